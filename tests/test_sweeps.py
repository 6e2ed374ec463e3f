"""Sweeps that leave one machine: every job writes its own results into its own directory,
whichever launcher ran it (basic, joblib, submitit, ray), the summary is gathered from those
files at the end, and failed jobs are listed instead of ending the sweep."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tsqp_core import report

ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
TINY = ("model=tiny", "workload=prefill", "workload.prompt_tokens=16", "threads.tee=1",
        "threads.gpu=1")


def sweep(tmp_path: Path, *args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, Path]:
    out_dir = tmp_path / "sweep"
    res = subprocess.run([sys.executable, "-m", "tsqp_core", "run", "-m", *args,
                          f"hydra.sweep.dir={out_dir}"], capture_output=True, text=True,
                         env=ENV, timeout=timeout, cwd=tmp_path)
    return res, out_dir


def summary_rows(sweep_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((sweep_dir / "summary.csv").read_text())))


def _fake_job(root: Path, name: str, overrides: list[str]) -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return job


def test_the_report_lists_failed_and_vanished_jobs(run_tiny, tmp_path):
    res = run_tiny("transport=inproc", "workload=prefill", "workload.prompt_tokens=8")
    root = tmp_path / "sw"
    ok = _fake_job(root, "0-stage0", ["stage=stage0"])
    (ok / "results.json").write_text(json.dumps(res))
    report.write_failure(_fake_job(root, "1-stage1", ["stage=stage1"]), 2, "error: bad input")
    _fake_job(root, "2-stage2", ["stage=stage2"])  # died without a word
    written = report.write_report(root)
    assert [p.name for p in written.paths] == list(report.FILES)
    assert [f.path.name for f in written.failures] == ["1-stage1", "2-stage2"]
    assert written.exit_code == 1  # codes 2 and "none" disagree
    rows = summary_rows(root)
    assert [(r["job"], r["status"]) for r in rows] == [
        ("0-stage0", "ok"), ("1-stage1", "failed, exit 2"), ("2-stage2", "failed")]
    assert rows[1]["label"] == "stage=stage1" and rows[1]["error"] == "error: bad input"
    md = (root / "summary.md").read_text()
    assert "**2 of 3 jobs failed**" in md and "## Failed jobs: 2" in md
    assert "| 1-stage1 | stage=stage1 | 2 | error: bad input |" in md
    assert "died before it finished" in md


def test_a_sweep_where_every_job_failed_still_gets_its_summary(tmp_path):
    root = tmp_path / "sw"
    report.write_failure(_fake_job(root, "0", ["x=1"]), 4, "reference check failed")
    written = report.write_report(root)
    assert [p.name for p in written.paths] == ["summary.csv", "summary.md"]  # no chart
    assert written.exit_code == 4
    assert "## Failed jobs: 1" in (root / "summary.md").read_text()


@pytest.mark.slow
def test_a_sweep_with_a_failing_job_runs_the_others_and_lists_it(tmp_path):
    res, out = sweep(tmp_path, "transport=inproc", *TINY[:2], "workload.prompt_tokens=16,5000",
                     *TINY[3:])
    assert res.returncode == 2, res.stderr[-3000:]  # the failed job's own code (bad input)
    assert "1 of 2 jobs failed" in res.stderr
    assert (out / "0" / "results.json").is_file()
    failed = json.loads((out / "1" / "failed.json").read_text())
    assert failed["exit_code"] == 2 and "exceeds the model's context" in failed["error"]
    rows = summary_rows(out)
    assert [r["status"] for r in rows] == ["ok", "failed, exit 2"]
    assert [r["label"] for r in rows] == ["workload.prompt_tokens=16",
                                          "workload.prompt_tokens=5000"]
    assert "## Failed jobs: 1" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_submitit_local_stage_sweep_writes_its_summary(tmp_path):
    """Hydra's submitit launcher with its local executor (on SLURM: hydra/launcher=
    submitit_slurm): each job a process of its own, writing its own results."""
    from tsqp_core.configs import group_files

    stages = sorted(group_files("stage"))
    res, out = sweep(tmp_path, "hydra/launcher=submitit_local", "stage=glob(*)", *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in report.FILES:
        assert (out / name).is_file(), name
    jobs = sorted((p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: int(p.name.split("-")[0]))
    assert [p.name for p in jobs] == [f"{i}-{s}" for i, s in enumerate(stages)]
    for job in jobs:
        result = json.loads((job / "results.json").read_text())
        assert result["config"]["stage"] == job.name.split("-", 1)[1]
    assert [r["stage"] for r in summary_rows(out)] == stages
    assert (out / ".submitit").is_dir()  # submitit's own logs, one folder per job


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
                    reason="hydra-ray-launcher not installed (pip install 'tsqp-core[ray]', "
                           "in an environment of its own: see README)")
def test_ray_stage_sweep_writes_its_summary(tmp_path):
    res, out = sweep(tmp_path, "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
                     "+hydra.launcher.ray.remote.num_cpus=2", "stage=stage0,stage3", *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["stage"] for r in summary_rows(out)] == ["stage0", "stage3"]
