"""Compiled programs: ``executor.options.compile=true`` runs each call's steps as graphs
compiled by ``torch.compile`` (inductor), prepared at ``hello``.

A call's program (the :class:`~tsqp_executor_fused.backend.Built` steps) is cut into
**segments**, maximal runs of steps that can be traced; the others run eagerly between them
(:data:`~tsqp_executor_fused.backend.EAGER_ONLY`: ``embed`` checks token ids on the host,
attention ops split across calls grow the KV cache themselves). Each segment is one graph:

* **One graph for every layer.** A segment is compiled in canonical form -- its ops
  renumbered from layer 0 and its values renamed alike -- with inputs, weights and KV
  buffers passed as arguments, so layer 3's and layer 7's segments share one function and
  its graphs. Each canonical segment and shape bucket gets a code object of its own, so
  dynamo's cache, guards and limits are per bucket, never shared between segments.
* **Shape buckets.** ``prefill`` (T > 1 new tokens: T dynamic, the keys S == T; a chunked
  prefill after a cached prefix is a new guard, hence one more graph) and ``decode`` (one
  token; S dynamic -- or, with static decode, the whole KV buffer under a position mask,
  the same shapes for every step of a cache capacity). Segments holding the final norm also
  split prefill by ``last_only``. Weights are static: inductor sees their sizes.
* **Compiled at hello, reported apart.** :meth:`Compiler.prepare` runs every new segment of
  the plan once per bucket on synthetic inputs (batch 1, zeros, a scratch cache): the wall
  time of those calls is the plan's compile time, spent before any timed call and reported
  by :meth:`Compiler.report` in the hello reply (``server.compile``). A shape not prepared
  (batch > 1, a chunked prefill, a one-token prompt) compiles at first use; that is
  counted under ``first_use`` (the call's whole time: compile and its first run), which
  the replies to later hellos show. A grown cache compiles nothing (S is a symbol).
* **A bound on recompilations.** A bucket compiles at most ``max_graphs`` graphs; a call that
  would need one more runs the same steps eagerly and is counted (``fallbacks``). A segment
  that does not compile at all (``fullgraph``: a graph break is an error) runs eagerly and
  is listed under ``failed``.
* **The KV cache stays outside.** Allocation and growth happen before a graph runs
  (:meth:`~tsqp_executor_fused.cache.PreallocatedKVCache.reserve`); the graph writes the
  new keys and values in place (:class:`ReservedKV`), then the positions are committed.
* **CUDA graphs for decode** (``cuda_graphs``, CUDA only): the decode bucket is compiled
  with inductor's CUDA graphs (``reduce-overhead``) over static shapes; weights, RoPE
  tables and KV buffers are marked static addresses (a replay copies only the token's
  inputs), and each call starts a new CUDA-graph step, its outputs cloned out of the
  graph's pool. Graphs are recorded per layer (per set of weight addresses) and per set of
  KV buffers; the buffers are pooled (:class:`~tsqp_executor_fused.cache.BufferPool`), so
  a new generation gets buffers an earlier one had and replays its graphs, and the number
  of recordings stays bounded. Written for an H100/H200; not run on the CPU machines this
  was built on.

Numerics: ``emulate_precision_casts`` makes inductor round bf16 intermediates where eager
torch does, so a compiled bf16 program rounds like the eager fused one (and transformers).
"""

from __future__ import annotations

import itertools
import sys
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from tsqp_core import ops
from tsqp_core.executor import GpuCall
from tsqp_core.graph import (INTEGER_VALUES, Op, expected_shape, value_kind, value_layer,
                             value_template)
from tsqp_core.metrics import now_ns

from tsqp_executor_fused.cache import BufferPool

if TYPE_CHECKING:
    from tsqp_executor_fused.backend import Built, FusedBackend, Step
    from tsqp_executor_fused.cache import PreallocatedKVCache

#: Inductor settings for every compiled program (the compiled reference uses the same).
INDUCTOR_OPTIONS: dict[str, Any] = {"emulate_precision_casts": True}
#: Synthetic sizes the buckets are prepared with: not 0 or 1 (dynamo specialises those)
#: and unlike any other size, so that only T and S become symbols.
PREFILL_TOKENS = 11
DECODE_PAST = 13


# --- inside a compiled graph: the reserved KV buffers -------------------------------------


class ReservedKV:
    """The KV cache as a compiled program sees it: per attention layer (canonical index) the
    key and value buffers reserved before the call, ``[B, Hkv, S or capacity, d]``.

    Dynamic (``slots`` None): each is the prefix of past + T positions; the new T go into
    its last T rows and attention reads the prefix. Static (``slots`` the positions being
    written, ``[T]``): each is the whole buffer; the new rows go to ``slots`` and attention
    reads the whole buffer under ``visible`` ``[T, capacity]`` (key j visible to query i iff
    ``j <= slots[i]``), so the shapes do not change from one decode step to the next."""

    def __init__(self, layers: Sequence[int], kv: Sequence[torch.Tensor],
                 slots: torch.Tensor | None) -> None:
        self.buffers = {layer: (kv[2 * i], kv[2 * i + 1]) for i, layer in enumerate(layers)}
        self.slots = slots
        self.visible = None
        if slots is not None and kv:
            capacity = kv[0].shape[2]
            self.visible = (torch.arange(capacity, device=slots.device)[None, :]
                            <= slots[:, None])

    def extend(self, which: str, layer: int, new: torch.Tensor) -> torch.Tensor:
        """Write ``new`` ``[B, T, Hkv, d]``; the keys (or values) attention reads."""
        buf = self.buffers[layer][0 if which == "k" else 1]
        rows = new.transpose(1, 2)
        if self.slots is None:
            t, s = rows.shape[2], buf.shape[2]
            buf.narrow(2, s - t, t).copy_(rows)
        else:
            buf.index_copy_(2, self.slots, rows)
        return buf


# --- figures --------------------------------------------------------------------------------


@dataclass
class Tally:
    graphs: int = 0
    ns: int = 0

    def report(self) -> dict[str, Any]:
        return {"graphs": self.graphs, "compile_ms": self.ns / 1e6}


@dataclass
class Stats:
    #: Compiles of the last plan prepared at hello.
    plan: Tally = field(default_factory=Tally)
    #: Compiles at first use (shapes not prepared), since the backend was built.
    first_use: Tally = field(default_factory=Tally)
    #: Everything this backend compiled.
    total: Tally = field(default_factory=Tally)
    fallbacks: int = 0
    failed: list[str] = field(default_factory=list)
    eager_ops: set[str] = field(default_factory=set)
    preparing: bool = False

    def add(self, graphs: int, ns: int) -> None:
        for tally in (self.plan if self.preparing else self.first_use, self.total):
            tally.graphs += graphs
            tally.ns += ns


def _own_code(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` with a code object of its own: dynamo keys its cache (and its recompile limit)
    by code object, and every segment's body is the same closure code."""
    code = fn.__code__.replace(co_name=name)
    if sys.version_info >= (3, 11):
        code = code.replace(co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


class Bucket:
    """One shape bucket of a canonical segment: its compiled function and graph count."""

    def __init__(self, body: Callable[..., Any], name: str, compiler: "Compiler",
                 cuda_graphs: bool) -> None:
        from torch._inductor.compile_fx import compile_fx

        self.name = name
        self.eager = body
        self.cuda_graphs = cuda_graphs
        self.graphs = 0
        self._compiler = compiler
        patches = dict(INDUCTOR_OPTIONS, **({"triton.cudagraphs": True} if cuda_graphs else {}))

        def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
            self.graphs += 1
            return compile_fx(gm, example_inputs, config_patches=patches)

        self.compiled = torch.compile(_own_code(body, name), backend=backend, fullgraph=True)

    def __call__(self, *args: Any) -> Any:
        stats = self._compiler.stats
        before, t0 = self.graphs, now_ns()
        try:
            if self.graphs >= self._compiler.max_graphs:
                with torch.compiler.set_stance("fail_on_recompile"):
                    out = self.compiled(*args)
            else:
                out = self.compiled(*args)
        except RuntimeError as exc:
            if "Detected recompile" not in str(exc):
                raise  # a compile failure (see Segment.broken) or an error the eager run shares
            if not stats.fallbacks:
                print(f"tsqp serve: {self.name} reached max_graphs="
                      f"{self._compiler.max_graphs}; shapes not compiled run eagerly",
                      file=sys.stderr)
            stats.fallbacks += 1
            return self.eager(*args)
        if self.graphs > before:
            stats.add(self.graphs - before, now_ns() - t0)
        return out


# --- a canonical segment and its binding to one call ----------------------------------------


def canonical_name(name: str, base: int | None) -> str:
    """``'7.q' -> '0.q'``, ``'h8' -> 'h1'`` for ``base`` 7; names without a layer stay."""
    layer = value_layer(name)
    if layer is None or base is None:
        return name
    kind = value_kind(name)
    return f"h{layer - base}" if kind == "h" else f"{layer - base}.{kind}"


def canonical_ops(ops_: Sequence[Op]) -> tuple[int | None, tuple[Op, ...]]:
    layers = [op.layer for op in ops_ if op.layer is not None]
    base = min(layers) if layers else None
    return base, tuple(
        Op(op.kind, None if op.layer is None or base is None else op.layer - base,
           tuple(canonical_name(n, base) for n in op.inputs),
           tuple(canonical_name(n, base) for n in op.outputs)) for op in ops_)


def segment_io(built: Sequence["Built"], needed: set[str]) -> tuple[list[str], list[str]]:
    """The values a run of steps reads from outside it, and those it writes that ``needed``
    holds, each in first-seen order."""
    inputs: list[str] = []
    written: list[str] = []
    for b in built:
        inputs += [n for n in b.reads if n not in written and n not in inputs]
        written += [n for n in b.writes if n not in written]
    return inputs, [n for n in written if n in needed]


class Segment:
    """A run of compilable steps in canonical form, with its shape buckets."""

    def __init__(self, compiler: "Compiler", index: int, ops_: tuple[Op, ...],
                 inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
        backend = compiler.backend
        self.compiler = compiler
        # unique in the process: dynamo remembers which sizes changed per code name, and
        # a backend built later must not inherit an earlier one's dynamic dims
        self.name = (f"tsqp{compiler.serial}_segment{index}_"
                     + "_".join(dict.fromkeys(op.kind for op in ops_)))
        self.ops = ops_
        self.inputs, self.outputs = inputs, outputs
        self.built = backend.build(ops_)
        self.weights = tuple(k for b in self.built for k in b.weights)
        #: Canonical layers whose attention runs here (the KV buffers passed in, in order).
        self.layers = tuple(op.layer for op in ops_ if op.kind == "attn_scores")
        self.has_tail = any(op.kind == "final_norm" for op in ops_)
        self.buckets: dict[tuple[str, bool], Bucket] = {}
        self.prepared: set[tuple[str, bool]] = set()
        #: It did not compile: every bucket runs its steps eagerly.
        self.broken = False

    def key(self, tokens: int, last_only: bool) -> tuple[str, bool]:
        """The bucket of a call of ``tokens`` new tokens. ``last_only`` only matters to a
        prefill that holds the final norm (one token is its own last position)."""
        if tokens == 1:
            return "decode", True
        return "prefill", last_only if self.has_tail else True

    def bucket(self, key: tuple[str, bool]) -> Bucket:
        b = self.buckets.get(key)
        if b is None:
            kind, last_only = key
            static = kind == "decode" and self.compiler.static_decode
            cuda_graphs = kind == "decode" and self.compiler.cuda_graphs
            name = f"{self.name}_{kind}" + ("" if last_only else "_all")
            b = self.buckets[key] = Bucket(self._body(last_only, static), name, self.compiler,
                                           cuda_graphs)
        return b

    def _body(self, last_only: bool, static: bool) -> Callable[..., tuple[torch.Tensor, ...]]:
        backend = self.compiler.backend
        dims, rope, eps = backend.dims, backend.rope, backend.eps
        steps = [b.step for b in self.built]
        inputs, outputs, weights, layers = self.inputs, self.outputs, self.weights, self.layers

        def body(args: list[torch.Tensor], w: list[torch.Tensor], kv: list[torch.Tensor],
                 slots: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
            env = dict(zip(inputs, args))
            cache = ReservedKV(layers, kv, slots if static else None)
            ctx = ops.OpContext(dims, dict(zip(weights, w)), rope, eps,
                                cache, last_only)  # type: ignore[arg-type]
            for step in steps:
                step(ctx, env)
            return tuple(env[n] for n in outputs)

        return body


@dataclass
class SegmentStep:
    """A canonical :class:`Segment` bound to one call: its real value names, weights and
    attention layers. A step of the call's program like any other."""

    segment: Segment
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weights: list[torch.Tensor]
    layers: tuple[int, ...]
    #: An input with a ``B`` dim (its batch) and an input dim that is ``T`` or ``L``.
    batch_src: str
    tokens_src: tuple[str, int]

    def __call__(self, ctx: ops.OpContext, env: dict[str, torch.Tensor]) -> None:
        seg = self.segment
        compiler = seg.compiler
        name, dim = self.tokens_src
        tokens = env[name].shape[dim]
        key = seg.key(tokens, ctx.last_only)
        bucket = seg.bucket(key)
        kv, slots = self._reserve(ctx.cache, env[self.batch_src].shape[0], tokens,
                                  static=key[0] == "decode" and compiler.static_decode)
        if bucket.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            for t in kv:
                torch._dynamo.mark_static_address(t)
        args = ([env[n] for n in self.inputs], self.weights, kv, slots)
        if seg.broken:
            out = bucket.eager(*args)
        else:
            try:
                out = bucket(*args)
            except torch._dynamo.exc.TorchDynamoException as exc:  # not compilable: eager
                compiler.mark_broken(seg, exc)
                out = bucket.eager(*args)
        for layer in self.layers:
            ctx.cache.commit("k", layer, tokens)
            ctx.cache.commit("v", layer, tokens)
        for n, value in zip(self.outputs, out):
            env[n] = value.clone() if bucket.cuda_graphs else value

    def _reserve(self, cache: "PreallocatedKVCache", batch: int, tokens: int,
                 static: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Room for ``tokens`` more positions in every attention layer here (outside the
        graph): the buffers to pass, and for static shapes the positions written."""
        kv: list[torch.Tensor] = []
        past = None
        for layer in self.layers:
            for which in ("k", "v"):
                buf, have = cache.reserve(which, layer, batch, tokens)
                if past is None:
                    past = have
                elif have != past:
                    raise ValueError(f"layer {layer} caches {have} positions, not {past}")
                kv.append(buf if static else buf.narrow(2, 0, have + tokens))
        if not static or past is None:
            return kv, None
        return kv, self.segment.compiler.positions[past:past + tokens]


# --- the compiler -----------------------------------------------------------------------------


class Compiler:
    """Cuts programs into segments, compiles them per shape bucket, and counts."""

    #: Compilers made in this process (names their code objects apart).
    made = itertools.count()

    def __init__(self, backend: "FusedBackend", options: Any) -> None:
        cuda = backend.device.type == "cuda"
        self.serial = next(Compiler.made)
        self.backend = backend
        self.cuda_graphs = options.cuda_graphs == "on" or (options.cuda_graphs == "auto" and cuda)
        if self.cuda_graphs and not cuda:
            raise ValueError("executor.options.cuda_graphs=on needs CUDA")
        self.static_decode = options.static_decode == "on" or (
            options.static_decode == "auto" and self.cuda_graphs)
        if self.cuda_graphs and not self.static_decode:
            raise ValueError("executor.options.cuda_graphs needs static_decode (auto or on)")
        self.max_graphs = options.max_graphs
        # dynamo's own per-code-object limit must not stop a bucket before ours does
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, self.max_graphs)
        self.positions = torch.arange(backend.dims.max_positions, device=backend.device)
        #: Static decode reuses KV buffers across generations (stable addresses for CUDA
        #: graphs, zeroed for masked attention); see cache.BufferPool.
        self.pool = (BufferPool(backend.dtype, backend.device, options.pool_per_shape)
                     if self.static_decode else None)
        self.segments: dict[tuple[tuple[Op, ...], tuple[str, ...]], Segment] = {}
        self.bound: dict[Segment, SegmentStep] = {}
        self.stats = Stats()
        if self.cuda_graphs:
            for t in backend.weights.values():
                torch._dynamo.mark_static_address(t)

    def program(self, built: list["Built"], call_outputs: Sequence[str]) -> list["Step"]:
        """A call's steps: eager-only ones as they are, each run of the others one
        :class:`SegmentStep`."""
        steps: list[Step] = []
        run: list[Built] = []
        for i, b in enumerate(built + [None]):  # type: ignore[list-item]
            if b is not None and not b.eager_only:
                run.append(b)
                continue
            if run:
                later = {n for x in built[i:] for n in x.reads}
                steps.append(self._bind(run, later | set(call_outputs)))
                run = []
            if b is not None:
                self.stats.eager_ops.update(op.kind for op in b.ops)
                steps.append(b.step)
        return steps

    def _bind(self, run: list["Built"], needed: set[str]) -> SegmentStep:
        ops_ = tuple(op for b in run for op in b.ops)
        inputs, outputs = segment_io(run, needed)
        base, canon = canonical_ops(ops_)
        key = (canon, tuple(canonical_name(n, base) for n in outputs))
        seg = self.segments.get(key)
        if seg is None:
            seg = self.segments[key] = Segment(
                self, len(self.segments), canon, tuple(canonical_name(n, base) for n in inputs),
                key[1])
        dims = self.backend.dims
        batch_src = next((n for n in inputs if value_template(n, dims)[0] == "B"), inputs[0])
        tokens_src = next((n, value_template(n, dims).index(s)) for n in inputs
                          for s in ("T", "L") if s in value_template(n, dims))
        step = SegmentStep(seg, tuple(inputs), tuple(outputs),
                           [self.backend.weights[k] for b in run for k in b.weights],
                           tuple(op.layer for op in ops_ if op.kind == "attn_scores"),
                           batch_src, tokens_src)
        self.bound.setdefault(seg, step)
        return step

    # --- at hello -----------------------------------------------------------------------------

    def prepare(self, calls: Sequence[GpuCall]) -> None:
        """Compile every bucket of the plan's segments not compiled yet, on synthetic
        inputs; the time is the plan's compile time."""
        del calls  # their programs are built (Backend.prepare); segments are what compiles
        self.stats.plan = Tally()
        self.stats.preparing = True
        try:
            for seg, step in self.bound.items():
                keys = [("prefill", True), ("decode", True)]
                if seg.has_tail:
                    keys.append(("prefill", False))
                for key in keys:
                    if key not in seg.prepared and not seg.broken:
                        self._warm(step, key)
                        seg.prepared.add(key)
        finally:
            self.stats.preparing = False

    def _warm(self, step: SegmentStep, key: tuple[str, bool]) -> None:
        """Run ``step``'s segment once in bucket ``key`` on zeros, batch 1, in a scratch
        cache: ``T`` and ``S`` marked dynamic where the bucket lets them vary."""
        with torch.no_grad():  # as FusedBackend.run with compiled programs
            self._warm_no_grad(step, key)

    def _warm_no_grad(self, step: SegmentStep, key: tuple[str, bool]) -> None:
        seg, dims, backend = step.segment, self.backend.dims, self.backend
        decode = key[0] == "decode"
        tokens, past = (1, DECODE_PAST) if decode else (PREFILL_TOKENS, 0)
        # rows after the final norm (L): one when it is here and slices; else a prefill
        # bucket means L == T > 1 (with L == 1 the call is in the decode bucket)
        last_only = key[1] if seg.has_tail else decode
        env: dict[str, torch.Tensor] = {}
        for name in step.inputs:
            if name == "pos":
                env[name] = torch.arange(past, past + tokens, device=backend.device)
            else:
                dtype = torch.int64 if value_kind(name) in INTEGER_VALUES else backend.dtype
                env[name] = torch.zeros(expected_shape(name, dims, 1, tokens, past, last_only),
                                        dtype=dtype, device=backend.device)
            if not decode:
                for i, sym in enumerate(value_template(name, dims)):
                    if sym in ("T", "L"):
                        torch._dynamo.maybe_mark_dynamic(env[name], i)
        cache = backend.new_cache()
        for layer in step.layers:
            for which in ("k", "v"):
                cache.reserve(which, layer, 1, past)
                cache.commit(which, layer, past)
        static = decode and self.static_decode
        kv, slots = step._reserve(cache, 1, tokens, static)
        if not static:  # S varies in both buckets (in prefill, S == T)
            for t in kv:
                torch._dynamo.maybe_mark_dynamic(t, 2)
        bucket = seg.bucket(key)
        try:
            if bucket.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
                for t in kv:
                    torch._dynamo.mark_static_address(t)
            bucket([env[n] for n in step.inputs], step.weights, kv, slots)
        except Exception as exc:  # noqa: BLE001 - whatever stops it compiling: run eagerly
            self.mark_broken(seg, exc)

    def mark_broken(self, seg: Segment, exc: BaseException) -> None:
        seg.broken = True
        self.stats.failed.append(seg.name)
        print(f"tsqp serve: {seg.name} does not compile, it runs eagerly: "
              f"{type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)

    # --- reporting ----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        s = self.stats
        return {"backend": "inductor", "cuda_graphs": self.cuda_graphs,
                "static_decode": self.static_decode, "max_graphs": self.max_graphs,
                "segments": len(self.segments),
                "buckets": sum(len(seg.buckets) for seg in self.segments.values()),
                "plan": s.plan.report(), "first_use": s.first_use.report(),
                "total": s.total.report(), "fallbacks": s.fallbacks, "failed": list(s.failed),
                "eager_ops": sorted(s.eager_ops), "options": dict(INDUCTOR_OPTIONS)}
