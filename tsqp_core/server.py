"""The GPU side: holds the weights its ops need and answers calls over any transport.

Protocol (header fields; tensors travel as codec frames, named by value)::

    hello  {m, id, fingerprint, executor, dtype, plan}  -> {ok, plan_id, device, dims}
    call   {m, id, plan, c, s, past, last} + inputs     -> {ok, t: [decode, compute, encode]} + outputs

``t`` is the server's own nanoseconds: decoding and validating the request, running it
(device synchronised), encoding the reply.
    end    {m, id, s}                                   -> {ok}
    ping   {m, id}                                      -> {ok}

Every reply carries the request's ``id``; a failure is ``{ok: false, error}``. The server is
untrusting too: every plan and every call is validated (op names, layers, value names,
shapes, dtypes, cache positions) before anything runs, and no request -- malformed,
truncated, oversized -- stops it from serving the next one.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgpack
import torch

from tsqp_core import codec
from tsqp_core.codec import Message, ProtocolError
from tsqp_core.executor import Backend, Executor
from tsqp_core.graph import (INTEGER_VALUES, STATEFUL, TAIL_VALUES, Op, batch_and_tokens,
                             expected_shape, forward_ops, value_kind)
from tsqp_core.metrics import now_ns
from tsqp_core.models.source import Checkpoint, fingerprint
from tsqp_core.transport import MessageTooLarge, ServerChannel

PROTOCOL = 1
MAX_PLANS = 8


class RequestError(ValueError):
    """A request the server refuses; the message goes back to the client."""


@dataclass(frozen=True)
class PlannedCall:
    ops: tuple[Op, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class GpuServer:
    def __init__(self, model_dir: Path, executor: Executor, executor_name: str,
                 dtype: torch.dtype, device: torch.device, max_sessions: int = 4) -> None:
        self.ckpt = Checkpoint(model_dir)
        self.fingerprint = fingerprint(model_dir)
        self.executor = executor
        self.executor_name = executor_name
        self.dtype = dtype
        self.device = device
        self.max_sessions = max_sessions
        self.dims = self.ckpt.dims
        self._ops = {(op.kind, op.layer): op for op in forward_ops(self.dims.layers)}
        self._plans: OrderedDict[str, list[PlannedCall]] = OrderedDict()
        self._sessions: OrderedDict[int, Any] = OrderedDict()
        self._backend: Backend | None = None
        self._kinds: frozenset[str] = frozenset()

    # --- the loop ------------------------------------------------------------------------

    def serve(self, channel: ServerChannel, stop: threading.Event | None = None,
              poll_s: float = 0.2) -> None:
        """Answer requests until ``stop`` is set (or forever)."""
        serve_loop(channel, self.handle, stop, poll_s)

    def handle(self, frames: list[Any]) -> list[Any]:
        """One request's frames in, the reply's frames out. Never raises."""
        req_id: Any = -1
        try:
            t0 = now_ns()
            msg = codec.decode(frames)
            t_decode = now_ns() - t0
            req_id = msg.header.get("id", -1)
            if not isinstance(req_id, int):
                raise ProtocolError("request 'id' must be an integer")
            method = msg.header.get("m")
            if method == "call":
                return self._call(msg, req_id, t_decode)
            if method == "hello":
                return codec.pack(self._hello(msg.header) | {"id": req_id, "ok": True}, [], [])
            if method == "end":
                self._sessions.pop(msg.header.get("s"), None)
                return codec.pack({"id": req_id, "ok": True}, [], [])
            if method == "ping":
                return codec.pack({"id": req_id, "ok": True}, [], [])
            raise ProtocolError(f"unknown method {method!r:.40}")
        except (ProtocolError, RequestError) as exc:
            return self._error(req_id, str(exc))
        except Exception as exc:  # a bug or a device error: report it, keep serving
            print(f"tsqp serve: error in request {req_id}: {exc!r}", file=sys.stderr)
            return self._error(req_id, f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _error(req_id: Any, message: str) -> list[Any]:
        return codec.pack({"id": req_id if isinstance(req_id, int) else -1, "ok": False,
                           "error": message}, [], [])

    # --- hello: agree on model and plan --------------------------------------------------

    def _hello(self, h: dict) -> dict:
        if h.get("v") != PROTOCOL:
            raise RequestError(f"protocol version {h.get('v')!r}; this server speaks {PROTOCOL}")
        mine = {"fingerprint": self.fingerprint, "executor": self.executor_name,
                "dtype": str(self.dtype).removeprefix("torch.")}
        for key, value in mine.items():
            if h.get(key) != value:
                raise RequestError(
                    f"server {key} is {value!r} but the client wants {h.get(key)!r}; start a "
                    f"server with the same model, executor and dtype"
                )
        plan = [self._check_call(c) for c in self._as_list(h.get("plan"), "plan")]
        kinds = frozenset(op.kind for c in plan for op in c.ops)
        if self._backend is None or not kinds <= self._kinds:
            self._kinds = self._kinds | kinds
            self._backend = self.executor.backend(self.ckpt, self._kinds, self.dtype, self.device)
        plan_id = hashlib.sha256(json.dumps(h["plan"]).encode()).hexdigest()[:16]
        self._plans[plan_id] = plan
        self._plans.move_to_end(plan_id)
        while len(self._plans) > MAX_PLANS:
            self._plans.popitem(last=False)
        return {"plan_id": plan_id, "device": str(self.device),
                "dims": self.dims.__dict__}

    @staticmethod
    def _as_list(x: Any, what: str) -> list:
        if not isinstance(x, list):
            raise RequestError(f"'{what}' must be a list")
        return x

    def _check_call(self, wire: Any) -> PlannedCall:
        if not (isinstance(wire, list) and len(wire) == 3):
            raise RequestError("each plan entry must be [ops, inputs, outputs]")
        ops = []
        for item in self._as_list(wire[0], "ops"):
            op = self._ops.get(tuple(item) if isinstance(item, list) else None)
            if op is None:
                raise RequestError(f"unknown op {item!r:.60} for a {self.dims.layers}-layer model")
            ops.append(op)
        if not ops:
            raise RequestError("a call needs at least one op")
        made = {n for op in ops for n in op.outputs}
        reads = {n for op in ops for n in op.inputs} - made
        inputs, outputs = self._as_list(wire[1], "inputs"), self._as_list(wire[2], "outputs")
        if set(inputs) != reads or len(inputs) != len(reads):
            raise RequestError(f"call inputs {inputs} do not match what its ops read {sorted(reads)}")
        if not set(outputs) <= made:
            raise RequestError(f"call outputs {outputs} are not all made by its ops")
        return PlannedCall(tuple(ops), tuple(inputs), tuple(outputs))

    # --- call -------------------------------------------------------------------------------

    def _call(self, msg: Message, req_id: int, t_decode: int) -> list[Any]:
        t_checks = now_ns()
        h = msg.header
        plan = self._plans.get(h.get("plan"))
        if plan is None or self._backend is None:
            raise RequestError("unknown plan: send hello first")
        c, session, past, last = h.get("c"), h.get("s"), h.get("past"), h.get("last", False)
        if not (isinstance(c, int) and 0 <= c < len(plan)):
            raise RequestError(f"call index {c!r:.20} out of range")
        if not (isinstance(session, int) and isinstance(past, int) and past >= 0):
            raise RequestError("'s' and 'past' must be integers")
        call = plan[c]
        env = dict(msg.tensors)
        self._check_inputs(call, env, past, bool(last))
        cache = self._session(session)
        for op in call.ops:
            if op.kind in STATEFUL:
                have = cache.length(op.layer, "k" if op.kind == "attn_scores" else "v")
                if have != past:
                    self._sessions.pop(session, None)
                    raise RequestError(f"layer {op.layer} cache holds {have} positions, call says "
                                       f"past={past}; session {session} reset")
        t0 = now_ns()
        t_decode += t0 - t_checks  # validating a request is part of reading it
        try:
            self._backend.run(call.ops, env, cache, bool(last))
            self._backend.synchronize()
        except Exception:
            self._sessions.pop(session, None)  # half-appended cache: never reuse it
            raise
        t_compute = now_ns() - t0
        t0 = now_ns()
        specs, buffers = codec.encode_tensors({n: env[n] for n in call.outputs})
        t_encode = now_ns() - t0
        return codec.pack({"id": req_id, "ok": True, "t": [t_decode, t_compute, t_encode]},
                          specs, buffers)

    def _check_inputs(self, call: PlannedCall, env: dict[str, torch.Tensor], past: int,
                      last: bool) -> None:
        if set(env) != set(call.inputs):
            raise RequestError(f"call wants tensors {list(call.inputs)}, got {list(env)}")
        bt = next((bt for n, t in env.items()
                   if not (last and value_kind(n) in TAIL_VALUES)
                   and (bt := batch_and_tokens(n, t.shape)) is not None), None)
        if bt is None:  # only tail values: take the batch from one of them
            t = next(t for n, t in env.items() if value_kind(n) != "pos")
            bt = (t.shape[0], 1)
        batch, tokens = bt
        if past + tokens > self.dims.max_positions:
            raise RequestError(f"{past + tokens} positions exceed the model's "
                               f"{self.dims.max_positions}")
        for name, t in env.items():
            want = expected_shape(name, self.dims, batch, tokens, past, last)
            if tuple(t.shape) != want:
                raise RequestError(f"tensor '{name}' has shape {list(t.shape)}, expected {list(want)}")
            dtype = torch.int64 if name in INTEGER_VALUES else self.dtype
            if t.dtype != dtype:
                raise RequestError(f"tensor '{name}' is {t.dtype}, expected {dtype}")

    def _session(self, session: int) -> Any:
        cache = self._sessions.get(session)
        if cache is None:
            cache = self._backend.new_cache()  # type: ignore[union-attr]
            self._sessions[session] = cache
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        self._sessions.move_to_end(session)
        return cache


def serve_loop(channel: ServerChannel, handle: Callable[[list[Any]], list[Any]],
               stop: threading.Event | None, poll_s: float) -> None:
    """Receive, ``handle`` (which never raises), reply -- until ``stop`` is set."""
    while stop is None or not stop.is_set():
        frames = channel.recv(timeout=poll_s)
        if frames is None:
            continue
        send_reply(channel, handle(frames))


def send_reply(channel: ServerChannel, reply: list[Any]) -> None:
    """Send ``reply``; one the channel cannot carry (:class:`MessageTooLarge`) becomes a small
    error answering the same request, so the client learns why instead of waiting."""
    try:
        channel.send(reply)
    except MessageTooLarge as exc:
        req_id = msgpack.unpackb(reply[0]).get("id", -1)
        channel.send(GpuServer._error(req_id, f"reply not sent: {exc}"))


def serve_forever(server: GpuServer, channel: ServerChannel, on_ready: Callable[[str], None]) -> None:
    """Serve until SIGTERM/SIGINT; the channel is closed in exactly this one place."""
    import signal

    stop = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        on_ready(channel.address)
        server.serve(channel, stop)
    finally:
        channel.close()
