"""``results.json`` (the run contract: README, "results.json") and the summary a run prints."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from tsqp_core import __version__
from tsqp_core.metrics import median, ratio_spread
from tsqp_core.run.bench import Measured
from tsqp_core.run.prepare import Prepared

SCHEMA = "tsqp.run/1"


def host() -> dict[str, Any]:
    """The machine a measurement was taken on."""
    return {"platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE")}


def build(p: Prepared, m: Measured, server: dict[str, Any]) -> dict[str, Any]:
    cfg, w = p.cfg, p.cfg.workload
    mid = m.mid
    rpc = m.meter.rpc()
    per_forward = m.meter.first or {k: rpc[k] for k in ("calls", "bytes_to_gpu", "bytes_from_gpu")}
    breakdown = m.meter.breakdown(m.totals[mid])
    offline_ms = median([t / 1e6 for t in m.offline])
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "tsqp_version": __version__,
        "config": {"stage": cfg.stage, "transport": cfg.transport.name,
                   "transport_options": p.transport.options.model_dump(),
                   "executor": cfg.executor.name, "partition": cfg.partition.name,
                   "protection": cfg.protection.name, "tee_ops": cfg.tee_ops.name,
                   "model": cfg.model.path or cfg.model.name, "dtype": cfg.dtype,
                   "device": server.get("device", cfg.device),
                   "threads": cfg.threads.model_dump()},
        "server": server,
        # the checkpoint every side read: where it is and a hash of its contents
        "model": p.model_info,
        "workload": {"kind": w.kind, "batch": w.batch, "prompt_tokens": int(p.prompt.shape[1]),
                     "new_tokens": w.new_tokens if w.kind in ("generate", "bench") else 0,
                     "warmup": w.warmup, "repeats": w.repeats, "interleave": w.interleave},
        "rpc": {"calls_per_forward": len(p.schedule.calls), **rpc, "per_forward": per_forward},
        "latency_ms": {"total": m.totals[mid] / 1e6, "ttft": median(m.ttfts) / 1e6,
                       "tpot": (median(m.tpots) / 1e6) if m.tpots else None,
                       "breakdown": breakdown,
                       # serialize by part (they add up to it), over the whole repeat
                       "serialize_parts": m.meter.serialize_parts(),
                       "repeats_total": [t / 1e6 for t in m.totals],
                       "repeats_ttft": [t / 1e6 for t in m.ttfts],
                       "repeats_tpot": [t / 1e6 for t in m.tpots]},
        "protection": {**p.protection.report(), "online_ms": breakdown["protect"],
                       "offline_ms": offline_ms,
                       "offline_ms_per_forward": offline_ms / len(m.forward_shapes)},
        "exposure": p.schedule.exposure(p.protection),
        "output_text": None,
        "host": host(),
    }
    if w.kind != "prefill":
        result["tokens"] = m.outputs.tokens
        if p.tokenizer is not None and w.kind == "generate":
            result["output_text"] = p.tokenizer.decode(m.outputs.tokens[0])
    return result


def _ratio(split: float | None, mono: float | None) -> float | None:
    return split / mono if split is not None and mono else None


def _per_call_us(split: float | None, mono: float | None, calls: int) -> float | None:
    """What each call adds: ``(split - monolithic) / calls per forward``, in microseconds."""
    return (split - mono) * 1e3 / calls if split is not None and mono is not None and calls \
        else None


def add_ratios(result: dict[str, Any]) -> None:
    """``ratio`` (split / monolithic for total, ttft, tpot, medians of each side) wherever
    both times exist, ``ratio_spread`` (min, median, max of the per-repeat ratios), and for
    ``bench`` the ``bench`` section: prefill and per-token decode, split, monolithic, ratio,
    and the per-call overhead ``(split - monolithic) / calls per forward``."""
    lat, ref = result["latency_ms"], result["reference"]["latency_ms"]
    result["ratio"] = {k: _ratio(lat.get(k), ref.get(k)) for k in ("total", "ttft", "tpot")}
    result["ratio_spread"] = {k: ratio_spread(lat.get(f"repeats_{k}") or [],
                                              ref.get(f"repeats_{k}") or [])
                              for k in ("total", "ttft", "tpot")}
    if result["workload"]["kind"] != "bench":
        return
    threads = result["config"]["threads"]
    calls = result["rpc"]["calls_per_forward"]
    result["bench"] = {
        "prefill_ms": {"split": lat["ttft"], "monolithic": ref["ttft"],
                       "ratio": result["ratio"]["ttft"],
                       "ratio_spread": result["ratio_spread"]["ttft"]},
        "decode_ms_per_token": {"split": lat["tpot"], "monolithic": ref["tpot"],
                                "ratio": result["ratio"]["tpot"],
                                "ratio_spread": result["ratio_spread"]["tpot"]},
        "total_ms": {"split": lat["total"], "monolithic": ref["total"],
                     "ratio": result["ratio"]["total"]},
        "per_call_overhead_us": {"prefill": _per_call_us(lat["ttft"], ref["ttft"], calls),
                                 "decode": _per_call_us(lat["tpot"], ref["tpot"], calls),
                                 "calls_per_forward": calls},
        "decode_steps": result["workload"]["new_tokens"],
        "threads": {"split_tee": threads["tee"], "split_gpu": threads["gpu"],
                    "monolithic": threads["tee"]},
        "compared": compared(result),
    }


def reference_tolerance(p: Prepared) -> float:
    """The run's declared tolerance: ``reference_tolerance`` for its dtype, plus what the
    protection scheme declares it may move the logits by."""
    dtype = p.cfg.dtype
    return (float(getattr(p.cfg.reference_tolerance, dtype))
            + float(p.protection.tolerance.get(dtype, 0.0)))


def check_reference(reference: dict[str, Any], tolerance: float) -> None:
    """The reference gate: ``passed`` when max |Δlogit| is a number within ``tolerance`` and
    the greedy tokens match (a NaN or an infinity never passes)."""
    diff = reference["max_abs_logit_diff"]
    within = isinstance(diff, (int, float)) and math.isfinite(diff) and diff <= tolerance
    reference["tolerance"] = tolerance
    reference["passed"] = bool(within and reference["tokens_match"] is True)


def reference_failure(result: dict[str, Any]) -> str | None:
    """One line saying why the reference check failed, or ``None`` when it passed (or did
    not run)."""
    ref = result.get("reference")
    if not ref or ref.get("passed", True):
        return None
    why = []
    diff, tol = ref["max_abs_logit_diff"], ref["tolerance"]
    if diff is None:  # a non-finite logit: JSON holds null and the reason
        why.append(f"max |dlogit| not a number ({ref.get('mismatch', 'non-finite logits')})")
    elif not (isinstance(diff, (int, float)) and math.isfinite(diff) and diff <= tol):
        why.append(f"max |dlogit| {diff:.3g} > {tol:.3g} ({result['config']['dtype']} tolerance)")
    if ref["tokens_match"] is not True:
        why.append("greedy tokens differ")
    return "reference check failed: " + " and ".join(why) + " against " + ref["impl"]


def compared(result: dict[str, Any]) -> dict[str, str]:
    """Which variants the ratio compares: ``compiled`` or ``eager``, split and monolithic."""
    split = bool((result.get("server") or {}).get("compile"))
    mono = bool((result.get("reference") or {}).get("compiled"))
    return {"split": "compiled" if split else "eager",
            "monolithic": "compiled" if mono else "eager"}


def compile_line(result: dict[str, Any]) -> str | None:
    """What compiling cost, apart from the timed runs: the GPU side's programs (at hello)
    and the monolithic reference (before its timer)."""
    parts = []
    comp = (result.get("server") or {}).get("compile")
    if comp:
        plan, first = comp["plan"], comp["first_use"]
        parts.append(f"gpu side {plan['graphs']} graphs in {plan['compile_ms'] / 1e3:.1f} s at "
                     f"hello ({comp['segments']} programs, max {comp['max_graphs']} graphs per "
                     "shape bucket" + (", CUDA graphs for decode" if comp["cuda_graphs"] else "")
                     + ")"
                     + (f", {first['graphs']} more at first use ({first['compile_ms'] / 1e3:.1f} s)"
                        if first["graphs"] else "")
                     + (f", {comp['fallbacks']} calls past the bound ran eagerly"
                        if comp["fallbacks"] else "")
                     + (f", {len(comp['failed'])} programs did not compile (eager)"
                        if comp["failed"] else ""))
    ref = result.get("reference") or {}
    if ref.get("compiled") and ref.get("compile_ms") is not None:
        parts.append(f"monolithic {ref['compile_ms'] / 1e3:.1f} s (one untimed run)")
    return "compile (not in the timed runs): " + "; ".join(parts) if parts else None


def write_results(outdir: Path, result: dict[str, Any]) -> Path:
    """Write ``results.json`` atomically: readers never see half a file."""
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    return path


def _pinned(server: dict[str, Any]) -> str:
    """`` host_memory=...`` where the GPU side is a CUDA device: whether the memory a call's
    tensors cross is page-locked (a CPU GPU side has nothing to pin: said nothing)."""
    memory = server.get("host_memory")
    if not memory or not str(server.get("device", "")).startswith("cuda"):
        return ""
    text = "pinned" if str(memory.get("pinned", "")).startswith("yes") else "pageable"
    if memory.get("refused"):
        text += f" ({len(memory['refused'])} refused: see results.json server.host_memory)"
    return f" host_memory={text}"


def summary(result: dict[str, Any]) -> str:
    c, w, r, lat = result["config"], result["workload"], result["rpc"], result["latency_ms"]
    server = result.get("server") or {}
    lines = [
        (f"tsqp {c['stage']}: " if c.get("stage") else "tsqp: ")
        + f"transport={c['transport']} executor={c['executor']} "
        f"partition={c['partition']} protection={c['protection']} model={c['model']} "
        f"dtype={c['dtype']} device={c['device']}"
        + (f" attention={server['attention']}" if server.get("attention") else "")
        + _pinned(server),
        f"workload: {w['kind']} batch={w['batch']} prompt_tokens={w['prompt_tokens']} "
        f"new_tokens={w['new_tokens']}",
    ]
    if result.get("output_text") is not None:
        lines.append(f"output: {result['output_text']!r}")
    tpot = f", tpot {lat['tpot']:.2f} ms" if lat.get("tpot") is not None else ""
    lines.append(f"latency: total {lat['total']:.1f} ms, ttft {lat['ttft']:.1f} ms{tpot}")
    lines.append("breakdown: " + ", ".join(f"{k} {v:.1f} ms" for k, v in lat["breakdown"].items()))
    parts, calls = lat.get("serialize_parts"), r.get("calls")
    if parts and calls:
        lines.append("serialize per call: " + ", ".join(
            f"{k.replace('_', ' ')} {v * 1e3 / calls:.1f} us" for k, v in parts.items()))
    prot = result.get("protection") or {}
    if c["protection"] != "none":
        lines.append(f"protection offline (before the timer): {prot['offline_ms']:.1f} ms")
    lines.append(f"rpc: {r['calls_per_forward']} calls/forward, {r['calls']} calls, "
                 f"{r['bytes_to_gpu'] / 1e6:.2f} MB to gpu, {r['bytes_from_gpu'] / 1e6:.2f} MB back")
    exposed = sorted({e["tensor"] for e in result["exposure"] if e["plaintext"]})
    lines.append("gpu side sees in plaintext: " + ("; ".join(exposed) or "nothing"))
    masked: dict[str, set[str]] = {}
    for e in result["exposure"]:
        if not e["plaintext"]:
            masked.setdefault(e["seen_as"], set()).add(e["tensor"])
    for how, tensors in sorted(masked.items()):
        lines.append(f"gpu side sees masked ({how}): " + "; ".join(sorted(tensors)))
    integrity = prot.get("integrity")
    if integrity:
        how = (f"soundness 2^-{integrity['soundness_bits']} per row"
               if integrity.get("soundness_bits") else integrity.get("kind", ""))
        unverified = integrity.get("unverified_calls")
        lines.append(f"integrity: {integrity['checks']} products checked "
                     f"({integrity['rows_checked']} rows), {integrity['failed']} failed, {how}"
                     + (f"; {unverified} calls not verifiable" if unverified else ""))
    line = compile_line(result)
    if line:
        lines.append(line)
    ref = result.get("reference")
    if ref:
        ratio = (result.get("ratio") or {}).get("total")
        checked = ref.get("checked_against")
        diff = ref["max_abs_logit_diff"]
        diff_text = f"{diff:.3g}" if diff is not None else f"n/a ({ref.get('mismatch')})"
        lines.append(f"reference ({ref['impl']}): max |dlogit| {diff_text}, "
                     f"tokens match: {ref['tokens_match']}"
                     + (f" (against {checked}, untimed)" if checked and checked != ref["impl"]
                        else "")
                     + f", total {ref['latency_ms']['total']:.1f} ms"
                     + (f", split/monolithic {ratio:.2f}x" if ratio else "")
                     + ("" if ref.get("passed", True) else " -- FAILED"))
    if result.get("attacks"):
        from tsqp_core.attack.harness import summary_line

        lines.append(summary_line(result["attacks"]))
    bench = result.get("bench")
    if bench:
        how = bench.get("compared") or compared(result)
        lines.append(f"bench compares: split {how['split']} against monolithic "
                     f"{how['monolithic']}")
        for key, what in (("prefill_ms", "prefill"), ("decode_ms_per_token", "decode/token")):
            b = bench[key]
            if b["split"] is not None and b["monolithic"] is not None:
                spread = b.get("ratio_spread")
                per_call = bench["per_call_overhead_us"][
                    "prefill" if key == "prefill_ms" else "decode"]
                lines.append(f"bench {what}: split {b['split']:.2f} ms, monolithic "
                             f"{b['monolithic']:.2f} ms, split/monolithic {b['ratio']:.2f}x"
                             + (f" (repeats {spread['min']:.2f}-{spread['max']:.2f}x)"
                                if spread else "")
                             + (f", {per_call:.0f} us per call" if per_call is not None else ""))
    return "\n".join(lines)
