"""The partition family: which ops of the forward graph run on the (untrusted) GPU side.

Everything not named by :meth:`Partition.gpu_ops` stays in the TEE, and so does sampling,
always. The call count per forward follows from the partition and the executor's grouping;
the run's ``exposure`` report follows from the partition alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from pydantic import field_validator

from tsqp_core.graph import expand_kinds
from tsqp_core.plugins import PluginOptions


class Partition(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    #: One line for ``plugins`` and reports.
    summary: ClassVar[str] = ""

    def __init__(self, options: PluginOptions) -> None:
        self.options = options

    @abstractmethod
    def gpu_ops(self) -> frozenset[str]:
        """The op kinds (see :data:`tsqp_core.graph.OP_KINDS`) that run on the GPU side."""


class FixedPartition(Partition):
    """A partition given by a fixed set of GPU op kinds."""

    GPU: ClassVar[tuple[str, ...]] = ()

    def gpu_ops(self) -> frozenset[str]:
        return expand_kinds(self.GPU)


class SeedPartition(FixedPartition):
    name = "seed"
    summary = "the seed system: GPU runs embed, projections, QK^T, PV, lm_head (6 calls/layer)"
    GPU = ("embed", "qkv_proj", "attn_scores", "attn_context", "o_proj", "gate_up_proj",
           "down_proj", "lm_head")


class AttnMlpPartition(FixedPartition):
    name = "attn_mlp"
    summary = ("conservative fusion: TEE keeps norms and the residual stream; GPU runs "
               "attention and MLP blocks (2 calls/layer when fused)")
    GPU = ("embed", "qkv_proj", "rope", "attn_scores", "attn_softmax", "attn_context", "o_proj",
           "gate_up_proj", "act", "down_proj", "lm_head")


class LayerPartition(FixedPartition):
    name = "layer"
    summary = ("one call per layer: TEE keeps input RMSNorm, the MLP residual add and the "
               "final norm; the GPU side sees the residual stream")
    GPU = ("embed", "qkv_proj", "rope", "attn_scores", "attn_softmax", "attn_context", "o_proj",
           "attn_residual", "post_norm", "gate_up_proj", "act", "down_proj", "lm_head")


class LinearsPartition(FixedPartition):
    name = "linears"
    summary = ("only the five weight products on the GPU side (q/k/v, o, gate/up, down, "
               "lm_head): embedding, norms, RoPE, attention with its KV cache, SiLU and "
               "residuals stay in the TEE (4 calls/layer + 1); the one a masking scheme accepts")
    GPU = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


class CustomPartition(Partition):
    name = "custom"
    summary = "any set of GPU ops: partition.options.gpu=[embed,qkv_proj,...]"

    class Options(PluginOptions):
        gpu: list[str]

        @field_validator("gpu")
        @classmethod
        def _known(cls, v: list[str]) -> list[str]:
            expand_kinds(v)
            return v

    def gpu_ops(self) -> frozenset[str]:
        return expand_kinds(self.options.gpu)  # type: ignore[attr-defined]
