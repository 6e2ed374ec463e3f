"""workload=bench (split against monolithic in one run), the sweep report and ``report DIR``.

Nothing here asserts a timing: only that the numbers are there, consistent and reproducible.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tsqp_core import report

SMALL_BENCH = ("workload=bench", "workload.prompt_tokens=8", "workload.new_tokens=3",
               "workload.warmup=1", "workload.repeats=2")
SECTION5 = {"schema", "config", "workload", "rpc", "latency_ms", "reference", "exposure",
            "output_text"}


def rpc_calls(res: dict) -> int:
    return res["rpc"]["calls_per_forward"]


def test_the_median_is_one_real_repeat_on_every_side():
    from tsqp_core.metrics import median, median_index, ratio_spread

    assert median([4.0, 1.0, 3.0, 2.0]) == 2.0  # the lower middle one, not 2.5
    assert median([5.0]) == 5.0 and median([]) is None
    xs = [3.0, 9.0, 1.0, 7.0]
    assert xs[median_index(xs)] == median(xs)
    assert ratio_spread([2.0, 4.0], [1.0, 1.0]) == {"min": 2.0, "median": 2.0, "max": 4.0}


def _check_bench(res: dict) -> None:
    assert SECTION5 <= set(res) and res["schema"] == "tsqp.run/1"
    lat = res["latency_ms"]
    assert lat["total"] > 0 and lat["ttft"] > 0 and lat["tpot"] > 0
    parts = lat["breakdown"]
    assert set(parts) == {"serialize", "transport", "gpu_compute", "tee_compute", "protect",
                          "other"}
    assert abs(sum(parts.values()) - lat["total"]) <= 0.05 * lat["total"]
    bench = res["bench"]
    for key in ("prefill_ms", "decode_ms_per_token", "total_ms"):
        b = bench[key]
        assert b["split"] > 0 and b["monolithic"] > 0
        assert b["ratio"] == pytest.approx(b["split"] / b["monolithic"])
    assert bench["prefill_ms"]["split"] == lat["ttft"]
    assert bench["decode_ms_per_token"]["split"] == lat["tpot"]
    assert bench["threads"]["monolithic"] == res["config"]["threads"]["tee"]
    assert res["ratio"]["total"] == bench["total_ms"]["ratio"]
    # one median for both sides: a real repeat of each (the lower middle one)
    ref_lat = res["reference"]["latency_ms"]
    for side in (lat, ref_lat):
        for key in ("total", "ttft", "tpot"):
            assert side[key] in side[f"repeats_{key}"]
        assert side["ttft"] <= side["total"]
    for key in ("ttft", "tpot"):
        spread = res["ratio_spread"][key]
        per_repeat = [a / b for a, b in zip(lat[f"repeats_{key}"], ref_lat[f"repeats_{key}"])]
        assert spread["min"] == min(per_repeat) and spread["max"] == max(per_repeat)
        assert spread["min"] <= spread["median"] <= spread["max"]
    per_call = bench["per_call_overhead_us"]
    assert per_call["calls_per_forward"] == rpc_calls(res)
    assert per_call["prefill"] == pytest.approx(
        (lat["ttft"] - ref_lat["ttft"]) * 1e3 / rpc_calls(res))
    assert per_call["decode"] == pytest.approx(
        (lat["tpot"] - ref_lat["tpot"]) * 1e3 / rpc_calls(res))
    ref = res["reference"]
    assert ref["tokens_match"] is True and ref["max_abs_logit_diff"] <= 1e-4
    assert len(res["tokens"][0]) == 3 + 1  # the prefill's token, then new_tokens decode steps
    rpc = res["rpc"]
    assert rpc["per_forward"]["calls"] == rpc["calls_per_forward"] == 98
    assert rpc["calls"] == 98 * (3 + 1)
    assert 0 < rpc["per_forward"]["bytes_to_gpu"] < rpc["bytes_to_gpu"]


@pytest.mark.parametrize("transport", ["inproc", "tcp"])
def test_bench_fills_split_and_monolithic(run_tiny, tmp_path, transport):
    res = run_tiny(f"transport={transport}", *SMALL_BENCH)
    _check_bench(res)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["bench"] == res["bench"]
    assert res["workload"]["kind"] == "bench" and res["workload"]["new_tokens"] == 3


def test_bench_runs_the_reference_without_being_asked(run_tiny):
    res = run_tiny("transport=inproc", "reference=false", *SMALL_BENCH)
    assert res["reference"] is not None and res["bench"]["decode_ms_per_token"]["ratio"] > 0


def test_every_reference_run_gets_a_ratio(run_tiny):
    res = run_tiny("transport=inproc", "workload=prefill", "workload.prompt_tokens=8",
                   "reference=true")
    assert res["ratio"]["total"] == pytest.approx(
        res["latency_ms"]["total"] / res["reference"]["latency_ms"]["total"])
    assert "bench" not in res
    plain = run_tiny("transport=inproc", "workload=prefill", "workload.prompt_tokens=8")
    assert plain["reference"] is None and "ratio" not in plain


@pytest.mark.parametrize("interleave", [True, False])
def test_split_and_monolithic_repeats_take_turns(run_tiny, monkeypatch, interleave):
    """By default every split repeat runs, the GPU side stops, then every monolithic one;
    with ``workload.interleave`` each pair runs both sides, the split first in every other
    one (ABBA), warm-up pairs included."""
    import tsqp_core.run as run
    from tsqp_core.reference import Reference
    from tsqp_core.run import bench

    order: list[str] = []
    split_generate, mono_generate = bench.generate, Reference.generate
    monkeypatch.setattr(bench, "generate", lambda *a, **k: (order.append("split"),
                                                             split_generate(*a, **k))[1])
    monkeypatch.setattr(Reference, "generate", lambda *a, **k: (order.append("mono"),
                                                                mono_generate(*a, **k))[1])
    real_connect = run.connect

    @contextlib.contextmanager
    def watched(*args, **kwargs):
        with real_connect(*args, **kwargs) as conn:
            yield conn
        order.append("stop")  # the GPU side is stopped

    monkeypatch.setattr(run, "connect", watched)
    res = run_tiny("transport=inproc", "workload=bench", "workload.prompt_tokens=6",
                   "workload.new_tokens=2", "workload.warmup=1", "workload.repeats=3",
                   f"workload.interleave={str(interleave).lower()}")
    if interleave:
        assert order == ["split", "mono", "mono", "split", "split", "mono", "mono", "split",
                         "stop"]
    else:
        assert order == ["split"] * 4 + ["stop"] + ["mono"] * 4
    ref = res["reference"]
    assert ref["interleaved"] is interleave and res["workload"]["interleave"] is interleave
    assert len(ref["latency_ms"]["repeats_tpot"]) == len(res["latency_ms"]["repeats_tpot"]) == 3
    assert ref["tokens_match"] is True


def test_report_from_results(run_tiny, tmp_path):
    res = run_tiny("transport=inproc", *SMALL_BENCH)
    job = tmp_path / "sweep" / "0-custom"
    job.mkdir(parents=True)
    (job / "results.json").write_text(json.dumps(res))
    written = report.write_report(tmp_path / "sweep")
    paths = written.paths
    assert [p.name for p in paths] == list(report.FILES) and written.failures == []
    (row,) = list(csv.DictReader(io.StringIO(paths[0].read_text())))
    assert row["job"] == "0-custom" and row["kind"] == "bench"
    assert float(row["split_over_monolithic"]) == pytest.approx(res["ratio"]["total"], rel=1e-3)
    assert float(row["decode_ratio"]) > 0 and float(row["prefill_ratio"]) > 0
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| job |" in paths[1].read_text()


def test_report_on_an_empty_dir_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "results.json").write_text("{}")
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no results.json under" in err and str(tmp_path) in err
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert not (tmp_path / "summary.csv").exists()


def _leftover_servers(mark: str) -> list[int]:
    """GPU-side processes still alive from the commands run with TSQP_TEST_MARK=mark."""
    left = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (b"_child" in (proc / "cmdline").read_bytes()
                    and f"TSQP_TEST_MARK={mark}".encode() in (proc / "environ").read_bytes()):
                left.append(int(proc.name))
        except OSError:
            continue
    return left


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [
    [],  # Hydra's basic launcher: jobs one after the other, in this process
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],  # loky worker processes
], ids=["basic", "joblib"])
def test_sweep_writes_the_report_and_report_rebuilds_it(tmp_path, launcher):
    mark = uuid.uuid4().hex
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TSQP_TEST_MARK=mark)
    sweep = tmp_path / "sweep"
    res = subprocess.run(
        [sys.executable, "-m", "tsqp_core", "run", "-m", *launcher, "stage=stage0",
         "transport=tcp,inproc", "model=tiny", "threads.tee=1", "threads.gpu=1", *SMALL_BENCH,
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in report.FILES:
        assert (sweep / name).is_file(), name
    rows = list(csv.DictReader(io.StringIO((sweep / "summary.csv").read_text())))
    assert [r["transport"] for r in rows] == ["tcp", "inproc"]
    assert [r["label"] for r in rows] == ["transport=tcp", "transport=inproc"]
    for r in rows:
        assert r["stage"] == "stage0" and r["calls_per_forward"] == "98"
        for col in ("split_over_monolithic", "prefill_ratio", "decode_ratio", "monolithic_ms",
                    "max_abs_logit_diff", *(f"{p}_ms" for p in report.PARTS)):
            assert r[col] != "", col
        assert float(r["split_over_monolithic"]) > 0
    md = (sweep / "summary.md").read_text()
    assert "transport=tcp,inproc" in md and "breakdown.png" in md

    csv_before, md_before = (sweep / "summary.csv").read_text(), md
    for name in report.FILES:
        (sweep / name).unlink()
    out = subprocess.run([sys.executable, "-m", "tsqp_core", "report", str(sweep)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (sweep / "summary.csv").read_text() == csv_before
    assert (sweep / "summary.md").read_text() == md_before
    assert (sweep / "breakdown.png").stat().st_size > 0

    if Path("/proc/self/environ").exists():
        assert _leftover_servers(mark) == []


def test_the_summary_says_whether_a_cuda_gpu_side_pinned_its_host_memory(run_tiny):
    from tsqp_core.run import summary

    res = run_tiny("transport=inproc", "workload=prefill", "workload.prompt_tokens=8")
    assert res["server"]["host_memory"] == {"pinned": "no (the device is cpu: nothing to pin for)"}
    assert "host_memory" not in summary(res)
    on = {"pinned": "yes (cudaHostRegister)", "read_only_supported": False,
          "refused": ["read-only host registration is not supported here"]}
    for memory, said in ((on, "pinned (1 refused: see results.json server.host_memory)"),
                         ({**on, "refused": []}, "pinned"),
                         ({"pinned": "no (server.pin_memory is off)"}, "pageable")):
        cuda = {**res, "server": {**res["server"], "device": "cuda:0", "host_memory": memory}}
        assert summary(cuda).splitlines()[0].endswith(f" host_memory={said}")
