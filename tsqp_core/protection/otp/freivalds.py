"""Freivalds' check of an integer product, exactly, modulo the prime ``Q = 2**61 - 1``.

To check ``Y = X . W^T`` (``X`` ``[R, K]``, ``W`` ``[N, K]``, ``Y`` ``[R, N]``, all integers)
without recomputing it: draw a secret probe ``s`` uniform in ``Z_Q^N``, precompute
``w_s = W^T s mod Q`` once, and accept row ``r`` iff ``Y_r . s == X_r . w_s (mod Q)``.

**Soundness.** If a returned row ``Y'_r`` differs from ``Y_r`` by ``e != 0`` and both lie
within the range check ``|y| < Q/2``, then ``e`` is a nonzero vector of the field ``Z_Q``;
``e . s`` is then uniform over ``Z_Q`` for uniform ``s``, so a wrong row is accepted with
probability exactly ``1/Q = 2**-61`` per probe. The probe must stay secret (it never leaves
the TEE) and a failed check must end the session: accept/abort would otherwise be an oracle
on ``s``.

**Exact arithmetic in floats.** torch has no exact int64 GEMM fast path, so the dot products
run as float64 GEMMs on limbs small enough that every partial sum is an integer below
``2**53`` (exact in any summation order), and are recombined modulo ``Q`` in int64:
``Y mod Q`` and ``s`` in four 16-bit limbs (16 GEMV products, each < 2**32, sums over
``N <= 2**21``); ``X`` (|x| < 2**31) against ``w_s`` in eight 8-bit limbs (sums over
``K <= 2**14``); ``W`` (|w| < 2**24) against ``s`` in eight 8-bit limbs (sums over
``N <= 2**21``), in row blocks.
"""

from __future__ import annotations

import functools

import torch

Q = (1 << 61) - 1
#: Soundness of one check per row, in bits.
SOUNDNESS_BITS = 61
_BLOCK = 1 << 14


@functools.lru_cache(maxsize=16)
def _shifts(bits: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int64)


def _weighted_sum_mod(parts: torch.Tensor, shifts: list[int]) -> torch.Tensor:
    """``sum_i parts[..., i] * 2**shifts[i] mod Q`` for int64 ``parts`` of any sign.

    Each term: ``x = remainder(parts, Q) < 2**61``, written ``x = hi * 2**(61-s) + lo``, is
    ``hi + lo * 2**s`` modulo ``Q`` (``2**61 == 1``), a value below ``2**62``; four reduced
    terms sum below ``2**63``."""
    s = _shifts(tuple(b % 61 for b in shifts))
    x = torch.remainder(parts, Q)
    hi, lo = x >> (61 - s), x & ((1 << (61 - s)) - 1)
    terms = torch.remainder(hi + (lo << s), Q)
    total = torch.zeros(parts.shape[:-1], dtype=torch.int64)
    for start in range(0, terms.shape[-1], 4):
        total = torch.remainder(total + torch.remainder(terms[..., start:start + 4].sum(-1), Q), Q)
    return total


def _limbs(x: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Non-negative int64 ``x`` as ``count`` limbs of ``bits`` bits, float64, last dim."""
    mask = (1 << bits) - 1
    return torch.stack([((x >> (bits * i)) & mask) for i in range(count)], dim=-1).to(torch.float64)


def _combine(parts: torch.Tensor, bits: int) -> torch.Tensor:
    """``sum_i parts[..., i] * 2**(bits*i) mod Q`` for integer ``parts`` (int64, or float64
    holding exact integers)."""
    return _weighted_sum_mod(parts.to(torch.int64), [bits * i for i in range(parts.shape[-1])])


def probe(n: int, rng) -> torch.Tensor:
    """A secret probe: ``n`` integers uniform in ``[0, Q)`` from ``rng`` (a
    :class:`~tsqp_core.protection.SecureRandom`), by rejection of 61-bit draws."""
    out = torch.empty(0, dtype=torch.int64)
    while out.numel() < n:
        draw = rng.int64((n - out.numel() + 8,), bits=61)
        out = torch.cat([out, draw[draw < Q]])
    return out[:n]


def weight_probe(w_int: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``w_s = W^T s mod Q`` for ``W`` ``[N, K]`` (|w| < 2**24) and ``s`` ``[N]``: ``[K]``."""
    s8 = _limbs(s, 8, 8)  # [N, 8]
    acc = torch.zeros(w_int.shape[1], 8, dtype=torch.int64)
    for start in range(0, w_int.shape[0], _BLOCK):  # keeps the float64 copy of W small
        block = w_int[start:start + _BLOCK].to(torch.float64)
        acc = torch.remainder(acc + (block.T @ s8[start:start + _BLOCK]).to(torch.int64), Q)
    return _combine(acc, 8)


def left(y_int: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``Y s mod Q`` per row, ``Y`` ``[R, N]`` (any int64), ``s`` ``[N]`` in ``[0, Q)``."""
    y = torch.remainder(y_int, Q)
    s16 = _limbs(s, 16, 4)  # [N, 4]
    # parts[r, a, b] = sum_j limb_a(y_rj) limb_b(s_j): each below 2**53, exact
    parts = torch.stack([((y >> (16 * a)) & 0xFFFF).to(torch.float64) @ s16 for a in range(4)],
                        dim=1).to(torch.int64)
    # group by a + b (the power of 2**16 each part carries): 7 sums, each below 2**55
    groups = torch.stack([sum(parts[:, a, c - a] for a in range(max(0, c - 3), min(c, 3) + 1))
                          for c in range(7)], dim=-1)
    return _weighted_sum_mod(groups, [16 * c for c in range(7)])


def right(x_int: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    """``X w_s mod Q`` per row, ``X`` ``[R, K]`` (|x| < 2**31), ``w_s`` ``[K]`` in ``[0, Q)``."""
    return _combine(x_int.to(torch.float64) @ _limbs(w_s, 8, 8), 8)


def verify(x_int: torch.Tensor, y_int: torch.Tensor, s: torch.Tensor,
           w_s: torch.Tensor) -> torch.Tensor:
    """Per row of ``X`` ``[R, K]`` and ``Y`` ``[R, N]``: does it pass? (bool ``[R]``)."""
    return left(y_int, s) == right(x_int, w_s)
