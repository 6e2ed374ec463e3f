"""Tokenizers behind one small interface: Hugging Face directories and Meta's Llama 3 BPE.

``bos_token_id`` means *the id that* ``encode`` *prepends*, or ``None`` when
``encode`` adds no BOS (e.g. SmolLM2, whose tokenizer defines a BOS but does not
insert it).  ``decode`` renders special tokens as their text.
"""

from __future__ import annotations

import abc
import importlib.util
import json
import pathlib
from collections.abc import Iterator

# Meta's Llama 3 pre-tokenizer split pattern (llama_models/llama3/tokenizer.py).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
LLAMA3_NAMED_SPECIAL = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
# sha256 of Meta's Llama 3 tokenizer.model, as shipped in llama-models.
LLAMA3_MODEL_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
_MAX_ENCODE_CHARS = 400_000  # tiktoken panics on longer inputs
_MAX_RUN_CHARS = 25_000  # ... and on longer runs of (non-)whitespace

TOKENIZER_KINDS = ("hf", "llama3")
#: Files that make a checkpoint directory carry its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_files(directory: pathlib.Path) -> list[str]:
    """The tokenizer files in ``directory`` (none: it has no tokenizer of its own)."""
    return [name for name in TOKENIZER_FILES if (directory / name).is_file()]


class Tokenizer(abc.ABC):
    """Text <-> token ids, plus the ids a generation loop needs."""

    eos_token_ids: set[int]
    """Ids that end generation."""
    bos_token_id: int | None
    """The id ``encode`` prepends, or ``None`` if it prepends nothing."""
    vocab_size: int
    """Number of ids the tokenizer can produce (special tokens included)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``, with BOS prepended if the model expects one."""

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text for ``ids`` (special tokens rendered as text)."""


class HFTokenizer(Tokenizer):
    """A tokenizer saved in a local Hugging Face directory (never touches the network)."""

    def __init__(self, path: pathlib.Path | str) -> None:
        from transformers import AutoTokenizer

        self.path = pathlib.Path(path)
        self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.vocab_size = len(self.hf)
        bos = self.hf.bos_token_id
        probe = self.hf.encode("a")
        self.bos_token_id = bos if bos is not None and probe[:1] == [bos] else None
        eos: set[int] = set()
        if self.hf.eos_token_id is not None:
            eos.add(int(self.hf.eos_token_id))
        for name in ("generation_config.json", "config.json"):
            eos |= _eos_ids_from(self.path / name)
        self.eos_token_ids = eos

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids))


def _eos_ids_from(config_file: pathlib.Path) -> set[int]:
    """The ``eos_token_id`` entry (int or list) of a JSON config, if the file has one."""
    try:
        value = json.loads(config_file.read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {int(v) for v in value if isinstance(v, int)}
    return set()


def llama3_model_path() -> pathlib.Path:
    """Meta's ``tokenizer.model`` inside the installed ``llama_models`` package (not imported)."""
    spec = importlib.util.find_spec("llama_models")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = pathlib.Path(location) / "llama3" / "tokenizer.model"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "Llama 3 tokenizer.model not found; install it with `pip install --no-deps llama-models`"
    )


class Llama3Tokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer rebuilt on ``tiktoken`` (128000 BPE ranks + 256 specials).

    Matches ``llama_models.llama3.tokenizer.Tokenizer`` with ``bos=True, eos=False``:
    special-token strings in the text are encoded as plain text unless
    ``allow_special=True`` is passed to :meth:`encode`.
    """

    def __init__(self, model_path: pathlib.Path | str | None = None) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = pathlib.Path(model_path) if model_path is not None else llama3_model_path()
        expected = LLAMA3_MODEL_SHA256 if model_path is None else None
        ranks = load_tiktoken_bpe(str(path), expected_hash=expected)
        n = len(ranks)
        reserved = (
            f"<|reserved_special_token_{2 + i}|>"
            for i in range(LLAMA3_NUM_SPECIAL - len(LLAMA3_NAMED_SPECIAL))
        )
        names = [*LLAMA3_NAMED_SPECIAL, *reserved]
        self.special_tokens = {name: n + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(
            name=path.name,
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size = n + len(names)
        self.bos_token_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_token_ids = {
            self.special_tokens[name] for name in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
        }

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """BOS followed by the BPE ids of ``text``."""
        allowed: set[str] | str = "all" if allow_special else set()
        ids: list[int] = [self.bos_token_id]  # type: ignore[list-item]
        for start in range(0, len(text), _MAX_ENCODE_CHARS):
            for piece in _split_runs(text[start : start + _MAX_ENCODE_CHARS], _MAX_RUN_CHARS):
                ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=()))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(list(ids))


def _split_runs(s: str, max_run: int) -> Iterator[str]:
    """Split ``s`` so no piece has more than ``max_run`` consecutive (non-)whitespace chars."""
    run, is_space, start = 0, s[:1].isspace(), 0
    for i, ch in enumerate(s):
        if ch.isspace() != is_space:
            run, is_space = 1, ch.isspace()
        else:
            run += 1
            if run > max_run:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


def load_tokenizer(kind: str, path: pathlib.Path | None) -> Tokenizer:
    """Build a tokenizer: ``"hf"`` needs ``path`` (a HF directory); ``"llama3"`` uses
    ``path`` as its ``tokenizer.model`` or, if ``None``, the one in ``llama-models``."""
    if kind == "hf":
        if path is None:
            raise ValueError("tokenizer kind 'hf' needs a path to a Hugging Face directory")
        return HFTokenizer(path)
    if kind == "llama3":
        if path is not None and path.is_dir():  # a model directory: its own tokenizer.model, if any
            path = path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None
        return Llama3Tokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(TOKENIZER_KINDS)}")
