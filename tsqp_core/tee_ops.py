"""The TEE-ops family: implementations of the ops a partition keeps inside the TEE."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Mapping

import torch

from tsqp_core import codec, ops
from tsqp_core.graph import Op
from tsqp_core.plugins import PluginOptions

try:  # built by setup.py where a C compiler is at hand; else RoPE runs in torch
    from tsqp_core.tee import _rope
except ImportError:  # pragma: no cover - exercised by monkeypatching it away
    _rope = None  # type: ignore[assignment]

#: The dtypes ``_rope`` reads, and the most values of ``q`` it is given: above that (a
#: prefill), torch's kernels, vectorised and on every thread, are as fast or faster.
_ROPE_KINDS = {torch.float32: 0, torch.bfloat16: 1}
ROPE_C_MAX = 1 << 14


class TeeOps(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, options: PluginOptions) -> None:
        self.options = options

    @abstractmethod
    def implementations(self) -> Mapping[str, ops.OpFn]:
        """Op kind -> function ``(ctx, op, *inputs) -> outputs``; kinds left out fall back
        to the reference implementations in :mod:`tsqp_core.ops`."""


class TorchTeeOps(TeeOps):
    """The reference torch implementations (RMSNorm, RoPE with Llama-3 scaling, causal
    fp32 softmax, SiLU*up, grouped-query attention), with RoPE and a decode step's softmax
    in fewer torch calls -- RoPE of a small tensor in one call to C (``tee/_rope.c``) --:
    the same arithmetic in the same order, so the same bits (``tests/test_ops.py``). On a
    small model each call from Python costs more than its arithmetic, and these two run
    once per layer in every forward."""

    name = "torch"

    def implementations(self) -> Mapping[str, ops.OpFn]:
        return {**ops.REFERENCE_OPS, "rope": op_rope, "attn_softmax": op_attn_softmax}


def op_rope(ctx: ops.OpContext, op: Op, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor):
    """:func:`ops.op_rope` in four torch calls per tensor instead of seven: with ``x`` split
    in halves ``[x1, x2]``, ``x*cos + rotate_half(x)*sin`` is ``[x1, x2]*[c, c] +
    [x2, x1]*[-s, s]`` -- each product rounded, then the sum, as transformers rounds it
    (negating ``s`` is exact)."""
    if _rope is not None and q.numel() <= ROPE_C_MAX:
        done = _rope_c(ctx, q, k, pos)
        if done is not None:
            return done
    cos, sin = _signed_tables(ctx, pos, q.dtype)
    return _rotated(q, ctx.dims.heads, cos, sin), _rotated(k, ctx.dims.kv_heads, cos, sin)


def _rope_c(ctx: ops.OpContext, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`op_rope` in one call to ``_rope``, into fresh ``[B, H, T, d]`` tensors; None
    where C may not read them (C reads raw memory: every size is checked here first)."""
    kind = _ROPE_KINDS.get(q.dtype)
    if kind is None or k.dtype is not q.dtype or q.dim() != 3 or not (q.is_cpu and k.is_cpu):
        return None
    b, t, width = q.shape
    heads, kv_heads, d = ctx.dims.heads, ctx.dims.kv_heads, ctx.dims.head_dim
    cos, sin = ctx.cos_sin(pos, q.dtype)  # [T, d] in q's dtype, on the host
    if (width != heads * d or k.shape != (b, t, kv_heads * d) or cos.shape != (t, d)
            or sin.shape != (t, d) or cos.dtype is not q.dtype or sin.dtype is not q.dtype
            or not (cos.is_cpu and sin.is_cpu and q.is_contiguous() and k.is_contiguous()
                    and cos.is_contiguous() and sin.is_contiguous())):
        return None
    qo = codec.tensor_of(codec.empty(q.dtype, (b, heads, t, d)), q.dtype)
    ko = codec.tensor_of(codec.empty(q.dtype, (b, kv_heads, t, d)), q.dtype)
    _rope.rope(q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), qo.data_ptr(),
               ko.data_ptr(), b, t, heads, kv_heads, d, kind)
    return qo, ko


def _signed_tables(ctx: ops.OpContext, pos: torch.Tensor, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, 2, d/2]`` tables at ``pos``: cos as ``[c, c]``, sin as ``[-s, s]`` (shared by
    every layer of a forward, like the reference's tables)."""
    hit = ctx.shared.get(("rope_signed", dtype))
    if hit is None or hit[0] is not pos:
        cos, sin = ctx.cos_sin(pos, dtype)  # [T, d], halves equal
        t, d = cos.shape
        signs = torch.tensor([[-1.0], [1.0]], dtype=dtype)
        hit = ctx.shared["rope_signed", dtype] = (
            pos, cos.view(t, 2, d // 2), sin.view(t, 2, d // 2) * signs)
    return hit[1], hit[2]


def _rotated(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, T, heads*d]`` as ``[B, heads, T, d]``, rotated."""
    b, t, width = x.shape
    d = width // heads
    xh = x.view(b, t, heads, 2, d // 2).transpose(1, 2)  # [B, H, T, 2, d/2]
    return (xh * cos + xh.flip(-2) * sin).view(b, heads, t, d)


def op_attn_softmax(ctx: ops.OpContext, op: Op, s: torch.Tensor):
    """:func:`ops.op_attn_softmax`; a single query (a decode step) sees every cached key, so
    there is nothing to mask."""
    if s.shape[2] != 1:
        return ops.op_attn_softmax(ctx, op, s)
    return (torch.softmax(s * ctx.dims.head_dim ** -0.5, dim=-1, dtype=torch.float32)
            .to(s.dtype),)
