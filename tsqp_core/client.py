"""The TEE side's view of the GPU server: calls with validated replies and measured costs."""

from __future__ import annotations

import itertools
from typing import Any

import torch

from tsqp_core import codec
from tsqp_core.codec import ProtocolError
from tsqp_core.graph import INTEGER_VALUES, Dims, expected_shape
from tsqp_core.metrics import Meter, now_ns
from tsqp_core.schedule import Call, Schedule
from tsqp_core.server import PROTOCOL
from tsqp_core.transport import ClientChannel


class RemoteError(RuntimeError):
    """The server answered, but with an error or with a reply that fails validation."""


class RemoteGpu:
    """Speaks the server protocol over one channel; every reply is validated before use
    (request id, status, tensor names, shapes, dtypes)."""

    def __init__(self, channel: ClientChannel, *, borrowed: bool, timeout: float | None,
                 meter: Meter | None = None) -> None:
        self.channel = channel
        self.borrowed = borrowed
        self.timeout = timeout
        self.meter = meter or Meter()
        self._ids = itertools.count(1)
        self.plan_id: str | None = None
        self.info: dict[str, Any] = {}

    def _request(self, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None,
                 timeout: float | None = None) -> tuple[codec.Message, int, int, int, int]:
        req_id = next(self._ids)
        t0 = now_ns()
        frames = codec.encode(codec.Message({**header, "id": req_id}, tensors or {}))
        t1 = now_ns()
        reply_frames = self.channel.request(frames, self.timeout if timeout is None else timeout)
        t2 = now_ns()
        try:
            reply = codec.decode(reply_frames, copy=self.borrowed)
        except ProtocolError as exc:
            raise RemoteError(f"malformed reply from the GPU side: {exc}") from None
        t3 = now_ns()
        if reply.header.get("id") != req_id:
            raise RemoteError(f"reply id {reply.header.get('id')!r} does not match request {req_id}")
        if reply.header.get("ok") is not True:
            raise RemoteError(f"GPU side refused {header.get('m')}: "
                              f"{reply.header.get('error', 'no reason given')}")
        sent = sum(len(memoryview(f)) for f in frames[1:])
        return reply, t1 - t0, t2 - t1, t3 - t2, sent

    def hello(self, *, fingerprint: str, executor: str, dtype: str, schedule: Schedule,
              timeout: float | None = None) -> dict[str, Any]:
        reply, *_ = self._request({"m": "hello", "v": PROTOCOL, "fingerprint": fingerprint,
                                   "executor": executor, "dtype": dtype,
                                   "plan": schedule.wire_plan()}, timeout=timeout)
        self.plan_id = reply.header["plan_id"]
        self.info = reply.header
        return reply.header

    def ping(self, timeout: float | None = None) -> None:
        self._request({"m": "ping"}, timeout=timeout)

    def end(self, session: int) -> None:
        self._request({"m": "end", "s": session})

    def call(self, call: Call, inputs: dict[str, torch.Tensor], *, session: int, past: int,
             last_only: bool, dims: Dims, batch: int, tokens: int,
             dtype: torch.dtype) -> dict[str, torch.Tensor]:
        reply, t_enc, t_rtt, t_dec, sent = self._request(
            {"m": "call", "plan": self.plan_id, "c": call.index, "s": session, "past": past,
             "last": last_only}, inputs)
        t_check = now_ns()
        out = reply.tensors
        if list(out) != list(call.outputs):
            raise RemoteError(f"call {call.method}: expected tensors {list(call.outputs)}, "
                              f"got {list(out)}")
        for name, t in out.items():
            want = expected_shape(name, dims, batch, tokens, past, last_only)
            want_dtype = torch.int64 if name in INTEGER_VALUES else dtype
            if tuple(t.shape) != want or t.dtype != want_dtype:
                raise RemoteError(f"call {call.method}: tensor '{name}' is {list(t.shape)} "
                                  f"{t.dtype}, expected {list(want)} {want_dtype}")
        t_check = now_ns() - t_check
        timings = reply.header.get("t")
        if not (isinstance(timings, list) and len(timings) == 3
                and all(isinstance(x, int) and 0 <= x for x in timings)):
            raise RemoteError(f"call {call.method}: bad timing field {timings!r:.60}")
        s_dec, s_compute, s_enc = timings
        server_ns = s_dec + s_compute + s_enc
        m = self.meter
        m.add("serialize", t_enc + t_dec + t_check + s_dec + s_enc)
        m.add("gpu_compute", s_compute)
        m.add("transport", max(0, t_rtt - server_ns))
        received = sum(t.numel() * t.element_size() for t in out.values())
        m.record_call(call.method, sent, received, t_enc + t_rtt + t_dec)
        return out
