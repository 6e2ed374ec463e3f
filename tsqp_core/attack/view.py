"""The GPU side's view of a run: every call it received and answered, decoded and copied.

:class:`ViewRecorder` is a :meth:`tsqp_core.gpu.server.GpuServer.observe` observer: attach it
to an in-process server and it keeps, per call, the wire tensors that arrived and the ones
that went back -- exactly what an honest-but-curious GPU host holds. (Values a call computes
and never returns are not in the frames; with the ``linears`` partition there are none: each
call is one weight product and returns it.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tsqp_core import codec, protocol
from tsqp_core.codec import ProtocolError
from tsqp_core.protocol import CallRequest, Hello


@dataclass
class Exchange:
    """One call as the GPU side saw it."""

    call: int
    session: int
    past: int
    last: bool
    #: ``ops`` of the call, ``[(kind, layer), ...]``, from the plan agreed at hello.
    ops: tuple[tuple[str, int | None], ...]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


@dataclass
class ViewRecorder:
    hello: Hello | None = None
    calls: list[Exchange] = field(default_factory=list)
    #: Each call's layout in the plan of ``hello`` (what its frames hold).
    layouts: list[protocol.CallLayout] = field(default_factory=list)

    def __call__(self, request: list[Any], reply: list[Any]) -> None:
        try:
            req = protocol.decode_request(request)
            msg = req.message
            if isinstance(msg, CallRequest):
                if self.hello is None or not protocol.is_call_frame(reply[0]):
                    return  # refused: nothing was computed
                inputs, outputs = self.layouts[msg.call].slots(msg.batch, msg.tokens,
                                                               msg.past, msg.last)
                self.calls.append(Exchange(
                    msg.call, msg.session, msg.past, msg.last, self.hello.plan[msg.call].ops,
                    protocol.read_tensors(inputs, req.frames, copy=True),
                    protocol.read_tensors(outputs, reply[1:], copy=True)))
            elif isinstance(msg, Hello) and codec.decode(reply).header.get(protocol.OK):
                self.hello = msg
                self.layouts = [protocol.CallLayout(e.wire) for e in msg.plan]
        except (ProtocolError, IndexError):
            return  # a refused request: nothing was computed

    def sent(self, name: str) -> list[torch.Tensor]:
        """Every tensor named ``name`` that reached the GPU side, in order."""
        return [x.inputs[name] for x in self.calls if name in x.inputs]

    def returned(self, name: str) -> list[torch.Tensor]:
        return [x.outputs[name] for x in self.calls if name in x.outputs]
