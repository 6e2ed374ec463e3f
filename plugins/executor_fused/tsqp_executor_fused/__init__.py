"""tsqp executor ``fused``: one call per maximal run of GPU-side ops, run with fused code.

Grouping is declared data (``grouping = "run"``, which the TEE side reads without this
package): a maximal run of consecutive GPU ops is one call, so the ``layer`` partition makes
1 + L + 1 calls per forward and ``attn_mlp`` 1 + 2L + 1.

The backend (GPU side, :mod:`tsqp_executor_fused.backend`, imported only by
:meth:`FusedExecutor.backend`) runs a call with

* one matmul for q/k/v and one for gate/up (weights concatenated once at load),
* RoPE applied in place and attention through flash-attn (CUDA, bf16/fp16, package
  installed) or ``torch.nn.functional.scaled_dot_product_attention`` (causal, grouped-query
  without repeating K/V) whenever the call holds rope..attn_context of a layer,
* a preallocated per-generation KV cache (:mod:`tsqp_executor_fused.cache`),
* with ``compile=true``, each call's program compiled by ``torch.compile`` (inductor; CUDA
  graphs for decode on CUDA) at ``hello``, once per plan and shape bucket
  (:mod:`tsqp_executor_fused.compiled`),

and falls back to the reference ops of :mod:`tsqp_core.ops` for every op it does not fuse, so
any partition is correct with it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tsqp_core import hookimpl
from tsqp_core.executor import Backend, Executor
from tsqp_core.models.source import Checkpoint
from tsqp_core.plugins import PluginOptions


class FusedOptions(PluginOptions):
    #: ``auto``: flash-attn on CUDA in bf16/fp16 when the package imports, else torch SDPA.
    #: ``flash`` requires it (an error otherwise); ``sdpa`` never uses it.
    attention: Literal["auto", "flash", "sdpa"] = "auto"
    #: Positions each layer's KV cache holds at first; it doubles when full, up to the
    #: model's context.
    cache_positions: int = Field(256, ge=1)
    #: Compile each call's program with ``torch.compile`` (inductor) at ``hello``, once per
    #: plan and shape bucket; the compile time is reported apart (``server.compile``).
    #: Attention is torch SDPA then (``auto`` never picks flash-attn).
    compile: bool = False
    #: Decode (one new token) with CUDA graphs (inductor's ``reduce-overhead``): ``auto`` on
    #: CUDA when compiling. Implies static decode shapes.
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    #: Decode over the whole KV buffer under a position mask, so every step of a cache
    #: capacity has the same shapes (what CUDA graphs need): ``auto`` when CUDA graphs are
    #: used; ``on`` elsewhere too (the CPU tests run it so).
    static_decode: Literal["auto", "on", "off"] = "auto"
    #: Graphs one shape bucket of a program may compile; a call that would need more runs
    #: that program eagerly and is counted (``server.compile.fallbacks``).
    max_graphs: int = Field(8, ge=1, le=64)
    #: With static decode: KV buffers of finished generations kept for the next, per layer
    #: and shape (a CUDA graph replays only over the buffers it was recorded with).
    pool_per_shape: int = Field(4, ge=1)


class FusedExecutor(Executor):
    """One call per maximal run of GPU ops; fused QKV, gate/up, RoPE and attention."""

    name = "fused"
    Options = FusedOptions
    grouping = "run"

    def backend(self, ckpt: Checkpoint, kinds: frozenset[str], dtype: torch.dtype,
                device: torch.device) -> Backend:
        from tsqp_executor_fused.backend import FusedBackend

        return FusedBackend(ckpt, kinds, dtype, device, self.options)  # type: ignore[arg-type]


@hookimpl
def tsqp_register_executors(register):
    register(FusedExecutor)
