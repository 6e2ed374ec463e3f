"""A preallocated per-generation KV cache on the GPU side.

One buffer per layer for keys and one for values, allocated at the first write of that layer
with room for ``max(needed, initial)`` positions and doubled (one copy) when full, never past
the model's context. Layout is chosen by the attention kernel that reads it::

    seq_dim=2 (SDPA):   [B, Hkv, capacity, d]   a prefix view is [B, Hkv, S, d]
    seq_dim=1 (flash):  [B, capacity, Hkv, d]   a prefix view is [B, S, Hkv, d]

Keys and values are counted apart (``length(layer, "k")`` / ``"v"``), as the server checks
each before it runs an op that appends to it. :meth:`append` is the
:class:`tsqp_core.ops.KVCache` interface the reference attention ops use, so a call that the
backend does not fuse (say ``attn_scores`` alone) still works on this cache.

Compiled programs (:mod:`tsqp_executor_fused.compiled`) keep allocation and growth out of
the compiled region: :meth:`reserve` makes room before the call and hands out the buffer, the
program writes the new positions itself, and :meth:`commit` counts them afterwards. A cache
made with a :class:`BufferPool` (static decode shapes, CUDA graphs) takes zeroed buffers from
it and gives them back when it grows and when it is dropped: the next generation gets the
same addresses, which a recorded CUDA graph needs to replay, and attention over a whole
buffer under a position mask never multiplies stale memory.
"""

from __future__ import annotations

import weakref

import torch


class BufferPool:
    """KV buffers of finished generations (and outgrown ones), by shape, for the next.

    At most ``per_shape`` buffers of each (which, layer, shape) are kept; :meth:`take` zeroes
    what it hands out."""

    def __init__(self, dtype: torch.dtype, device: torch.device, per_shape: int = 4) -> None:
        self.dtype = dtype
        self.device = device
        self.per_shape = per_shape
        self._free: dict[tuple[str, int, tuple[int, ...]], list[torch.Tensor]] = {}

    def take(self, which: str, layer: int, shape: tuple[int, ...]) -> torch.Tensor:
        free = self._free.get((which, layer, shape))
        if free:
            return free.pop().zero_()
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def give(self, which: str, layer: int, buf: torch.Tensor) -> None:
        free = self._free.setdefault((which, layer, tuple(buf.shape)), [])
        if len(free) < self.per_shape:
            free.append(buf)

    def give_all(self, buffers: dict[str, dict[int, torch.Tensor]]) -> None:
        for which, layers in buffers.items():
            for layer, buf in layers.items():
                self.give(which, layer, buf)

    def held(self) -> int:
        return sum(len(v) for v in self._free.values())


class PreallocatedKVCache:
    def __init__(self, *, kv_heads: int, head_dim: int, max_positions: int, dtype: torch.dtype,
                 device: torch.device, seq_dim: int = 2, initial: int = 256,
                 pool: BufferPool | None = None) -> None:
        if seq_dim not in (1, 2):
            raise ValueError("seq_dim must be 1 (BSHD) or 2 (BHSD)")
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.dtype = dtype
        self.device = device
        self.seq_dim = seq_dim
        self.initial = initial
        self.pool = pool
        self._buf: dict[str, dict[int, torch.Tensor]] = {"k": {}, "v": {}}
        self._len: dict[str, dict[int, int]] = {"k": {}, "v": {}}
        if pool is not None:  # the buffers go back when this cache is dropped
            weakref.finalize(self, pool.give_all, self._buf)

    def length(self, layer: int, which: str = "k") -> int:
        """Positions cached for ``layer`` (keys or values)."""
        return self._len[which].get(layer, 0)

    def nbytes(self) -> int:
        """Bytes held by the buffers (allocated capacity, not just the filled prefix)."""
        return sum(t.numel() * t.element_size() for d in self._buf.values() for t in d.values())

    def _buffer(self, which: str, layer: int, batch: int, need: int) -> torch.Tensor:
        """The buffer of ``layer`` with room for ``need`` positions (allocating or growing)."""
        buf = self._buf[which].get(layer)
        if need > self.max_positions:
            raise ValueError(f"{need} positions exceed the model's {self.max_positions}")
        if buf is not None:
            if buf.shape[0] != batch:
                raise ValueError(f"layer {layer}: batch {batch} does not match the cached "
                                 f"batch {buf.shape[0]}")
            if buf.shape[self.seq_dim] >= need:
                return buf
        cap = buf.shape[self.seq_dim] if buf is not None else self.initial
        while cap < need:
            cap *= 2
        cap = min(cap, self.max_positions)
        shape = ([batch, self.kv_heads, cap, self.head_dim] if self.seq_dim == 2
                 else [batch, cap, self.kv_heads, self.head_dim])
        if self.pool is not None:
            new = self.pool.take(which, layer, tuple(shape))
        else:
            new = torch.empty(shape, dtype=self.dtype, device=self.device)
        if buf is not None:
            have = self._len[which][layer]
            new.narrow(self.seq_dim, 0, have).copy_(buf.narrow(self.seq_dim, 0, have))
            if self.pool is not None:
                self.pool.give(which, layer, buf)
        self._buf[which][layer] = new
        return new

    def extend(self, which: str, layer: int, new: torch.Tensor) -> torch.Tensor:
        """Append ``new`` ``[B, T, Hkv, d]`` (positions as dim 1, whatever the storage
        layout) and return the whole cached prefix in the storage layout."""
        batch, tokens = new.shape[0], new.shape[1]
        have = self._len[which].get(layer, 0)
        buf = self._buffer(which, layer, batch, have + tokens)
        dst = buf.narrow(self.seq_dim, have, tokens)
        dst.copy_(new.transpose(1, 2) if self.seq_dim == 2 else new)
        self._len[which][layer] = have + tokens
        return buf.narrow(self.seq_dim, 0, have + tokens)

    def append(self, which: str, layer: int, new: torch.Tensor) -> torch.Tensor:
        """The reference-op interface: ``new`` and the result are ``[B, Hkv, S, d]``."""
        full = self.extend(which, layer, new.transpose(1, 2))
        return full if self.seq_dim == 2 else full.transpose(1, 2)

    def reserve(self, which: str, layer: int, batch: int, tokens: int) -> tuple[torch.Tensor, int]:
        """Room for ``tokens`` more positions of ``layer``: ``(buffer, past)``, the whole
        buffer in the storage layout and the positions already in it. Nothing is counted
        until :meth:`commit`."""
        have = self._len[which].get(layer, 0)
        return self._buffer(which, layer, batch, have + tokens), have

    def commit(self, which: str, layer: int, tokens: int) -> None:
        """Count ``tokens`` positions written after :meth:`reserve`."""
        self._len[which][layer] = self._len[which].get(layer, 0) + tokens
