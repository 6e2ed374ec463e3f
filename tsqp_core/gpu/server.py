"""The GPU side: holds the weights its ops need and answers calls over any transport.

The messages are :mod:`tsqp_core.protocol`'s. The server is untrusting too: every plan and
every call is validated (op names, layers, value names, the wire layout the protection scheme
declares, shapes, dtypes, cache positions) before anything runs, and no request --
malformed, truncated, oversized -- stops it from serving the next one.

At ``hello`` the client names the model (fingerprint), executor, dtype and protection scheme
and sends the plan; the server checks each against what it holds, builds (once) the backend
for the plan's ops -- wrapped by the protection's GPU-side part when the scheme has one --
and answers with a plan id and what it actually runs (device, dtype, executor options,
attention kernel).

**Clients are kept apart.** Plans and sessions (KV caches) belong to the connection that
made them (:class:`~tsqp_core.transport.Peer`, with its authenticated key where the
transport has one): a plan id or session id of another connection means nothing to this
one, so no client can see, use or evict another's. Limits are per client and refusals are
clear: a client holds at most ``max_sessions`` live sessions (one more is refused, never a
live one evicted) and :data:`MAX_PLANS` plans (its own oldest goes); the server holds at
most ``max_clients`` clients -- a hello beyond that is refused unless a client has been
idle for ``idle_s``, whose state is then dropped -- and one authenticated key at most half
of them. A connection that closes frees its state
at once where the transport reports it (:meth:`GpuServer.forget`).

**Sizes.** Before its hello a connection may send :data:`protocol.PRE_HELLO_BYTES`; after,
the largest request its plans allow for the batch and positions it declared. A bigger
request is refused before it is decoded.

Unexpected errors are logged, rate-limited (:class:`~tsqp_core.errlog.RateLimitedLog`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgpack
import torch

from tsqp_core import __version__, codec, protocol
from tsqp_core.codec import ProtocolError
from tsqp_core.errlog import RateLimitedLog
from tsqp_core.executor import Backend, Executor, GpuCall
from tsqp_core.gpu.tamper import Tamper
from tsqp_core.graph import STATEFUL, Op, forward_ops
from tsqp_core.metrics import now_ns
from tsqp_core.models.source import Checkpoint, fingerprint
from tsqp_core.ops import InputError
from tsqp_core.plugins import PluginError
from tsqp_core.protocol import CallRequest, End, Hello, HelloReply, Ping
from tsqp_core.schedule import Call
from tsqp_core.transport import ANONYMOUS, MessageTooLarge, Peer, ServerChannel

#: A channel's ``reserve``: writable buffers for a reply's tensor frames, or None.
Reserve = Callable[[list[int]], "list[memoryview] | None"]

#: Plans one client may hold (its own oldest goes when it makes one more).
MAX_PLANS = 4
#: The largest batch a hello may declare.
MAX_BATCH = 4096
ATTENTION = frozenset({"rope", "attn_scores", "attn_softmax", "attn_context"})


class RequestError(ValueError):
    """A request the server refuses; the message goes back to the client."""


@dataclass
class _Plan:
    calls: list[GpuCall]
    backend: Backend
    #: What the hello declared: no call may go beyond.
    batch: int
    positions: int
    #: The largest legitimate request of this plan, in bytes.
    max_request: int
    #: Per call, the caches its ops read and append to: ``(layer, "k" | "v")`` (worked
    #: out once here, not per call).
    stateful: list[tuple[tuple[int, str], ...]] = field(default_factory=list)
    #: Per call, its wire layout made concrete per call sizes (what a call's frames hold).
    layouts: list[protocol.CallLayout] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layouts = [protocol.CallLayout(call.wire) for call in self.calls]
        self.stateful = [tuple((op.layer, "k" if op.kind == "attn_scores" else "v")
                               for op in call.ops if op.kind in STATEFUL)
                         for call in self.calls]


@dataclass
class _Client:
    """What one connection holds on the GPU side."""

    peer: Peer
    #: By plan id (as a call frame names it).
    plans: OrderedDict[int, _Plan] = field(default_factory=OrderedDict)
    sessions: OrderedDict[int, Any] = field(default_factory=OrderedDict)
    last_seen: float = field(default_factory=time.monotonic)
    #: The largest request it may send: the largest call of its plans (kept by
    #: :meth:`plans_changed`, read on every request).
    limit: int = protocol.PRE_HELLO_BYTES

    def plans_changed(self) -> None:
        self.limit = max([protocol.PRE_HELLO_BYTES, *(p.max_request for p in self.plans.values())])

    def max_request(self) -> int:
        return self.limit


class GpuServer:
    def __init__(self, model_dir: Path, executor: Executor, executor_name: str,
                 dtype: torch.dtype, device: torch.device, max_sessions: int = 4,
                 tamper: Tamper | None = None, max_clients: int = 8,
                 idle_s: float = 600.0, pin_memory: bool = True) -> None:
        self.ckpt = Checkpoint(model_dir)
        self.fingerprint = fingerprint(model_dir)
        self.executor = executor
        self.executor_name = executor_name
        #: Who made a call's outputs, for check_slots' message (not formatted per call).
        self._maker = f"executor {executor_name}"
        self.dtype = dtype
        self.dtype_name = str(dtype).removeprefix("torch.")
        self.device = device
        self.max_sessions = max_sessions
        self.max_clients = max_clients
        self.idle_s = idle_s
        #: Page-locks the memory channels lend (CUDA only; made by :meth:`serve`).
        self.pinner: Any = None
        self._pin_memory = pin_memory
        #: Deliberate corruption of replies (tests and demonstrations only; see tamper.py).
        self.tamper = tamper
        self.dims = self.ckpt.dims
        self._ops = {(op.kind, op.layer): op for op in forward_ops(self.dims.layers)}
        self._clients: dict[Peer, _Client] = {}
        self._log = RateLimitedLog("tsqp serve")
        self._backend: Backend | None = None
        self._kinds: frozenset[str] = frozenset()
        #: GPU-side parts of protection schemes, by (name, options), around ``_backend``.
        self._protected: dict[str, Backend] = {}
        #: Bytes of call outputs this side copied on their way out (into a transport's
        #: reserved memory, or to make them contiguous host memory): the copy-count tests.
        self.copied_bytes = 0
        #: Called with every request and its reply (see :meth:`observe`).
        self._observers: list[Callable[[list[Any], list[Any]], None]] = []

    def observe(self, observer: Callable[[list[Any], list[Any]], None]) -> None:
        """Have ``observer(request_frames, reply_frames)`` called after every request: what
        the GPU side received and what it answered (views valid only during the call). For
        recording the GPU side's view in tests and attacks; costs nothing when unused."""
        self._observers.append(observer)

    # --- the loop ------------------------------------------------------------------------

    def serve(self, channel: ServerChannel, stop: threading.Event | None = None,
              poll_s: float = 0.2) -> None:
        """Answer requests until ``stop`` is set (or forever). On CUDA (and unless
        ``pin_memory`` is off) the memory ``channel`` lends is page-locked for the device
        first (:meth:`~tsqp_core.transport.ServerChannel.pin`)."""
        if self._pin_memory and self.device.type == "cuda":
            if self.pinner is None:
                from tsqp_core.gpu.pinning import CudaPinner

                self.pinner = CudaPinner(self.device)
            channel.pin(self.pinner)
        serve_loop(channel, self.handle, stop, poll_s, self.forget)

    def forget(self, peer: Peer) -> None:
        """``peer``'s connection closed: drop its plans and sessions."""
        self._clients.pop(peer, None)

    @property
    def clients(self) -> int:
        return len(self._clients)

    def live_sessions(self) -> dict[tuple[Peer, int], Any]:
        """Every live session's cache, by (client, session id): for tests and reports."""
        return {(c.peer, sid): cache for c in self._clients.values()
                for sid, cache in c.sessions.items()}

    def handle(self, frames: list[Any], peer: Peer = ANONYMOUS,
               reserve: Reserve | None = None) -> list[Any]:
        """One request's frames in (from ``peer``), the reply's frames out. Never raises.
        ``reserve``: the channel's :meth:`~tsqp_core.transport.ServerChannel.reserve`, so a
        call's outputs are written once, straight into the transport's reply memory."""
        reply = self._handle(frames, peer, reserve)
        for observer in self._observers:
            observer(frames, reply)
        return reply

    def _handle(self, frames: list[Any], peer: Peer, reserve: Reserve | None) -> list[Any]:
        req_id: int | None = None
        try:
            t0 = now_ns()
            client = self._clients.get(peer)
            if client is not None and frames and protocol.is_call_frame(frames[0]):
                # a call of a client with plans: its header has a fixed size and each tensor
                # frame must hold exactly what the plan's layout says (read before anything
                # else), so the total needs no sum of its own
                try:
                    req_id, call = CallRequest.parse(frames[0])
                except ProtocolError:
                    req_id = _peek_id(frames)
                    raise
                client.last_seen = time.monotonic()
                return self._call(client, req_id, call, frames[1:], now_ns() - t0, reserve)
            size = sum(memoryview(f).nbytes for f in frames)
            limit = client.limit if client else protocol.PRE_HELLO_BYTES
            if size > limit:
                req_id = _peek_id(frames)
                raise RequestError(
                    f"a request of {size} bytes exceeds this connection's limit of {limit} "
                    + ("(the largest call of its plans)" if client else "before hello"))
            try:
                req = protocol.decode_request(frames)
            except ProtocolError:
                req_id = _peek_id(frames)
                raise
            req_id = req.id
            msg = req.message
            if client is not None:
                client.last_seen = time.monotonic()
            if isinstance(msg, CallRequest):  # (a client with plans took the path above)
                raise RequestError("unknown plan: send hello first")
            if isinstance(msg, Hello):
                header = self._hello(peer, msg).header()
                if self.tamper is not None:
                    self.tamper.hello(header)
                return protocol.encode_reply(req_id, header)
            if isinstance(msg, End):
                if client is not None:
                    client.sessions.pop(msg.session, None)
            elif not isinstance(msg, Ping):  # pragma: no cover - REQUESTS lists them all
                raise ProtocolError(f"unhandled message {type(msg).__name__}")
            return protocol.encode_reply(req_id)
        except (ProtocolError, RequestError, PluginError, InputError) as exc:
            return protocol.encode_error(req_id, str(exc))
        except Exception as exc:  # a bug or a device error: report it, keep serving
            self._log(protocol.clean_text(f"error in request {req_id}: {exc!r}", 500))
            return protocol.encode_error(req_id, f"{type(exc).__name__}: {exc}")

    def _client(self, peer: Peer) -> _Client:
        """``peer``'s state, made at its first hello if the server has room."""
        client = self._clients.get(peer)
        if client is not None:
            return client
        if len(self._clients) >= self.max_clients:
            now = time.monotonic()
            idle = [c for c in self._clients.values() if now - c.last_seen >= self.idle_s]
            for c in sorted(idle, key=lambda c: c.last_seen)[:1]:
                del self._clients[c.peer]
        if len(self._clients) >= self.max_clients:
            raise RequestError(f"the GPU side is full: it serves {self.max_clients} clients "
                               "at once (server.max_clients) and none has been idle for "
                               f"{self.idle_s:g} s; try again later")
        if peer.key is not None:
            per_key = max(1, self.max_clients // 2)
            if sum(c.peer.key == peer.key for c in self._clients.values()) >= per_key:
                raise RequestError(f"this client key already holds {per_key} of the "
                                   f"{self.max_clients} connections a GPU side serves; close "
                                   "one first")
        client = self._clients[peer] = _Client(peer)
        return client

    # --- hello: agree on model, protection and plan ----------------------------------------

    def _hello(self, peer: Peer, h: Hello) -> HelloReply:
        mine = {"fingerprint": self.fingerprint, "executor": self.executor_name,
                "dtype": self.dtype_name}
        for key, value in mine.items():
            if getattr(h, key) != value:
                if key == "fingerprint":  # never tell a stranger which model this is
                    raise RequestError(
                        f"the client's model fingerprint {h.fingerprint!r:.40} is not this "
                        "server's (the checkpoints' contents differ); start a server with the "
                        "same model")
                raise RequestError(
                    f"the server's {key} is {value!r} but the client's is "
                    f"{getattr(h, key)!r:.80}; start a server with the same model, executor "
                    "and dtype")
        if not 1 <= h.batch <= MAX_BATCH:
            raise RequestError(f"a batch of {h.batch} is beyond this server's {MAX_BATCH}")
        if not 1 <= h.positions <= self.dims.max_positions:
            raise RequestError(f"{h.positions} positions exceed the model's "
                               f"{self.dims.max_positions}")
        protection = self._protection(h.protection)
        calls = [self._check_call(i, entry, protection) for i, entry in enumerate(h.plan)]
        if not calls:
            raise RequestError("the plan has no calls")
        client = self._client(peer)
        kinds = frozenset(op.kind for c in calls for op in c.ops)
        if self._backend is None or not kinds <= self._kinds:
            self._kinds = self._kinds | kinds
            self._backend = self.executor.backend(self.ckpt, self._kinds, self.dtype, self.device)
            self._protected.clear()
        backend = self._backend
        key = json.dumps(h.protection, sort_keys=True)
        if protection is not None:
            if key not in self._protected:
                self._protected[key] = protection.gpu_backend(
                    self._backend, self.ckpt, self._kinds, self.dtype, self.device)
            backend = self._protected[key]
        wire_plan = [e.to_wire() for e in h.plan]
        plan_id = hashlib.sha256(json.dumps([wire_plan, key, h.batch, h.positions]).encode()
                                 ).hexdigest()[:16]
        max_request = protocol.message_limit([c.wire for c in calls], h.batch, h.positions,
                                             "request")
        number = int(plan_id, 16)
        client.plans[number] = _Plan(calls, backend, h.batch, h.positions, max_request)
        client.plans.move_to_end(number)
        while len(client.plans) > MAX_PLANS:  # only ever its own
            client.plans.popitem(last=False)
        client.plans_changed()
        backend.prepare(calls)  # before info(): a compiling backend reports its compile time
        return HelloReply(plan_id, self.info(kinds, h.protection), self.dims.__dict__)

    def info(self, kinds: frozenset[str], protection: dict[str, Any]) -> dict[str, Any]:
        """What this server actually runs (the ``server`` section of results)."""
        backend_info = self._backend.info() if self._backend is not None else {}
        attention = (backend_info.get("attention", "eager") if ATTENTION & kinds
                     else "none (attention runs in the TEE)")
        return {"device": str(self.device), "dtype": self.dtype_name,
                "executor": self.executor_name,
                "executor_options": self.executor.options.model_dump(),
                "attention": attention, "protection": protection,
                "torch": torch.__version__, "tsqp": __version__,
                "host_memory": self._host_memory(),
                **{k: v for k, v in backend_info.items() if k != "attention"}}

    def _host_memory(self) -> dict[str, Any]:
        if self.pinner is not None:
            return self.pinner.summary()
        why = ("server.pin_memory is off" if self.device.type == "cuda"
               else f"the device is {self.device.type}: nothing to pin for")
        return {"pinned": f"no ({why})"}

    def _protection(self, spec: dict[str, Any]):
        """The protection scheme the client asks for, when it has a GPU-side part."""
        if spec["name"] == "none":
            return None
        from tsqp_core.plugins import get_plugins

        return get_plugins().protections.create(spec["name"], spec["options"])

    def _check_call(self, index: int, entry: protocol.PlanEntry, protection: Any) -> GpuCall:
        ops: list[Op] = []
        for key in entry.ops:
            op = self._ops.get(key)
            if op is None:
                raise RequestError(f"unknown op {list(key)!r:.60} for a {self.dims.layers}-layer "
                                   "model")
            ops.append(op)
        if self.executor.grouping == "op" and len(ops) > 1:
            raise RequestError(f"executor {self.executor_name} runs one op per call; call "
                               f"{index} has {len(ops)}")
        made = {n for op in ops for n in op.outputs}
        reads = {n for op in ops for n in op.inputs} - made
        if set(entry.inputs) != reads or len(entry.inputs) != len(reads):
            raise RequestError(f"call {index} inputs {list(entry.inputs)} do not match what "
                               f"its ops read {sorted(reads)}")
        if not set(entry.outputs) <= made or len(set(entry.outputs)) != len(entry.outputs):
            raise RequestError(f"call {index} outputs {list(entry.outputs)} are not all made "
                               "by its ops")
        call = Call(index, tuple(ops), entry.inputs, entry.outputs)
        wire = call.plain_wire(self.dims, self.dtype_name)
        if protection is not None:
            wire = protection.wire(call, wire)
        if wire != entry.wire:
            raise RequestError(f"call {index} ({call.method}): the client's wire layout does "
                               "not match the protection scheme's here (different versions?)")
        return GpuCall(index, tuple(ops), wire)

    # --- call -------------------------------------------------------------------------------

    def _call(self, client: _Client, req_id: int, req: CallRequest, frames: Any,
              t_decode: int, reserve: Reserve | None = None) -> list[Any]:
        t_checks = now_ns()
        plan = client.plans.get(req.plan)
        if plan is None:
            raise RequestError("unknown plan: send hello first")
        if req.call >= len(plan.calls):
            raise RequestError(f"call index {req.call} out of range")
        if req.past + req.tokens > plan.positions or req.batch > plan.batch:
            raise RequestError(f"a call of batch {req.batch} over {req.past + req.tokens} "
                               f"positions is beyond what the hello declared ({plan.batch}, "
                               f"{plan.positions})")
        call = plan.calls[req.call]
        sized = plan.layouts[req.call].sized(req.batch, req.tokens, req.past, req.last)
        env = protocol.read_tensors(sized.inputs, frames, copy=False)  # the backend adds to it
        session = req.session
        cache = self._session(client, session, plan.backend)
        for layer, which in plan.stateful[req.call]:
            have = cache.length(layer, which)
            if have != req.past:
                client.sessions.pop(session, None)
                raise RequestError(f"layer {layer} cache holds {have} positions, call says "
                                   f"past={req.past}; session {session} reset")
        t0 = now_ns()
        t_decode += t0 - t_checks  # validating a request is part of reading it
        try:
            plan.backend.run(call, env, cache, req.last)
            plan.backend.synchronize()
        except Exception:
            client.sessions.pop(session, None)  # half-appended cache: never reuse it
            raise
        t_compute = now_ns() - t0
        t0 = now_ns()
        out = {name: env[name] for name in sized.output_names}
        try:
            protocol.check_slots(sized.outputs, out, self._maker, sized.output_names)
        except ProtocolError as exc:
            client.sessions.pop(session, None)
            raise RequestError(str(exc)) from None
        lie = self.tamper is not None and self.tamper.chosen(call.index)
        if lie:
            text = self.tamper.before_reply()
            if text is not None:  # raw, as a hostile server would send it
                return codec.pack({protocol.ID: req_id, protocol.OK: False,
                                   protocol.ERROR: text}, [], [])
        buffers = self._place(out, reserve, sized.received, plan.backend)
        timings = protocol.CallReply(t_decode, t_compute, now_ns() - t0)
        if lie:
            timings = self.tamper.reply(timings, out)
            buffers = self._place(out, reserve, sized.received, plan.backend)
        return protocol.encode_call_reply(req_id, timings, buffers)

    def _place(self, out: dict[str, torch.Tensor], reserve: Reserve | None,
               nbytes: int, backend: Backend) -> list[Any]:
        """The reply's tensor frames (``nbytes`` in all), each output copied once on its way
        (:func:`codec.tensor_frames`: views, or straight into the channel's memory -- from a
        device, the one device-to-host transfer, queued on the backend's stream and waited
        for once, here, before the reply can leave)."""
        on_device = self.device.type != "cpu"
        try:
            buffers, copied = codec.tensor_frames(out.values(), nbytes, reserve, on_device)
        except MessageTooLarge as exc:
            raise RequestError(f"reply not sent: {exc}") from None
        finally:
            if on_device:  # a copy queued before one failed must not land in a later reply
                backend.synchronize()
        self.copied_bytes += copied
        return buffers

    def _session(self, client: _Client, session: int, backend: Backend) -> Any:
        cache = client.sessions.get(session)
        if cache is None:
            if len(client.sessions) >= self.max_sessions:
                raise RequestError(
                    f"this client already has {len(client.sessions)} live sessions "
                    f"(server.max_sessions={self.max_sessions}); end one before starting "
                    "another")
            cache = client.sessions[session] = backend.new_cache()
        return cache


def _peek_id(frames: list[Any]) -> int | None:
    """The id of a request the codec refused, if its header says one (the error answers it)."""
    if frames and protocol.is_call_frame(frames[0]):
        return protocol.call_frame_id(frames[0])
    try:
        header = msgpack.unpackb(frames[0], raw=False, max_bin_len=0, max_ext_len=0)
    except Exception:
        return None
    return protocol.request_id(header) if isinstance(header, dict) else None


def serve_loop(channel: ServerChannel, handle: Callable[[list[Any], Peer, Reserve], list[Any]],
               stop: threading.Event | None, poll_s: float,
               forget: Callable[[Peer], None] | None = None) -> None:
    """Receive, ``handle(frames, peer, channel.reserve)`` (which never raises), reply --
    until ``stop`` is set; ``forget(peer)`` for every peer the channel reports gone."""
    while stop is None or not stop.is_set():
        frames = channel.recv(timeout=poll_s)
        if forget is not None:
            for peer in channel.departed():
                forget(peer)
        if frames is None:
            continue
        send_reply(channel, handle(frames, channel.peer, channel.reserve))


def send_reply(channel: ServerChannel, reply: list[Any]) -> None:
    """Send ``reply``; one the channel cannot carry (:class:`MessageTooLarge`) becomes a small
    error answering the same request, so the client learns why instead of waiting."""
    try:
        channel.send(reply)
    except MessageTooLarge as exc:
        channel.send(protocol.encode_error(_peek_id(reply), f"reply not sent: {exc}"))


def serve_forever(server: GpuServer, channel: ServerChannel,
                  on_ready: Callable[[str], None]) -> int | None:
    """Serve until SIGTERM/SIGINT (returns which); the channel is closed in exactly this one
    place."""
    import signal

    stop = threading.Event()
    got: list[int] = []

    def _stop(signum: int, frame: Any) -> None:
        got.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        on_ready(channel.address)
        server.serve(channel, stop)
    finally:
        channel.close()
    return got[0] if got else None
