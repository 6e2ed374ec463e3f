"""The TEE side's view of the GPU server: calls with validated replies and measured costs.

Every reply is hostile input until checked: its size must be within what the plan allows
(before it is decoded or copied), its id must answer the request, an error reply's text is
cleaned before anyone prints it, its timings must be plausible (no part negative or longer
than the round trip the client measured), its hello must say all it must (plan id, the
model's dimensions; every string cleaned) and its tensors must be exactly the ones the plan's
wire layout declares -- names, order, dtypes, shapes. What the values are is checked after
the protection scheme opens them (:mod:`tsqp_core.tee.validate`).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch

from tsqp_core import codec, protocol
from tsqp_core.codec import ProtocolError
from tsqp_core.metrics import Meter, now_ns
from tsqp_core.protocol import CallReply, CallRequest, End, Hello, HelloReply, Ping, RemoteRefusal
from tsqp_core.transport import ClientChannel


class RemoteError(RuntimeError):
    """The server answered, but with an error or with a reply that fails validation."""


class RemoteGpu:
    """Speaks :mod:`tsqp_core.protocol` over one channel."""

    def __init__(self, channel: ClientChannel, *, borrowed: bool, timeout: float | None) -> None:
        self.channel = channel
        #: Reply frames are views of transport memory valid until the next request: tensors
        #: over them are copied before they are returned.
        self.borrowed = borrowed
        self.timeout = timeout
        self._ids = itertools.count(1)
        self.plan_id: str | None = None
        self.server: dict[str, Any] = {}
        #: The largest reply accepted: a hello reply is a header; after it, the plan's
        #: largest call (:func:`protocol.message_limit`).
        self.max_reply = protocol.PRE_HELLO_BYTES
        #: The largest batch and positions the hello declared (calls beyond are refused).
        self.batch = self.positions = 0
        #: Bytes of call tensors this side copied itself: request tensors into the
        #: transport's memory (or, where it lends none, those that were not contiguous host
        #: memory), and borrowed replies out of it (once, before any check reads them: the
        #: peer can still write there). The transport's own copies are its count.
        self.copied_bytes = 0

    def _exchange(self, message: Any, tensors: dict[str, torch.Tensor] | None = None,
                  timeout: float | None = None) -> tuple[codec.Message, list[Any], int, int, int]:
        """Send one request; return the checked reply, the sent frames, and the nanoseconds
        spent encoding, in the round trip and decoding."""
        req_id = next(self._ids)
        t0 = now_ns()
        frames = self._encode(req_id, message, tensors)
        t1 = now_ns()
        reply_frames = self.channel.request(frames, self.timeout if timeout is None else timeout)
        t2 = now_ns()
        size = sum(memoryview(f).nbytes for f in reply_frames)
        if size > self.max_reply:
            raise RemoteError(f"the GPU side's reply to {message.METHOD} has {size} bytes, more "
                              f"than the {self.max_reply} the plan allows; not read")
        try:
            reply = codec.decode(reply_frames, copy=self.borrowed)
            protocol.check_reply(reply, req_id)
        except RemoteRefusal as exc:
            raise RemoteError(f"GPU side refused {message.METHOD}: {exc}") from None
        except ProtocolError as exc:
            raise RemoteError(f"malformed reply from the GPU side to {message.METHOD}: "
                              f"{exc}") from None
        return reply, frames, t1 - t0, t2 - t1, now_ns() - t2

    def _encode(self, req_id: int, message: Any,
                tensors: dict[str, torch.Tensor] | None) -> list[Any]:
        """The request's frames; where the channel lends its memory, each tensor is copied
        once, straight into it (whatever its strides), and the channel copies only the
        header."""
        if tensors:
            buffers = self.channel.reserve([t.numel() * t.element_size()
                                            for t in tensors.values()])
            if buffers is not None:
                for t, buf in zip(tensors.values(), buffers):
                    codec.place(t, buf)
                    self.copied_bytes += t.numel() * t.element_size()
                return codec.pack(protocol.request_header(req_id, message),
                                  codec.describe(tensors), buffers)
            self.copied_bytes += sum(t.numel() * t.element_size() for t in tensors.values()
                                     if not (t.is_cpu and t.is_contiguous()))
        return protocol.encode_request(req_id, message, tensors)

    def hello(self, hello: Hello, timeout: float | None = None) -> HelloReply:
        self._hello, self._hello_timeout = hello, timeout
        reply, *_ = self._exchange(hello, timeout=timeout)
        try:
            parsed = HelloReply.parse(reply.header)
        except ProtocolError as exc:
            raise RemoteError(f"malformed hello reply from the GPU side: {exc}") from None
        self.plan_id = parsed.plan_id
        self.server = parsed.server
        self.max_reply = max(protocol.PRE_HELLO_BYTES, protocol.message_limit(
            [e.wire for e in hello.plan], hello.batch, hello.positions, "reply"))
        self.batch, self.positions = hello.batch, hello.positions
        return parsed

    def widen(self, batch: int, positions: int) -> None:
        """Say hello again, declaring at least ``batch`` and ``positions`` (a forward beyond
        what the last hello declared): the GPU side makes a plan with the larger limits;
        sessions, which belong to the connection, go on."""
        if self.plan_id is None:
            raise RemoteError("widen before hello")
        self.hello(dataclasses.replace(self._hello, batch=max(batch, self.batch),
                                       positions=max(positions, self.positions)),
                   self._hello_timeout)

    def ping(self, timeout: float | None = None) -> None:
        self._exchange(Ping(), timeout=timeout)

    def end(self, session: int, timeout: float | None = None) -> None:
        self._exchange(End(session), timeout=timeout)

    def call(self, site: Any, tensors: dict[str, torch.Tensor], meter: Meter
             ) -> dict[str, torch.Tensor]:
        """Run ``site.call`` with wire inputs ``tensors``; the wire outputs, checked against
        ``site.wire.outputs``."""
        if self.plan_id is None:
            raise RemoteError("call before hello")
        call = site.call
        reply, frames, t_enc, t_rtt, t_dec = self._exchange(
            CallRequest(self.plan_id, call.index, site.session, site.past, site.last_only),
            tensors)
        t_check = now_ns()
        try:
            timings = CallReply.parse(reply.header, t_rtt)
            protocol.check_tensors(site.wire.outputs, reply.tensors, site.sizes)
        except ProtocolError as exc:
            raise RemoteError(f"call {call.method}: {exc}") from None
        t_done = now_ns()
        server_ns = timings.decode_ns + timings.compute_ns + timings.encode_ns
        meter.add("serialize", t_enc + t_dec + (t_done - t_check) + timings.decode_ns
                  + timings.encode_ns)
        meter.add("gpu_compute", timings.compute_ns)
        meter.add("transport", t_rtt - server_ns)
        sent = sum(memoryview(f).nbytes for f in frames[1:])
        received = sum(t.numel() * t.element_size() for t in reply.tensors.values())
        if self.borrowed:
            self.copied_bytes += received
        meter.record_call(call.method, sent, received, t_enc + t_rtt + t_dec + t_done - t_check)
        return reply.tensors
