"""What the GPU side knows without being told anything private: the public checkpoint and
the scheme's public parameters, as they arrive at ``hello``.

:class:`PublicModel` holds the candidates the attacks compare the view with -- every
vocabulary entry's layer-0 input ``gamma_0 * RMSNorm(E_v)`` and its layer-0 key ``W_k c_v`` --
and can run the first layers itself (:meth:`PublicModel.layer_input`), as the ordering attack
does. :class:`WireDomain` says how a wire tensor encodes a value: ``float`` (the value, or a
float mask on it) or ``residue`` (``k`` centred residues modulo the scheme's primes, with the
fixed-point bits the scheme declares); :func:`domain_of` reads it from the hello's protection
spec exactly as the GPU side does when it builds its part of the scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tsqp_core import ops
from tsqp_core.graph import forward_ops
from tsqp_core.models.source import OP_WEIGHTS, Checkpoint


@dataclass(frozen=True)
class WireDomain:
    """How the wire encodes a value: ``float`` or ``residue`` (then ``primes``, ``x_bits``,
    ``w_bits``: the scheme's public parameters)."""

    kind: str
    primes: tuple[int, ...] = ()
    x_bits: int = 0
    w_bits: int = 0

    @property
    def residue(self) -> bool:
        return self.kind == "residue"


def domain_of(protection: dict[str, Any]) -> WireDomain:
    """The wire domain of the scheme named in a hello (``{"name", "options"}``), built from
    the registered plugin as the GPU side builds it: only public parameters are read."""
    if protection["name"] == "none":
        return WireDomain("float")
    from tsqp_core.plugins import get_plugins

    scheme = get_plugins().protections.create(protection["name"], protection["options"])
    primes = getattr(scheme, "primes", None)
    if primes:
        return WireDomain("residue", tuple(primes), int(scheme.x_bits), int(scheme.w_bits))
    return WireDomain("float")


@dataclass
class PublicModel:
    """The public checkpoint, seen from the GPU side, in the run's dtype."""

    ckpt: Checkpoint
    dtype: torch.dtype = torch.float32
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, model_dir: Path | str, dtype: torch.dtype = torch.float32) -> "PublicModel":
        return cls(Checkpoint(Path(model_dir)), dtype)

    @property
    def dims(self):
        return self.ckpt.dims

    @cached_property
    def eps(self) -> float:
        return float(self.ckpt.config.rms_norm_eps)

    def weight(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = self.ckpt.get(name, self.dtype)
        return self._cache[name]

    @cached_property
    def normed_embeddings(self) -> torch.Tensor:
        """``c_v = gamma_0 * RMSNorm(E_v)`` for every vocabulary entry ``v``: ``[V, d]``, the
        layer-0 input a prompt token ``v`` becomes (computed with the TEE's own op)."""
        e = self.weight("model.embed_tokens.weight")
        gamma = self.weight("model.layers.0.input_layernorm.weight")
        return ops.rms_norm(e, gamma, self.eps)

    def quantised_embeddings(self, bits: int) -> torch.Tensor:
        """:attr:`normed_embeddings` in fixed point as a residue scheme quantises a row
        (``bits`` bits, the row's own power-of-two scale): int32 ``[V, d]``."""
        key = f"quantised:{bits}"
        if key not in self._cache:
            from tsqp_core.protection.otp.fixed import quantize

            c = self.normed_embeddings.float()
            self._cache[key] = torch.cat([quantize(c[s:s + 8192], bits)[0].to(torch.int32)
                                          for s in range(0, c.shape[0], 8192)])
        return self._cache[key]

    @cached_property
    def keys(self) -> torch.Tensor:
        """``W_k c_v`` for every vocabulary entry: ``[V, kv_heads * head_dim]``, the layer-0
        key (before RoPE) of a prompt token ``v``."""
        return F.linear(self.normed_embeddings, self.weight("model.layers.0.self_attn.k_proj.weight"))

    @cached_property
    def key_columns(self) -> slice:
        """Where the keys sit in the layer-0 ``qkv_proj`` product (q | k | v)."""
        d = self.dims
        hq, hk = d.heads * d.head_dim, d.kv_heads * d.head_dim
        return slice(hq, hq + hk)

    @cached_property
    def _rope(self) -> ops.Rope:
        return ops.Rope(self.ckpt.config, self.dims.head_dim)

    def _layer_ops(self, layer: int) -> list:
        """embed, every op of the layers below ``layer``, then ``layer``'s input norm."""
        out = []
        for op in forward_ops(self.dims.layers):
            if op.kind == "embed" or (op.layer is not None and op.layer < layer):
                out.append(op)
            elif op.layer == layer and op.kind == "input_norm":
                out.append(op)
                return out
        raise ValueError(f"no layer {layer} in a {self.dims.layers}-layer model")

    def _weights_for(self, op_list: list) -> dict[str, torch.Tensor]:
        names = [t.format(i=op.layer) for op in op_list for t in OP_WEIGHTS.get(op.kind, ())]
        return {n: self.weight(n) for n in names}

    def layer_input(self, ids: torch.Tensor, layer: int, cache: ops.KVCache | None = None,
                    past: int = 0) -> torch.Tensor:
        """The input of ``layer``'s ``qkv_proj`` (``{layer}.x``) for ``ids`` ``[B, T]`` at
        positions ``past ..``, computed with the public weights and the reference ops;
        ``cache`` (the layers' keys and values of the ``past`` positions) is extended."""
        op_list = self._layer_ops(layer)
        ctx = ops.OpContext(self.dims, self._weights_for(op_list), self._rope, self.eps,
                            cache if cache is not None else ops.KVCache())
        env = {"ids": ids, "pos": torch.arange(past, past + ids.shape[1])}
        for op in op_list:
            ops.run_op(ops.REFERENCE_OPS, ctx, op, env)
        return env[f"{layer}.x"]
