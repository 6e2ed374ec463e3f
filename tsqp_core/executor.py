"""The executor family: how GPU-side ops group into calls, and how a call runs there.

:meth:`Executor.group` runs on the TEE side when the schedule is built; :meth:`Executor.backend`
runs on the GPU side only, after the server has chosen its device -- import CUDA-only code
there, never at module import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping, Sequence

import torch

from tsqp_core import ops
from tsqp_core.graph import Op
from tsqp_core.models.source import Checkpoint, load_weights
from tsqp_core.plugins import PluginOptions


class Backend(ABC):
    """A loaded executor on the GPU side: weights on the device, ready to run calls."""

    @abstractmethod
    def run(self, ops: Sequence[Op], env: dict[str, torch.Tensor], cache: ops.KVCache,
            last_only: bool) -> None:
        """Run ``ops`` in order over ``env`` (inputs in, outputs added), using ``cache`` for
        this generation's keys and values."""

    def new_cache(self) -> Any:
        """A fresh per-generation cache."""
        return ops.KVCache()

    def synchronize(self) -> None:
        """Wait for queued device work (timers call this)."""


class Executor(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    #: A call holding a layer's rope..attn_context runs attention without materialising
    #: scores (flash/SDPA): the reference then uses transformers' sdpa kernel, else eager.
    fuses_attention: ClassVar[bool] = False

    def __init__(self, options: PluginOptions) -> None:
        self.options = options

    @abstractmethod
    def group(self, run: list[Op]) -> list[list[Op]]:
        """Split a maximal run of consecutive GPU-side ops into calls."""

    @abstractmethod
    def backend(self, ckpt: Checkpoint, kinds: frozenset[str], dtype: torch.dtype,
                device: torch.device) -> Backend:
        """Load what ops of ``kinds`` need onto ``device`` and return the runner."""


class ReferenceBackend(Backend):
    """Runs each op with the reference implementations, one after the other."""

    def __init__(self, ckpt: Checkpoint, kinds: frozenset[str], dtype: torch.dtype,
                 device: torch.device, impls: Mapping[str, ops.OpFn] = ops.REFERENCE_OPS) -> None:
        self.device = device
        self.dims = ckpt.dims
        self.weights = load_weights(ckpt, kinds, dtype, device)
        self.rope = ops.Rope(ckpt.config, ckpt.dims.head_dim, device)
        self.eps = float(ckpt.config.rms_norm_eps)
        self.impls = impls

    def run(self, ops_: Sequence[Op], env: dict[str, torch.Tensor], cache: ops.KVCache,
            last_only: bool) -> None:
        ctx = ops.OpContext(self.dims, self.weights, self.rope, self.eps, cache, last_only)
        for name, t in env.items():
            if t.device != self.device:
                env[name] = t.to(self.device)
        for op in ops_:
            ops.run_op(self.impls, ctx, op, env)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class UnfusedExecutor(Executor):
    """One call per GPU op -- with the ``seed`` partition exactly the seed's schedule:
    embed; per layer q/k/v, QK^T, PV, o, gate/up, down; lm_head."""

    name = "unfused"

    def group(self, run: list[Op]) -> list[list[Op]]:
        return [[op] for op in run]

    def backend(self, ckpt: Checkpoint, kinds: frozenset[str], dtype: torch.dtype,
                device: torch.device) -> Backend:
        return ReferenceBackend(ckpt, kinds, dtype, device)
