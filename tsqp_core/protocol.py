"""The wire protocol between the TEE side and the GPU side: one module both import.

Messages other than calls are codec messages (:mod:`tsqp_core.codec`): a msgpack header plus
named tensors. The header keys live here and nowhere else; each message is a small typed class
that builds its header and parses one back, refusing anything malformed with
:class:`~tsqp_core.codec.ProtocolError`. Requests carry ``m`` (the method) and ``id``; every
reply carries the request's ``id`` and ``ok``::

    hello  {v, fingerprint, executor, dtype, protection, plan, limits}
                                                            -> {plan_id, server, dims}
    end    {s}                                                  -> {}
    ping   {}                                                   -> {}
    (any, calls included)                                       -> {ok: false, error}

**Calls** -- the hot path, many per token -- are *call frames*: a fixed binary header
(:data:`CALL_REQUEST`: id, plan, call index, session, past, batch, tokens, last) followed by
the raw bytes of the call's wire inputs, in the plan's order; the answer is a fixed header
(:data:`CALL_REPLY`: id and the server's timings) followed by the wire outputs. Names, dtypes
and shapes do not travel: the plan agreed at ``hello`` fixes them for the sizes the header
gives (:class:`CallLayout`), so checking a call is checking each frame's byte count against
them. A call header starts with :data:`CALL_TAG`, a byte msgpack never uses, so no msgpack
header reads as one. The timings are the server's own nanoseconds for the call: decoding
and validating the request, running it (device synchronised), encoding the reply.

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
every tensor of every call against it. After ``hello`` a call is just its index in the plan.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Sequence

import torch

from tsqp_core import codec
from tsqp_core.codec import DTYPES, ProtocolError

#: Bumped whenever a message changes shape.
VERSION = 4

# --- header keys: the one place they are spelled ----------------------------------------------

METHOD = "m"
ID = "id"
OK = "ok"
ERROR = "error"

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

    @property
    def plan(self) -> int:
        """The plan id as a call frame carries it."""
        return int(self.plan_id, 16)

    @classmethod
    def parse(cls, h: dict[str, Any]) -> "HelloReply":
        plan_id = _field(h, "plan_id", str, "a string")
        if not (len(plan_id) == 16 and all(c in "0123456789abcdef" for c in plan_id)):
            raise ProtocolError(f"'plan_id' must be 16 hex digits (a call names it in 8 bytes), "
                                f"got {clean_text(plan_id, 40)!r}")
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


# --- calls: fixed binary headers, then the wire tensors' bytes --------------------------------

#: The first byte of a call frame's header: 0xc1 is the one byte msgpack never uses, so a
#: msgpack header (every other message, errors included) never reads as a call frame.
CALL_TAG = 0xC1
_KIND_REQUEST, _KIND_REPLY = 1, 2
#: tag, kind, flags (bit 0: last), call index, id, plan, session, past, batch, tokens.
CALL_REQUEST = struct.Struct("<BBBxIQQQIII")
#: tag, kind, id, then the server's decode, compute and encode nanoseconds.
CALL_REPLY = struct.Struct("<BBxxxxxxQQQQ")
#: Where both headers keep the request id (so an error can answer a call it refused).
_ID_AT = 8
#: A call taking longer than this is not a timing, it is a lie (an hour, in ns).
MAX_CALL_NS = 3600 * 10**9


def _bytes(frame: Any) -> memoryview:
    view = memoryview(frame)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def is_call_frame(frame: Any) -> bool:
    """Whether ``frame`` (a message's first) is a call header rather than msgpack."""
    view = _bytes(frame)
    return view.nbytes > 0 and view[0] == CALL_TAG


def call_frame_id(frame: Any) -> int | None:
    """The request id a call header names, if it is long enough to name one."""
    view = _bytes(frame)
    if view.nbytes < _ID_AT + 8 or view[0] != CALL_TAG:
        return None
    return int.from_bytes(view[_ID_AT:_ID_AT + 8], "little")


class CallRequest(NamedTuple):
    """Run call ``call`` of plan ``plan`` for ``session``: ``batch`` rows of ``tokens`` new
    positions after ``past`` cached ones; ``last``: the tail values of the last position
    only. On the wire, :data:`CALL_REQUEST` then the wire inputs."""

    plan: int
    call: int
    session: int
    past: int
    last: bool
    batch: int = 1
    tokens: int = 1

    METHOD = "call"

    def frame(self, req_id: int) -> bytes:
        try:
            return CALL_REQUEST.pack(CALL_TAG, _KIND_REQUEST, 1 if self.last else 0, self.call,
                                     req_id, self.plan, self.session, self.past, self.batch,
                                     self.tokens)
        except struct.error as exc:
            raise ProtocolError(f"call header out of range: {exc}") from None

    @classmethod
    def parse(cls, frame: Any) -> tuple[int, "CallRequest"]:
        """The request id and the call of a call header; anything else is refused."""
        try:  # a header of any other size raises
            (tag, kind, flags, call, req_id, plan, session, past, batch,
             tokens) = CALL_REQUEST.unpack(frame)
        except (struct.error, TypeError, ValueError, BufferError):
            raise ProtocolError(f"a call header has {CALL_REQUEST.size} bytes, got "
                                f"{memoryview(frame).nbytes}") from None
        if tag != CALL_TAG or kind != _KIND_REQUEST:
            raise ProtocolError("not a call request header")
        if flags > 1:
            raise ProtocolError(f"unknown call flags {flags:#x}")
        if batch < 1 or tokens < 1:
            raise ProtocolError(f"a call needs at least one row (batch {batch}, tokens "
                                f"{tokens})")
        return req_id, cls(plan, call, session, past, flags == 1, batch, tokens)


class CallReply(NamedTuple):
    """The server's nanoseconds for one call. On the wire, :data:`CALL_REPLY` then the wire
    outputs."""

    decode_ns: int
    compute_ns: int
    encode_ns: int

    def frame(self, req_id: int) -> bytes:
        return CALL_REPLY.pack(CALL_TAG, _KIND_REPLY, req_id, self.decode_ns, self.compute_ns,
                               self.encode_ns)

    @classmethod
    def parse(cls, frames: Sequence[Any], req_id: int,
              round_trip_ns: int | None = None) -> "CallReply":
        """The timings of a reply to call ``req_id``. An error reply (msgpack) raises
        :class:`RemoteRefusal`; anything else that is not this call's reply header,
        :class:`ProtocolError`. ``round_trip_ns``: what the client measured; the server's
        parts cannot add up to more than that."""
        if not frames:
            raise ProtocolError("empty reply")
        try:  # the usual case first: a header of exactly its size (any other size raises)
            tag, kind, got, *t = CALL_REPLY.unpack(frames[0])
        except (struct.error, TypeError, ValueError, BufferError):  # the checks below say why
            tag = kind = None
        if tag != CALL_TAG:  # msgpack (an error reply) never starts with the tag
            head = memoryview(frames[0])
            if not is_call_frame(head):
                check_reply(codec.decode(frames), req_id)  # an error raises; ok is still wrong
                raise ProtocolError("a call's reply must be a call frame")
            raise ProtocolError(f"a call reply header has {CALL_REPLY.size} bytes, got "
                                f"{head.nbytes}")
        if kind != _KIND_REPLY:
            raise ProtocolError("not a call reply header")
        if got != req_id:
            raise ProtocolError(f"reply id {got} does not match request {req_id}")
        if max(t) > MAX_CALL_NS:
            raise ProtocolError(f"bad timings {t}")
        if round_trip_ns is not None and sum(t) > round_trip_ns:
            raise ProtocolError(f"the server claims {sum(t)} ns for a call that took "
                                f"{round_trip_ns} ns end to end")
        return cls(*t)


class Slot(NamedTuple):
    """One wire tensor of a call of given sizes: where its frame's bytes go."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class CallSizes(NamedTuple):
    """A call's wire layout at one set of sizes: its inputs' and outputs' slots, their
    names and their bytes in all -- what checking and sizing a call's frames needs, worked
    out once."""

    inputs: tuple[Slot, ...]
    outputs: tuple[Slot, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    #: Bytes of the inputs' frames (the request's tensors) and of the outputs' (the reply's).
    sent: int
    received: int

    @classmethod
    def of(cls, inputs: tuple[Slot, ...], outputs: tuple[Slot, ...]) -> "CallSizes":
        return cls(inputs, outputs, tuple(s.name for s in inputs),
                   tuple(s.name for s in outputs), sum(s.nbytes for s in inputs),
                   sum(s.nbytes for s in outputs))


class CallLayout:
    """A call's wire layout made concrete for the sizes of a call: each tensor's name,
    dtype, shape and byte count, in order -- worked out once per distinct sizes (only the
    symbols the layout uses count), so that checking a call is comparing byte counts."""

    __slots__ = ("wire", "_uses_s", "_cache")

    #: Distinct sizes remembered (a long generation over ``S`` goes through many).
    MAX_CACHED = 256

    def __init__(self, wire: CallWire) -> None:
        self.wire = wire
        self._uses_s = any("S" in t.shape for t in (*wire.inputs, *wire.outputs))
        self._cache: dict[tuple[int, int, int, bool], CallSizes] = {}

    def sized(self, batch: int, tokens: int, past: int, last: bool) -> CallSizes:
        """The call's slots, names and byte totals at these sizes."""
        key = (batch, tokens, past if self._uses_s else 0, last)
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) >= self.MAX_CACHED:
                self._cache.clear()
            want = sizes(batch, tokens, past, last)
            hit = self._cache[key] = CallSizes.of(_slots(self.wire.inputs, want),
                                                  _slots(self.wire.outputs, want))
        return hit

    def slots(self, batch: int, tokens: int, past: int, last: bool
              ) -> tuple[tuple[Slot, ...], tuple[Slot, ...]]:
        """The inputs' and the outputs' slots of a call of these sizes."""
        hit = self.sized(batch, tokens, past, last)
        return hit.inputs, hit.outputs


def _slots(specs: Sequence[WireTensor], want: dict[str, int]) -> tuple[Slot, ...]:
    out = []
    for spec in specs:
        shape = spec.resolve(want)
        dtype = spec.torch_dtype
        out.append(Slot(spec.name, dtype, shape, math.prod(shape) * dtype.itemsize))
    return tuple(out)


def read_tensors(slots: Sequence[Slot], frames: Sequence[Any], *, copy: bool
                 ) -> dict[str, torch.Tensor]:
    """The tensors of ``frames`` (a call's frames after its header), one per slot: each
    frame must hold exactly its slot's bytes. ``copy``: the tensors own their memory (else
    they are views of the frames)."""
    if len(frames) != len(slots):
        raise ProtocolError(f"expected {len(slots)} tensors {[s.name for s in slots]}, got "
                            f"{len(frames)} frames")
    make = codec.owned if copy else codec.over
    out = {}
    for slot, frame in zip(slots, frames):
        view = memoryview(frame)
        if view.nbytes != slot.nbytes:
            raise ProtocolError(f"tensor '{slot.name}': {list(slot.shape)} "
                                f"{codec.DTYPE_NAMES[slot.dtype]} needs {slot.nbytes} bytes, "
                                f"frame has {view.nbytes}")
        out[slot.name] = make(view, slot.dtype, slot.shape) if slot.nbytes else torch.empty(
            slot.shape, dtype=slot.dtype)
    return out


def check_slots(slots: Sequence[Slot], tensors: dict[str, torch.Tensor], who: str,
                names: tuple[str, ...] | None = None) -> None:
    """``tensors`` are exactly ``slots``' names, in order, of their dtypes and shapes: what
    this side is about to send (a bug in ``who`` otherwise, said before anything leaves).
    ``names``: the slots' names, where the caller has them (:class:`CallSizes`)."""
    if tuple(tensors) != (names if names is not None else tuple(s.name for s in slots)):
        raise ProtocolError(f"{who} made tensors {list(tensors)}, the plan says "
                            f"{[s.name for s in slots]}")
    for slot, t in zip(slots, tensors.values()):
        if t.dtype != slot.dtype or t.shape != slot.shape:
            raise ProtocolError(f"{who} made '{slot.name}' {list(t.shape)} "
                                f"{codec.DTYPE_NAMES.get(t.dtype, t.dtype)}, the plan says "
                                f"{list(slot.shape)} {codec.DTYPE_NAMES[slot.dtype]}")


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


#: The messages sent as msgpack (a call is a call frame).
REQUESTS: dict[str, type] = {m.METHOD: m for m in (Hello, End, Ping)}


@dataclass
class Request:
    """A decoded request: its id, its message and its tensors -- for a call, its frames
    after the header, which only the plan can read (:func:`read_tensors`)."""

    id: int
    message: Any
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    frames: Sequence[Any] = ()


def request_header(req_id: int, message: Any) -> dict[str, Any]:
    """The header of request ``req_id`` carrying ``message`` (its tensors not yet listed)."""
    header = message.header()
    header[METHOD] = message.METHOD
    header[ID] = req_id
    return header


def encode_request(req_id: int, message: Any,
                   tensors: dict[str, torch.Tensor] | None = None) -> list[Any]:
    """The frames of a request; a :class:`CallRequest`'s are a call frame, its tensors'
    bytes in the order given (the plan's)."""
    if isinstance(message, CallRequest):
        return [message.frame(req_id),
                *(codec.tensor_buffer(t) for t in (tensors or {}).values())]
    return codec.pack(request_header(req_id, message), *codec.encode_tensors(tensors or {}))


def request_id(header: dict[str, Any]) -> int | None:
    """The id of a request, when it has a usable one (errors answer it)."""
    rid = header.get(ID)
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None


def decode_request(frames: Sequence[Any]) -> Request:
    if not frames:
        raise ProtocolError("empty message")
    if is_call_frame(frames[0]):
        req_id, call = CallRequest.parse(frames[0])
        return Request(req_id, call, frames=frames[1:])
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


def encode_call_reply(req_id: int, timings: CallReply, buffers: Sequence[Any]) -> list[Any]:
    return [timings.frame(req_id), *buffers]


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
