"""``none``: no protection. Every tensor crosses as itself, and the exposure report says so."""

from __future__ import annotations

import torch

from tsqp_core.protection.base import CallSite, Protection
from tsqp_core.protocol import WireTensor


class NoProtection(Protection):
    """Threat model: none. The GPU side sees every value that crosses, and every value it
    computes, in plaintext; replies are checked for form only (names, dtypes, shapes).
    No randomness is drawn."""

    name = "none"
    summary = "plaintext: the GPU side sees every value that crosses and every value it computes"
    threat_model = "none (plaintext)"
    deterministic = True
    tolerance = {"float32": 0.0, "bfloat16": 0.0, "float16": 0.0}

    def seal(self, site: CallSite, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return values

    def open(self, site: CallSite, wire: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return wire

    def seen_as(self, value: str, how: str) -> str:
        return "plaintext"

    def blind(self, spec: WireTensor, shape: tuple[int, ...]) -> torch.Tensor:
        """No mask: a view that carries no data is all zeros."""
        return torch.zeros(shape, dtype=getattr(torch, spec.dtype))
