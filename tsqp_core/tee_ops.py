"""The TEE-ops family: implementations of the ops a partition keeps inside the TEE."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Mapping

from tsqp_core import ops
from tsqp_core.plugins import PluginOptions


class TeeOps(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, options: PluginOptions) -> None:
        self.options = options

    @abstractmethod
    def implementations(self) -> Mapping[str, ops.OpFn]:
        """Op kind -> function ``(ctx, op, *inputs) -> outputs``; kinds left out fall back
        to the reference implementations in :mod:`tsqp_core.ops`."""


class TorchTeeOps(TeeOps):
    """The reference torch implementations (RMSNorm, RoPE with Llama-3 scaling, causal
    fp32 softmax, SiLU*up, grouped-query attention)."""

    name = "torch"

    def implementations(self) -> Mapping[str, ops.OpFn]:
        return ops.REFERENCE_OPS
