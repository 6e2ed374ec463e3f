"""The GPU side of ``otp``: ``k`` residue GEMMs per call against the public weights.

Loaded lazily, on the GPU side only, when a client asks for ``otp`` at hello. The weights are
quantised and reduced modulo each prime on the CPU exactly as the TEE side does
(:func:`~.weights.quantized`), then kept on the device as int8 ``[k, K, N]``: ``k``
bytes per parameter. A call's one input is the ``k`` masked residues of its input rows; its
one output the ``k`` residues of the masked product. Nothing here ever sees a scale, a mask
or a plaintext value.
"""

from __future__ import annotations

from typing import Any

import torch

from tsqp_core.executor import Backend, GpuCall
from tsqp_core.models.source import Checkpoint
from tsqp_core.protection.otp.kernels import Gemm, residue_matmul
from tsqp_core.protection.otp.weights import LINEAR_KINDS, quantized


class ResidueBackend(Backend):
    def __init__(self, ckpt: Checkpoint, kinds: frozenset[str], w_bits: int,
                 primes: tuple[int, ...], gemm: Gemm, device: torch.device) -> None:
        from tsqp_core.graph import forward_ops
        from tsqp_core.protection.base import PublicWeights

        self.primes = primes
        self.gemm = gemm
        self.device = device
        weights = PublicWeights(ckpt)
        self.residues: dict[tuple[int | None, str], torch.Tensor] = {}
        for op in forward_ops(ckpt.dims.layers):
            if op.kind in kinds and op.kind in LINEAR_KINDS:
                q = quantized(weights, op, w_bits, primes, store=False)
                self.residues[op.layer, op.kind] = q.residues.to(device)

    def run(self, call: GpuCall, env: dict[str, torch.Tensor], cache: Any,
            last_only: bool) -> None:
        (op,) = call.ops
        (x_spec,), (y_spec,) = call.wire.inputs, call.wire.outputs
        self.to_device(env)
        x = env[x_spec.name]
        k, width = x.shape[0], x.shape[-1]
        y = residue_matmul(x.reshape(k, -1, width), self.residues[op.layer, op.kind],
                           self.primes, self.gemm)
        env[y_spec.name] = y.view(*x.shape[:-1], y.shape[-1])

    def info(self) -> dict[str, Any]:
        return {"attention": "none", "residue_gemm": self.gemm,
                "weight_residue_bytes": sum(t.numel() for t in self.residues.values())}
