"""The fused backend: runs one call (a maximal run of GPU ops) as a short compiled program.

A call's op list is compiled once into steps:

* ``qkv_proj`` -> one matmul against the concatenated ``[Wq; Wk; Wv]``, split into views;
* ``rope, attn_scores, attn_softmax, attn_context`` of a layer -> one attention step: RoPE
  (in place over q and k together when ``qkv_proj`` is in the same call, on copies when q/k
  came over the wire), the new keys and values written into the preallocated cache, then
  flash-attn or torch SDPA. The scores and probabilities are never materialised; they cannot
  be outputs of such a call, since no op outside it reads them;
* ``gate_up_proj`` (+ ``act``) -> one matmul against ``[Wgate; Wup]``, then
  ``silu(g) * u`` in place;
* any other op -> the reference implementation from :mod:`tsqp_core.ops` (the oracle).

Numerics follow transformers' LLaMA in the configured dtype: RoPE tables computed in fp32 and
cast, ``x*cos + rotate_half(x)*sin`` rounded in the same order, RMSNorm and softmax upcast
internally only; nothing else leaves the dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from tsqp_core import ops
from tsqp_core.executor import Backend, GpuCall
from tsqp_core.graph import Op
from tsqp_core.models.source import Checkpoint, load_weights

from tsqp_executor_fused.cache import PreallocatedKVCache

ATTENTION = ("rope", "attn_scores", "attn_softmax", "attn_context")
#: Fused separately; their per-projection weights are never loaded.
CONCATENATED = frozenset({"qkv_proj", "gate_up_proj"})
#: Compiled calls kept (a plan has at most 6L + 2 calls; the server keeps 8 plans).
MAX_PROGRAMS = 2048

Step = Callable[[ops.OpContext, dict[str, torch.Tensor]], None]


def load_flash_attn(required: bool) -> Callable[..., torch.Tensor] | None:
    """``flash_attn_func`` if the optional package imports, else ``None`` (or an error)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as exc:
        if required:
            raise ValueError(f"executor.options.attention=flash but flash-attn does not import "
                             f"({exc}); install tsqp-executor-fused[gpu] or use auto") from None
        return None
    return flash_attn_func


class FusedBackend(Backend):
    def __init__(self, ckpt: Checkpoint, kinds: frozenset[str], dtype: torch.dtype,
                 device: torch.device, options: Any) -> None:
        self.device = device
        self.dtype = dtype
        self.dims = d = ckpt.dims
        self.options = options
        self.eps = float(ckpt.config.rms_norm_eps)
        self.rope = ops.Rope(ckpt.config, d.head_dim, device)
        self.scale = d.head_dim ** -0.5
        self.split_qkv = [d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim]
        self.flash = None
        if options.attention != "sdpa":
            usable = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            if options.attention == "flash" and not usable:
                raise ValueError("executor.options.attention=flash needs CUDA and bf16/fp16 "
                                 f"(have {device.type}, {dtype})")
            if usable:
                self.flash = load_flash_attn(required=options.attention == "flash")
        self.attention = "flash-attn" if self.flash is not None else "sdpa"
        with torch.inference_mode():
            self.weights = load_weights(ckpt, kinds - CONCATENATED, dtype, device)
            self.qkv: dict[int, torch.Tensor] = {}
            self.gate_up: dict[int, torch.Tensor] = {}
            for i in range(d.layers):
                p = f"model.layers.{i}."
                if "qkv_proj" in kinds:
                    self.qkv[i] = torch.cat([ckpt.get(p + f"self_attn.{n}_proj.weight", dtype, device)
                                             for n in "qkv"])
                if "gate_up_proj" in kinds:
                    self.gate_up[i] = torch.cat([ckpt.get(p + f"mlp.{n}_proj.weight", dtype, device)
                                                 for n in ("gate", "up")])
            # half-width RoPE tables for every position (cos and sin repeat across halves),
            # computed like transformers: fp32, then cast. 1B shape: 131072 x 32 x 2 bf16 = 16 MB.
            # Dynamic RoPE's frequencies follow the longest sequence seen: no fixed table.
            half = d.head_dim // 2
            n = d.max_positions if "rope" in kinds and not self.rope.dynamic else 0
            cos, sin = self.rope.cos_sin(torch.arange(n, device=device), dtype)
            self._cos, self._sin = cos[:, :half].contiguous(), sin[:, :half].contiguous()
        self._programs: dict[int, tuple[Sequence[Op], list[Step]]] = {}

    # --- the Backend interface ------------------------------------------------------------

    def new_cache(self) -> PreallocatedKVCache:
        d = self.dims
        return PreallocatedKVCache(kv_heads=d.kv_heads, head_dim=d.head_dim,
                                   max_positions=d.max_positions, dtype=self.dtype,
                                   device=self.device, seq_dim=1 if self.flash else 2,
                                   initial=self.options.cache_positions)

    def info(self) -> dict[str, Any]:
        return {"attention": self.attention}

    def run(self, call: GpuCall, env: dict[str, torch.Tensor], cache: Any,
            last_only: bool) -> None:
        ops_ = call.ops
        entry = self._programs.get(id(ops_))
        if entry is None or entry[0] is not ops_:  # keyed by identity: hashing ops costs µs
            if len(self._programs) >= MAX_PROGRAMS:  # plans come and go with each hello
                self._programs.clear()
            entry = self._programs[id(ops_)] = (ops_, self.compile(ops_))
        ctx = ops.OpContext(self.dims, self.weights, self.rope, self.eps, cache, last_only)
        with torch.inference_mode():
            if self.device.type != "cpu":
                check_positions(env.get("pos"), self.dims.max_positions)
                for name, t in env.items():
                    env[name] = t.to(self.device)
            for step in entry[1]:
                step(ctx, env)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- compiling a call -----------------------------------------------------------------

    def compile(self, ops_: Sequence[Op]) -> list[Step]:
        """The steps that run ``ops_``: fused where a pattern matches, reference otherwise."""
        steps: list[Step] = []
        kinds = [op.kind for op in ops_]
        i = 0
        while i < len(ops_):
            op = ops_[i]
            if op.kind == "qkv_proj" and tuple(kinds[i + 1:i + 5]) == ATTENTION:
                steps.append(self._qkv_attention_step(op, ops_[i + 1:i + 5]))
                n = 5
            elif op.kind == "rope" and tuple(kinds[i:i + 4]) == ATTENTION:
                steps.append(self._attention_step(ops_[i:i + 4]))
                n = 4
            elif op.kind == "qkv_proj":
                steps.append(self._matmul_split_step(self.qkv[op.layer], op.inputs[0],
                                                     op.outputs, self.split_qkv))
                n = 1
            elif op.kind == "gate_up_proj":
                inter = self.dims.intermediate
                if i + 1 < len(ops_) and kinds[i + 1] == "act":
                    steps.append(self._mlp_up_step(op, ops_[i + 1]))
                    n = 2
                else:
                    steps.append(self._matmul_split_step(self.gate_up[op.layer], op.inputs[0],
                                                         op.outputs, [inter, inter]))
                    n = 1
            else:
                steps.append(self._reference_step(op))
                n = 1
            i += n
        return steps

    @staticmethod
    def _reference_step(op: Op) -> Step:
        impl = ops.REFERENCE_OPS[op.kind]
        ins, outs = op.inputs, op.outputs

        def step(ctx: ops.OpContext, env: dict[str, torch.Tensor]) -> None:
            for name, value in zip(outs, impl(ctx, op, *(env[n] for n in ins))):
                env[name] = value

        return step

    @staticmethod
    def _matmul_split_step(weight: torch.Tensor, src: str, outs: tuple[str, ...],
                           sizes: list[int]) -> Step:
        def step(ctx: ops.OpContext, env: dict[str, torch.Tensor]) -> None:
            for name, value in zip(outs, F.linear(env[src], weight).split(sizes, dim=-1)):
                env[name] = value

        return step

    def _mlp_up_step(self, gate_up: Op, act: Op) -> Step:
        weight, inter = self.gate_up[gate_up.layer], self.dims.intermediate
        src, out = gate_up.inputs[0], act.outputs[0]

        def step(ctx: ops.OpContext, env: dict[str, torch.Tensor]) -> None:
            g, u = F.linear(env[src], weight).split([inter, inter], dim=-1)
            env[out] = F.silu(g, inplace=True).mul_(u)  # g is this call's own: safe in place

        return step

    def _qkv_attention_step(self, qkv: Op, four: Sequence[Op]) -> Step:
        """qkv_proj + rope..attn_context of one layer: one matmul, then RoPE in place over
        q and k together (adjacent in the matmul's output, and this call's own)."""
        weight, src, layer = self.qkv[qkv.layer], qkv.inputs[0], qkv.layer
        pos_name, out = four[0].inputs[2], four[3].outputs[0]
        heads, kv_heads, head_dim = self.dims.heads, self.dims.kv_heads, self.dims.head_dim
        width = (heads + kv_heads) * head_dim

        def step(ctx: ops.OpContext, env: dict[str, torch.Tensor]) -> None:
            qkv_ = F.linear(env[src], weight)
            b, t, _ = qkv_.shape
            qk = qkv_[..., :width].view(b, t, heads + kv_heads, head_dim)
            rope_inplace(qk, *self._cos_sin(env[pos_name]))
            env[out] = self._attend(layer, qk[:, :, :heads], qk[:, :, heads:],
                                    qkv_[..., width:].view(b, t, kv_heads, head_dim), ctx.cache)

        return step

    def _attention_step(self, four: Sequence[Op]) -> Step:
        """rope..attn_context of one layer, q/k/v made outside this call: RoPE on copies,
        never in place over buffers that arrived over the wire."""
        rope, _, _, context = four
        layer = rope.layer
        q_name, k_name, pos_name = rope.inputs
        v_name, out = context.inputs[1], context.outputs[0]
        heads, kv_heads, head_dim = self.dims.heads, self.dims.kv_heads, self.dims.head_dim

        def step(ctx: ops.OpContext, env: dict[str, torch.Tensor]) -> None:
            q, k, v = env[q_name], env[k_name], env[v_name]
            b, t, _ = q.shape
            qh = q.view(b, t, heads, head_dim).clone()
            kh = k.view(b, t, kv_heads, head_dim).clone()
            cos, sin = self._cos_sin(env[pos_name])
            rope_inplace(qh, cos, sin)
            rope_inplace(kh, cos, sin)
            env[out] = self._attend(layer, qh, kh, v.view(b, t, kv_heads, head_dim), ctx.cache)

        return step

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: PreallocatedKVCache) -> torch.Tensor:
        """Append rotated ``k`` and ``v`` ``[B, T, Hkv, d]`` to the cache, attend with ``q``
        ``[B, T, H, d]`` (the last T positions) over all cached positions: ``[B, T, H*d]``."""
        keys, values = cache.extend("k", layer, k), cache.extend("v", layer, v)
        b, t, heads, head_dim = q.shape
        if self.flash is not None:  # BSHD; causal is bottom-right aligned for t < keys
            o = self.flash(q, keys, values, causal=True, softmax_scale=self.scale)
        else:
            o = sdpa(q.transpose(1, 2), keys, values, self.scale,
                     self.dims.kv_heads != heads).transpose(1, 2)
        return o.reshape(b, t, heads * head_dim)

    def _cos_sin(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Half-width RoPE tables ``[1, T, 1, d/2]`` at ``pos``. On the CPU an out-of-range
        position is an IndexError here; on a device, :func:`check_positions` ran first."""
        t = pos.shape[0]
        if self.rope.dynamic:
            half = self.dims.head_dim // 2
            cos, sin = self.rope.cos_sin(pos, self.dtype)
            return cos[:, :half].reshape(1, t, 1, -1), sin[:, :half].reshape(1, t, 1, -1)
        return (self._cos.index_select(0, pos).view(1, t, 1, -1),
                self._sin.index_select(0, pos).view(1, t, 1, -1))


def check_positions(pos: torch.Tensor | None, limit: int) -> None:
    """Positions must index the RoPE tables: checked on the host, before a device kernel
    could fault on them."""
    if pos is not None and pos.numel():
        lo, hi = (int(x) for x in pos.aminmax())
        if lo < 0 or hi >= limit:
            raise ValueError(f"positions [{lo}, {hi}] outside the model's context [0, {limit})")


def rope_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``x = x*cos + rotate_half(x)*sin`` in place over ``x`` ``[B, T, H, d]``, rounding in
    transformers' order: ``(x1*c) - (x2*s)`` and ``(x2*c) + (x1*s)``, each product rounded."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    x2s, x1s = x2 * sin, x1 * sin
    x1.mul_(cos).sub_(x2s)
    x2.mul_(cos).add_(x1s)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
         gqa: bool) -> torch.Tensor:
    """Causal attention of ``q`` ``[B, H, T, d]`` (the last ``T`` positions) over ``k``/``v``
    ``[B, Hkv, S, d]``. SDPA's ``is_causal`` aligns the mask top-left, right only when
    ``T == S``; a single query sees every key; otherwise the mask is explicit."""
    t, s = q.shape[2], k.shape[2]
    mask = None
    if 1 < t < s:
        mask = ops.causal_mask(t, s, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=t > 1 and t == s,
                                          scale=scale, enable_gqa=gqa)
