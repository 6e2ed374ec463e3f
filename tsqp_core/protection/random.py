"""The random source for masks and probes: cryptographically secure, counted, never seeded.

Every byte comes from the operating system's CSPRNG (``os.urandom``: ``getrandom(2)`` on
Linux). There is no seed and no way to set one, so no two runs -- or two processes started
the same way -- can draw the same masks; ``torch``'s and ``random``'s generators are
predictable and never used for secrets. ``drawn`` counts the bytes taken, so a test can check
that a scheme's masks really came from here.
"""

from __future__ import annotations

import os

import torch

#: Bytes per getrandom call (the kernel returns at most 32 MiB - 1 at a time).
_CHUNK = 1 << 24


class SecureRandom:
    def __init__(self) -> None:
        self.drawn = 0

    def __repr__(self) -> str:
        return f"SecureRandom(os.urandom, drawn={self.drawn})"

    def bytes(self, n: int) -> bytes:
        self.drawn += n
        if n <= _CHUNK:
            return os.urandom(n)
        return b"".join(os.urandom(min(_CHUNK, n - i)) for i in range(0, n, _CHUNK))

    def uint8(self, n: int) -> torch.Tensor:
        """``n`` uniform bytes as a uint8 tensor."""
        return torch.frombuffer(bytearray(self.bytes(n)), dtype=torch.uint8) if n else \
            torch.empty(0, dtype=torch.uint8)

    def below(self, p: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform integers in ``[0, p)`` (int64), ``2 <= p <= 256``, by rejection sampling
        of bytes: a byte ``b < p * (256 // p)`` gives ``b mod p``, exactly uniform."""
        if not 2 <= p <= 256:
            raise ValueError(f"below() takes 2 <= p <= 256, got {p}")
        n = 1
        for d in shape:
            n *= d
        limit = p * (256 // p)
        out = torch.empty(n, dtype=torch.int64)
        filled = 0
        while filled < n:
            need = n - filled
            raw = self.uint8(need + need * (256 - limit) // limit + 16).to(torch.int64)
            ok = raw[raw < limit][:need]
            out[filled:filled + ok.numel()] = ok % p
            filled += ok.numel()
        return out.view(shape)

    def int64(self, shape: tuple[int, ...], bits: int = 63) -> torch.Tensor:
        """Uniform integers in ``[0, 2**bits)``, ``1 <= bits <= 63``."""
        if not 1 <= bits <= 63:
            raise ValueError("bits must be in [1, 63]")
        n = 1
        for d in shape:
            n *= d
        raw = torch.frombuffer(bytearray(self.bytes(8 * n)), dtype=torch.int64) if n else \
            torch.empty(0, dtype=torch.int64)
        return (raw & ((1 << bits) - 1)).view(shape)
