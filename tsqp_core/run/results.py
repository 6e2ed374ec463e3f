"""``results.json`` (the contract of DESIGN.md section 5) and the summary a run prints."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from tsqp_core import __version__
from tsqp_core.metrics import median
from tsqp_core.run.bench import Measured
from tsqp_core.run.prepare import Prepared

SCHEMA = "tsqp.run/1"


def host() -> dict[str, Any]:
    """The machine a measurement was taken on."""
    return {"platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


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
                   "executor": cfg.executor.name, "partition": cfg.partition.name,
                   "protection": cfg.protection.name, "tee_ops": cfg.tee_ops.name,
                   "model": cfg.model.name, "dtype": cfg.dtype,
                   "device": server.get("device", cfg.device),
                   "threads": cfg.threads.model_dump()},
        "server": server,
        "workload": {"kind": w.kind, "batch": w.batch, "prompt_tokens": int(p.prompt.shape[1]),
                     "new_tokens": w.new_tokens if w.kind in ("generate", "bench") else 0,
                     "warmup": w.warmup, "repeats": w.repeats},
        "rpc": {"calls_per_forward": len(p.schedule.calls), **rpc, "per_forward": per_forward},
        "latency_ms": {"total": m.totals[mid] / 1e6, "ttft": median(m.ttfts) / 1e6,
                       "tpot": (median(m.tpots) / 1e6) if m.tpots else None,
                       "breakdown": breakdown,
                       "repeats_total": [t / 1e6 for t in m.totals]},
        "protection": {**p.protection.report(), "online_ms": breakdown["protect"],
                       "offline_ms": offline_ms},
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
    server = result.get("server") or {}
    lines = [
        f"tsqp {c['stage']}: transport={c['transport']} executor={c['executor']} "
        f"partition={c['partition']} protection={c['protection']} model={c['model']} "
        f"dtype={c['dtype']} device={c['device']}"
        + (f" attention={server['attention']}" if server.get("attention") else ""),
        f"workload: {w['kind']} batch={w['batch']} prompt_tokens={w['prompt_tokens']} "
        f"new_tokens={w['new_tokens']}",
    ]
    if result.get("output_text") is not None:
        lines.append(f"output: {result['output_text']!r}")
    tpot = f", tpot {lat['tpot']:.2f} ms" if lat.get("tpot") is not None else ""
    lines.append(f"latency: total {lat['total']:.1f} ms, ttft {lat['ttft']:.1f} ms{tpot}")
    lines.append("breakdown: " + ", ".join(f"{k} {v:.1f} ms" for k, v in lat["breakdown"].items()))
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
        lines.append(f"integrity: {integrity['checks']} products checked "
                     f"({integrity['rows_checked']} rows), {integrity['failed']} failed, "
                     f"soundness 2^-{integrity['soundness_bits']} per row")
    ref = result.get("reference")
    if ref:
        ratio = (result.get("ratio") or {}).get("total")
        diff = ref["max_abs_logit_diff"]
        diff_text = f"{diff:.3g}" if diff is not None else f"n/a ({ref.get('mismatch')})"
        lines.append(f"reference ({ref['impl']}): max |dlogit| {diff_text}, "
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
