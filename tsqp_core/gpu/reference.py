"""The reference backend: each op with the reference implementations (the oracle)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from tsqp_core import ops
from tsqp_core.executor import Backend, GpuCall
from tsqp_core.models.source import Checkpoint, load_weights


class ReferenceBackend(Backend):
    """Runs each op of a call with :mod:`tsqp_core.ops`, one after the other."""

    def __init__(self, ckpt: Checkpoint, kinds: frozenset[str], dtype: torch.dtype,
                 device: torch.device, impls: Mapping[str, ops.OpFn] = ops.REFERENCE_OPS) -> None:
        self.device = device
        self.dims = ckpt.dims
        self.weights = load_weights(ckpt, kinds, dtype, device)
        self.rope = ops.Rope(ckpt.config, ckpt.dims.head_dim, device)
        self.eps = float(ckpt.config.rms_norm_eps)
        self.impls = impls

    def run(self, call: GpuCall, env: dict[str, torch.Tensor], cache: Any,
            last_only: bool) -> None:
        ctx = ops.OpContext(self.dims, self.weights, self.rope, self.eps, cache, last_only)
        with torch.inference_mode():  # as transformers is run for the reference
            self.to_device(env)  # a call's inputs arrive in host memory
            for op in call.ops:
                ops.run_op(self.impls, ctx, op, env)
