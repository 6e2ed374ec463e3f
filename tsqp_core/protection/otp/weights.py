"""The public weights as the residue scheme uses them, computed the same way on both sides.

For each weight product (``qkv_proj``: ``[Wq; Wk; Wv]``, ``gate_up_proj``: ``[Wgate; Wup]``,
``o_proj``, ``down_proj``, ``lm_head``) the weight ``W`` ``[N, K]`` is quantised per output
row to ``bits`` bits (:func:`~.fixed.quantize`, on the CPU in float64 so that both sides get
the same integers), then reduced modulo each prime: ``T[i] = W_int^T mod p_i``, int8
``[k, K, N]`` (the layout ``torch._int_mm`` reads fastest). The GPU side keeps only ``T``;
the TEE side also keeps ``W_int`` (for Freivalds probes), the row exponents (to dequantise)
and the row norms (for the range bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tsqp_core.protection.otp.fixed import quantize
from tsqp_core.protection.otp.rns import centre

if TYPE_CHECKING:
    from tsqp_core.graph import Op
    from tsqp_core.protection.base import PublicWeights

#: Op kinds a residue scheme can carry: products of a private input with a public weight.
LINEAR_KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


@dataclass
class QuantWeight:
    #: ``W_int^T mod p_i`` centred, int8 ``[k, K, N]``.
    residues: torch.Tensor
    #: ``W_int`` int32 ``[N, K]`` (|w| <= 2**(bits-1)); TEE side only (None on the GPU side).
    w_int: torch.Tensor | None
    #: Row exponents: ``W ~= w_int * 2**-exps[:, None]``.
    exps: torch.Tensor
    #: Largest row norm ``max_j ||w_int[j]||``, for the Cauchy-Schwarz bound.
    max_norm: float
    #: Per-row norms ``||w_int[j]||`` (float64 ``[N]``).
    norms: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.residues.shape[2]

    @property
    def in_features(self) -> int:
        return self.residues.shape[1]


def quantize_weight(w: torch.Tensor, bits: int, primes: tuple[int, ...],
                    keep_int: bool) -> QuantWeight:
    """``w`` ``[N, K]`` (any float dtype, on the CPU) as a :class:`QuantWeight`."""
    w_int, exps = quantize(w, bits)
    w_int = w_int.to(torch.int32)  # |w| <= 2**23: int32 arithmetic is exact and faster
    norms = w_int.to(torch.float64).norm(dim=-1)
    w_t = w_int.T.contiguous()  # transpose once; reduce it prime by prime into place
    residues = torch.empty((len(primes), *w_t.shape), dtype=torch.int8)
    for i, p in enumerate(primes):
        residues[i] = centre(w_t, p)
    return QuantWeight(residues, w_int if keep_int else None, exps,
                       float(norms.max()) if norms.numel() else 0.0, norms)


#: Quantised weights of the checkpoint last used in this process, by (layer, kind, bits,
#: primes): a second ``bind`` (another run, the attack pass) or an in-process GPU side
#: reuses them. Process memory only -- never written to disk, where the TEE could not tell a
#: changed file from its own.
_MEMO: dict[tuple, QuantWeight] = {}
_MEMO_CKPT: list[str] = []


def quantized(weights: "PublicWeights", op: "Op", bits: int, primes: tuple[int, ...],
              store: bool) -> QuantWeight:
    """:func:`quantize_weight` of ``op``'s weights (``qkv``/``gate_up`` concatenated), from
    this process's memo when present; ``store`` keeps the result (with ``w_int``) there."""
    ckpt = str(weights.path)
    if _MEMO_CKPT != [ckpt]:  # another checkpoint: forget the last one's
        _MEMO.clear()
        _MEMO_CKPT[:] = [ckpt]
    key = (op.layer, op.kind, bits, primes)
    hit = _MEMO.get(key)
    if hit is not None:
        return hit
    q = quantize_weight(torch.cat(weights.of(op, torch.float32)), bits, primes, keep_int=store)
    if store:
        _MEMO[key] = q
    return q
