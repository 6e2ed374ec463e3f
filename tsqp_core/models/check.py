"""A checkpoint is checked before anything uses it: every dimension of its config within
sane bounds, and its safetensors files against that config -- each file's header parsed
here (size, JSON, dtypes, byte ranges inside the file), every weight the model needs
present with the shape the config implies and a floating-point dtype.

Every failure is one :class:`~tsqp_core.models.source.ModelError` line naming the file and
what is wrong (exit code 2), raised before a process starts: a truncated file, garbage, a
config of ``num_attention_heads=0`` or ``num_hidden_layers=1e5``, a config whose sizes
disagree with the weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tsqp_core.graph import Dims

#: Inclusive bounds of each dimension (beyond any LLaMA-family model there is, by far).
BOUNDS: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, 1024),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (2, 1024),
    "vocab_size": (1, 1 << 22),
    "max_position_embeddings": (1, 1 << 21),
}
#: Keys that may be null (then derived: kv heads = heads, head_dim = hidden / heads).
OPTIONAL = frozenset({"num_key_value_heads", "head_dim"})
#: A random model is materialised in memory: at most this many parameters.
MAX_RANDOM_PARAMETERS = 4 * 10**9
#: safetensors dtype -> bytes per element; the floating ones may hold weights.
ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
MAX_HEADER = 100 << 20


def _error(message: str) -> Exception:
    from tsqp_core.models.source import ModelError

    return ModelError(message)


def check_config(raw: dict[str, Any], where: str, defaults: dict[str, Any] | None = None
                 ) -> None:
    """Every dimension of ``raw`` (a config.json, or LlamaConfig keyword arguments over
    ``defaults``) an integer within :data:`BOUNDS`, and consistent with the others."""
    cfg = {**(defaults or {}), **raw}
    values: dict[str, int | None] = {}
    for key, (low, high) in BOUNDS.items():
        v = cfg.get(key)
        if v is None and key in OPTIONAL:
            values[key] = None
            continue
        if not isinstance(v, int) or isinstance(v, bool):
            raise _error(f"{where}: {key}={v!r} must be an integer ({low} to {high})")
        if not low <= v <= high:
            raise _error(f"{where}: {key}={v} is out of range ({low} to {high})")
        values[key] = v
    heads, kv = values["num_attention_heads"], values["num_key_value_heads"] or \
        values["num_attention_heads"]
    assert heads is not None and kv is not None
    if kv > heads or heads % kv:
        raise _error(f"{where}: {heads} attention heads cannot be shared by {kv} key/value "
                     "heads (they must divide them)")
    hidden = values["hidden_size"]
    assert hidden is not None
    head_dim = values["head_dim"]
    if head_dim is None:
        if hidden % heads:
            raise _error(f"{where}: hidden_size={hidden} is not a multiple of "
                         f"num_attention_heads={heads} (and no head_dim is given)")
        head_dim = hidden // heads
    if head_dim % 2:
        raise _error(f"{where}: head_dim={head_dim} must be even (rotary embeddings)")
    eps = cfg.get("rms_norm_eps", 1e-6)
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps)
            and 0 < eps < 1):
        raise _error(f"{where}: rms_norm_eps={eps!r} must be a small positive number")


def parameters(dims: Dims, tied: bool) -> int:
    return sum(math.prod(s) for s in weight_shapes(dims, tied).values())


def weight_shapes(dims: Dims, tied: bool) -> dict[str, tuple[int, ...]]:
    """Every weight a LLaMA model of ``dims`` has, by Hugging Face name, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (dims.vocab, dims.hidden),
                                          "model.norm.weight": (dims.hidden,)}
    hq, hk = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    for i in range(dims.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (dims.hidden,),
            p + "post_attention_layernorm.weight": (dims.hidden,),
            p + "self_attn.q_proj.weight": (hq, dims.hidden),
            p + "self_attn.k_proj.weight": (hk, dims.hidden),
            p + "self_attn.v_proj.weight": (hk, dims.hidden),
            p + "self_attn.o_proj.weight": (dims.hidden, hq),
            p + "mlp.gate_proj.weight": (dims.intermediate, dims.hidden),
            p + "mlp.up_proj.weight": (dims.intermediate, dims.hidden),
            p + "mlp.down_proj.weight": (dims.hidden, dims.intermediate),
        }
    if not tied:
        shapes["lm_head.weight"] = (dims.vocab, dims.hidden)
    return shapes


def read_header(f: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors of one safetensors file, ``name -> (dtype, shape)``, after checking that
    the header is what the format says and that every tensor's bytes lie inside the file."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _error(f"{f}: truncated ({size} bytes): not a safetensors file")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER):
                raise _error(f"{f}: not a safetensors file (its first 8 bytes announce a "
                             f"{n}-byte header in a {size}-byte file)")
            raw = fh.read(n)
    except OSError as exc:
        raise _error(f"{f}: unreadable ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _error(f"{f}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise _error(f"{f}: not a safetensors file (its header is not a map)")
    data = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and info.get("dtype") in ST_DTYPES
                and isinstance(info.get("shape"), list)
                and all(isinstance(d, int) and d >= 0 for d in info["shape"])
                and isinstance(info.get("data_offsets"), list)
                and len(info["data_offsets"]) == 2
                and all(isinstance(o, int) and o >= 0 for o in info["data_offsets"])):
            raise _error(f"{f}: tensor {name!r:.80} has a malformed entry in the header")
        begin, end = info["data_offsets"]
        want = math.prod(info["shape"]) * ST_DTYPES[info["dtype"]]
        if end > data:
            raise _error(f"{f}: truncated: tensor {name!r} ends at byte {end} of the data, "
                         f"which has {data}")
        if end - begin != want or begin > end:
            raise _error(f"{f}: tensor {name!r} ({info['dtype']} {info['shape']}) spans "
                         f"{end - begin} bytes, not {want}")
        out[name] = (info["dtype"], tuple(info["shape"]))
    return out


def check_weights(path: Path, dims: Dims, tied: bool) -> None:
    """Every weight the model needs, in its safetensors files, with the shape the config
    implies and a floating-point dtype."""
    have: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in sorted(path.glob("*.safetensors")):
        have |= read_header(f)
    for name, shape in weight_shapes(dims, tied).items():
        got = have.get(name)
        if got is None:
            raise _error(f"{path}: no weight {name!r}, which a {dims.layers}-layer model with "
                         "this config.json needs")
        dtype, actual = got
        if actual != shape:
            raise _error(f"{path}: {name} is {list(actual)} but config.json implies "
                         f"{list(shape)}")
        if dtype not in FLOAT_DTYPES:
            raise _error(f"{path}: {name} is {dtype}, not a floating-point weight")
