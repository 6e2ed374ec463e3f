"""The fused backend: runs one call (a maximal run of GPU ops) as a short compiled program.

A call's op list is built once into steps:

* ``qkv_proj`` -> one matmul against the concatenated ``[Wq; Wk; Wv]``, split into views;
* ``rope, attn_scores, attn_softmax, attn_context`` of a layer -> one attention step: RoPE
  (in place over q and k together when ``qkv_proj`` is in the same call, on copies when q/k
  came over the wire), the new keys and values written into the preallocated cache, then
  flash-attn or torch SDPA. The scores and probabilities are never materialised; they cannot
  be outputs of such a call, since no op outside it reads them;
* ``gate_up_proj`` (+ ``act``) -> one matmul against ``[Wgate; Wup]``, then
  ``silu(g) * u`` in place;
* any other op -> the reference implementation from :mod:`tsqp_core.ops` (the oracle).

Every step reads its weights from ``ctx.weights`` by key (the checkpoint's names, plus
:data:`QKV`, :data:`GATE_UP` and the RoPE tables), never from a closure: the same steps,
built over a call's ops renumbered from layer 0, are what ``executor.options.compile=true``
hands to ``torch.compile`` (:mod:`tsqp_executor_fused.compiled`), one graph for every layer.

Numerics follow transformers' LLaMA in the configured dtype: RoPE tables computed in fp32 and
cast, ``x*cos + rotate_half(x)*sin`` rounded in the same order, RMSNorm and softmax upcast
internally only; nothing else leaves the dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F

from tsqp_core import ops
from tsqp_core.executor import Backend, GpuCall
from tsqp_core.graph import Op
from tsqp_core.models.source import Checkpoint, load_weights

from tsqp_executor_fused.cache import PreallocatedKVCache

if TYPE_CHECKING:
    from tsqp_executor_fused.compiled import Compiler

ATTENTION = ("rope", "attn_scores", "attn_softmax", "attn_context")
#: Fused separately; their per-projection weights are never loaded.
CONCATENATED = frozenset({"qkv_proj", "gate_up_proj"})
#: Compiled calls kept (a plan has at most 6L + 2 calls; the server keeps 8 plans).
MAX_PROGRAMS = 2048
#: The backend's own weights, beside the checkpoint's: per layer ``[Wq; Wk; Wv]`` and
#: ``[Wgate; Wup]``, and the half-width RoPE tables for every position.
QKV = "model.layers.{}.self_attn.qkv_proj.weight"
GATE_UP = "model.layers.{}.mlp.gate_up_proj.weight"
ROPE_COS, ROPE_SIN = "rope.cos", "rope.sin"
#: The weights each reference op reads from ``ctx.weights`` (``{}``: its layer).
REFERENCE_WEIGHTS: dict[str, tuple[str, ...]] = {
    "embed": ("model.embed_tokens.weight",),
    "input_norm": ("model.layers.{}.input_layernorm.weight",),
    "o_proj": ("model.layers.{}.self_attn.o_proj.weight",),
    "post_norm": ("model.layers.{}.post_attention_layernorm.weight",),
    "down_proj": ("model.layers.{}.mlp.down_proj.weight",),
    "final_norm": ("model.norm.weight",),
    "lm_head": ("lm_head.weight",),
}
#: Reference ops that cannot run inside a compiled graph: ``embed`` checks token ids on the
#: host; attention ops split across calls grow the KV cache themselves.
EAGER_ONLY = frozenset({"embed", "attn_scores", "attn_context"})

Step = Callable[[ops.OpContext, dict[str, torch.Tensor]], None]


@dataclass(frozen=True)
class Built:
    """One step of a call's program: the ops it runs, the values it reads from and writes
    into ``env``, and the ``ctx.weights`` keys it reads."""

    ops: tuple[Op, ...]
    step: Step
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    weights: tuple[str, ...]
    #: Never inside a compiled graph (see :data:`EAGER_ONLY`).
    eager_only: bool = False


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
        if options.attention == "flash" and options.compile:
            raise ValueError("executor.options.attention=flash does not compile (flash-attn is "
                             "opaque to torch.compile); use attention=auto or sdpa with compile")
        if options.attention != "sdpa" and not options.compile:
            usable = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            if options.attention == "flash" and not usable:
                raise ValueError("executor.options.attention=flash needs CUDA and bf16/fp16 "
                                 f"(have {device.type}, {dtype})")
            if usable:
                self.flash = load_flash_attn(required=options.attention == "flash")
        self.attention = "flash-attn" if self.flash is not None else "sdpa"
        with torch.inference_mode():
            self.weights = load_weights(ckpt, kinds - CONCATENATED, dtype, device)
            for i in range(d.layers):
                p = f"model.layers.{i}."
                if "qkv_proj" in kinds:
                    self.weights[QKV.format(i)] = torch.cat(
                        [ckpt.get(p + f"self_attn.{n}_proj.weight", dtype, device) for n in "qkv"])
                if "gate_up_proj" in kinds:
                    self.weights[GATE_UP.format(i)] = torch.cat(
                        [ckpt.get(p + f"mlp.{n}_proj.weight", dtype, device)
                         for n in ("gate", "up")])
            # half-width RoPE tables for every position (cos and sin repeat across halves),
            # computed like transformers: fp32, then cast. 1B shape: 131072 x 32 x 2 bf16 = 16 MB.
            # Dynamic RoPE's frequencies follow the longest sequence seen: no fixed table.
            half = d.head_dim // 2
            n = d.max_positions if "rope" in kinds and not self.rope.dynamic else 0
            cos, sin = self.rope.cos_sin(torch.arange(n, device=device), dtype)
            self._cos, self._sin = cos[:, :half].contiguous(), sin[:, :half].contiguous()
            self.weights[ROPE_COS], self.weights[ROPE_SIN] = self._cos, self._sin
        self._programs: dict[int, tuple[Sequence[Op], list[Step]]] = {}
        self.compiler: Compiler | None = None
        if options.compile:
            from tsqp_executor_fused.compiled import Compiler

            self.compiler = Compiler(self, options)

    # --- the Backend interface ------------------------------------------------------------

    def new_cache(self) -> PreallocatedKVCache:
        d = self.dims
        return PreallocatedKVCache(kv_heads=d.kv_heads, head_dim=d.head_dim,
                                   max_positions=d.max_positions, dtype=self.dtype,
                                   device=self.device, seq_dim=1 if self.flash else 2,
                                   initial=self.options.cache_positions,
                                   pool=self.compiler.pool if self.compiler else None)

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"attention": self.attention}
        if self.compiler is not None:
            info["compile"] = self.compiler.report()
        return info

    def prepare(self, calls: Sequence[GpuCall]) -> None:
        """Build every call's program now; with ``compile``, compile each shape bucket."""
        for call in calls:
            self._program(call)
        if self.compiler is not None:
            self.compiler.prepare(calls)

    def run(self, call: GpuCall, env: dict[str, torch.Tensor], cache: Any,
            last_only: bool) -> None:
        steps = self._program(call)
        ctx = ops.OpContext(self.dims, self.weights, self.rope, self.eps, cache, last_only)
        with self._grad_off():
            if self.device.type != "cpu":
                pos = env.get("pos")
                if pos is not None:  # checked in private memory: the client's arena could
                    env["pos"] = pos = pos.clone()  # change under the device's copy of it
                check_positions(pos, self.dims.max_positions)
                self.to_device(env)
            for step in steps:
                step(ctx, env)

    def _grad_off(self) -> Any:
        """``inference_mode``, or with compiled programs ``no_grad``: dynamo guards on
        whether a tensor is an inference tensor, and the wire's inputs never are, so every
        tensor a graph sees (cache buffers included) is made the same way."""
        return torch.no_grad() if self.compiler is not None else torch.inference_mode()

    # --- building a call's program --------------------------------------------------------

    def _program(self, call: GpuCall) -> list[Step]:
        ops_ = call.ops
        entry = self._programs.get(id(ops_))
        if entry is None or entry[0] is not ops_:  # keyed by identity: hashing ops costs µs
            if len(self._programs) >= MAX_PROGRAMS:  # plans come and go with each hello
                self._programs.clear()
            built = self.build(ops_)
            steps = ([b.step for b in built] if self.compiler is None
                     else self.compiler.program(built, call.outputs))
            entry = self._programs[id(ops_)] = (ops_, steps)
        return entry[1]

    def build(self, ops_: Sequence[Op]) -> list[Built]:
        """The steps that run ``ops_``: fused where a pattern matches, reference otherwise."""
        steps: list[Built] = []
        kinds = [op.kind for op in ops_]
        i = 0
        while i < len(ops_):
            op = ops_[i]
            if op.kind == "qkv_proj" and tuple(kinds[i + 1:i + 5]) == ATTENTION:
                steps.append(self._qkv_attention_step(op, tuple(ops_[i + 1:i + 5])))
            elif op.kind == "rope" and tuple(kinds[i:i + 4]) == ATTENTION:
                steps.append(self._attention_step(tuple(ops_[i:i + 4])))
            elif op.kind == "qkv_proj":
                steps.append(self._matmul_split_step(op, QKV.format(op.layer), self.split_qkv))
            elif op.kind == "gate_up_proj":
                inter = self.dims.intermediate
                if i + 1 < len(ops_) and kinds[i + 1] == "act":
                    steps.append(self._mlp_up_step(op, ops_[i + 1]))
                else:
                    steps.append(self._matmul_split_step(op, GATE_UP.format(op.layer),
                                                         [inter, inter]))
            else:
                steps.append(self._reference_step(op))
            i += len(steps[-1].ops)
        return steps

    @staticmethod
    def _reference_step(op: Op) -> Built:
        impl = ops.REFERENCE_OPS[op.kind]
        ins, outs = op.inputs, op.outputs

        def step(ctx: ops.OpContext, env: dict[str, torch.Tensor]) -> None:
            for name, value in zip(outs, impl(ctx, op, *(env[n] for n in ins))):
                env[name] = value

        weights = tuple(k.format(op.layer) for k in REFERENCE_WEIGHTS.get(op.kind, ()))
        return Built((op,), step, ins, outs, weights, op.kind in EAGER_ONLY)

    @staticmethod
    def _matmul_split_step(op: Op, key: str, sizes: list[int]) -> Built:
        src, outs = op.inputs[0], op.outputs

        def step(ctx: ops.OpContext, env: dict[str, torch.Tensor]) -> None:
            for name, value in zip(outs, F.linear(env[src], ctx.weights[key]).split(sizes, dim=-1)):
                env[name] = value

        return Built((op,), step, (src,), outs, (key,))

    def _mlp_up_step(self, gate_up: Op, act: Op) -> Built:
        key, inter = GATE_UP.format(gate_up.layer), self.dims.intermediate
        src, out = gate_up.inputs[0], act.outputs[0]

        def step(ctx: ops.OpContext, env: dict[str, torch.Tensor]) -> None:
            g, u = F.linear(env[src], ctx.weights[key]).split([inter, inter], dim=-1)
            env[out] = F.silu(g, inplace=True).mul_(u)  # g is this call's own: safe in place

        def fresh(ctx: ops.OpContext, env: dict[str, torch.Tensor]) -> None:
            g, u = F.linear(env[src], ctx.weights[key]).split([inter, inter], dim=-1)
            env[out] = F.silu(g) * u  # compiled: one fused kernel into a contiguous buffer

        # in place, the product is a strided view of the matmul's output; eager torch folds
        # it into down_proj's matmul, inductor turns that matmul into a bmm with copies
        return Built((gate_up, act), step if self.compiler is None else fresh, (src,), (out,),
                     (key,))

    def _qkv_attention_step(self, qkv: Op, four: tuple[Op, ...]) -> Built:
        """qkv_proj + rope..attn_context of one layer: one matmul, then RoPE in place over
        q and k together (adjacent in the matmul's output, and this call's own)."""
        key, src, layer = QKV.format(qkv.layer), qkv.inputs[0], qkv.layer
        pos_name, out = four[0].inputs[2], four[3].outputs[0]
        heads, kv_heads, head_dim = self.dims.heads, self.dims.kv_heads, self.dims.head_dim
        width = (heads + kv_heads) * head_dim

        def step(ctx: ops.OpContext, env: dict[str, torch.Tensor]) -> None:
            qkv_ = F.linear(env[src], ctx.weights[key])
            b, t, _ = qkv_.shape
            qk = qkv_[..., :width].view(b, t, heads + kv_heads, head_dim)
            rope_inplace(qk, *self._rope_tables(ctx, env[pos_name]))
            env[out] = self._attend(layer, qk[:, :, :heads], qk[:, :, heads:],
                                    qkv_[..., width:].view(b, t, kv_heads, head_dim), ctx.cache)

        return Built((qkv, *four), step, (src, pos_name), (out,), (key, ROPE_COS, ROPE_SIN))

    def _attention_step(self, four: tuple[Op, ...]) -> Built:
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
            cos, sin = self._rope_tables(ctx, env[pos_name])
            rope_inplace(qh, cos, sin)
            rope_inplace(kh, cos, sin)
            env[out] = self._attend(layer, qh, kh, v.view(b, t, kv_heads, head_dim), ctx.cache)

        return Built(four, step, (q_name, k_name, pos_name, v_name), (out,),
                     (ROPE_COS, ROPE_SIN))

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: Any) -> torch.Tensor:
        """Append rotated ``k`` and ``v`` ``[B, T, Hkv, d]`` to the cache, attend with ``q``
        ``[B, T, H, d]`` (the last T positions) over all cached positions: ``[B, T, H*d]``.
        A compiled program's cache (:class:`~tsqp_executor_fused.compiled.ReservedKV`) may
        hand back the whole buffer and a ``visible`` mask ``[T, capacity]`` instead."""
        keys, values = cache.extend("k", layer, k), cache.extend("v", layer, v)
        b, t, heads, head_dim = q.shape
        if self.flash is not None:  # BSHD; causal is bottom-right aligned for t < keys
            o = self.flash(q, keys, values, causal=True, softmax_scale=self.scale)
        else:
            o = sdpa(q.transpose(1, 2), keys, values, self.scale,
                     self.dims.kv_heads != heads, getattr(cache, "visible", None)).transpose(1, 2)
        return o.reshape(b, t, heads * head_dim)

    def _cos_sin(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rope_tables(None, pos)

    def _rope_tables(self, ctx: ops.OpContext | None,
                     pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Half-width RoPE tables ``[1, T, 1, d/2]`` at ``pos``: from the precomputed tables
        (``ctx.weights``, so a compiled program takes them as arguments), or computed for
        this call when the RoPE is dynamic (its frequencies change with the length)."""
        if self.rope.dynamic:
            t, half = pos.shape[0], self.dims.head_dim // 2
            cos, sin = self.rope.cos_sin(pos, self.dtype)
            return cos[:, :half].reshape(1, t, 1, -1), sin[:, :half].reshape(1, t, 1, -1)
        if ctx is None:
            return cos_sin_at(self._cos, self._sin, pos)
        return cos_sin_at(ctx.weights[ROPE_COS], ctx.weights[ROPE_SIN], pos)


def cos_sin_at(cos: torch.Tensor, sin: torch.Tensor,
               pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width RoPE tables ``[1, T, 1, d/2]`` at ``pos``. On the CPU an out-of-range
    position is an IndexError here; on a device, :func:`check_positions` ran first."""
    t = pos.shape[0]
    return cos.index_select(0, pos).view(1, t, 1, -1), sin.index_select(0, pos).view(1, t, 1, -1)


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
         gqa: bool, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``q`` ``[B, H, T, d]`` (the last ``T`` positions) over ``k``/``v``
    ``[B, Hkv, S, d]``. SDPA's ``is_causal`` aligns the mask top-left, right only when
    ``T == S``; a single query sees every key; otherwise the mask is explicit. ``visible``
    ``[T, S]`` (keys each query may see) replaces all of that when given."""
    t, s = q.shape[2], k.shape[2]
    if visible is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale,
                                              enable_gqa=gqa)
    mask, causal = None, False
    if 1 < t < s:
        mask = ops.causal_mask(t, s, q.device)
    elif 1 < t:  # t == s; branches, not a bool expression: compiled, t and s are symbols
        causal = True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          scale=scale, enable_gqa=gqa)
