"""Any local LLaMA checkpoint with ``model.path=DIR`` alone: its tokenizer or random ids (with
a message either way), what tsqp cannot run refused before any process starts, linear and
dynamic RoPE checked against transformers, and the checkpoint's path and fingerprint in
results.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose, run_config

ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
FAST = ("transport=inproc", "threads.tee=1", "threads.gpu=1")


def save_llama(path: Path, tokenizer: bool = False, **config) -> Path:
    """A small LLaMA saved by transformers itself (``save_pretrained``), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    kwargs.update(config)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**kwargs)).save_pretrained(path)
    if tokenizer:
        save_tokenizer(path)
    return path


def save_tokenizer(path: Path) -> None:
    """A word-level tokenizer of a few hundred words, saved as transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(250)] + \
        "the capital of france is paris a city".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("ckpt") / "my-llama")


def test_model_path_alone_runs_a_checkpoint_saved_by_transformers(ckpt, tmp_path, capsys):
    from tsqp_core.models.source import fingerprint

    res = run_config(tmp_path, f"model.path={ckpt}", "prompt=null", "workload=prefill",
                     "reference=true", *FAST)
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt}: no tokenizer in the directory" in err
    assert "the prompt is 128 seeded random token ids" in err
    assert res["config"]["model"] == str(ckpt)
    assert res["model"]["path"] == str(ckpt) and res["model"]["source"] == "checkpoint"
    assert res["model"]["fingerprint"] == fingerprint(ckpt)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["model"] == res["model"]
    assert res["rpc"]["calls_per_forward"] == 1 + 6 * 2 + 1
    assert res["reference"]["passed"] is True and res["reference"]["max_abs_logit_diff"] <= 1e-4


def test_the_default_prompt_gives_way_to_random_ids_but_a_users_prompt_does_not(ckpt, tmp_path):
    from tsqp_core.run import InputError, prepare

    p = prepare(compose(f"model.path={ckpt}", "workload=prefill", "workload.prompt_tokens=9"))
    assert p.tokenizer is None and p.prompt.shape == (1, 9)  # smollm2's default prompt: no text
    with pytest.raises(InputError, match="has no tokenizer"):
        prepare(compose(f"model.path={ckpt}", "prompt=my own words"))


def test_a_checkpoint_with_a_tokenizer_uses_it(tmp_path, capsys):
    path = save_llama(tmp_path / "with-tok", tokenizer=True)
    res = run_config(tmp_path / "out", f"model.path={path}", "prompt=the capital of france is",
                     "workload=generate", "workload.new_tokens=3", "reference=true", *FAST)
    assert "tokenizer from the directory (tokenizer.json, tokenizer_config.json)" in \
        capsys.readouterr().err
    assert res["workload"]["prompt_tokens"] == 5 and isinstance(res["output_text"], str)
    assert res["model"]["tokenizer"].startswith("tokenizer from the directory")
    assert res["reference"]["tokens_match"] is True


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
     "rope_type 'yarn' is not supported"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantized checkpoints"),
    ({"model_type": "mistral"}, "tsqp runs LLaMA-family models"),
], ids=["yarn", "bias", "gelu", "quantized", "mistral"])
def test_unsupported_features_are_refused_before_anything_starts(ckpt, tmp_path, change, message):
    import shutil

    from tsqp_core.models.source import ModelError
    from tsqp_core.run import prepare

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    _edit_config(bad, **change)
    with pytest.raises(ModelError, match=message):
        prepare(compose(f"model.path={bad}", "prompt=null"))


def test_missing_and_non_float_weights_are_refused(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    from tsqp_core.models.source import ModelError
    from tsqp_core.run import prepare

    tensors = load_file(str(ckpt / "model.safetensors"))
    for name, edit in (("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       ("int8", lambda t: t.__setitem__(
                           "model.norm.weight", t["model.norm.weight"].to(torch.int8)))):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((ckpt / "config.json").read_text())
        copy = dict(tensors)
        edit(copy)
        save_file(copy, str(d / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ModelError, match="up_proj" if name == "missing" else "I8"):
            prepare(compose(f"model.path={d}", "prompt=null"))


@pytest.mark.slow
def test_an_unsupported_rope_exits_2_from_the_command_line_before_any_process(ckpt, tmp_path):
    import shutil

    bad = tmp_path / "yarn"
    shutil.copytree(ckpt, bad)
    _edit_config(bad, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    out = subprocess.run([sys.executable, "-m", "tsqp_core", "run", f"model.path={bad}",
                          "prompt=null", f"hydra.run.dir={tmp_path / 'out'}"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "rope_type 'yarn' is not supported" in out.stderr
    assert "listening" not in out.stderr + out.stdout


@pytest.mark.slow
def test_done_when_model_path_prefill_reference(ckpt, tmp_path):
    """The issue's command, as a user types it (tcp transport, a server child)."""
    out = subprocess.run([sys.executable, "-m", "tsqp_core", "run", f"model.path={ckpt}",
                          "prompt=null", "workload=prefill", "reference=true",
                          f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["model"]["path"] == str(ckpt) and len(res["model"]["fingerprint"]) == 32
    assert res["reference"]["passed"] is True


# --- RoPE scaling ------------------------------------------------------------------------------

ROPES = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic-llama3-theta": {"rope_type": "dynamic", "rope_theta": 500000.0, "factor": 3.0},
}


@pytest.mark.parametrize("rope", ROPES)
def test_rope_tables_match_transformers_bit_for_bit(rope):
    """Positions as a generation feeds them (prefill, decode steps past the trained context,
    a new shorter prompt): transformers' stateful dynamic update is reproduced exactly."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from tsqp_core.ops import Rope

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                      max_position_embeddings=64, rope_parameters=dict(ROPES[rope]))
    hf, mine = LlamaRotaryEmbedding(cfg), Rope(cfg, 16)
    default = mine.inv_freq.clone()
    x = torch.zeros(1)
    steps = [torch.arange(48), torch.tensor([48]), torch.arange(60, 70), torch.tensor([70]),
             torch.arange(100), torch.arange(20), torch.arange(10)]
    for pos in steps:
        for dtype in (torch.float32, torch.bfloat16):
            c1, s1 = hf(x.to(dtype), pos[None])
            c2, s2 = mine.cos_sin(pos, dtype)
            assert torch.equal(c1[0], c2) and torch.equal(s1[0], s2), (rope, pos[-1].item())
        if rope.startswith("dynamic") and int(pos.max()) >= 64:
            assert not torch.equal(mine.inv_freq, default)  # scaled past the trained context


@pytest.mark.parametrize("rope", ["linear", "dynamic"])
@pytest.mark.parametrize("where", ["tee", "gpu"])
def test_scaled_rope_end_to_end_against_transformers(rope, where, tmp_path):
    """RoPE in the TEE (seed partition) and on the GPU side (fused executor, layer partition);
    dynamic RoPE generates past ``max_position_embeddings`` (64 here), where it scales."""
    params = "{" + ",".join(f"{k}:{v}" for k, v in ROPES[rope].items()) + "}"
    tokens = ("workload.prompt_tokens=48", "workload.new_tokens=40") if rope == "dynamic" \
        else ("workload.prompt_tokens=40", "workload.new_tokens=16")
    layout = ("partition=seed", "executor=unfused") if where == "tee" else ("stage=stage2",)
    res = run_config(tmp_path, "model=tiny", *layout, *FAST, "~model.config.rope_parameters",
                     f"+model.config.rope_parameters={params}",
                     "model.config.max_position_embeddings=64", "workload=generate", *tokens,
                     "reference=true")
    assert res["model"]["rope"] == rope
    assert res["reference"]["tokens_match"] is True
    assert res["reference"]["max_abs_logit_diff"] <= 1e-4


def test_dynamic_rope_extends_the_context_and_others_do_not(ckpt):
    from tsqp_core.models.source import dims_of
    from transformers import LlamaConfig

    base = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=64)
    assert dims_of(LlamaConfig(**base, rope_parameters=ROPES["dynamic"])).max_positions == 128
    assert dims_of(LlamaConfig(**base, rope_parameters=ROPES["linear"])).max_positions == 64
