"""The reference gate: a ``reference=true`` run whose logits are further from transformers than
the declared tolerance of its dtype, or whose greedy tokens differ, still writes everything,
then exits 4 (``app.EXIT_REFERENCE``) with one clear line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tsqp_core.run.results import check_reference, reference_failure

ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
#: A lying GPU side (tsqp_core/gpu/tamper.py): call 5's output zeroed -- plausible numbers,
#: wrong ones. Without protection nothing but the reference can notice.
LIE = "server.tamper={what:zero,call:5}"


def _ref(diff, match=True):
    return {"impl": "transformers", "max_abs_logit_diff": diff, "tokens_match": match}


@pytest.mark.parametrize("diff,match,passed", [
    (0.0, True, True), (1e-3, True, True), (1.1e-3, True, False), (0.0, False, False),
    (math.nan, True, False), (math.inf, True, False),
])
def test_the_gate(diff, match, passed):
    ref = _ref(diff, match)
    check_reference(ref, 1e-3)
    assert ref["passed"] is passed and ref["tolerance"] == 1e-3
    result = {"reference": ref, "config": {"dtype": "float32"}}
    line = reference_failure(result)
    assert (line is None) is passed
    if not passed:
        assert line.startswith("reference check failed: ") and "\n" not in line
        assert ("greedy tokens differ" in line) is (not match)


def test_the_tolerance_is_per_dtype_plus_the_protection_schemes(run_tiny):
    from conftest import compose
    from tsqp_core.run import prepare
    from tsqp_core.run.results import reference_tolerance

    assert reference_tolerance(prepare(compose("model=tiny", "transport=inproc"))) == 1e-3
    assert reference_tolerance(prepare(compose("model=tiny", "transport=inproc",
                                               "dtype=bfloat16"))) == 0.6
    otp = prepare(compose("model=tiny", "transport=inproc", "stage=stage4"))
    assert reference_tolerance(otp) == 1e-3 + otp.protection.tolerance["float32"]
    tight = prepare(compose("model=tiny", "transport=inproc", "reference_tolerance.float32=0"))
    assert reference_tolerance(tight) == 0.0


def test_a_mismatch_still_writes_everything(run_tiny, tmp_path):
    res = run_tiny("transport=inproc", "workload=generate", "workload.prompt_tokens=16",
                   "workload.new_tokens=4", "reference=true", LIE)
    ref = res["reference"]
    assert ref["passed"] is False and ref["max_abs_logit_diff"] > ref["tolerance"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["reference"]["passed"] is False and on_disk["latency_ms"]["total"] > 0
    honest = run_tiny("transport=inproc", "workload=prefill", "workload.prompt_tokens=16",
                      "reference=true")
    assert honest["reference"]["passed"] is True


@pytest.mark.slow
def test_a_mismatching_reference_exits_4_with_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tsqp_core", "run", "model=tiny",
                          "workload=prefill", "workload.prompt_tokens=16", "reference=true",
                          LIE, f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 4, out.stderr[-3000:]
    lines = [l for l in out.stderr.splitlines() if l.startswith("tsqp: reference check failed")]
    assert len(lines) == 1 and "float32 tolerance" in lines[0]
    assert str(tmp_path / "results.json") in lines[0]
    assert "-- FAILED" in out.stdout  # the summary was printed too
    assert json.loads((tmp_path / "results.json").read_text())["reference"]["passed"] is False
