"""Timing a workload: the split pipeline and the monolithic model on the same weights.

Warm-up repeats are never counted; reported times are medians. Each repeat gets a fresh
:class:`~tsqp_core.metrics.Meter` (the run's, passed in); the breakdown reported is the
median repeat's. The protection scheme's precompute runs before each repeat's timer starts
and is reported as ``offline``.

Every split repeat runs first; then the GPU side stops and the monolithic repeats run with
the machine to themselves. With ``workload.interleave`` the two take turns repeat by repeat
in ABBA order (split then monolithic, then monolithic then split, ...), both models loaded
at once: a drift over seconds (a GPU's clocks, a neighbour's job) then slows both members
of a pair, each side runs first as often as second, and the per-repeat ratios
(``ratio_spread``) compare runs moments apart.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from tsqp_core.config import ConfigError, resolve_device
from tsqp_core.metrics import Meter, median, median_index, now_ns
from tsqp_core.protection import ForwardShape
from tsqp_core.run.prepare import Prepared
from tsqp_core.tee.pipeline import SplitModel, generate, prefill
from tsqp_core.tee.sampling import Sampler, Sampling


def _progress(total: int, desc: str) -> tqdm:
    """A bar over the repeats, on stderr, only where someone watches it (a terminal)."""
    return tqdm(total=total, desc=desc, unit="run", leave=False, file=sys.stderr,
                disable=total <= 1 or not sys.stderr.isatty())


@dataclass
class ForwardMeter(Meter):
    """A :class:`Meter` that also keeps the calls and bytes of the span's first forward
    (the prefill): ``rpc.per_forward``, the seed's "calls and bytes per forward"."""

    calls_per_forward: int = 0
    first: dict[str, int] | None = None

    def record_call(self, method: str, to_gpu: int, from_gpu: int, ns: int) -> None:
        super().record_call(method, to_gpu, from_gpu, ns)
        if self.first is None and self.calls == self.calls_per_forward:
            rpc = self.rpc()
            self.first = {k: rpc[k] for k in ("calls", "bytes_to_gpu", "bytes_from_gpu")}


def forward_shapes(p: Prepared) -> list[ForwardShape]:
    """The forwards one repeat of the workload runs (what a scheme precomputes for)."""
    w = p.cfg.workload
    batch, tokens = p.prompt.shape
    if w.kind == "prefill":
        return [ForwardShape(batch, tokens, 0, False)]
    steps = w.new_tokens + 1 if w.kind == "bench" else max(w.new_tokens, 1)
    return [ForwardShape(batch, tokens, 0, True)] + [
        ForwardShape(batch, 1, tokens + i, True) for i in range(steps - 1)]


@dataclass
class Measured:
    totals: list[int]
    ttfts: list[int]
    tpots: list[float]
    offline: list[int]
    #: The median repeat (its total and its meter's breakdown are reported).
    mid: int
    meter: ForwardMeter
    outputs: Any
    #: The forwards one repeat runs (what the protection precomputed for).
    forward_shapes: list[ForwardShape]


def measure(p: Prepared, model: SplitModel, mono: "Monolithic | None" = None) -> Measured:
    """Time the split run's repeats; with ``mono``, the monolithic model's in turn with
    them (ABBA: each side first in every other pair)."""
    cfg, w = p.cfg, p.cfg.workload
    totals: list[int] = []
    ttfts: list[int] = []
    tpots: list[float] = []
    offline: list[int] = []
    meters: list[ForwardMeter] = []
    outputs: Any = None
    shapes = forward_shapes(p)
    bar = _progress(w.warmup + w.repeats, f"{cfg.stage or 'run'} {w.kind} split"
                    + (" and monolithic" if mono is not None else ""))
    for i in range(w.warmup + w.repeats):
        if mono is not None and i % 2 == 1:  # the pair's monolithic repeat first
            mono.repeat(outputs, timed=i >= w.warmup)
        t0 = now_ns()
        p.protection.precompute(shapes)
        t_offline = now_ns() - t0
        meter = ForwardMeter(calls_per_forward=len(p.schedule.calls))
        t0 = now_ns()
        if w.kind == "prefill":
            logits = prefill(model, p.prompt, meter)
            total = now_ns() - t0
            outputs, ttft, tpot = logits, total, None
        else:
            sampler = Sampler(Sampling(w.temperature, w.top_p, cfg.seed))
            stop = None
            if w.kind == "generate" and p.tokenizer and cfg.prompt:
                stop = p.tokenizer.eos_token_ids
            gen = generate(model, p.prompt, len(shapes), sampler, meter, stop)
            total = now_ns() - t0
            outputs, ttft = gen, gen.ttft_ns
            tpot = median([float(x) for x in gen.step_ns])
        if mono is not None and i % 2 == 0:
            mono.repeat(outputs, timed=i >= w.warmup)
        bar.update()
        if i < w.warmup:
            continue
        totals.append(total)
        ttfts.append(ttft)
        offline.append(t_offline)
        if tpot is not None:
            tpots.append(tpot)
        meters.append(meter)
    bar.close()
    mid = median_index(totals)
    return Measured(totals, ttfts, tpots, offline, mid, meters[mid], outputs, shapes)


def reference_compiled(p: Prepared, server: dict[str, Any]) -> bool:
    """Whether the monolithic model is compiled: ``reference_compile`` when set, else as
    the GPU side compiled the split run's programs (``server.compile``), so that the ratio
    compares like with like unless asked otherwise."""
    if p.cfg.reference_compile is not None:
        return p.cfg.reference_compile
    return bool(server.get("compile"))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, where any NaN or Inf on either side counts as an infinite difference
    (``max`` and ``torch.max`` would let a NaN compare as equal or propagate silently)."""
    a, b = a.float(), b.float()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return math.inf
    return float((a - b).abs().max()) if a.numel() else 0.0


class Monolithic:
    """transformers on the same weights, dtype and threads (``threads.tee``), timed repeat by
    repeat: the ratio's denominator and the correctness check.

    A compiled reference is timed, but the logits and tokens are checked against one more,
    untimed, run of the eager one: compiled bf16 rounds differently (its static cache masks
    a padded attention), enough to flip the random tiny model's near-ties, and the check is
    about the split, not about the compiler."""

    def __init__(self, p: Prepared, server: dict[str, Any]) -> None:
        from tsqp_core.reference import Reference, attention_kernel

        self.p = p
        self.kernel = attention_kernel(server.get("attention", "eager"),
                                       p.partition.gpu_ops())
        try:  # the GPU side's device, when this host has it (a remote server's may not be)
            self.device = resolve_device(p.cfg.device)
        except ConfigError:
            self.device = torch.device("cpu")
        self.ref = Reference(p.model_dir, p.cfg.torch_dtype, self.kernel, self.device,
                             compile=reference_compiled(p, server))
        self.totals: list[int] = []
        self.ttfts: list[int] = []
        self.tpots: list[float] = []
        self.last: Any = None
        self._warm = False

    def _new_tokens(self, outputs: Any) -> int:
        """The decode steps the split run took (it may stop early at a stop token)."""
        return len(outputs.tokens[0]) if self.p.cfg.workload.kind != "prefill" else 0

    def repeat(self, outputs: Any, timed: bool) -> None:
        """One run of the workload, as long as the split run's ``outputs``; a compiled
        reference compiles first (never timed)."""
        w, new_tokens = self.p.cfg.workload, self._new_tokens(outputs)
        if not self._warm:
            self.ref.warm(self.p.prompt, new_tokens, generate=w.kind != "prefill")
            self._warm = True
        ttft, tpot, ns, self.last = _reference_run(self.ref, self.p.prompt, w.kind, new_tokens)
        if timed:
            self.totals.append(ns)
            self.ttfts.append(ttft)
            if tpot is not None:
                self.tpots.append(tpot)

    def run_all(self, outputs: Any) -> None:
        """Every repeat (warm-up first), one after the other."""
        w = self.p.cfg.workload
        bar = _progress(w.warmup + w.repeats,
                        f"{self.p.cfg.stage or 'run'} {w.kind} monolithic")
        for i in range(w.warmup + w.repeats):
            self.repeat(outputs, timed=i >= w.warmup)
            bar.update()
        bar.close()

    def section(self, outputs: Any, interleaved: bool) -> dict[str, Any]:
        """The ``reference`` section of results: its times and its agreement with the split
        run's ``outputs``."""
        from tsqp_core.reference import Reference

        w, ref, last = self.p.cfg.workload, self.ref, self.last
        impl, compiled, compile_ms = ref.impl, ref.compiled, ref.compile_ms
        check = ref
        if compiled:
            del ref, check
            self.ref = None  # type: ignore[assignment]  # the compiled one goes first
            check = Reference(self.p.model_dir, self.p.cfg.torch_dtype, self.kernel,
                              self.device)
            last = _reference_run(check, self.p.prompt, w.kind, self._new_tokens(outputs))[3]
        diff, tokens_match = _agreement(outputs, last, w.kind)
        finite = math.isfinite(diff)
        tokens_match = tokens_match and finite  # a non-finite logit is never a match
        totals, ttfts, tpots = self.totals, self.ttfts, self.tpots
        return {"impl": impl, "compiled": compiled, "compile_ms": compile_ms,
                "checked_against": check.impl,
                # timed in turn with the split run's repeats, or after them
                "interleaved": interleaved,
                "latency_ms": {"total": median(totals) / 1e6, "ttft": median(ttfts) / 1e6,
                               "tpot": (median(tpots) / 1e6) if tpots else None,
                               "repeats_total": [t / 1e6 for t in totals],
                               "repeats_ttft": [t / 1e6 for t in ttfts],
                               "repeats_tpot": [t / 1e6 for t in tpots]},
                # JSON has no NaN or Infinity: a non-finite difference is null, and says why
                "max_abs_logit_diff": diff if finite else None,
                **({} if finite else {"mismatch": "non-finite logits (NaN or Inf) on one side"}),
                "tokens_match": tokens_match,
                "reference_tokens": last.tokens if w.kind != "prefill" else None}


def _reference_run(ref: Any, prompt: torch.Tensor, kind: str,
                   new_tokens: int) -> tuple[int, float | None, int, Any]:
    """One run of the workload on the monolithic model: ttft, tpot, total (ns), and its
    logits (prefill) or generation."""
    if kind == "prefill":
        logits, ns = ref.prefill(prompt)
        return ns, None, ns, logits
    t0 = now_ns()
    gen = ref.generate(prompt, new_tokens)
    return gen.ttft_ns, median([float(x) for x in gen.step_ns]), now_ns() - t0, gen


def _agreement(outputs: Any, ref: Any, kind: str) -> tuple[float, bool]:
    """Max |dlogit| (infinite when either side is not finite) and whether greedy tokens
    match; in generation the logits are compared up to the first step whose inputs differ."""
    if kind == "prefill":
        return max_abs_diff(outputs, ref), bool(torch.equal(outputs.argmax(-1), ref.argmax(-1)))
    diff = 0.0
    for a, b, ref_tokens, tokens in zip(outputs.step_logits, ref.step_logits,
                                        zip(*ref.tokens), zip(*outputs.tokens)):
        diff = max(diff, max_abs_diff(a, b))  # never max(x, nan): nan is inf here
        if ref_tokens != tokens:  # inputs differ from here on
            break
    return diff, ref.tokens == outputs.tokens
