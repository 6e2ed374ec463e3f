"""Bad checkpoints are one clear error before anything starts: a truncated or garbage
safetensors file, dimensions out of bounds, a config whose sizes disagree with the weights."""

from __future__ import annotations

import json
import shutil
import struct
import time

import pytest

from tsqp_core.models.check import read_header
from tsqp_core.models.source import ModelError, resolve
from tsqp_core.run import prepare

from conftest import compose


@pytest.fixture(scope="module")
def tiny_dir():
    return resolve(compose("model=tiny").model)


@pytest.fixture
def ckpt(tiny_dir, tmp_path):
    """A private copy of the tiny checkpoint to break."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / f, d / f)
    return d


def prepare_at(path):
    return prepare(compose("model=tiny", f"model.path={path}"))


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_the_copy_is_fine(ckpt):
    assert prepare_at(ckpt).ckpt.dims.layers == 16


@pytest.mark.parametrize("how,words", [
    (lambda b: b[:4], ["truncated (4 bytes): not a safetensors file"]),
    (lambda b: b[: len(b) // 2], ["truncated: tensor", "ends at byte"]),
    (lambda b: b"\x00" * 64, ["not a safetensors file (its header is not JSON)"]),
    (lambda b: struct.pack("<Q", 1 << 40) + b[8:], ["announce a 1099511627776-byte header"]),
    (lambda b: b"garbage " * 1000, ["not a safetensors file"]),
], ids=["4-bytes", "half", "zeros", "huge-header", "text"])
def test_a_bad_weights_file_is_one_clear_line(ckpt, how, words):
    f = ckpt / "model.safetensors"
    f.write_bytes(how(f.read_bytes()))
    with pytest.raises(ModelError) as exc:
        prepare_at(ckpt)
    message = str(exc.value)
    assert "\n" not in message and "model.safetensors" in message
    for w in words:
        assert w in message, message


@pytest.mark.parametrize("changes,words", [
    ({"num_attention_heads": 0}, ["num_attention_heads=0 is out of range (1 to 1024)"]),
    ({"num_hidden_layers": 100000}, ["num_hidden_layers=100000 is out of range"]),
    ({"num_hidden_layers": 1e5}, ["num_hidden_layers=100000.0 must be an integer"]),
    ({"hidden_size": -64}, ["hidden_size=-64 is out of range"]),
    ({"vocab_size": "512"}, ["vocab_size='512' must be an integer"]),
    ({"num_key_value_heads": 3}, ["4 attention heads cannot be shared by 3"]),
    ({"head_dim": 15}, ["head_dim=15 must be even"]),
    ({"head_dim": 4096}, ["head_dim=4096 is out of range"]),
    ({"rms_norm_eps": float("nan")}, ["rms_norm_eps=nan"]),
    # sizes that disagree with the weights
    ({"num_hidden_layers": 17}, ["no weight 'model.layers.16.input_layernorm.weight'"]),
    ({"intermediate_size": 128}, ["gate_proj.weight is [160, 64] but config.json implies "
                                  "[128, 64]"]),
    ({"vocab_size": 1024}, ["embed_tokens.weight is [512, 64]", "[1024, 64]"]),
])
def test_a_bad_config_is_one_clear_line(ckpt, changes, words):
    edit_config(ckpt, **changes)
    t0 = time.monotonic()
    with pytest.raises(ModelError) as exc:
        prepare_at(ckpt)
    assert time.monotonic() - t0 < 60  # num_hidden_layers=1e5 once hung
    for w in words:
        assert w in str(exc.value), str(exc.value)


def test_a_random_model_is_bounded_before_it_is_made(tmp_path, monkeypatch):
    monkeypatch.setenv("TSQP_CACHE", str(tmp_path))
    for overrides, words in [
            (["model.config.num_hidden_layers=100000"], ["out of range"]),
            (["model.config.num_attention_heads=0"], ["out of range"]),
            (["model.config.vocab_size=4000000", "model.config.hidden_size=2048"],
             ["1.64e+10 random parameters", "use a checkpoint"])]:
        with pytest.raises(ModelError) as exc:
            prepare(compose("model=tiny", *overrides))
        for w in words:
            assert w in str(exc.value), str(exc.value)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_a_weight_of_the_wrong_dtype_or_a_malformed_entry(ckpt):
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = "model.norm.weight"
    header[name]["dtype"] = "I32"  # same width, wrong kind
    body = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(body) == n
    f.write_bytes(raw[:8] + body + raw[8 + n:])
    with pytest.raises(ModelError, match="model.norm.weight is I32, not a floating-point"):
        prepare_at(ckpt)
    header[name] = {"dtype": "F32", "shape": [64], "data_offsets": "everywhere"}
    f.write_bytes(raw[:8] + json.dumps(header, separators=(",", ":")).encode().ljust(n)
                  + raw[8 + n:])
    with pytest.raises(ModelError, match="malformed entry"):
        read_header(f)
