"""The sweep report: ``summary.csv``, ``summary.md`` and ``breakdown.png`` from ``results.json``.

One row per run found under a directory (recursively): where the time goes (the seed's
categories), calls and bytes per forward, the monolithic time and ``split / monolithic``, and
the max |Δlogit| against transformers. Jobs that failed are listed too: each wrote
``failed.json`` (exit code and reason) into its directory, and a job directory with neither
that nor ``results.json`` belongs to a job that died (or is still running). Written by the
Hydra callback at the end of every ``run -m`` sweep (:mod:`tsqp_core.callbacks`) and rebuilt
by ``python -m tsqp_core report DIR``; both call :func:`write_report`, so they produce the
same files from the same runs.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

FILES = ("summary.csv", "summary.md", "breakdown.png")
#: What a job that failed leaves in its directory (beside results.json if it got that far).
FAILED = "failed.json"
PARTS = ("serialize", "transport", "gpu_compute", "tee_compute", "protect", "other")
PART_LABELS = {"serialize": "serialization", "transport": "transport (RPC)",
               "gpu_compute": "GPU-side compute", "tee_compute": "TEE compute",
               "protect": "protection (online)", "other": "other (unattributed)"}

SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

#: summary.csv, in order: column -> how its value is written.
COLUMNS: dict[str, str] = {
    "job": "s", "label": "s", "stage": "s", "transport": "s", "executor": "s",
    "partition": "s", "protection": "s", "dtype": "s", "model": "s", "device": "s",
    "kind": "s", "prompt_tokens": "d", "new_tokens": "d", "repeats": "d",
    "threads_tee": "d", "threads_gpu": "d",
    "calls_per_forward": "d", "mb_to_gpu_per_forward": ".3f", "mb_from_gpu_per_forward": ".3f",
    "total_ms": ".3f", **{f"{p}_ms": ".3f" for p in PARTS},
    "monolithic_ms": ".3f", "split_over_monolithic": ".3f",
    "prefill_ms": ".3f", "monolithic_prefill_ms": ".3f", "prefill_ratio": ".3f",
    "decode_ms_per_token": ".3f", "monolithic_decode_ms_per_token": ".3f", "decode_ratio": ".3f",
    "prefill_us_per_call": ".1f", "decode_us_per_call": ".1f",
    "max_abs_logit_diff": ".3g", "tokens_match": "s", "status": "s", "error": "s",
    "split_compiled": "s", "monolithic_compiled": "s", "gpu_compile_ms": ".1f",
}


class NoResults(FileNotFoundError):
    """No ``results.json`` under the directory given."""


@dataclass
class Run:
    path: Path  # the run's directory
    result: dict[str, Any]
    overrides: list[str]  # the job's Hydra task overrides, when it has them


@dataclass
class Failure:
    path: Path  # the job's directory
    exit_code: int | None  # None: the job left no word (killed, crashed, still running)
    error: str
    overrides: list[str]


def write_failure(job_dir: Path, exit_code: int, error: str) -> Path:
    """Record in a job's directory that it failed, with the exit code it would have had."""
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / FAILED
    path.write_text(json.dumps({"schema": "tsqp.failed/1", "exit_code": exit_code,
                                "error": error}, indent=2))
    return path


# --- reading --------------------------------------------------------------------------------

def _natural(path: Path) -> list:
    """Sort key: ``2-stage1`` before ``10-stage0``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def collect_failures(root: Path) -> list[Failure]:
    """Every job under ``root`` that failed: those that said so (``failed.json``), and job
    directories (Hydra's ``.hydra/`` inside) with no result at all."""
    root = Path(root)
    jobs = {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    jobs |= {p.parent for p in root.rglob(FAILED)}
    out = []
    for job in sorted(jobs, key=lambda p: _natural(p.relative_to(root))):
        marker = job / FAILED
        if marker.is_file():
            try:
                data = json.loads(marker.read_text())
                code, error = data.get("exit_code"), str(data.get("error", ""))
            except (OSError, ValueError) as exc:
                code, error = None, f"unreadable {FAILED}: {exc}"
        elif (job / "results.json").is_file():
            continue
        else:
            code, error = None, ("no results.json: the job died before it finished "
                                 "(or is still running)")
        out.append(Failure(job, code, error, _overrides(job)))
    return out


def collect(root: Path, allow_empty: bool = False) -> list[Run]:
    """Every readable ``tsqp.run/1`` result under ``root``, in job order."""
    root = Path(root)
    if not root.is_dir():
        raise NoResults(f"{root} is not a directory")
    runs = []
    for path in sorted(root.rglob("results.json"), key=lambda p: _natural(p.relative_to(root))):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"tsqp report: skipping {path}: {exc}", file=sys.stderr)
            continue
        if not isinstance(result, dict) or not str(result.get("schema", "")).startswith("tsqp.run/"):
            print(f"tsqp report: skipping {path}: not a tsqp run result", file=sys.stderr)
            continue
        runs.append(Run(path.parent, result, _overrides(path.parent)))
    if not runs and not allow_empty:
        raise NoResults(f"no results.json under {root}: give a run or sweep directory "
                        "(outputs/DATE/TIME-STAGE or multirun/DATE/TIME)")
    return runs


def _varying(runs: list[Run] | list[Run | Failure]) -> list[str]:
    """Override keys whose values differ between the jobs: what the sweep swept."""
    parsed = [dict(o.split("=", 1) for o in r.overrides if "=" in o) for r in runs]
    keys: list[str] = []
    for d in parsed:
        keys += [k for k in d if k not in keys]
    return [k for k in keys if len({d.get(k) for d in parsed}) > 1]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def row(run: Run, root: Path, varying: list[str]) -> dict[str, Any]:
    r = run.result
    c, w, rpc, lat = r["config"], r["workload"], r["rpc"], r["latency_ms"]
    ref = r.get("reference") or {}
    ref_lat = ref.get("latency_ms") or {}
    ratio = r.get("ratio") or {}
    per_call = (r.get("bench") or {}).get("per_call_overhead_us") or {}
    per_fwd = rpc.get("per_forward")
    if per_fwd is None:  # older results: average over the forwards of the span
        forwards = max(1, round(rpc["calls"] / rpc["calls_per_forward"])) if rpc["calls_per_forward"] else 1
        per_fwd = {k: rpc[k] / forwards for k in ("bytes_to_gpu", "bytes_from_gpu")}
    opts = dict(o.split("=", 1) for o in run.overrides if "=" in o)
    label = (" ".join(f"{k}={opts[k]}" for k in varying if k in opts) or c.get("stage")
             or run.path.name)
    threads = c.get("threads") or {}
    breakdown = lat.get("breakdown") or {}
    out = {
        "job": run.path.relative_to(root).as_posix(),
        "label": label, "stage": c["stage"], "transport": c["transport"],
        "executor": c["executor"], "partition": c["partition"],
        "protection": c.get("protection"), "dtype": c["dtype"], "model": c["model"],
        "device": c.get("device"), "kind": w["kind"], "prompt_tokens": w["prompt_tokens"],
        "new_tokens": w.get("new_tokens"), "repeats": w.get("repeats"),
        "threads_tee": threads.get("tee"), "threads_gpu": threads.get("gpu"),
        "calls_per_forward": rpc["calls_per_forward"],
        "mb_to_gpu_per_forward": per_fwd["bytes_to_gpu"] / 1e6,
        "mb_from_gpu_per_forward": per_fwd["bytes_from_gpu"] / 1e6,
        "total_ms": lat["total"],
        **{f"{p}_ms": breakdown.get(p) for p in PARTS},
        "monolithic_ms": ref_lat.get("total"),
        "split_over_monolithic": ratio.get("total", _ratio(lat["total"], ref_lat.get("total"))),
        "prefill_ms": lat.get("ttft"), "monolithic_prefill_ms": ref_lat.get("ttft"),
        "prefill_ratio": ratio.get("ttft", _ratio(lat.get("ttft"), ref_lat.get("ttft"))),
        "decode_ms_per_token": lat.get("tpot"),
        "monolithic_decode_ms_per_token": ref_lat.get("tpot"),
        "decode_ratio": ratio.get("tpot", _ratio(lat.get("tpot"), ref_lat.get("tpot"))),
        "prefill_us_per_call": per_call.get("prefill"),
        "decode_us_per_call": per_call.get("decode"),
        "max_abs_logit_diff": ref.get("max_abs_logit_diff"),
        "tokens_match": ref.get("tokens_match"),
        "status": "ok" if ref.get("passed", True) else "reference check failed",
        "error": None,
        # which variants were compared, and what compiling the split's programs cost at hello
        "split_compiled": bool((r.get("server") or {}).get("compile")),
        "monolithic_compiled": ref.get("compiled", False) if ref else None,
        "gpu_compile_ms": (((r.get("server") or {}).get("compile") or {}).get("plan") or {})
        .get("compile_ms"),
    }
    return out


def failure_row(failure: Failure, root: Path, varying: list[str]) -> dict[str, Any]:
    """A failed job's CSV row: what it was (its swept overrides) and why it failed."""
    opts = dict(o.split("=", 1) for o in failure.overrides if "=" in o)
    label = " ".join(f"{k}={opts[k]}" for k in varying if k in opts) or failure.path.name
    out: dict[str, Any] = dict.fromkeys(COLUMNS)
    code = "" if failure.exit_code is None else f", exit {failure.exit_code}"
    out |= {"job": failure.path.relative_to(root).as_posix(), "label": label,
            "status": f"failed{code}", "error": failure.error}
    return out


def rows(runs: list[Run], root: Path,
         failures: Sequence[Failure] = ()) -> list[dict[str, Any]]:
    """One row per run, then one per failed job that left no result."""
    varying = _varying([*runs, *failures])
    with_results = {r.path for r in runs}
    return ([row(r, root, varying) for r in runs]
            + [failure_row(f, root, varying) for f in failures if f.path not in with_results])


# --- writing --------------------------------------------------------------------------------

def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return ""
    if spec == "s":
        return str(value)
    if spec == "d":
        return str(int(value))
    return format(float(value), spec)


def to_csv(table: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in table:
        writer.writerow([_fmt(r[k], spec) for k, spec in COLUMNS.items()])
    return buf.getvalue()


def _md(value: Any, spec: str) -> str:
    return _fmt(value, spec) or "–"


def _yes(flag: Any) -> str:
    return "–" if flag is None else ("yes" if flag else "no")


def _pair(split: Any, mono: Any, ratio: Any, spec: str = ".2f") -> str:
    if split is None:
        return "–"
    if mono is None:
        return _md(split, spec)
    return f"{_md(split, spec)} / {_md(mono, spec)} ({_md(ratio, '.2f')}×)"


def _command(root: Path) -> str | None:
    """The sweep's command line, from Hydra's ``multirun.yaml`` in the sweep directory."""
    path = root / "multirun.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    over = OmegaConf.load(path).hydra.overrides
    args = [str(o) for o in over.hydra
            if not str(o).startswith(("hydra.sweep.dir=", "hydra.run.dir=", "hydra.mode="))]
    args += [str(o) for o in over.task]
    return "python -m tsqp_core run -m " + " ".join(shlex.quote(a) for a in args)


def _common(table: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: table[0][k] for k in keys if len({r[k] for r in table}) == 1}


def _workload_text(r: dict[str, Any]) -> str:
    if r["kind"] == "bench":
        return f"bench: prefill {r['prompt_tokens']} tokens + {r['new_tokens']} decode steps"
    if r["kind"] == "generate":
        return f"generate: {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens"
    return f"prefill: {r['prompt_tokens']} tokens"


def _failures_markdown(failures: Sequence[Failure], root: Path) -> list[str]:
    if not failures:
        return []
    lines = [f"## Failed jobs: {len(failures)}", "",
             "Each wrote `failed.json` into its directory (a job with no word died before it "
             "finished); the jobs above are the ones that produced results.", "",
             "| job | overrides | exit code | why |", "|---|---|---|---|"]
    for f in failures:
        cells = [f.path.relative_to(root).as_posix(), " ".join(f.overrides) or "–",
                 "–" if f.exit_code is None else str(f.exit_code),
                 " ".join(f.error.split())[:500]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return [*lines, ""]


def to_markdown(table: list[dict[str, Any]], runs: list[Run], root: Path,
                failures: Sequence[Failure] = ()) -> str:
    table = [r for r in table if r["status"] in ("ok", "reference check failed")]
    lines = ["# tsqp sweep summary", ""]
    command = _command(root)
    if command:
        lines += [f"Command: `{command}`", ""]
    h = (runs[0].result.get("host") or {}) if runs else {}
    if h:
        lines += [f"Machine: {h.get('cpus')} CPUs ({h.get('machine')}), {h.get('platform')}, "
                  f"torch {h.get('torch')}, OMP_WAIT_POLICY={h.get('omp_wait_policy')}, "
                  f"THP_MEM_ALLOC_ENABLE={h.get('thp_mem_alloc_enable')}.", ""]
    if failures:
        jobs = len({r.path for r in runs} | {f.path for f in failures})
        lines += [f"**{len(failures)} of {jobs} jobs failed** (listed at the end).", ""]
    if not table:
        return "\n".join([*lines, *_failures_markdown(failures, root)])
    common = _common(table, ("model", "kind", "prompt_tokens", "new_tokens", "repeats",
                             "threads_tee", "threads_gpu", "device"))
    if {"model", "kind", "prompt_tokens", "new_tokens"} <= set(common):
        lines += [f"Model `{common['model']}`, {_workload_text(table[0])}"
                  + (f", medians of {common['repeats']} repeats" if "repeats" in common else "")
                  + (f"; threads: TEE {common['threads_tee']}, GPU side {common['threads_gpu']}, "
                     f"monolithic {common['threads_tee']}"
                     if {"threads_tee", "threads_gpu"} <= set(common) else "") + ".", ""]
    lines += [
        "Times in ms. *total* is one run of the workload (the median repeat) and its breakdown "
        "adds up to it; *monolithic* is transformers on the same weights, dtype and TEE threads; "
        "*prefill* and *decode per token* read split / monolithic (ratio); *µs/call* is "
        "(split - monolithic) / calls per forward, prefill / decode; calls and MB per "
        "forward are those of the first forward (the prefill).", "",
    ]
    head = ["job", "stage", "transport", "executor", "dtype", "partition", "calls/fwd",
            "MB/fwd to / from GPU", "total", "serialize", "transport", "GPU compute",
            "TEE compute", "protect", "other", "monolithic", "split / mono", "prefill",
            "decode per token", "µs/call", "compiled split / mono", "max abs Δlogit"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [
            r["label"], r["stage"] or "–", r["transport"], r["executor"], r["dtype"], r["partition"],
            _md(r["calls_per_forward"], "d"),
            f"{_md(r['mb_to_gpu_per_forward'], '.2f')} / {_md(r['mb_from_gpu_per_forward'], '.2f')}",
            _md(r["total_ms"], ".1f"), *(_md(r[f"{p}_ms"], ".1f") for p in PARTS),
            _md(r["monolithic_ms"], ".1f"),
            (_md(r["split_over_monolithic"], ".2f") + "×") if r["split_over_monolithic"] else "–",
            _pair(r["prefill_ms"], r["monolithic_prefill_ms"], r["prefill_ratio"], ".1f"),
            _pair(r["decode_ms_per_token"], r["monolithic_decode_ms_per_token"],
                  r["decode_ratio"]),
            f"{_md(r['prefill_us_per_call'], '.0f')} / {_md(r['decode_us_per_call'], '.0f')}",
            f"{_yes(r['split_compiled'])} / {_yes(r['monolithic_compiled'])}",
            _md(r["max_abs_logit_diff"], ".2g"),
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", "![where the time goes, per job](breakdown.png)", ""]
    lines += _failures_markdown(failures, root)
    return "\n".join(lines)


def _ticks(table: list[dict[str, Any]]) -> list[str]:
    """``transport=tcp workload.prompt_tokens=32`` -> two short lines, plus the settings a
    preset changed (``stage=stage3`` -> ``shm · fused · bfloat16``)."""
    shown = ("transport", "executor", "partition", "dtype")
    vary = [k for k in shown if len({r[k] for r in table}) > 1]
    ticks = []
    for r in table:
        lines = [part.split(".")[-1] for part in r["label"].split(" ")]
        extra = [SHORT.get(str(r[k]), str(r[k])) for k in vary if f"{k}=" not in r["label"]]
        lines += [" · ".join(extra[i:i + 2]) for i in range(0, len(extra), 2)]
        ticks.append("\n".join(lines))
    return ticks


def _subtitle(table: list[dict[str, Any]]) -> str:
    """What all the jobs share: model, dtype, workload."""
    c = _common(table, ("model", "dtype", "kind", "prompt_tokens", "new_tokens", "repeats"))
    parts = [c.get("model"), c.get("dtype")]
    if {"kind", "prompt_tokens", "new_tokens"} <= set(c):
        parts.append(_workload_text(table[0]))
    else:
        parts.append(c.get("kind"))
    if "repeats" in c:
        parts.append(f"median of {c['repeats']} repeats")
    return ", ".join(str(p) for p in parts if p is not None)


def plot(table: list[dict[str, Any]], path: Path) -> None:
    """Stacked bar per job (the breakdown of its total), monolithic time as a marker."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n = len(table)
    fig = Figure(figsize=(max(8.0, 1.25 * n + 5.0), 5.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(n))
    bottoms = [0.0] * n
    colors = dict(zip(PARTS, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3",
                                "#8c8c8c")))
    for part in PARTS:
        vals = [max(0.0, r[f"{part}_ms"] or 0.0) for r in table]
        ax.bar(xs, vals, 0.6, bottom=bottoms, label=PART_LABELS[part], color=colors[part])
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    top = max(bottoms + [r["monolithic_ms"] or 0.0 for r in table]) or 1.0
    has_mono = False
    for x, r in zip(xs, table):
        mono = r["monolithic_ms"]
        if mono is not None:
            has_mono = True
            ax.hlines(mono, x - 0.42, x + 0.42, colors="black", linewidth=2.2, zorder=3)
        text = f"{r['total_ms']:.1f} ms"
        if r["split_over_monolithic"]:
            text += f"\n{r['split_over_monolithic']:.2f}× mono"
        ax.annotate(text, (x, max(bottoms[x], mono or 0.0)), xytext=(0, 4),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, top * 1.22)
    ax.set_xticks(xs)
    ax.set_xticklabels(_ticks(table), fontsize=8)
    ax.set_title("Split inference: where the time goes, against the monolithic model\n"
                 + _subtitle(table), fontsize=10)
    ax.set_xlabel("job (swept settings)")
    ax.set_ylabel("wall time per run, ms (median repeat)")
    handles, labels = ax.get_legend_handles_labels()
    if has_mono:
        handles.append(Line2D([], [], color="black", linewidth=2.2))
        labels.append("monolithic (transformers,\nsame weights, dtype, threads)")
    ax.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              title="split run: time by category", title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})


@dataclass
class Report:
    paths: list[Path]  # the files written
    runs: list[Run]
    failures: list[Failure]

    @property
    def exit_code(self) -> int:
        """0 when no job failed; the failed jobs' exit code when they agree; else 1."""
        codes = {f.exit_code for f in self.failures}
        if not codes:
            return 0
        return (codes.pop() or 1) if len(codes) == 1 else 1


def write_report(root: Path) -> Report:
    """Build the report in ``root`` from the jobs under it (the chart only when some job has
    results); failed jobs are listed. Raises :class:`NoResults` when there are no jobs."""
    root = Path(root)
    runs = collect(root, allow_empty=True)
    failures = collect_failures(root)
    if not runs and not failures:
        collect(root)  # raises NoResults with its message
    table = rows(runs, root, failures)
    csv_path, md_path, png_path = (root / f for f in FILES)
    csv_path.write_text(to_csv(table))
    md_path.write_text(to_markdown(table, runs, root, failures))
    paths = [csv_path, md_path]
    ok = [r for r in table if r["status"] in ("ok", "reference check failed")]
    if ok:
        plot(ok, png_path)
        paths.append(png_path)
    return Report(paths, runs, failures)


def main(args: list[str]) -> int:
    """``python -m tsqp_core report DIR``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tsqp_core report",
        description="Rebuild summary.csv, summary.md and breakdown.png in DIR from the "
                    "results.json files under it (recursively).")
    parser.add_argument("dir", type=Path, help="a run or sweep directory")
    ns = parser.parse_args(args)
    try:
        report = write_report(ns.dir)
    except NoResults as exc:
        print(f"tsqp report: error: {exc}", file=sys.stderr)
        return 2
    print("tsqp report: wrote " + ", ".join(str(p) for p in report.paths))
    if report.failures:
        print(f"tsqp report: {len(report.failures)} failed job(s) listed in summary.md",
              file=sys.stderr)
    return 0
