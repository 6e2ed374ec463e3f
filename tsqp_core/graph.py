"""The forward graph: a fixed sequence of ops over named values (README, "Architecture").

Each op reads and writes *values* named in single-assignment form: ``h0`` is the embedding
output (the residual stream entering layer 0), ``3.q`` is layer 3's query projection,
``h4`` the residual stream leaving layer 3, ``logits`` the output. Partitions assign ops to a
side, executors group GPU-side ops into calls, and the shape of every value follows from its
kind and the model's dimensions -- which is how both sides validate what they receive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

#: Per-layer op kinds, in execution order: (kind, inputs, outputs). ``{i}`` is the layer,
#: ``{n}`` the next layer. ``attn_residual``/``mlp_residual`` are a layer's two residual adds.
LAYER_OPS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("input_norm", ("h{i}",), ("{i}.x",)),
    ("qkv_proj", ("{i}.x",), ("{i}.q", "{i}.k", "{i}.v")),
    ("rope", ("{i}.q", "{i}.k", "pos"), ("{i}.qr", "{i}.kr")),
    ("attn_scores", ("{i}.qr", "{i}.kr"), ("{i}.s",)),
    ("attn_softmax", ("{i}.s",), ("{i}.p",)),
    ("attn_context", ("{i}.p", "{i}.v"), ("{i}.c",)),
    ("o_proj", ("{i}.c",), ("{i}.o",)),
    ("attn_residual", ("h{i}", "{i}.o"), ("{i}.hm",)),
    ("post_norm", ("{i}.hm",), ("{i}.x2",)),
    ("gate_up_proj", ("{i}.x2",), ("{i}.g", "{i}.u")),
    ("act", ("{i}.g", "{i}.u"), ("{i}.m",)),
    ("down_proj", ("{i}.m",), ("{i}.d",)),
    ("mlp_residual", ("{i}.hm", "{i}.d"), ("h{n}",)),
)
HEAD_OPS = (("embed", ("ids",), ("h0",)),)
TAIL_OPS = (
    ("final_norm", ("hL",), ("xf",)),
    ("lm_head", ("xf",), ("logits",)),
)
OP_KINDS: tuple[str, ...] = tuple(k for k, _, _ in HEAD_OPS + LAYER_OPS + TAIL_OPS)
#: Ops that keep per-generation state (the KV cache) on the side that runs them.
STATEFUL = frozenset({"attn_scores", "attn_context"})
#: Aliases accepted wherever op kinds are named.
ALIASES = {"residual": ("attn_residual", "mlp_residual")}

#: What each value kind is, for exposure reports.
DESCRIPTIONS = {
    "ids": "token ids",
    "pos": "token positions",
    "h": "residual stream (hidden states)",
    "x": "normed hidden states (attention input)",
    "q": "query projections",
    "k": "key projections",
    "v": "value projections",
    "qr": "rotated queries",
    "kr": "rotated keys",
    "s": "attention scores (QK^T)",
    "p": "attention probabilities",
    "c": "attention context (PV)",
    "o": "attention output projection",
    "hm": "residual stream after attention",
    "x2": "normed hidden states (MLP input)",
    "g": "MLP gate projections",
    "u": "MLP up projections",
    "m": "MLP activations (silu(gate)*up)",
    "d": "MLP down projections",
    "xf": "final normed hidden states",
    "logits": "logits",
}


@dataclass(frozen=True)
class Op:
    kind: str
    layer: int | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def label(self) -> str:
        return self.kind if self.layer is None else f"{self.layer}.{self.kind}"


def expand_kinds(kinds: Iterable[str]) -> frozenset[str]:
    """Op kind names with aliases expanded; an unknown name is an error listing the kinds."""
    out: set[str] = set()
    for k in kinds:
        if k in ALIASES:
            out.update(ALIASES[k])
        elif k in OP_KINDS:
            out.add(k)
        else:
            raise ValueError(
                f"unknown op '{k}'; choose from: {', '.join(OP_KINDS + tuple(ALIASES))}"
            )
    return frozenset(out)


def forward_ops(n_layers: int) -> list[Op]:
    """The ops of one forward pass of an ``n_layers``-layer model, in order."""
    ops = [Op(k, None, i, o) for k, i, o in HEAD_OPS]
    for layer in range(n_layers):
        for kind, ins, outs in LAYER_OPS:
            fmt = {"i": layer, "n": layer + 1}
            ops.append(Op(kind, layer, tuple(s.format(**fmt) for s in ins),
                          tuple(s.format(**fmt) for s in outs)))
    last = f"h{n_layers}"
    for kind, ins, outs in TAIL_OPS:
        ops.append(Op(kind, None, tuple(last if s == "hL" else s for s in ins), outs))
    return ops


def value_kind(name: str) -> str:
    """``'3.q' -> 'q'``, ``'h4' -> 'h'``, ``'logits' -> 'logits'``."""
    if "." in name:
        return name.split(".", 1)[1]
    if name[:1] == "h" and name[1:].isdigit():
        return "h"
    return name


def value_layer(name: str) -> int | None:
    if "." in name:
        return int(name.split(".", 1)[0])
    if name[:1] == "h" and name[1:].isdigit():
        return int(name[1:])
    return None


@dataclass(frozen=True)
class Dims:
    """The model dimensions every shape follows from."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int


def value_template(name: str, dims: Dims) -> tuple[int | str, ...]:
    """The shape of value ``name`` as a template over the call symbols of
    :mod:`tsqp_core.protocol`: ``B`` batch, ``T`` new tokens, ``S`` keys (past + new),
    ``L`` tail rows (1 when only the last position is needed, else ``T``)."""
    kind = value_kind(name)
    hq, hk = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    table: dict[str, tuple[int | str, ...]] = {
        "ids": ("B", "T"),
        "pos": ("T",),
        "h": ("B", "T", dims.hidden), "x": ("B", "T", dims.hidden), "o": ("B", "T", dims.hidden),
        "hm": ("B", "T", dims.hidden), "x2": ("B", "T", dims.hidden),
        "d": ("B", "T", dims.hidden),
        "xf": ("B", "L", dims.hidden),
        "q": ("B", "T", hq), "c": ("B", "T", hq), "k": ("B", "T", hk), "v": ("B", "T", hk),
        "qr": ("B", dims.heads, "T", dims.head_dim), "kr": ("B", dims.kv_heads, "T", dims.head_dim),
        "s": ("B", dims.heads, "T", "S"), "p": ("B", dims.heads, "T", "S"),
        "g": ("B", "T", dims.intermediate), "u": ("B", "T", dims.intermediate),
        "m": ("B", "T", dims.intermediate),
        "logits": ("B", "L", dims.vocab),
    }
    try:
        return table[kind]
    except KeyError:
        raise ValueError(f"unknown value '{name}'") from None


INTEGER_VALUES = frozenset({"ids", "pos"})

#: Values after the final norm: only the last position when a forward needs just that.
TAIL_VALUES = frozenset({"xf", "logits"})


def expected_shape(name: str, dims: Dims, batch: int, tokens: int, past: int,
                   last_only: bool) -> tuple[int, ...]:
    """The shape value ``name`` must have in a forward of ``tokens`` new tokens after
    ``past`` cached ones."""
    size = {"B": batch, "T": tokens, "S": past + tokens, "L": 1 if last_only else tokens}
    return tuple(d if isinstance(d, int) else size[d] for d in value_template(name, dims))
