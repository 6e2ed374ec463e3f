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


def test_both_sides_run_their_ops_in_inference_mode(monkeypatch):
    """As the monolithic reference runs transformers: no op on either side is ever
    differentiated, and autograd's bookkeeping would be one more dispatch per op (stage1's
    TEE ops took a fifth longer with it)."""
    from tsqp_core import ops, tee_ops

    seen: dict[str, list[bool]] = {"tee": [], "gpu": []}

    def spy(side: str, impl: ops.OpFn) -> ops.OpFn:
        def op(*args: Any) -> Any:
            seen[side].append(torch.is_inference_mode_enabled())
            return impl(*args)
        return op

    monkeypatch.setitem(ops.REFERENCE_OPS, "qkv_proj", spy("gpu", ops.op_qkv_proj))
    monkeypatch.setattr(tee_ops, "op_rope", spy("tee", tee_ops.op_rope))
    with split_model("stage=stage1") as (model, _):
        greedy(model, torch.tensor([[5, 9, 2]]), steps=2)
    layers = model.dims.layers
    assert seen == {"tee": [True] * 2 * layers, "gpu": [True] * 2 * layers}


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


# --- compiled programs (executor.options.compile): parity with the oracle, compile figures --

COMPILE = "executor.options.compile=true"


def compile_report(server: Any) -> dict[str, Any]:
    return server._backend.info()["compile"]


@needs_fused
@pytest.mark.parametrize("stage,dtype", [("stage3", "bfloat16"), ("stage2", "float32")])
def test_compiled_parity(stage, dtype, prompts, hf, oracle):
    """The compiled fused executor against the oracle and transformers, with the bounds
    of the eager suites above; every program compiled at hello, one graph per shape bucket
    for all 16 layers, and decoding 32 steps compiles nothing more."""
    with split_model(f"stage={stage}", COMPILE) as (model, server):
        report = compile_report(server)
        assert report["failed"] == [] and report["fallbacks"] == 0
        # embed (checks ids on the host) runs eagerly; a layer call and lm_head are two
        # programs, each compiled for prefill and decode: 4 graphs, whatever the layers
        assert report["eager_ops"] == ["embed"] and report["segments"] == 2
        assert report["plan"]["graphs"] == report["buckets"] == 4
        assert report["plan"]["compile_ms"] > 0
        gen = greedy(model, prompts["generate"])
        assert compile_report(server)["first_use"]["graphs"] == 0, "decode recompiled"
        # batch 2 compiles once more per program at first use (bf16 only: time)
        batch = 2 if dtype == "bfloat16" else 1
        logits = prefill(model, prompts["prefill"][:batch])
        report = compile_report(server)
        assert report["first_use"]["graphs"] == (2 if batch == 2 else 0)
        assert report["fallbacks"] == 0
        assert not server.live_sessions()
    oracle_logits, oracle_gen = (x[:batch] if i == 0 else x for i, x in enumerate(oracle("layer")))
    if dtype == "float32":
        for ref_logits, ref_gen in ((oracle_logits, oracle_gen),
                                    (hf["fp32"]["prefill"][:batch], hf["fp32"]["generate"])):
            assert max_diff(logits, ref_logits) <= FP32_TOL
            assert gen.tokens == ref_gen.tokens
            assert step_diff(gen.step_logits, ref_gen.step_logits) <= FP32_TOL
        return
    assert logits.dtype == torch.bfloat16
    for ref in (oracle_logits, hf["fp32"]["prefill"][:batch], hf["sdpa"]["prefill"][:batch]):
        assert max_diff(logits, ref) <= bf16_tol(hf["eps_prefill"])
    twin = hf["sdpa"]["generate"]  # fused attention rounds like transformers' sdpa
    assert gen.tokens == twin.tokens
    assert step_diff(gen.step_logits, twin.step_logits) <= bf16_tol(hf["eps_generate"])
    assert first_steps_diff(gen, oracle_gen) <= bf16_tol(hf["eps_generate"])


@needs_fused
@pytest.mark.parametrize("partition,eager", [("seed", ["attn_context", "attn_scores", "embed"]),
                                             ("attn_mlp", ["embed"]), ("linears", [])])
def test_compiled_partitions(partition, eager, prompts, oracle):
    """Every partition compiles: programs cut around what must run eagerly (embed; attention
    split across calls, which grows the cache itself), fp32 within 1e-4 of the oracle."""
    with split_model("executor=fused", f"partition={partition}", COMPILE) as (model, server):
        logits = prefill(model, prompts["prefill"][:1])
        gen = greedy(model, prompts["generate"], 8)
        report = compile_report(server)
    assert report["failed"] == [] and report["eager_ops"] == eager
    assert report["plan"]["graphs"] > 0 and report["first_use"]["graphs"] == 0
    oracle_logits, oracle_gen = oracle(partition)
    assert max_diff(logits, oracle_logits[:1]) <= FP32_TOL
    assert gen.tokens[0] == oracle_gen.tokens[0][:8]
    assert step_diff(gen.step_logits, oracle_gen.step_logits) <= FP32_TOL


@needs_fused
def test_compiled_static_decode_and_the_recompile_bound(prompts, hf):
    """Static decode shapes (the CUDA-graph path, here on the CPU): attention over the whole
    KV buffer under a position mask, one graph per cache capacity. With max_graphs=1 the
    decode graph compiled at hello (capacity 32) serves positions 20..31; from 32 on the
    cache holds 64, which would need a second graph, so those calls run eagerly, counted --
    with transformers' tokens and fp32 logits either way."""
    with split_model("stage=stage2", COMPILE, "executor.options.static_decode=on",
                     "executor.options.cache_positions=32",
                     "executor.options.max_graphs=1") as (model, server):
        assert compile_report(server)["static_decode"] is True
        gen = greedy(model, prompts["generate"])  # 20 + 32 positions
        report = compile_report(server)
        # the generation's buffers went back to the pool; the next one reuses them, zeroed
        pool = server._backend.compiler.pool
        assert pool.held() > 0
        again = greedy(model, prompts["generate"], 12)
        assert pool.held() > 0 and compile_report(server)["first_use"]["graphs"] == 0
    assert report["failed"] == [] and report["first_use"]["graphs"] == 0
    assert report["fallbacks"] > 0
    ref = hf["fp32"]["generate"]
    assert gen.tokens == ref.tokens and again.tokens[0] == ref.tokens[0][:12]
    assert step_diff(gen.step_logits, ref.step_logits) <= FP32_TOL


@needs_fused
def test_compiled_stage3_run_reports_compile_time_apart(tmp_path):
    """A compiled stage3 bench matches transformers, and results.json says what compiling
    cost (at hello, not in the timed runs) and which variants the ratio compares."""
    from tsqp_core.run import summary

    res = run_tiny(tmp_path, "stage=stage3", COMPILE, "workload=bench",
                   "workload.prompt_tokens=16", "workload.new_tokens=4", "workload.warmup=0",
                   "workload.repeats=1", "reference_compile=false")
    comp = res["server"]["compile"]
    assert comp["plan"]["graphs"] == 4 and comp["plan"]["compile_ms"] > 0
    assert comp["failed"] == [] and comp["fallbacks"] == 0
    assert res["reference"]["tokens_match"] is True and res["reference"]["compiled"] is False
    assert res["bench"]["compared"] == {"split": "compiled", "monolithic": "eager"}
    text = summary(res)
    assert "compile (not in the timed runs): gpu side 4 graphs in" in text
    assert "bench compares: split compiled against monolithic eager" in text


@needs_fused
@pytest.mark.parametrize("options,match", [
    ({"compile": True, "attention": "flash"}, "does not compile"),
    ({"compile": True, "cuda_graphs": "on"}, "needs CUDA"),
])
def test_compile_options_refused(options, match):
    from tsqp_core.models.source import Checkpoint, resolve
    from tsqp_core.plugins import get_plugins

    ckpt = Checkpoint(resolve(compose().model))
    executor = get_plugins().executors.create("fused", options)
    with pytest.raises(ValueError, match=match):
        executor.backend(ckpt, frozenset({"lm_head"}), torch.float32, torch.device("cpu"))


@gpu
@pytest.mark.gpu
@needs_fused
def test_cuda_compiled_parity(prompts, hf):
    """On CUDA: compiled bf16 stage3 (CUDA graphs for decode) against transformers on the
    same card, and no recompiles while decoding."""
    ref = hf_cuda(torch.bfloat16, prompts)
    with split_model("stage=stage3", COMPILE, device="cuda") as (model, server):
        report = compile_report(server)
        assert report["cuda_graphs"] and report["static_decode"] and report["failed"] == []
        gen = greedy(model, prompts["generate"])
        assert compile_report(server)["first_use"]["graphs"] == 0
        logits = prefill(model, prompts["prefill"])
    assert max_diff(logits, ref["prefill"]) <= bf16_tol(hf["eps_prefill"])
    assert gen.tokens == ref["generate"].tokens
    assert step_diff(gen.step_logits, ref["generate"].step_logits) <= bf16_tol(hf["eps_generate"])


@needs_fused
@pytest.mark.slow
def test_compiled_against_compiled_reference(tmp_path):
    """By default a compiled split is compared with a compiled monolithic model (2 layers
    here: transformers compiles every layer into its graph): timed compiled, checked against
    eager transformers, and the summary says so."""
    from tsqp_core.run import summary

    res = run_tiny(tmp_path, "stage=stage3", COMPILE, "model.config.num_hidden_layers=2",
                   "workload=bench", "workload.prompt_tokens=16", "workload.new_tokens=4",
                   "workload.warmup=0", "workload.repeats=1")
    ref = res["reference"]
    assert ref["compiled"] is True and ref["compile_ms"] > 0 and "torch.compile" in ref["impl"]
    assert "torch.compile" not in ref["checked_against"] and ref["tokens_match"] is True
    assert res["bench"]["compared"] == {"split": "compiled", "monolithic": "compiled"}
    text = summary(res)
    assert "; monolithic " in text and "(against transformers" in text
