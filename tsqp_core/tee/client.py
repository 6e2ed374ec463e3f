"""The TEE side's view of the GPU server: calls with validated replies and measured costs.

Every reply is hostile input until checked: its size must be within what the plan allows
(before it is decoded or copied), its id must answer the request, an error reply's text is
cleaned before anyone prints it, its timings must be plausible (no part negative or longer
than the round trip the client measured), its hello must say all it must (plan id, the
model's dimensions; every string cleaned) and a call's reply must be a call frame holding
exactly the bytes of the tensors the plan's wire layout declares for the call's sizes
(:class:`~tsqp_core.protocol.CallLayout`: names, dtypes and shapes are the plan's, never the
peer's). What the values are is checked after the protection scheme opens them
(:mod:`tsqp_core.tee.validate`).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch

from tsqp_core import codec, protocol
from tsqp_core.codec import ProtocolError
from tsqp_core.metrics import Meter, now_ns
from tsqp_core.protocol import (CallReply, CallRequest, End, Hello, HelloReply, Ping,
                                RemoteRefusal)
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
        #: The plan id as a call frame names it, and each call's layout.
        self.plan: int | None = None
        self.layouts: list[protocol.CallLayout] = []
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

    def _exchange(self, message: Any, timeout: float | None = None) -> codec.Message:
        """Send one request (not a call); return the checked reply."""
        req_id = next(self._ids)
        frames = protocol.encode_request(req_id, message)
        reply_frames = self.channel.request(frames, self.timeout if timeout is None else timeout)
        self._check_size(reply_frames, message.METHOD)
        try:
            reply = codec.decode(reply_frames, copy=self.borrowed)
            protocol.check_reply(reply, req_id)
        except RemoteRefusal as exc:
            raise RemoteError(f"GPU side refused {message.METHOD}: {exc}") from None
        except ProtocolError as exc:
            raise RemoteError(f"malformed reply from the GPU side to {message.METHOD}: "
                              f"{exc}") from None
        return reply

    def _check_size(self, frames: list[Any], method: str) -> None:
        """Refuse a reply larger than the plan allows."""
        size = sum(memoryview(f).nbytes for f in frames)
        if size > self.max_reply:
            raise RemoteError(f"the GPU side's reply to {method} has {size} bytes, more "
                              f"than the {self.max_reply} the plan allows; not read")

    def _call_frames(self, req_id: int, request: CallRequest, sized: protocol.CallSizes,
                     tensors: dict[str, torch.Tensor], method: str) -> list[Any]:
        """A call's frames: its header, then its tensors, each copied once on its way
        (:func:`codec.tensor_frames`: views, or straight into the channel's memory)."""
        try:
            protocol.check_slots(sized.inputs, tensors, "the protection scheme",
                                 sized.input_names)
            head = request.frame(req_id)
        except ProtocolError as exc:
            raise RemoteError(f"call {method}: {exc}") from None
        buffers, copied = codec.tensor_frames(tensors.values(), sized.sent,
                                              self.channel.reserve)
        self.copied_bytes += copied
        return [head, *buffers]

    def hello(self, hello: Hello, timeout: float | None = None) -> HelloReply:
        self._hello, self._hello_timeout = hello, timeout
        reply = self._exchange(hello, timeout=timeout)
        try:
            parsed = HelloReply.parse(reply.header)
        except ProtocolError as exc:
            raise RemoteError(f"malformed hello reply from the GPU side: {exc}") from None
        self.plan_id, self.plan = parsed.plan_id, parsed.plan
        self.layouts = [protocol.CallLayout(e.wire) for e in hello.plan]
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
        self._exchange(Ping(), timeout)

    def end(self, session: int, timeout: float | None = None) -> None:
        self._exchange(End(session), timeout)

    def call(self, site: Any, tensors: dict[str, torch.Tensor], meter: Meter
             ) -> dict[str, torch.Tensor]:
        """Run ``site.call`` with wire inputs ``tensors``; the wire outputs, checked against
        the plan's layout for the call's sizes."""
        if self.plan is None:
            raise RemoteError("call before hello")
        call = site.call
        sized = self.layouts[call.index].sized(site.batch, site.tokens, site.past,
                                               site.last_only)
        outputs = sized.outputs
        req_id = next(self._ids)
        t0 = now_ns()
        frames = self._call_frames(req_id, CallRequest(
            self.plan, call.index, site.session, site.past, site.last_only, site.batch,
            site.tokens), sized, tensors, call.method)
        received = sized.received
        # a small reply is copied once, straight into memory of our own (a large one is lent
        # and copied by torch on every thread: one thread filling fresh pages is slower)
        into = self.borrowed and received <= codec.SMALL_COPY
        if into:
            buffers = [codec.empty(slot.dtype, slot.shape) for slot in outputs]
            t1 = now_ns()
            reply = self.channel.request_into(frames, buffers, self.timeout)
            into = _taken(reply, buffers)
        else:
            t1 = now_ns()
            reply = self.channel.request(frames, self.timeout)
        t2 = now_ns()
        # the size of what arrived, before anything reads it -- unless the transport took
        # the reply into our buffers: only a reply of the plan's sizes is taken, and the
        # header must have its exact size to parse
        if not into:
            self._check_size(reply, call.method)
        try:
            timings = CallReply.parse(reply, req_id, t2 - t1)
            if into:
                out = {slot.name: codec.tensor_of(a, slot.dtype)
                       for slot, a in zip(outputs, buffers)}
            else:  # as lent, or a transport that does not take buffers: checked and copied
                out = protocol.read_tensors(outputs, reply[1:], copy=self.borrowed)
        except RemoteRefusal as exc:
            raise RemoteError(f"GPU side refused {call.method}: {exc}") from None
        except ProtocolError as exc:
            raise RemoteError(f"call {call.method}: {exc}") from None
        t3 = now_ns()
        if self.borrowed:
            self.copied_bytes += received
        meter.call(call.method, sized.sent, received, t3 - t0, encode_request=t1 - t0,
                   check_reply=t3 - t2, server=timings, round_trip=t2 - t1)
        return out


def _taken(reply: list[Any], buffers: list[Any]) -> bool:
    """Whether the transport copied the reply's tensor frames into ``buffers`` (it returns
    those very objects then; it does so only where every size matched)."""
    if len(reply) != len(buffers) + 1:
        return False
    for r, b in zip(reply[1:], buffers):
        if r is not b:
            return False
    return True
