"""One run: validate, start the GPU side, run the workload, compare, report.

Everything that can be checked is checked before a process starts: plugin names and
options, the model, the prompt's length. The GPU side is always stopped at the end.

Workloads: ``prefill`` (one forward, full logits: the seed's benchmark), ``generate``
(prefill + decode with a KV cache) and ``bench`` (split against monolithic in one run:
prefill of ``prompt_tokens`` seeded random ids, then ``new_tokens`` decode steps, timed for
the split pipeline and then for transformers on the same weights, dtype and
``threads.tee``; ``results.json`` gets a ``bench`` section with the medians and the
``split / monolithic`` ratios). Warm-up repeats are never counted; reported times are medians.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tsqp_core import __version__
from tsqp_core.client import RemoteGpu
from tsqp_core.config import ConfigError, RunConfig, resolve_device
from tsqp_core.graph import Op
from tsqp_core.launch import ServerSpec, gpu_side
from tsqp_core.metrics import Meter, median, median_index, now_ns
from tsqp_core.models.source import Checkpoint, fingerprint, load_weights, resolve
from tsqp_core.pipeline import Sampler, Sampling, Session, SplitModel, generate
from tsqp_core.plugins import get_plugins
from tsqp_core.schedule import build_schedule

SCHEMA = "tsqp.run/1"


class InputError(ValueError):
    """The workload cannot run on this model (prompt too long, no tokenizer, ...)."""


@dataclass
class Prepared:
    cfg: RunConfig
    transport: Any
    executor: Any
    partition: Any
    protection: Any
    tee_ops: Any
    model_dir: Path
    ckpt: Checkpoint
    schedule: Any
    prompt: torch.Tensor
    tokenizer: Any


def prepare(cfg: RunConfig) -> Prepared:
    """All validation that needs no GPU side."""
    plugins = get_plugins()
    objs = {fam: plugins.registry(fam).create(getattr(cfg, fam).name, getattr(cfg, fam).options)
            for fam in ("transport", "executor", "partition", "protection", "tee_ops")}
    if cfg.server.address is None:  # a server we start here must find its device here
        resolve_device(cfg.device)
    model_dir = resolve(cfg.model)
    ckpt = Checkpoint(model_dir)
    schedule = build_schedule(ckpt.dims.layers, objs["partition"].gpu_ops(), objs["executor"].group)
    tokenizer = None
    if cfg.model.tokenizer != "none":
        from tsqp_core.models.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.tokenizer, model_dir)
    prompt = make_prompt(cfg, ckpt, tokenizer)
    return Prepared(cfg, model_dir=model_dir, ckpt=ckpt, schedule=schedule, prompt=prompt,
                    tokenizer=tokenizer, **objs)


def make_prompt(cfg: RunConfig, ckpt: Checkpoint, tokenizer: Any) -> torch.Tensor:
    w = cfg.workload
    if cfg.prompt is not None and w.kind != "bench":  # a benchmark times shapes, not text
        if tokenizer is None:
            raise InputError(f"model '{cfg.model.name}' has no tokenizer; drop prompt= to use "
                             "random token ids")
        ids = tokenizer.encode(cfg.prompt)
        if not ids:
            raise InputError("the prompt encodes to no tokens")
        prompt = torch.tensor([ids] * w.batch, dtype=torch.int64)
    else:
        gen = torch.Generator().manual_seed(cfg.seed)
        prompt = torch.randint(0, ckpt.dims.vocab, (w.batch, w.prompt_tokens), generator=gen)
    need = prompt.shape[1] + (w.new_tokens if w.kind in ("generate", "bench") else 0)
    if need > ckpt.dims.max_positions:
        raise InputError(f"prompt of {prompt.shape[1]} tokens + {need - prompt.shape[1]} new "
                         f"tokens exceeds the model's context of {ckpt.dims.max_positions}")
    return prompt


def run(cfg: RunConfig, outdir: Path) -> dict[str, Any]:
    p = prepare(cfg)
    torch.set_num_threads(cfg.threads.tee)
    spec = ServerSpec(transport=cfg.transport.model_dump(), address=None,
                      model_dir=str(p.model_dir), executor=cfg.executor.model_dump(),
                      dtype=cfg.dtype, device=cfg.device, threads=cfg.threads.gpu,
                      max_sessions=cfg.server.max_sessions)
    tee_kinds = {step.kind for step in p.schedule.steps if isinstance(step, Op)}
    weights = load_weights(p.ckpt, tee_kinds, cfg.torch_dtype)
    with gpu_side(spec, in_process=p.transport.in_process, external=cfg.server.address,
                  startup_timeout=cfg.server.startup_timeout_s) as (address, watchdog):
        channel = p.transport.connect(address, watchdog)
        try:
            remote = RemoteGpu(channel, borrowed=p.transport.borrowed_frames,
                               timeout=cfg.server.timeout_s)
            info = remote.hello(fingerprint=fingerprint(p.model_dir), executor=cfg.executor.name,
                                dtype=cfg.dtype, schedule=p.schedule,
                                timeout=cfg.server.startup_timeout_s)
            model = SplitModel(schedule=p.schedule, dims=p.ckpt.dims, config=p.ckpt.config,
                               weights=weights, tee_impls=p.tee_ops.implementations(),
                               remote=remote, protection=p.protection, dtype=cfg.torch_dtype)
            result = measure(p, model)
        finally:
            channel.close()
    result["config"]["device"] = info.get("device", cfg.device)
    if cfg.reference or cfg.workload.kind == "bench":
        # The GPU side is stopped by now: the monolithic model has the TEE process's threads
        # (threads.tee) to itself, as the split run's TEE side had.
        result["reference"] = compare(p, result.pop("_outputs"))
        add_ratios(result)
    else:
        result.pop("_outputs")
        result["reference"] = None
    write_results(outdir, result)
    return result


def _progress(total: int, desc: str) -> tqdm:
    """A bar over the repeats, on stderr, only where someone watches it (a terminal)."""
    return tqdm(total=total, desc=desc, unit="run", leave=False, file=sys.stderr,
                disable=total <= 1 or not sys.stderr.isatty())


@dataclass
class _ForwardMeter(Meter):
    """A :class:`Meter` that also keeps the calls and bytes of the span's first forward
    (the prefill): ``rpc.per_forward``, the seed's "calls and bytes per forward"."""

    calls_per_forward: int = 0
    first: dict[str, int] | None = None

    def record_call(self, method: str, to_gpu: int, from_gpu: int, ns: int) -> None:
        super().record_call(method, to_gpu, from_gpu, ns)
        if self.first is None and self.calls == self.calls_per_forward:
            rpc = self.rpc()
            self.first = {k: rpc[k] for k in ("calls", "bytes_to_gpu", "bytes_from_gpu")}


def host() -> dict[str, Any]:
    """The machine a measurement was taken on."""
    return {"platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def measure(p: Prepared, model: SplitModel) -> dict[str, Any]:
    cfg, w = p.cfg, p.cfg.workload
    totals: list[float] = []
    ttfts: list[float] = []
    tpots: list[float] = []
    meters: list[Meter] = []
    outputs: Any = None
    calls_per_forward = len(p.schedule.calls)
    bar = _progress(w.warmup + w.repeats, f"{cfg.stage} {w.kind} split")
    for i in range(w.warmup + w.repeats):
        model.remote.meter = meter = _ForwardMeter(calls_per_forward=calls_per_forward)
        t0 = now_ns()
        if w.kind == "prefill":
            session = Session()
            try:
                logits = model.forward(p.prompt, session)
            finally:
                model.end(session)
            total = now_ns() - t0
            outputs, ttft, tpot = logits, total, None
        else:
            sampler = Sampler(Sampling(w.temperature, w.top_p, cfg.seed))
            if w.kind == "bench":  # a fixed amount of work: the prefill's token + new_tokens steps
                stop, n_tokens = None, w.new_tokens + 1
            else:
                stop = p.tokenizer.eos_token_ids if (p.tokenizer and cfg.prompt) else None
                n_tokens = max(w.new_tokens, 1)
            gen = generate(model, p.prompt, n_tokens, sampler, stop)
            total = now_ns() - t0
            outputs, ttft = gen, gen.ttft_ns
            tpot = median([float(x) for x in gen.step_ns])
        bar.update()
        if i < w.warmup:
            continue
        totals.append(total)
        ttfts.append(ttft)
        if tpot is not None:
            tpots.append(tpot)
        meters.append(meter)
    bar.close()
    mid = median_index(totals)
    meter = meters[mid]
    rpc = meter.rpc()
    per_forward = meter.first or {k: rpc[k] for k in ("calls", "bytes_to_gpu", "bytes_from_gpu")}
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "tsqp_version": __version__,
        "config": {"stage": cfg.stage, "transport": cfg.transport.name,
                   "executor": cfg.executor.name, "partition": cfg.partition.name,
                   "protection": cfg.protection.name, "tee_ops": cfg.tee_ops.name,
                   "model": cfg.model.name, "dtype": cfg.dtype, "device": cfg.device,
                   "threads": cfg.threads.model_dump()},
        "workload": {"kind": w.kind, "batch": w.batch, "prompt_tokens": int(p.prompt.shape[1]),
                     "new_tokens": w.new_tokens if w.kind in ("generate", "bench") else 0,
                     "warmup": w.warmup, "repeats": w.repeats},
        "rpc": {"calls_per_forward": calls_per_forward, **rpc, "per_forward": per_forward},
        "latency_ms": {"total": totals[mid] / 1e6, "ttft": median(ttfts) / 1e6,
                       "tpot": (median(tpots) / 1e6) if tpots else None,
                       "breakdown": meter.breakdown(totals[mid]),
                       "repeats_total": [t / 1e6 for t in totals]},
        "exposure": p.schedule.exposure(p.protection.plaintext),
        "output_text": None,
        "host": host(),
        "_outputs": outputs,
    }
    if w.kind != "prefill":
        result["tokens"] = outputs.tokens
        if p.tokenizer is not None and w.kind == "generate":
            result["output_text"] = p.tokenizer.decode(outputs.tokens[0])
    return result


def compare(p: Prepared, outputs: Any) -> dict[str, Any]:
    """Run transformers on the same weights, dtype and threads; compare and time it."""
    from tsqp_core.reference import Reference, attention_kernel

    w = p.cfg.workload
    kernel = attention_kernel(p.executor.fuses_attention, p.partition.gpu_ops())
    try:  # the GPU side's device, when this host has it (a remote server's may not be here)
        device = resolve_device(p.cfg.device)
    except ConfigError:
        device = torch.device("cpu")
    ref = Reference(p.model_dir, p.cfg.torch_dtype, kernel, device)
    totals, ttfts, tpots = [], [], []
    bar = _progress(w.warmup + w.repeats, f"{p.cfg.stage} {w.kind} monolithic")
    for i in range(w.warmup + w.repeats):
        if w.kind == "prefill":
            logits, ns = ref.prefill(p.prompt)
            gen, ttft, tpot = None, ns, None
        else:
            t0 = now_ns()
            gen = ref.generate(p.prompt, len(outputs.tokens[0]))
            ns, ttft = now_ns() - t0, gen.ttft_ns
            tpot = median([float(x) for x in gen.step_ns])
        bar.update()
        if i >= w.warmup:
            totals.append(ns)
            ttfts.append(ttft)
            if tpot is not None:
                tpots.append(tpot)
    bar.close()
    if w.kind == "prefill":
        diff = (outputs.float() - logits.float()).abs().max().item()
        tokens_match = bool(torch.equal(outputs.argmax(-1), logits.argmax(-1)))
    else:
        assert gen is not None
        tokens_match = gen.tokens == outputs.tokens
        diff = 0.0
        for a, b, ref_tokens, tokens in zip(outputs.step_logits, gen.step_logits,
                                            zip(*gen.tokens), zip(*outputs.tokens)):
            diff = max(diff, (a.float() - b.float()).abs().max().item())
            if ref_tokens != tokens:  # inputs differ from here on
                break
    return {"impl": f"transformers {ref.version} ({ref.attention} attention, {ref.device})",
            "latency_ms": {"total": median(totals) / 1e6, "ttft": median(ttfts) / 1e6,
                           "tpot": (median(tpots) / 1e6) if tpots else None,
                           "repeats_total": [t / 1e6 for t in totals]},
            "max_abs_logit_diff": diff, "tokens_match": tokens_match,
            "reference_tokens": gen.tokens if gen is not None else None}


def _ratio(split: float | None, mono: float | None) -> float | None:
    return split / mono if split is not None and mono else None


def add_ratios(result: dict[str, Any]) -> None:
    """``ratio`` (split / monolithic for total, ttft, tpot) wherever both times exist, and for
    ``bench`` the ``bench`` section: prefill and per-token decode, split, monolithic, ratio."""
    lat, ref = result["latency_ms"], result["reference"]["latency_ms"]
    result["ratio"] = {k: _ratio(lat.get(k), ref.get(k)) for k in ("total", "ttft", "tpot")}
    if result["workload"]["kind"] != "bench":
        return
    threads = result["config"]["threads"]
    result["bench"] = {
        "prefill_ms": {"split": lat["ttft"], "monolithic": ref["ttft"],
                       "ratio": result["ratio"]["ttft"]},
        "decode_ms_per_token": {"split": lat["tpot"], "monolithic": ref["tpot"],
                                "ratio": result["ratio"]["tpot"]},
        "total_ms": {"split": lat["total"], "monolithic": ref["total"],
                     "ratio": result["ratio"]["total"]},
        "decode_steps": result["workload"]["new_tokens"],
        "threads": {"split_tee": threads["tee"], "split_gpu": threads["gpu"],
                    "monolithic": threads["tee"]},
    }


def write_results(outdir: Path, result: dict[str, Any]) -> Path:
    """Write ``results.json`` atomically: readers never see half a file."""
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    return path


def summary(result: dict[str, Any]) -> str:
    c, w, r, lat = result["config"], result["workload"], result["rpc"], result["latency_ms"]
    lines = [
        f"tsqp {c['stage']}: transport={c['transport']} executor={c['executor']} "
        f"partition={c['partition']} model={c['model']} dtype={c['dtype']} device={c['device']}",
        f"workload: {w['kind']} batch={w['batch']} prompt_tokens={w['prompt_tokens']} "
        f"new_tokens={w['new_tokens']}",
    ]
    if result.get("output_text") is not None:
        lines.append(f"output: {result['output_text']!r}")
    tpot = f", tpot {lat['tpot']:.2f} ms" if lat.get("tpot") is not None else ""
    lines.append(f"latency: total {lat['total']:.1f} ms, ttft {lat['ttft']:.1f} ms{tpot}")
    lines.append("breakdown: " + ", ".join(f"{k} {v:.1f} ms" for k, v in lat["breakdown"].items()))
    lines.append(f"rpc: {r['calls_per_forward']} calls/forward, {r['calls']} calls, "
                 f"{r['bytes_to_gpu'] / 1e6:.2f} MB to gpu, {r['bytes_from_gpu'] / 1e6:.2f} MB back")
    exposed = sorted({e["tensor"] for e in result["exposure"] if e["plaintext"]})
    lines.append("gpu side sees in plaintext: " + "; ".join(exposed))
    ref = result.get("reference")
    if ref:
        ratio = (result.get("ratio") or {}).get("total")
        lines.append(f"reference ({ref['impl']}): max |dlogit| {ref['max_abs_logit_diff']:.3g}, "
                     f"tokens match: {ref['tokens_match']}, total {ref['latency_ms']['total']:.1f} ms"
                     + (f", split/monolithic {ratio:.2f}x" if ratio else ""))
    bench = result.get("bench")
    if bench:
        for key, what in (("prefill_ms", "prefill"), ("decode_ms_per_token", "decode/token")):
            b = bench[key]
            if b["split"] is not None and b["monolithic"] is not None:
                lines.append(f"bench {what}: split {b['split']:.2f} ms, monolithic "
                             f"{b['monolithic']:.2f} ms, split/monolithic {b['ratio']:.2f}x")
    return "\n".join(lines)
