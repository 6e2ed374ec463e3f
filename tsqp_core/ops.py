"""Reference implementations of every op in the forward graph: the oracle.

Plain torch, written to match Hugging Face transformers' LLaMA numerics step by step
(RMSNorm in fp32 then cast back, RoPE tables in fp32, softmax in fp32). The ``torch`` TEE-op
library and the ``unfused`` executor both run these functions; faster variants are trusted
only after a parity test against them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from tsqp_core.graph import Dims, Op


# --- state ---------------------------------------------------------------------------------


@dataclass
class KVCache:
    """One generation's keys and values per layer, on the side that runs attention.

    Stored rotated keys ``[B, Hkv, S, d]`` and values ``[B, Hkv, S, d]``; grown by
    concatenation (simple and exact; the fused executor preallocates)."""

    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)

    def length(self, layer: int, which: str = "k") -> int:
        """Positions cached for ``layer`` (keys or values)."""
        t = (self.k if which == "k" else self.v).get(layer)
        return 0 if t is None else t.shape[2]

    def append(self, which: str, layer: int, new: torch.Tensor) -> torch.Tensor:
        store = self.k if which == "k" else self.v
        old = store.get(layer)
        # ``new`` may be a view of a borrowed transport frame (shm): keep a copy, never the view
        full = new.clone() if old is None else torch.cat([old, new], dim=2)
        store[layer] = full
        return full


# --- RoPE ------------------------------------------------------------------------------------


#: RoPE variants tsqp implements (each checked against transformers in the tests).
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def rope_parameters(config: Any) -> dict[str, Any]:
    """The model's RoPE parameters (transformers' ``rope_parameters``, legacy keys folded in),
    with ``rope_type`` and ``rope_theta`` always present."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def check_rope(config: Any) -> None:
    """Refuse what :func:`rope_inv_freq` cannot compute like transformers (``ValueError``)."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: "
                         f"{', '.join(ROPE_TYPES)})")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported (RoPE over the whole head)")
    needs = {"linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings")}.get(rope_type, ())
    missing = [k for k in needs if params.get(k) is None]
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs {', '.join(missing)}")


def rope_context(config: Any) -> int:
    """Positions a model may use: ``max_position_embeddings``, times ``factor`` for dynamic
    RoPE (whose purpose is to run past the trained context: transformers sets no limit)."""
    params = rope_parameters(config)
    if params["rope_type"] == "dynamic":
        return int(config.max_position_embeddings * float(params["factor"]))
    return int(config.max_position_embeddings)


def rope_inv_freq(config: Any, head_dim: int, seq_len: int | None = None
                  ) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, as transformers computes them.

    ``default``; ``linear`` (frequencies / factor); ``llama3`` (Llama 3.1's smoothed scaling);
    ``dynamic`` (NTK: the base grows with ``seq_len`` past ``max_position_embeddings``, computed
    in the same dtypes as transformers so both give the same bits; ``None`` is the model's
    own context, i.e. the default frequencies)."""
    check_rope(config)
    params = rope_parameters(config)
    theta = float(params["rope_theta"])
    rope_type = params["rope_type"]
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "default":
        return inv, 1.0
    factor = float(params["factor"])
    if rope_type == "linear":
        return inv / factor, 1.0
    if rope_type == "dynamic":
        max_pos = config.max_position_embeddings
        if seq_len is None:
            length: Any = max_pos
        else:  # transformers passes max(position_ids) + 1 as an int64 tensor
            length = torch.maximum(torch.tensor(seq_len, dtype=torch.int64),
                                   torch.tensor(max_pos, dtype=torch.int64))
        base = theta * ((factor * length / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
        arange = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (base ** arange), 1.0
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_ctx = float(params["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


class Rope:
    """cos/sin tables for positions, computed like transformers (fp32, then cast).

    Dynamic RoPE keeps transformers' state: a forward reaching past every position seen so
    far (and past ``max_position_embeddings``) recomputes the frequencies for its length; one
    back under ``max_position_embeddings`` returns to the original ones. Keys already in a KV
    cache keep the rotation they got, as in transformers."""

    def __init__(self, config: Any, head_dim: int, device: str | torch.device = "cpu") -> None:
        self.config, self.head_dim, self.device = config, head_dim, device
        inv, self.scaling = rope_inv_freq(config, head_dim)
        self.inv_freq = self.original_inv_freq = inv.to(device)
        self.dynamic = rope_parameters(config)["rope_type"] == "dynamic"
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings

    def cos_sin(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dynamic and pos.numel():
            self._dynamic_update(int(pos.max()) + 1)
        freqs = pos.to(self.inv_freq.device, torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def _dynamic_update(self, seq_len: int) -> None:
        """transformers' ``dynamic_rope_update``, step for step."""
        if seq_len > self.max_seq_len_cached:  # growth
            inv, self.scaling = rope_inv_freq(self.config, self.head_dim, seq_len)
            self.inv_freq = inv.to(self.device)
            self.max_seq_len_cached = seq_len
        if seq_len < self.original_max_seq_len < self.max_seq_len_cached:  # reset
            self.inv_freq = self.original_inv_freq
            self.max_seq_len_cached = self.original_max_seq_len


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


# --- the ops ----------------------------------------------------------------------------------


@dataclass
class OpContext:
    """What an op needs besides its inputs: dims, weights by HF name, RoPE, the KV cache."""

    dims: Dims
    weights: Mapping[str, torch.Tensor]
    rope: Rope
    eps: float
    cache: KVCache
    #: Tail ops (final_norm) keep only the last position: generation needs no other logits.
    last_only: bool = False
    #: What every layer of a forward shares, made by the first layer that needs it -- as
    #: transformers makes its RoPE tables and causal mask once per forward, not per layer
    #: (the TEE side runs one context for a whole forward).
    shared: dict[Any, Any] = field(default_factory=dict)

    def w(self, op: Op, suffix: str) -> torch.Tensor:
        return self.weights[f"model.layers.{op.layer}.{suffix}"]

    def cos_sin(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables at ``pos`` (the same tensor for every layer of a forward)."""
        hit = self.shared.get(("rope", dtype))
        if hit is None or hit[0] is not pos:
            hit = self.shared["rope", dtype] = (pos, *self.rope.cos_sin(pos, dtype))
        return hit[1], hit[2]

    def blocked(self, tokens: int, keys: int, device: torch.device) -> torch.Tensor:
        """True where a query may not attend to a key (:func:`causal_mask` inverted)."""
        key = ("blocked", tokens, keys, device)
        hit = self.shared.get(key)
        if hit is None:
            hit = self.shared[key] = ~causal_mask(tokens, keys, device)
        return hit


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm``: normalised in fp32, cast back, then scaled.

    On the CPU the fp32 part is ``F.rms_norm``: the same arithmetic in one call from Python
    instead of five (bit-identical here, ``tests/test_ops.py``; it runs once or twice per
    layer on each side, and on a small model every dispatch shows) -- with the weight when
    everything is fp32, else without it, then cast and scaled in ``dtype`` as transformers
    does. Elsewhere -- devices whose kernel may round differently -- the ops are spelled out."""
    if x.is_cpu:
        if x.dtype is torch.float32 and weight.dtype is torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return weight * F.rms_norm(x.to(torch.float32), (x.shape[-1],), None, eps).to(x.dtype)
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class InputError(ValueError):
    """A call's input values are outside what its op accepts (a token id beyond the
    vocabulary): the caller's mistake, refused like a malformed request, not logged as a
    server error."""


def causal_mask(tokens: int, keys: int, device: torch.device) -> torch.Tensor:
    """True where query ``i`` (at position ``keys - tokens + i``) may attend to key ``j``."""
    past = keys - tokens
    q = torch.arange(tokens, device=device)[:, None] + past
    k = torch.arange(keys, device=device)[None, :]
    return k <= q


def op_embed(ctx: OpContext, op: Op, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    w = ctx.weights["model.embed_tokens.weight"]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= w.shape[0]):
        raise InputError(f"token id out of range [0, {w.shape[0]})")
    return (F.embedding(ids.to(w.device), w),)


def op_input_norm(ctx: OpContext, op: Op, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (rms_norm(h, ctx.w(op, "input_layernorm.weight"), ctx.eps),)


def op_qkv_proj(ctx: OpContext, op: Op, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(F.linear(x, ctx.w(op, f"self_attn.{n}_proj.weight")) for n in "qkv")


def op_rope(ctx: OpContext, op: Op, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor):
    qh, kh = split_heads(q, ctx.dims.heads), split_heads(k, ctx.dims.kv_heads)
    cos, sin = ctx.cos_sin(pos, q.dtype)
    return (qh * cos) + (rotate_half(qh) * sin), (kh * cos) + (rotate_half(kh) * sin)


def op_attn_scores(ctx: OpContext, op: Op, qr: torch.Tensor, kr: torch.Tensor):
    keys = ctx.cache.append("k", op.layer, kr)  # [B, Hkv, S, d]
    b, h, t, d = qr.shape
    group = h // keys.shape[1]
    s = qr.reshape(b, keys.shape[1], group, t, d) @ keys.unsqueeze(2).transpose(-1, -2)
    return (s.reshape(b, h, t, keys.shape[2]),)


def op_attn_softmax(ctx: OpContext, op: Op, s: torch.Tensor):
    scale = ctx.dims.head_dim ** -0.5
    scores = (s * scale).masked_fill(ctx.blocked(s.shape[2], s.shape[3], s.device),
                                     float("-inf"))
    return (torch.softmax(scores, dim=-1, dtype=torch.float32).to(s.dtype),)


def op_attn_context(ctx: OpContext, op: Op, p: torch.Tensor, v: torch.Tensor):
    values = ctx.cache.append("v", op.layer, split_heads(v, ctx.dims.kv_heads))
    b, h, t, s = p.shape
    hk = values.shape[1]
    c = p.reshape(b, hk, h // hk, t, s) @ values.unsqueeze(2)  # [B, Hkv, G, T, d]
    return (merge_heads(c.reshape(b, h, t, -1)),)


def op_o_proj(ctx: OpContext, op: Op, c: torch.Tensor):
    return (F.linear(c, ctx.w(op, "self_attn.o_proj.weight")),)


def op_residual(ctx: OpContext, op: Op, h: torch.Tensor, delta: torch.Tensor):
    return (h + delta,)


def op_post_norm(ctx: OpContext, op: Op, h: torch.Tensor):
    return (rms_norm(h, ctx.w(op, "post_attention_layernorm.weight"), ctx.eps),)


def op_gate_up_proj(ctx: OpContext, op: Op, x: torch.Tensor):
    return (F.linear(x, ctx.w(op, "mlp.gate_proj.weight")),
            F.linear(x, ctx.w(op, "mlp.up_proj.weight")))


def op_act(ctx: OpContext, op: Op, g: torch.Tensor, u: torch.Tensor):
    return (F.silu(g) * u,)


def op_down_proj(ctx: OpContext, op: Op, m: torch.Tensor):
    return (F.linear(m, ctx.w(op, "mlp.down_proj.weight")),)


def op_final_norm(ctx: OpContext, op: Op, h: torch.Tensor):
    if ctx.last_only:
        h = h[:, -1:]
    return (rms_norm(h, ctx.weights["model.norm.weight"], ctx.eps),)


def op_lm_head(ctx: OpContext, op: Op, x: torch.Tensor):
    return (F.linear(x, ctx.weights["lm_head.weight"]),)


OpFn = Callable[..., tuple[torch.Tensor, ...]]

REFERENCE_OPS: dict[str, OpFn] = {
    "embed": op_embed,
    "input_norm": op_input_norm,
    "qkv_proj": op_qkv_proj,
    "rope": op_rope,
    "attn_scores": op_attn_scores,
    "attn_softmax": op_attn_softmax,
    "attn_context": op_attn_context,
    "o_proj": op_o_proj,
    "attn_residual": op_residual,
    "post_norm": op_post_norm,
    "gate_up_proj": op_gate_up_proj,
    "act": op_act,
    "down_proj": op_down_proj,
    "mlp_residual": op_residual,
    "final_norm": op_final_norm,
    "lm_head": op_lm_head,
}


def run_op(impls: Mapping[str, OpFn], ctx: OpContext, op: Op, env: dict[str, torch.Tensor]) -> None:
    """Run ``op`` with ``impls`` reading its inputs from ``env`` and writing its outputs."""
    outs = impls[op.kind](ctx, op, *(env[n] for n in op.inputs))
    for name, value in zip(op.outputs, outs):
        env[name] = value
