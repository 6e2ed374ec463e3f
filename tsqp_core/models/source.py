"""Where a model's weights come from, resolved to one local Hugging Face checkpoint directory.

Every model -- the seeded random ``tiny``, the LLaMA-3.2-1B shape, a user's checkpoint, the
real SmolLM2 -- ends up as a directory with ``config.json`` and safetensors weights. The TEE
process, the GPU-side server and the transformers reference all read that one directory, so
they hold the same numbers by construction. Random and converted models are materialised
once into the cache (``$TSQP_CACHE``, default ``~/.cache/tsqp``) atomically: a crash never
leaves a half-written model behind. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tsqp_core.graph import Dims

SUPPORTED_MODEL_TYPES = ("llama",)


class ModelError(ValueError):
    """The model cannot be used: missing, not LLaMA-family, unsupported feature."""


class ModelSpec(BaseModel):
    """The ``model`` config group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: Literal["random", "checkpoint", "smollm2"]
    #: LlamaConfig keyword arguments, for ``source=random``.
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    #: A local Hugging Face checkpoint directory; for ``random`` models it replaces the
    #: random weights (so ``model=llama-3.2-1b model.path=/ckpt`` runs real weights).
    path: str | None = None
    #: ``auto`` (the checkpoint directory's own tokenizer files when it has some, else none:
    #: random token ids), ``hf`` (the directory's files, required -- but with ``path`` set it
    #: reads as ``auto``), ``llama3`` (the directory's ``tokenizer.model``, else Meta's from
    #: llama-models), ``none`` (random token ids).
    tokenizer: Literal["auto", "hf", "llama3", "none"] = "auto"
    #: What ``prompt`` is when the user gives none (``null``: random token ids).
    default_prompt: str | None = None


def cache_root() -> Path:
    return Path(os.environ.get("TSQP_CACHE", Path.home() / ".cache" / "tsqp"))


def resolve(spec: ModelSpec) -> Path:
    """The checkpoint directory for ``spec``, materialising it into the cache if needed."""
    if spec.path is not None:
        path = Path(spec.path).expanduser()
        validate_checkpoint(path)
        return path
    if spec.source == "checkpoint":
        raise ModelError(f"model '{spec.name}' needs model.path=<checkpoint directory>")
    if spec.source == "smollm2":
        from tsqp_core.models import smollm2

        return smollm2.materialize(cache_root() / "models")
    return materialize_random(spec)


def validate_checkpoint(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(f"model path {str(path)!r} does not exist or is not a directory")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelError(f"model path {str(path)!r} has no config.json: not a HF checkpoint")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{cfg}: unreadable config ({exc})") from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"model at {str(path)!r} is a {model_type!r} model; tsqp runs LLaMA-family "
            f"models ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if not list(path.glob("*.safetensors")):
        raise ModelError(f"model path {str(path)!r} has no *.safetensors weights")


def load_config(path: Path) -> Any:
    """The checkpoint's LlamaConfig, once its raw config.json passed
    :func:`~tsqp_core.models.check.check_config`."""
    from transformers import LlamaConfig

    from tsqp_core.models.check import check_config

    cfg_file = path / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{cfg_file}: unreadable config ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{cfg_file}: not a JSON map")
    check_config(raw, str(cfg_file), _llama_defaults())
    try:
        config = LlamaConfig.from_pretrained(path)
    except Exception as exc:  # transformers validates too, with many exception types
        raise ModelError(f"{cfg_file}: {type(exc).__name__}: {exc}") from None
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ModelError(f"model at {path}: {flag}=true is not supported")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ModelError(f"model at {path}: hidden_act {config.hidden_act!r} is not supported")
    if getattr(config, "quantization_config", None):
        raise ModelError(f"model at {path}: quantized checkpoints are not supported "
                         "(tsqp runs float weights)")
    from tsqp_core.ops import check_rope

    try:
        check_rope(config)
    except ValueError as exc:
        raise ModelError(f"model at {path}: {exc}") from None
    return config


def _llama_defaults() -> dict[str, Any]:
    """What LlamaConfig assumes for keys a config leaves out."""
    from transformers import LlamaConfig

    return {k: v for k, v in LlamaConfig().to_dict().items()
            if k not in ("head_dim", "num_key_value_heads")}  # derived from the others


def dims_of(config: Any) -> Dims:
    from tsqp_core.ops import rope_context

    heads = config.num_attention_heads
    return Dims(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        max_positions=rope_context(config),
    )


def fingerprint(path: Path) -> str:
    """A short id of a checkpoint's *contents* (its config and every weight byte): two
    checkpoints that differ in one weight differ here, so both sides agree on the numbers,
    not just the shapes. Hashing is done once per file version: the digest is cached under
    ``$TSQP_CACHE/fingerprints``, keyed by path, size, mtime and inode, and reused while all
    of them are unchanged (a rewritten file is hashed again)."""
    files = sorted(path.glob("*.safetensors"))
    stamp = [[f.name, *_stamp(f)] for f in [path / "config.json", *files]]
    cache = cache_root() / "fingerprints" / (
        hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24] + ".json")
    try:
        saved = json.loads(cache.read_text())
        if saved.get("stamp") == stamp and isinstance(saved.get("digest"), str):
            return saved["digest"]
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    for f in [path / "config.json", *files]:
        h.update(f.name.encode() + b"\0" + _file_sha256(f))
    digest = h.hexdigest()[:32]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(path.resolve()), "stamp": stamp,
                                   "digest": digest}))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs the hash next time
    return digest


def _file_sha256(f: Path) -> bytes:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.digest()


def _stamp(f: Path) -> list[int]:
    st = f.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


# --- weights -------------------------------------------------------------------------------


class Checkpoint:
    """Lazy access to a checkpoint's tensors by Hugging Face name (safetensors, mmap'd).

    Opening one refuses what tsqp cannot run (:func:`load_config`); :meth:`check_weights`
    refuses missing or non-float weights -- both before any process starts."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        from tsqp_core.models.check import check_weights

        self.path = path
        self.config = load_config(path)
        self.dims = dims_of(self.config)
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        check_weights(path, self.dims, self.tied)
        self._files = [safe_open(str(f), framework="pt") for f in sorted(path.glob("*.safetensors"))]
        self._where = {k: f for f in self._files for k in f.keys()}

    def names(self) -> list[str]:
        return sorted(self._where)

    def check_weights(self) -> None:
        """Every weight a forward needs is there, as a float tensor (header only: no read)."""
        names = weight_names(OP_WEIGHTS, self.dims.layers)
        for name in names:
            if name == "lm_head.weight" and name not in self._where and self.tied:
                name = "model.embed_tokens.weight"
            if name not in self._where:
                raise ModelError(f"checkpoint {self.path} has no tensor {name!r}")
            dtype = self._where[name].get_slice(name).get_dtype()
            if dtype not in FLOAT_DTYPES:
                raise ModelError(f"checkpoint {self.path}: tensor {name!r} is {dtype}; tsqp runs "
                                 f"float weights ({', '.join(FLOAT_DTYPES)})")

    def get(self, name: str, dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
        if name == "lm_head.weight" and name not in self._where and self.tied:
            name = "model.embed_tokens.weight"
        try:
            f = self._where[name]
        except KeyError:
            raise ModelError(f"checkpoint {self.path} has no tensor {name!r}") from None
        return f.get_tensor(name).to(device=device, dtype=dtype)


#: safetensors dtypes a checkpoint's weights may have.
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

#: The Hugging Face weights each op needs (``{i}`` is the layer).
OP_WEIGHTS: dict[str, tuple[str, ...]] = {
    "embed": ("model.embed_tokens.weight",),
    "input_norm": ("model.layers.{i}.input_layernorm.weight",),
    "qkv_proj": (
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
    ),
    "o_proj": ("model.layers.{i}.self_attn.o_proj.weight",),
    "post_norm": ("model.layers.{i}.post_attention_layernorm.weight",),
    "gate_up_proj": ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    "down_proj": ("model.layers.{i}.mlp.down_proj.weight",),
    "final_norm": ("model.norm.weight",),
    "lm_head": ("lm_head.weight",),
}


def weight_names(kinds: Iterable[str], layers: int) -> list[str]:
    names: list[str] = []
    for kind in kinds:
        for tmpl in OP_WEIGHTS.get(kind, ()):
            if "{i}" in tmpl:
                names.extend(tmpl.format(i=i) for i in range(layers))
            else:
                names.append(tmpl)
    return names


def load_weights(
    ckpt: Checkpoint, kinds: Iterable[str], dtype: torch.dtype, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The weights the ops ``kinds`` need, converted once to ``dtype`` on ``device``.

    Norm weights stay in the model's compute dtype as transformers keeps them."""
    return {n: ckpt.get(n, dtype, device) for n in weight_names(kinds, ckpt.dims.layers)}


# --- materialising random models -------------------------------------------------------------


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def random_state_dict(config: Any, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights with O(1) activations and well-spread logits.

    Each tensor has its own generator (seeded from the model seed and the tensor name), so
    the result does not depend on creation order. Linear layers use N(0, 1/fan_in), norms
    1 + N(0, 0.1^2) (so a dropped norm weight shows in the logits), embeddings N(0, 1)."""
    from tsqp_core.models.check import weight_shapes

    shapes = weight_shapes(dims_of(config), bool(getattr(config, "tie_word_embeddings", False)))
    out = {}
    for name, shape in shapes.items():
        g = torch.Generator().manual_seed(_tensor_seed(seed, name))
        t = torch.randn(shape, generator=g)
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * t
        elif name == "lm_head.weight":
            t = t * (2.0 / shape[1] ** 0.5)
        elif name != "model.embed_tokens.weight":
            t = t * (1.0 / shape[1] ** 0.5)
        out[name] = t
    return out


def materialize_random(spec: ModelSpec) -> Path:
    from transformers import LlamaConfig

    key = hashlib.sha256(json.dumps([spec.config, spec.seed], sort_keys=True).encode()).hexdigest()
    target = cache_root() / "models" / f"{spec.name}-{key[:12]}"
    if (target / "tsqp-source.json").is_file():
        return target
    from tsqp_core.models.check import MAX_RANDOM_PARAMETERS, check_config, parameters

    check_config(spec.config, f"model '{spec.name}' (model.config)", _llama_defaults())
    try:
        config = LlamaConfig(**spec.config)
    except Exception as exc:  # transformers' own validation
        raise ModelError(f"model '{spec.name}': {type(exc).__name__}: {exc}") from None
    n = parameters(dims_of(config), bool(getattr(config, "tie_word_embeddings", False)))
    if n > MAX_RANDOM_PARAMETERS:
        raise ModelError(f"model '{spec.name}': {n:.3g} random parameters is more than the "
                         f"{MAX_RANDOM_PARAMETERS:.0e} tsqp materialises; use a checkpoint")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"tsqp: creating random model '{spec.name}' (seed {spec.seed}) in {target} (once)",
          file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        from safetensors.torch import save_file

        config.save_pretrained(tmp)
        save_file(random_state_dict(config, spec.seed), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "tsqp-source.json").write_text(json.dumps({"random": spec.config, "seed": spec.seed}))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "tsqp-source.json").is_file():  # not a concurrent twin: re-raise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
