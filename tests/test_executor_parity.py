"""The parity suite (:mod:`tsqp_core.testing.parity`, shipped in the package for plugin
authors) against every registered executor, partition and TEE-op library; plus the fused
executor's own checks: call counts, decode traffic, cache lifetime, and CUDA parity."""

from __future__ import annotations

from typing import Any

from tsqp_core.testing.parity import *  # noqa: F401,F403  the suite itself
from tsqp_core.testing.parity import (EXECUTORS, FP32_TOL, STEPS, bf16_tol, compose,  # noqa: F401
                                      greedy, max_diff, prefill, run_tiny, split_model,
                                      step_diff)

import pytest  # noqa: E402
import torch  # noqa: E402


# --- calls, traffic and lifetime of the fused executor -----------------------------------

needs_fused = pytest.mark.skipif("fused" not in EXECUTORS, reason="tsqp-executor-fused not installed")


@needs_fused
@pytest.mark.parametrize("overrides,calls", [
    (("stage=stage2",), 18), (("stage=stage3",), 18),
    (("executor=fused", "partition=layer"), 18),
    (("executor=fused", "partition=attn_mlp"), 34),
    (("executor=fused", "partition=seed"), 82),
    (("executor=unfused", "partition=seed"), 98),
    (("executor=fused", "partition=linears"), 65),  # 4 per layer + lm_head, either executor
    (("executor=unfused", "partition=linears"), 65),
])
def test_calls_per_forward(overrides, calls):
    from tsqp_core.run import prepare

    # stages name transport=shm; compose's transport=inproc on the command line wins
    p = prepare(compose(*overrides))
    assert len(p.schedule.calls) == calls


@needs_fused
def test_stage2_prefill_matches_transformers(tmp_path):
    res = run_tiny(tmp_path, "stage=stage2", "workload=prefill",
                   "workload.prompt_tokens=128", "reference=true")
    assert res["config"]["executor"] == "fused" and res["config"]["dtype"] == "float32"
    assert res["rpc"]["calls_per_forward"] <= 18
    assert res["reference"]["max_abs_logit_diff"] <= FP32_TOL
    assert res["reference"]["tokens_match"] is True


@needs_fused
def test_stage3_generate_matches_transformers(tmp_path):
    res = run_tiny(tmp_path, "stage=stage3", "workload=generate",
                   "workload.prompt_tokens=32", f"workload.new_tokens={STEPS}", "reference=true")
    assert res["config"]["dtype"] == "bfloat16"
    assert res["rpc"]["calls_per_forward"] <= 18
    assert res["reference"]["tokens_match"] is True
    assert len(res["tokens"][0]) == STEPS


@needs_fused
def test_decode_calls_and_bytes_do_not_grow_with_context(tmp_path):
    """Per decode step: one call per layer (plus embed and lm_head), and the same bytes
    whatever the prompt length -- the history stays in the GPU-side cache."""
    layers = compose().model.config["num_hidden_layers"]
    rpc = {}
    for prompt in (8, 40):
        for new in (1, 5):  # new_tokens=1 is the prefill alone
            res = run_tiny(tmp_path / f"{prompt}-{new}", "stage=stage3",
                           "workload=generate", f"workload.prompt_tokens={prompt}",
                           f"workload.new_tokens={new}")
            rpc[prompt, new] = res["rpc"]
    per_step = {}
    for prompt in (8, 40):
        a, b = rpc[prompt, 1], rpc[prompt, 5]
        calls = (b["calls"] - a["calls"]) / 4
        assert calls == b["calls_per_forward"] <= layers + 2
        per_step[prompt] = ((b["bytes_to_gpu"] - a["bytes_to_gpu"]) / 4,
                            (b["bytes_from_gpu"] - a["bytes_from_gpu"]) / 4)
    assert per_step[8] == per_step[40]
    assert rpc[40, 1]["bytes_to_gpu"] > rpc[8, 1]["bytes_to_gpu"]  # prefill does grow


@needs_fused
def test_kv_cache_lives_per_generation():
    from tsqp_core.metrics import Meter
    from tsqp_core.tee.pipeline import Session

    with split_model("stage=stage3") as (model, server):
        session = Session()
        model.forward(torch.arange(10)[None], session, Meter(), last_only=True)
        model.forward(torch.tensor([[3]]), session, Meter(), last_only=True)
        (cache,) = server.live_sessions().values()
        assert cache.length(0, "k") == cache.length(15, "v") == 11
        assert cache.nbytes() > 0
        model.end(session)
        assert not server.live_sessions()


@needs_fused
def test_preallocated_cache_grows_by_doubling():
    from tsqp_executor_fused.cache import PreallocatedKVCache

    for seq_dim in (1, 2):
        cache = PreallocatedKVCache(kv_heads=2, head_dim=4, max_positions=20,
                                    dtype=torch.float32, device=torch.device("cpu"),
                                    seq_dim=seq_dim, initial=4)
        chunks = [torch.randn(1, 2, n, 4) for n in (3, 2, 6)]  # [B, Hkv, T, d]
        for i, chunk in enumerate(chunks):
            full = cache.append("k", 0, chunk)
            assert torch.equal(full, torch.cat(chunks[:i + 1], dim=2))
        assert cache.length(0, "k") == 11 and cache.length(0, "v") == 0
        assert cache.nbytes() == 16 * 2 * 4 * 4  # 4 -> 8 -> 16 positions
        with pytest.raises(ValueError, match="exceed"):
            cache.append("k", 0, torch.randn(1, 2, 10, 4))
        with pytest.raises(ValueError, match="batch"):
            cache.append("k", 0, torch.randn(2, 2, 1, 4))


# --- on a GPU (CUDA parity against transformers on the same card) ------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def hf_cuda(dtype: torch.dtype, prompts: dict[str, torch.Tensor]) -> dict[str, Any]:
    from tsqp_core.models.source import resolve
    from tsqp_core.reference import Reference

    ref = Reference(resolve(compose().model), dtype)
    ref.model = ref.model.to("cuda")
    return {"prefill": ref.prefill(prompts["prefill"].cuda())[0],
            "generate": ref.generate(prompts["generate"].cuda(), STEPS)}


@gpu
@pytest.mark.gpu
@needs_fused
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_parity(dtype, prompts, hf):
    """SDPA on the GPU side against transformers (sdpa) on the same card and dtype."""
    ref = hf_cuda(getattr(torch, dtype), prompts)
    with split_model("stage=stage3", f"dtype={dtype}", "executor.options.attention=sdpa",
                     device="cuda") as (model, server):
        logits = prefill(model, prompts["prefill"])
        gen = greedy(model, prompts["generate"])
        assert not server.live_sessions()
    tol = FP32_TOL if dtype == "float32" else bf16_tol(hf["eps_prefill"])
    assert max_diff(logits, ref["prefill"]) <= tol
    assert gen.tokens == ref["generate"].tokens
    assert step_diff(gen.step_logits, ref["generate"].step_logits) <= (
        FP32_TOL if dtype == "float32" else bf16_tol(hf["eps_generate"]))


@gpu
@pytest.mark.gpu
@needs_fused
def test_cuda_flash_attn_matches_sdpa(prompts, hf):
    """flash-attn (when installed) against SDPA, bf16: logits within the bf16 bound; tokens
    until the first near-tie may differ, so only the first decode steps' logits are bound."""
    pytest.importorskip("flash_attn")
    out = {}
    for attention in ("flash", "sdpa"):
        with split_model("stage=stage3", f"executor.options.attention={attention}",
                         device="cuda") as (model, _):
            out[attention] = (prefill(model, prompts["prefill"]), greedy(model, prompts["generate"]))
    assert max_diff(out["flash"][0], out["sdpa"][0]) <= bf16_tol(hf["eps_prefill"])
    assert max_diff(out["flash"][1].step_logits[0], out["sdpa"][1].step_logits[0]) \
        <= bf16_tol(hf["eps_generate"])
