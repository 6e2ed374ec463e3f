"""Residue number system over primes below 256: centred int8 residues and Garner's CRT.

An integer ``y`` with ``|y| < M/2``, ``M = p_1 ... p_k``, is carried as its ``k`` residues
``y mod p_i``, each centred into ``[-(p_i - 1)/2, (p_i - 1)/2]`` so that it fits an int8 and
an int8 x int8 -> int32 GEMM (``torch._int_mm``) computes exact products of residues for
reduction dimensions ``K < 2**31 / 127**2`` (~133 000). :class:`Crt` rebuilds ``y`` from its
residues (Garner's mixed-radix algorithm, all in int64: every intermediate stays below
``M < 2**63``).
"""

from __future__ import annotations

import math
import torch

#: The largest primes below 256, in descending order; a modulus takes the first ``k``.
PRIMES: tuple[int, ...] = (251, 241, 239, 233, 229, 227, 223, 211, 199, 197, 193, 191)
#: With k primes the modulus must stay below 2**63 for int64 reconstruction: at most 8.
MAX_PRIMES = 8
#: Largest reduction dimension for which an int8 residue product is exact in int32.
MAX_K_INT32 = (2**31 - 1) // (127 * 127)


def primes(k: int) -> tuple[int, ...]:
    if not 1 <= k <= MAX_PRIMES:
        raise ValueError(f"k must be in [1, {MAX_PRIMES}] (the modulus must fit int64), got {k}")
    return PRIMES[:k]


def modulus(ps: tuple[int, ...]) -> int:
    return math.prod(ps)


def centre(r: torch.Tensor, p: int) -> torch.Tensor:
    """``r`` (any integers) reduced mod ``p`` into ``[-(p-1)/2, (p-1)/2]``, same dtype."""
    half = p // 2  # p is odd: [0, p) - half is exactly [-half, half]
    return torch.remainder(r + half, p) - half


def residues(x: torch.Tensor, ps: tuple[int, ...]) -> torch.Tensor:
    """Centred residues of int64 ``x`` as int8 ``[k, *x.shape]``."""
    return torch.stack([centre(x, p).to(torch.int8) for p in ps])


class Crt:
    """Reconstruction from residues modulo ``ps`` (pairwise coprime, product < 2**63).

    Garner's algorithm: the mixed-radix digits ``v_i`` of ``y = v_1 + v_2 p_1 +
    v_3 p_1 p_2 + ...`` are ``v_i = (r_i - sum_{j<i} v_j (P_j mod p_i)) / P_{i-1} mod p_i``,
    with ``P_j = p_1 ... p_j``: every intermediate is below ``2**24``, so the digits are
    computed in int32 with one reduction each, and only the final sum is int64."""

    def __init__(self, ps: tuple[int, ...]) -> None:
        if len(ps) > MAX_PRIMES or modulus(ps) >= 2**63:
            raise ValueError("the modulus must stay below 2**63")
        self.ps = tuple(ps)
        self.M = modulus(ps)
        self.half = self.M // 2
        self._radix = [math.prod(ps[:i]) for i in range(len(ps))]
        self._inv = [pow(self._radix[i], -1, p) for i, p in enumerate(ps)]
        # (P_j mod p_i) for j < i
        self._cross = [[self._radix[j] % p for j in range(i)] for i, p in enumerate(ps)]

    def rebuild(self, res: torch.Tensor) -> torch.Tensor:
        """``y`` in ``(-M/2, M/2]`` (int64) from residues ``res`` ``[k, ...]`` (any integer
        dtype, entries of magnitude below ``2**16``, any representative of each class)."""
        if res.shape[0] != len(self.ps):
            raise ValueError(f"{res.shape[0]} residues for {len(self.ps)} primes")
        res = res.to(torch.int32)
        digits: list[torch.Tensor] = []
        for i, p in enumerate(self.ps):
            acc = res[i]
            for v, c in zip(digits, self._cross[i]):
                acc = acc - v * c  # |acc| < 2**16 + 8 * 2**16
            digits.append(torch.remainder(acc * self._inv[i], p))  # |.| < 2**25
        y = torch.zeros(res.shape[1:], dtype=torch.int64)
        for v, radix in zip(digits, self._radix):
            y += v.to(torch.int64) * radix
        return torch.where(y > self.half, y - self.M, y)
