"""One parity suite, run against every registered executor: the split model agrees with
transformers on the same weights, and with the ``unfused`` executor (the oracle), for every
partition; plus the fused executor's call counts, decode traffic and cache lifetime.

bf16 tolerance, and why. bf16 keeps 8 significant bits, and after 16 layers the tiny model's
logits (std ~2, |max| ~10) carry ~0.2 of accumulated rounding: ``eps``, the largest
|transformers bf16 - transformers fp32| on the same prompt over both of its attention kernels,
measures 0.20 (eager) to 0.28 (sdpa) for prefill and 0.17 over the decode steps here. Two
correct bf16 implementations that round in a different order are each about ``eps`` from the
fp32 truth, so they can differ from each other by up to about ``2 * eps``: that is the bound
on bf16 logits (against fp32 and against transformers bf16). Being measured per prompt, it
holds on another CPU or on CUDA, where kernels round differently; a real bug (a wrong mask,
a wrong RoPE sign) moves logits by several units and fails it.

The measured figure is capped, so that a broken reference cannot widen the bound silently:
``eps`` itself must be at most ``BF16_EPS_MAX = 0.5`` (nearly twice the largest figure
measured, 0.28; more means transformers' bf16 or fp32 run is itself wrong, and the ``hf``
fixture fails), and the bound is ``min(2 * eps, BF16_TOL_CAP)`` with ``BF16_TOL_CAP = 0.6``,
just above twice that largest measured eps (:func:`bf16_tol`).

Greedy tokens in bf16 are compared with the transformers attention kernel that rounds like
the executor: ``sdpa`` (one fused kernel, scores never rounded to bf16) when the executor
fuses rope..attn_context into one call, ``eager`` (scores and probabilities rounded to bf16,
as the partition ships them) otherwise. Measured on this CPU, the fused executor reproduces
transformers sdpa bf16 bit for bit and the unfused one transformers eager bf16 bit for bit.
The two transformers kernels themselves pick different greedy tokens on some prompts: the
random tiny model has near-ties (median top-1/top-2 gap 0.45, some under 0.05) that bf16's
~0.15 logit error flips -- a property of bf16, not of the split. An executor this suite does
not know must match one of them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tsqp_core.app import CONF_DIR  # noqa: E402
from tsqp_core.plugins import get_plugins  # noqa: E402

EXECUTORS = get_plugins().executors.names()
PARTITIONS = ["seed", "attn_mlp", "layer", "linears"]
FP32_TOL = 1e-4
STEPS = 32
#: Partitions that put rope..attn_context of a layer into one run of GPU ops.
ATTENTION_IN_ONE_RUN = {"attn_mlp", "layer"}
#: transformers' own bf16 error (``eps``) above this means the reference is broken.
BF16_EPS_MAX = 0.5
#: The bf16 bound is twice ``eps`` but never more than this (see the module docstring).
BF16_TOL_CAP = 0.6


def bf16_tol(eps: float) -> float:
    """The bound on bf16 logits given transformers' measured bf16 error ``eps``."""
    assert 0 < eps <= BF16_EPS_MAX, (
        f"transformers' bf16 error is {eps:.3g}, outside (0, {BF16_EPS_MAX}]: the reference "
        "is broken, and a bound derived from it would be meaningless")
    return min(2 * eps, BF16_TOL_CAP)


def compose(*overrides: str, device: str = "cpu"):
    """The validated config of ``run model=tiny transport=inproc OVERRIDES`` (GPU side on
    ``device``: the CPU unless a test asks for CUDA)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from tsqp_core.config import parse

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["model=tiny", "transport=inproc",
                                                 "threads.tee=1", "threads.gpu=1", f"device={device}",
                                                 *overrides])
    return parse(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]


def run_tiny(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    from tsqp_core.run import run

    return run(compose(*overrides), tmp_path)


@contextlib.contextmanager
def split_model(*overrides: str, device: str = "cpu") -> Iterator[tuple[Any, Any]]:
    """A ready :class:`SplitModel` over the inproc transport, and its :class:`GpuServer`
    (through :func:`tsqp_core.run.connect`, the wiring the run itself uses)."""
    from tsqp_core.run import connect, prepare

    p = prepare(compose(*overrides, device=device))
    with connect(p, batch=4, positions=p.ckpt.dims.max_positions) as conn:
        yield conn.model, conn.local_server


def prefill(model: Any, ids: torch.Tensor) -> torch.Tensor:
    from tsqp_core.metrics import Meter
    from tsqp_core.tee.pipeline import prefill as split_prefill

    return split_prefill(model, ids, Meter())


def greedy(model: Any, ids: torch.Tensor, steps: int = STEPS):
    from tsqp_core.metrics import Meter
    from tsqp_core.tee.pipeline import generate
    from tsqp_core.tee.sampling import Sampler, Sampling

    return generate(model, ids, steps, Sampler(Sampling()), Meter())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def step_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(max_diff(x, y) for x, y in zip(a, b))


def first_steps_diff(a: Any, b: Any) -> float:
    """Largest logit difference of two generations over the steps both fed the same tokens."""
    same = next((i for i, (x, y) in enumerate(zip(zip(*a.tokens), zip(*b.tokens))) if x != y),
                len(a.step_logits))
    return step_diff(a.step_logits[:same + 1], b.step_logits[:same + 1])


# --- shared expensive things: prompts, transformers references, the oracle's outputs --------


@pytest.fixture(scope="module")
def prompts() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return {"prefill": torch.randint(0, 512, (2, 24), generator=gen),
            "generate": torch.randint(0, 512, (1, 20), generator=gen)}


@pytest.fixture(scope="module")
def hf(prompts) -> dict[str, Any]:
    """transformers outputs: fp32, bf16 with the sdpa kernel and bf16 with eager attention."""
    from tsqp_core.models.source import resolve
    from tsqp_core.reference import Reference

    model_dir = resolve(compose().model)
    out: dict[str, Any] = {}
    for key, dtype, attn in (("fp32", torch.float32, "sdpa"), ("sdpa", torch.bfloat16, "sdpa"),
                             ("eager", torch.bfloat16, "eager")):
        ref = Reference(model_dir, dtype, attn)
        out[key] = {"prefill": ref.prefill(prompts["prefill"])[0],
                    "generate": ref.generate(prompts["generate"], STEPS)}
    # transformers' own bf16 error on these prompts (either kernel): the bf16 tolerance's scale
    out["eps_prefill"] = max(max_diff(out[k]["prefill"], out["fp32"]["prefill"])
                             for k in ("sdpa", "eager"))
    out["eps_generate"] = max(first_steps_diff(out[k]["generate"], out["fp32"]["generate"])
                              for k in ("sdpa", "eager"))
    for key in ("eps_prefill", "eps_generate"):  # a broken reference must not widen the bound
        assert 0 < out[key] <= BF16_EPS_MAX, f"{key} = {out[key]:.3g}: the reference is broken"
    return out


@pytest.fixture(scope="module")
def oracle(prompts) -> dict[tuple[str, str], Any]:
    """The unfused executor's fp32 outputs per partition, computed on first use."""
    cache: dict[tuple[str, str], Any] = {}

    def get(partition: str) -> tuple[torch.Tensor, Any]:
        if partition not in cache:
            with split_model("executor=unfused", f"partition={partition}") as (model, _):
                cache[partition] = (prefill(model, prompts["prefill"]),
                                    greedy(model, prompts["generate"]))
        return cache[partition]

    return get  # type: ignore[return-value]


# --- the parity suite --------------------------------------------------------------------


@pytest.mark.parametrize("partition", PARTITIONS)
@pytest.mark.parametrize("executor", EXECUTORS)
def test_fp32_parity(executor, partition, prompts, hf, oracle):
    with split_model(f"executor={executor}", f"partition={partition}",
                     "dtype=float32") as (model, server):
        logits = prefill(model, prompts["prefill"])
        gen = greedy(model, prompts["generate"])
        assert not server.live_sessions(), "each generation's GPU-side cache is freed at its end"
    ref = hf["fp32"]
    assert max_diff(logits, ref["prefill"]) <= FP32_TOL
    assert torch.equal(logits.argmax(-1), ref["prefill"].argmax(-1))
    assert gen.tokens == ref["generate"].tokens
    assert step_diff(gen.step_logits, ref["generate"].step_logits) <= FP32_TOL
    oracle_logits, oracle_gen = oracle(partition)
    assert max_diff(logits, oracle_logits) <= FP32_TOL
    assert gen.tokens == oracle_gen.tokens
    assert step_diff(gen.step_logits, oracle_gen.step_logits) <= FP32_TOL


@pytest.mark.parametrize("partition", PARTITIONS)
@pytest.mark.parametrize("executor", EXECUTORS)
def test_bf16_parity(executor, partition, prompts, hf):
    with split_model(f"executor={executor}", f"partition={partition}",
                     "dtype=bfloat16") as (model, server):
        logits = prefill(model, prompts["prefill"])
        gen = greedy(model, prompts["generate"])
        assert not server.live_sessions()
    assert logits.dtype == torch.bfloat16
    # within 2 eps (capped) of the fp32 truth and of transformers bf16 (see the module docstring)
    for ref in (hf["fp32"], hf["sdpa"], hf["eager"]):
        assert max_diff(logits, ref["prefill"]) <= bf16_tol(hf["eps_prefill"])
    # identical greedy tokens for 32 steps with the transformers kernel that rounds alike
    if executor == "fused":
        twins = ["sdpa" if partition in ATTENTION_IN_ONE_RUN else "eager"]
    elif executor == "unfused":
        twins = ["eager"]
    else:
        twins = ["sdpa", "eager"]
    matched = [t for t in twins if gen.tokens == hf[t]["generate"].tokens]
    assert matched, f"greedy tokens differ from transformers bf16 ({' / '.join(twins)})"
    twin = hf[matched[0]]["generate"]
    assert step_diff(gen.step_logits, twin.step_logits) <= bf16_tol(hf["eps_generate"])
    assert first_steps_diff(gen, hf["fp32"]["generate"]) <= bf16_tol(hf["eps_generate"])


@pytest.mark.parametrize("executor", EXECUTORS)
def test_attention_on_gpu_projections_in_tee(executor, prompts, hf):
    """A partition no preset uses: q/k/v arrive over the wire and attention runs on the GPU
    side (the fused executor must not rotate received buffers in place)."""
    gpu = "[embed,rope,attn_scores,attn_softmax,attn_context,o_proj,lm_head]"
    with split_model(f"executor={executor}", "partition=custom",
                     f"partition.options.gpu={gpu}") as (model, _):
        logits = prefill(model, prompts["prefill"])
        gen = greedy(model, prompts["generate"], 8)
    assert max_diff(logits, hf["fp32"]["prefill"]) <= FP32_TOL
    assert gen.tokens[0] == hf["fp32"]["generate"].tokens[0][:8]
    assert step_diff(gen.step_logits, hf["fp32"]["generate"].step_logits) <= FP32_TOL


@pytest.mark.parametrize("dtype,tol", [("float32", FP32_TOL), ("bfloat16", None)])
@pytest.mark.parametrize("executor", EXECUTORS)
def test_chunked_prefill(executor, dtype, tol, prompts, hf):
    """T > 1 new tokens after a cached prefix: the causal mask is aligned bottom-right
    (queries at positions past..past+T-1 see keys 0..past+T-1)."""
    from tsqp_core.metrics import Meter
    from tsqp_core.tee.pipeline import open_session

    ids = prompts["prefill"]
    with split_model(f"executor={executor}", "partition=layer", f"dtype={dtype}") as (model, _):
        with open_session(model) as session:
            first = model.forward(ids[:, :9], session, Meter())
            rest = model.forward(ids[:, 9:], session, Meter())
    logits = torch.cat([first, rest], dim=1)
    ref = hf["fp32"]["prefill"]
    assert max_diff(logits, ref) <= (tol if tol is not None else bf16_tol(hf["eps_prefill"]))
    if tol is not None:
        assert torch.equal(logits.argmax(-1), ref.argmax(-1))


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
