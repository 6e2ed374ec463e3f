"""The executor family: how GPU-side ops group into calls, and how a call runs there.

Grouping is declared data (:attr:`Executor.grouping`, one of
:data:`tsqp_core.schedule.GROUPINGS`): the TEE side builds its schedule from it without
importing any GPU code. :meth:`Executor.backend` runs on the GPU side only, after the server
has chosen its device -- import CUDA-only code there, never at module import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Sequence

import torch

from tsqp_core.graph import Op
from tsqp_core.plugins import PluginOptions
from tsqp_core.protocol import CallWire

if TYPE_CHECKING:
    from tsqp_core.models.source import Checkpoint


@dataclass(frozen=True)
class GpuCall:
    """One call of an agreed plan, as the GPU side holds it."""

    index: int
    ops: tuple[Op, ...]
    wire: CallWire

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.wire.inputs)

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.wire.outputs)


class Backend(ABC):
    """A loaded executor on the GPU side: weights on the device, ready to run calls."""

    @abstractmethod
    def run(self, call: GpuCall, env: dict[str, torch.Tensor], cache: Any,
            last_only: bool) -> None:
        """Run ``call.ops`` in order over ``env`` (the call's wire inputs in, its wire
        outputs added), using ``cache`` for this generation's keys and values."""

    def prepare(self, calls: Sequence[GpuCall]) -> None:
        """Called at ``hello`` with the agreed plan's calls, before :meth:`info` is read for
        the reply: build (and compile) what runs them now, so that no timed call pays for it
        and what it cost can be reported. Default: nothing."""

    def new_cache(self) -> Any:
        """A fresh per-generation cache."""
        from tsqp_core.ops import KVCache

        return KVCache()

    def to_device(self, env: dict[str, torch.Tensor]) -> None:
        """Move a call's inputs to the backend's ``device`` (where it is not the CPU), queued
        on its stream: they arrive in host memory -- the transport's, page-locked where the
        server registered it (:meth:`~tsqp_core.transport.ServerChannel.pin`), so each is
        one DMA -- that an honest client leaves alone until the reply is sent, after
        :meth:`synchronize`. A hostile one may rewrite it while the copy runs: a value a
        device kernel could fault on (an index) is checked on the device's copy, or in a
        private host copy that is the one sent up (the fused backend's positions), never
        in the transport's memory."""
        device = getattr(self, "device", None)
        if device is not None and device.type != "cpu":
            for name, t in env.items():
                env[name] = t.to(device, non_blocking=True)

    def synchronize(self) -> None:
        """Wait until the work queued so far on the backend's stream is done (the server
        calls this after a call's compute, and again after its outputs' copies to the
        host): an event recorded on the current stream of ``device`` and waited on -- never
        the whole device. Nothing to wait for off CUDA."""
        device = getattr(self, "device", None)
        if device is None or device.type != "cuda":
            return
        event = self.__dict__.get("_done")
        if event is None:
            event = self.__dict__["_done"] = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        event.synchronize()

    def info(self) -> dict[str, Any]:
        """What this backend actually runs, for the ``server`` section of results:
        at least ``attention``, the kernel used when attention runs here (``eager``:
        scores materialised; ``sdpa``; ``flash-attn``)."""
        return {"attention": "eager"}


class Executor(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    #: How a maximal run of GPU-side ops becomes calls: ``op`` (one call per op) or ``run``
    #: (one call per run). Declared, so the TEE host needs no executor code to plan.
    grouping: ClassVar[Literal["op", "run"]]

    def __init__(self, options: PluginOptions) -> None:
        self.options = options

    @abstractmethod
    def backend(self, ckpt: "Checkpoint", kinds: frozenset[str], dtype: torch.dtype,
                device: torch.device) -> Backend:
        """Load what ops of ``kinds`` need onto ``device`` and return the runner (GPU side)."""


class UnfusedExecutor(Executor):
    """One call per GPU op -- with the ``seed`` partition exactly the seed's schedule:
    embed; per layer q/k/v, QK^T, PV, o, gate/up, down; lm_head."""

    name = "unfused"
    grouping = "op"

    def backend(self, ckpt: "Checkpoint", kinds: frozenset[str], dtype: torch.dtype,
                device: torch.device) -> Backend:
        from tsqp_core.gpu.reference import ReferenceBackend

        return ReferenceBackend(ckpt, kinds, dtype, device)
