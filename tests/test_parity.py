"""The split pipeline agrees with transformers on the same weights (fp32), on varied inputs."""

from __future__ import annotations

import json

import pytest

from tsqp_core.plugins import get_plugins

#: Every installed transport: a transport that corrupts data shows up here as a logit diff.
TRANSPORTS = get_plugins().transports.names()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_prefill_stage0_matches_transformers(run_tiny, transport, tmp_path):
    res = run_tiny("stage=stage0", f"transport={transport}", "workload=prefill",
                   "workload.prompt_tokens=48", "reference=true", "seed=3")
    assert res["rpc"]["calls_per_forward"] == 98  # 1 + 6 * 16 + 1
    assert res["rpc"]["calls"] == 98
    assert res["reference"]["max_abs_logit_diff"] <= 1e-4
    assert res["reference"]["tokens_match"] is True
    assert json.loads((tmp_path / "results.json").read_text())["schema"] == "tsqp.run/1"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_generate_stage0_matches_transformers(run_tiny, transport):
    res = run_tiny("stage=stage0", f"transport={transport}", "workload=generate",
                   "workload.prompt_tokens=20", "workload.new_tokens=8", "reference=true",
                   "seed=5")
    assert res["reference"]["tokens_match"] is True
    assert res["reference"]["max_abs_logit_diff"] <= 1e-4
    assert len(res["tokens"][0]) == 8
    # prefill + 7 decode forwards (the last sampled token needs no forward)
    assert res["rpc"]["calls"] == 98 * 8


@pytest.mark.parametrize("seed,batch,tokens", [(11, 2, 33), (12, 1, 1), (13, 3, 7)])
def test_varied_inputs(run_tiny, seed, batch, tokens):
    res = run_tiny("stage=stage0", "transport=inproc", "workload=prefill",
                   f"workload.batch={batch}", f"workload.prompt_tokens={tokens}",
                   "reference=true", f"seed={seed}")
    assert res["reference"]["max_abs_logit_diff"] <= 1e-4


def test_decode_does_not_resend_history(run_tiny):
    """With the KV cache on the GPU side, a decode step ships O(1) data, not the prefix."""
    small = run_tiny("transport=inproc", "workload=generate", "workload.prompt_tokens=8",
                     "workload.new_tokens=3", "stage=stage0")
    large = run_tiny("transport=inproc", "workload=generate", "workload.prompt_tokens=64",
                     "workload.new_tokens=3", "stage=stage0")
    qkv_small = small["rpc"]["by_method"]["qkv_proj"]["bytes_to_gpu"]
    qkv_large = large["rpc"]["by_method"]["qkv_proj"]["bytes_to_gpu"]
    per_token = qkv_small / (8 + 2)
    # prefill ships prompt_tokens rows, each decode step exactly one row
    assert qkv_small == per_token * (8 + 2)
    assert qkv_large == per_token * (64 + 2)


def test_results_contract(run_tiny):
    res = run_tiny("transport=inproc", "workload=prefill", "workload.prompt_tokens=16",
                   "workload.repeats=3", "reference=true")
    for key in ("schema", "config", "workload", "rpc", "latency_ms", "reference", "exposure",
                "output_text"):
        assert key in res
    for key in ("stage", "transport", "executor", "partition", "protection", "model", "dtype",
                "device"):
        assert key in res["config"]
    lat = res["latency_ms"]
    parts = lat["breakdown"]
    assert set(parts) == {"serialize", "transport", "gpu_compute", "tee_compute", "protect",
                          "other"}
    assert abs(sum(parts.values()) - lat["total"]) <= 0.05 * lat["total"]
    # ``other`` is the remainder: negative only if some category counted time twice
    assert all(v >= 0 for v in parts.values()), parts
    assert res["server"]["attention"] == "eager" and res["server"]["device"] == "cpu"
    assert res["protection"]["scheme"] == "none" and res["protection"]["offline_ms"] >= 0
    assert len(lat["repeats_total"]) == 3
    by = res["rpc"]["by_method"]
    assert sum(m["calls"] for m in by.values()) == res["rpc"]["calls"]
    assert by["qkv_proj"]["calls"] == 16 and by["embed"]["calls"] == 1
    seen = {(e["value"], e["how"]) for e in res["exposure"]}
    assert ("ids", "sent to gpu") in seen  # the seed partition embeds on the GPU side
    assert ("s", "computed on gpu") in seen  # and computes attention scores there
