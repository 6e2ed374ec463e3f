"""``verify``: plaintext, but every weight product the GPU side returns is checked within a
float tolerance -- honest runs pass with a wide margin, lies of a useful size do not."""

from __future__ import annotations

import pytest
import torch

from tsqp_core.protection import IntegrityError
from tsqp_core.protection.verify import gaussian

from conftest import compose  # noqa: F401  (the fixture module)


def test_gaussian_probes_are_standard_normal():
    from tsqp_core.protection import SecureRandom

    rng = SecureRandom()
    z = gaussian(20000, 2, rng)
    assert rng.drawn == 2 * 20000 * 2 * 8
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    assert float((z.abs() > 3).double().mean()) == pytest.approx(0.0027, abs=0.0015)


@pytest.mark.parametrize("overrides,checked", [
    (("stage=stage1",), 16 * 4 + 1),  # seed partition: every projection call and lm_head
    (("stage=stage3", "partition=linears"), 65),  # bf16, every call
    (("stage=stage2",), 1),  # layer partition: only lm_head is one product
])
def test_honest_runs_pass_well_inside_the_tolerance(run_tiny, overrides, checked):
    res = run_tiny(*overrides, "transport=inproc", "protection=verify", "workload=prefill",
                   "workload.prompt_tokens=24", "reference=true")
    integrity = res["protection"]["integrity"]
    assert integrity["failed"] == 0 and integrity["checks"] == checked
    assert integrity["unverified_calls"] == res["rpc"]["calls"] - checked
    assert integrity["largest_residual_over_tau"] < 0.1  # honest rounding: far from a failure
    assert res["reference"]["max_abs_logit_diff"] == 0  # nothing changes the numbers
    assert all(e["plaintext"] for e in res["exposure"])  # and nothing is hidden


@pytest.mark.parametrize("what", ["element", "nan", "huge"])
def test_a_lying_gpu_side_is_caught(run_tiny, what):
    with pytest.raises(IntegrityError, match="integrity check"):
        run_tiny("stage=stage1", "transport=inproc", "protection=verify", "workload=prefill",
                 "workload.prompt_tokens=16", f"server.tamper={{what:{what},call:13,size:1.0}}")
