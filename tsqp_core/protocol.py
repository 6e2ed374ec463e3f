"""The wire protocol between the TEE side and the GPU side: one module both import.

Every message is a codec message (:mod:`tsqp_core.codec`): a msgpack header plus named
tensors. The header keys live here and nowhere else; each message is a small typed class that
builds its header and parses one back, refusing anything malformed with
:class:`~tsqp_core.codec.ProtocolError`. Requests carry ``m`` (the method) and ``id``; every
reply carries the request's ``id`` and ``ok``::

    hello  {v, fingerprint, executor, dtype, protection, plan, limits}
                                                            -> {plan_id, server, dims}
    call   {plan, c, s, past, last} + wire inputs               -> {t} + wire outputs
    end    {s}                                                  -> {}
    ping   {}                                                   -> {}
    (any)                                                       -> {ok: false, error}

``t`` is the server's own nanoseconds for the call: decoding and validating the request,
running it (device synchronised), encoding the reply.

**The plan** is agreed once, at ``hello``: one entry per call of a forward, each the call's
ops and its *wire layout* -- the tensors that cross, each as ``[name, dtype, shape]``. A
shape is a list of integers and symbols that a call's header fixes:

====== =====================================================================================
``B``  batch
``T``  new tokens in this forward
``S``  keys attended over: ``past + T``
``L``  rows of the tail values (``xf``, ``logits``): 1 when the call asks for the last
       position only (``last``), else ``T``
====== =====================================================================================

**Limits.** A hello also declares the largest ``batch`` and ``positions`` (``S``) its calls
will use. From the plan and those, both sides know the largest legitimate message in each
direction (:func:`message_limit`): the server refuses a bigger request from that connection
before decoding it, and the client a bigger reply. Before its hello, a connection may send
no more than :data:`PRE_HELLO_BYTES`.

Without protection the layout is the values themselves (``3.x: float32 [B, T, 64]``); a
protection scheme declares its own (residues, challenge vectors, ...) and both sides check
every tensor of every call against it. After ``hello`` a call is just its index ``c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Sequence

import torch

from tsqp_core import codec
from tsqp_core.codec import DTYPES, ProtocolError

#: Bumped whenever a message changes shape.
VERSION = 3

# --- header keys: the one place they are spelled ----------------------------------------------

METHOD = "m"
ID = "id"
OK = "ok"
ERROR = "error"
TIMINGS = "t"

SYMBOLS = ("B", "T", "S", "L")
#: Bytes a message may take beyond its tensors (header and framing).
HEADER_ALLOWANCE = 64 << 10
#: The most a connection may send before its hello (a hello is a header: the plan).
PRE_HELLO_BYTES = codec.MAX_HEADER_BYTES + HEADER_ALLOWANCE
#: Longest error text accepted from a peer (it is printed: see :func:`clean_text`).
MAX_ERROR_CHARS = 2000


def clean_text(text: Any, limit: int = MAX_ERROR_CHARS) -> str:
    """A peer's text made safe to print: control characters (terminal escapes) replaced,
    truncated to ``limit`` characters."""
    s = text if isinstance(text, str) else repr(text)
    s = "".join(ch if ch.isprintable() or ch == "\n" else "?" for ch in s[:limit])
    return s + (" [truncated]" if len(text if isinstance(text, str) else s) > limit else "")


# --- wire layout --------------------------------------------------------------------------------


class WireTensor(NamedTuple):
    """One tensor that crosses in a call: its name, dtype name (:data:`codec.DTYPES`) and
    shape template (integers and :data:`SYMBOLS`)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_wire(self) -> list:
        return [self.name, self.dtype, list(self.shape)]

    @classmethod
    def parse(cls, x: Any) -> "WireTensor":
        if not (isinstance(x, list) and len(x) == 3):
            raise ProtocolError(f"a wire tensor is [name, dtype, shape], got {x!r:.80}")
        name, dtype, shape = x
        if not (isinstance(name, str) and 0 < len(name) <= 64):
            raise ProtocolError(f"bad wire tensor name {name!r:.80}")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ProtocolError(f"wire tensor '{name}': unsupported dtype {dtype!r:.40}")
        if not (isinstance(shape, list) and len(shape) <= codec.MAX_DIMS and all(
                (isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40)
                or (isinstance(d, str) and d in SYMBOLS) for d in shape)):
            raise ProtocolError(f"wire tensor '{name}': bad shape template {shape!r:.80}")
        return cls(name, dtype, tuple(shape))

    def resolve(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The concrete shape for ``sizes`` (``{"B": .., "T": .., "S": .., "L": ..}``)."""
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class CallWire:
    """What crosses in one call: wire inputs (to the GPU side) and outputs (back)."""

    inputs: tuple[WireTensor, ...]
    outputs: tuple[WireTensor, ...]

    def to_wire(self) -> list:
        return [[t.to_wire() for t in self.inputs], [t.to_wire() for t in self.outputs]]


def message_limit(wires: Sequence[CallWire], batch: int, positions: int, direction: str
                  ) -> int:
    """The largest message, in bytes, any call of ``wires`` can need in ``direction``
    (``request``: its inputs; ``reply``: its outputs) when no call has more than ``batch``
    rows or ``positions`` keys (every symbol at its largest), header included."""
    largest = 0
    top = {"B": batch, "T": positions, "S": positions, "L": positions}
    for wire in wires:
        tensors = wire.inputs if direction == "request" else wire.outputs
        n = sum(math.prod(t.resolve(top)) * t.torch_dtype.itemsize for t in tensors)
        largest = max(largest, n)
    return largest + HEADER_ALLOWANCE


def sizes(batch: int, tokens: int, past: int, last: bool) -> dict[str, int]:
    """The values of the shape symbols for a call."""
    return {"B": batch, "T": tokens, "S": past + tokens, "L": 1 if last else tokens}


def bind_sizes(templates: Sequence[WireTensor], shapes: Sequence[Sequence[int]], past: int,
               last: bool) -> dict[str, int]:
    """Read ``B`` and ``T`` off received tensors' shapes (``T`` also from ``S`` and, when not
    ``last``, ``L``); every tensor must then match its template exactly. ``T`` no tensor
    fixes (a call of tail values only) is 1."""
    bound: dict[str, int] = {}
    for tmpl, shape in zip(templates, shapes):
        if len(shape) != len(tmpl.shape):
            raise ProtocolError(f"tensor '{tmpl.name}' has {len(shape)} dims, expected "
                                f"{len(tmpl.shape)}")
        for sym, n in zip(tmpl.shape, shape):
            if sym == "B" or sym == "T":
                bound.setdefault(sym, n)
            elif sym == "S":
                bound.setdefault("T", n - past)
            elif sym == "L" and not last:
                bound.setdefault("T", n)
    batch, tokens = bound.get("B", 1), bound.get("T", 1)
    if batch < 1 or tokens < 1:
        raise ProtocolError(f"a call needs at least one row (batch {batch}, tokens {tokens})")
    want = sizes(batch, tokens, past, last)
    for tmpl, shape in zip(templates, shapes):
        if tuple(shape) != tmpl.resolve(want):
            raise ProtocolError(f"tensor '{tmpl.name}' has shape {list(shape)}, expected "
                                f"{list(tmpl.resolve(want))}")
    return want


def check_tensors(specs: Sequence[WireTensor], got: dict[str, torch.Tensor],
                  dims: dict[str, int] | None, past: int = 0, last: bool = False
                  ) -> dict[str, int]:
    """``got`` holds exactly the tensors of ``specs``, in order, each of its declared dtype
    and shape (``dims`` given: against those sizes; else sizes bound from the tensors)."""
    if len(got) != len(specs) or any(a != s.name for a, s in zip(got, specs)):
        raise ProtocolError(f"expected tensors {[s.name for s in specs]}, got {list(got)}")
    tensors = list(got.values())
    for spec, t in zip(specs, tensors):
        if t.dtype != spec.torch_dtype:
            raise ProtocolError(f"tensor '{spec.name}' is {codec.DTYPE_NAMES.get(t.dtype, t.dtype)},"
                                f" expected {spec.dtype}")
    if dims is None:
        return bind_sizes(specs, [t.shape for t in tensors], past, last)
    for spec, t in zip(specs, tensors):
        want = spec.resolve(dims)
        if t.shape != want:
            raise ProtocolError(f"tensor '{spec.name}' has shape {list(t.shape)}, expected "
                                f"{list(want)}")
    return dims


# --- messages ---------------------------------------------------------------------------------


def _field(h: dict, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = h.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"'{key}' must be {what}, got {value!r:.60}")
    return value


def _int(h: dict, key: str, low: int = 0) -> int:
    value = h.get(key)
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value < 2**63):
        raise ProtocolError(f"'{key}' must be an integer >= {low}, got {value!r:.40}")
    return value


@dataclass(frozen=True)
class PlanEntry:
    """One call of the plan: its ops (``(kind, layer)``), the values it reads and makes
    (names of the forward graph) and its wire layout (what actually crosses)."""

    ops: tuple[tuple[str, int | None], ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    wire: CallWire

    def to_wire(self) -> list:
        return [[list(op) for op in self.ops], list(self.inputs), list(self.outputs),
                *self.wire.to_wire()]

    @classmethod
    def parse(cls, x: Any) -> "PlanEntry":
        if not (isinstance(x, list) and len(x) == 5 and all(isinstance(p, list) for p in x)):
            raise ProtocolError("each plan entry must be [ops, inputs, outputs, wire inputs, "
                                "wire outputs]")
        ops = []
        for item in x[0]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                    and (item[1] is None or (isinstance(item[1], int)
                                             and not isinstance(item[1], bool)))):
                raise ProtocolError(f"an op is [kind, layer], got {item!r:.60}")
            ops.append((item[0], item[1]))
        if not ops:
            raise ProtocolError("a call needs at least one op")
        for names in (x[1], x[2]):
            if not all(isinstance(n, str) and 0 < len(n) <= 64 for n in names):
                raise ProtocolError("call inputs and outputs are lists of value names")
        wire = CallWire(tuple(WireTensor.parse(t) for t in x[3]),
                        tuple(WireTensor.parse(t) for t in x[4]))
        return cls(tuple(ops), tuple(x[1]), tuple(x[2]), wire)


@dataclass(frozen=True)
class Hello:
    METHOD: ClassVar[str] = "hello"
    fingerprint: str
    executor: str
    dtype: str
    #: ``{"name": ..., "options": {...}}`` of the protection scheme.
    protection: dict[str, Any]
    plan: tuple[PlanEntry, ...]
    #: The largest batch and number of positions (``S``) any call will use.
    batch: int = 1
    positions: int = 1
    version: int = VERSION

    def header(self) -> dict[str, Any]:
        return {"v": self.version, "fingerprint": self.fingerprint, "executor": self.executor,
                "dtype": self.dtype, "protection": self.protection,
                "plan": [e.to_wire() for e in self.plan],
                "limits": {"batch": self.batch, "positions": self.positions}}

    @classmethod
    def parse(cls, h: dict[str, Any]) -> "Hello":
        if h.get("v") != VERSION:
            raise ProtocolError(f"protocol version {h.get('v')!r:.20}; this side speaks {VERSION}")
        prot = _field(h, "protection", dict, "a map")
        if not (isinstance(prot.get("name"), str) and isinstance(prot.get("options", {}), dict)):
            raise ProtocolError("'protection' must be {name, options}")
        plan = _field(h, "plan", list, "a list")
        limits = _field(h, "limits", dict, "a map {batch, positions}")
        return cls(_field(h, "fingerprint", str, "a string"), _field(h, "executor", str, "a string"),
                   _field(h, "dtype", str, "a string"),
                   {"name": prot["name"], "options": dict(prot.get("options") or {})},
                   tuple(PlanEntry.parse(e) for e in plan),
                   _int(limits, "batch", 1), _int(limits, "positions", 1))


@dataclass(frozen=True)
class HelloReply:
    plan_id: str
    #: What the GPU side actually runs: device, dtype, executor and its options, the
    #: attention kernel chosen, protection, versions.
    server: dict[str, Any]
    dims: dict[str, int]

    def header(self) -> dict[str, Any]:
        return {"plan_id": self.plan_id, "server": self.server, "dims": self.dims}

    @classmethod
    def parse(cls, h: dict[str, Any]) -> "HelloReply":
        plan_id = _field(h, "plan_id", str, "a string")
        if not (0 < len(plan_id) <= 64 and plan_id.isascii() and plan_id.isprintable()):
            raise ProtocolError("'plan_id' must be 1 to 64 printable ASCII characters")
        server = clean_info(_field(h, "server", dict, "a map"))
        dims = _field(h, "dims", dict, "a map")
        if len(dims) > 16 or not all(isinstance(k, str) and isinstance(v, int)
                                     and not isinstance(v, bool) for k, v in dims.items()):
            raise ProtocolError("'dims' must map names to integers")
        return cls(plan_id, server, dims)


#: Bounds on what a peer may say about itself (the ``server`` map of a hello reply, which
#: goes into results.json and the printed summary).
MAX_INFO_ITEMS, MAX_INFO_DEPTH, MAX_INFO_CHARS = 64, 4, 200


def clean_info(value: Any, depth: int = 0) -> Any:
    """A peer's self-description made safe to store and print: maps with string keys, lists,
    scalars; every string cleaned (:func:`clean_text`) and short; bounded size and depth."""
    if depth > MAX_INFO_DEPTH:
        raise ProtocolError("peer info nested too deeply")
    if isinstance(value, str):
        return clean_text(value, MAX_INFO_CHARS)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_INFO_ITEMS:
            raise ProtocolError("peer info list too long")
        return [clean_info(v, depth + 1) for v in value]
    if isinstance(value, dict):
        if len(value) > MAX_INFO_ITEMS:
            raise ProtocolError("peer info map too large")
        if not all(isinstance(k, str) for k in value):
            raise ProtocolError("peer info map keys must be strings")
        return {clean_text(k, 64): clean_info(v, depth + 1) for k, v in value.items()}
    raise ProtocolError(f"peer info holds a {type(value).__name__}")


@dataclass(frozen=True)
class CallRequest:
    METHOD: ClassVar[str] = "call"
    plan: str
    call: int
    session: int
    past: int
    last: bool

    def header(self) -> dict[str, Any]:
        return {"plan": self.plan, "c": self.call, "s": self.session, "past": self.past,
                "last": self.last}

    @classmethod
    def parse(cls, h: dict[str, Any]) -> "CallRequest":
        last = h.get("last", False)
        if not isinstance(last, bool):
            raise ProtocolError("'last' must be true or false")
        return cls(_field(h, "plan", str, "a string"), _int(h, "c"), _int(h, "s"),
                   _int(h, "past"), last)


#: A call taking longer than this is not a timing, it is a lie (an hour, in ns).
MAX_CALL_NS = 3600 * 10**9


@dataclass(frozen=True)
class CallReply:
    decode_ns: int
    compute_ns: int
    encode_ns: int

    def header(self) -> dict[str, Any]:
        return {TIMINGS: [self.decode_ns, self.compute_ns, self.encode_ns]}

    @classmethod
    def parse(cls, h: dict[str, Any], round_trip_ns: int | None = None) -> "CallReply":
        """``round_trip_ns``: what the client measured; the server's parts cannot add up to
        more than that."""
        t = h.get(TIMINGS)
        if not (isinstance(t, list) and len(t) == 3 and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_CALL_NS
                for x in t)):
            raise ProtocolError(f"bad timing field {t!r:.60}")
        if round_trip_ns is not None and sum(t) > round_trip_ns:
            raise ProtocolError(f"the server claims {sum(t)} ns for a call that took "
                                f"{round_trip_ns} ns end to end")
        return cls(*t)


@dataclass(frozen=True)
class End:
    METHOD: ClassVar[str] = "end"
    session: int

    def header(self) -> dict[str, Any]:
        return {"s": self.session}

    @classmethod
    def parse(cls, h: dict[str, Any]) -> "End":
        return cls(_int(h, "s"))


@dataclass(frozen=True)
class Ping:
    METHOD: ClassVar[str] = "ping"

    def header(self) -> dict[str, Any]:
        return {}

    @classmethod
    def parse(cls, h: dict[str, Any]) -> "Ping":
        return cls()


REQUESTS: dict[str, type] = {m.METHOD: m for m in (Hello, CallRequest, End, Ping)}


@dataclass
class Request:
    """A decoded request: its id, its message and its tensors."""

    id: int
    message: Any
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def request_header(req_id: int, message: Any) -> dict[str, Any]:
    """The header of request ``req_id`` carrying ``message`` (its tensors not yet listed)."""
    header = message.header()
    header[METHOD] = message.METHOD
    header[ID] = req_id
    return header


def encode_request(req_id: int, message: Any,
                   tensors: dict[str, torch.Tensor] | None = None) -> list[Any]:
    return codec.pack(request_header(req_id, message), *codec.encode_tensors(tensors or {}))


def request_id(header: dict[str, Any]) -> int | None:
    """The id of a request, when it has a usable one (errors answer it)."""
    rid = header.get(ID)
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None


def decode_request(frames: Sequence[Any]) -> Request:
    msg = codec.decode(frames)
    rid = request_id(msg.header)
    if rid is None:
        raise ProtocolError("request 'id' must be an integer")
    method = msg.header.get(METHOD)
    kind = REQUESTS.get(method) if isinstance(method, str) else None
    if kind is None:
        raise ProtocolError(f"unknown method {msg.header.get(METHOD)!r:.40}")
    return Request(rid, kind.parse(msg.header), msg.tensors)


def encode_reply(req_id: int, header: dict[str, Any] | None = None,
                 specs: list | None = None, buffers: list | None = None) -> list[Any]:
    return codec.pack({**(header or {}), ID: req_id, OK: True}, specs or [], buffers or [])


def encode_error(req_id: int | None, message: str) -> list[Any]:
    return codec.pack({ID: -1 if req_id is None else req_id, OK: False,
                       ERROR: clean_text(message)}, [], [])


class RemoteRefusal(Exception):
    """The peer answered ``ok: false``; ``str()`` is its cleaned reason."""


def check_reply(msg: codec.Message, req_id: int) -> dict[str, Any]:
    """The header of a reply to request ``req_id``; an error reply raises
    :class:`RemoteRefusal`, a reply to another request :class:`ProtocolError`."""
    h = msg.header
    if h.get(OK) is False and h.get(ID) in (req_id, -1):
        raise RemoteRefusal(clean_text(h.get(ERROR, "no reason given")))
    if h.get(ID) != req_id:
        raise ProtocolError(f"reply id {clean_text(h.get(ID), 40)} does not match request {req_id}")
    if h.get(OK) is not True:
        raise ProtocolError("reply has no 'ok'")
    return h
