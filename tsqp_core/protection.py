"""The protection family: what happens to a tensor before it leaves the TEE and after its
result comes back. ``none`` ships plaintext; masking and integrity schemes plug in here."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from tsqp_core.plugins import PluginOptions


class Protection(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, options: PluginOptions) -> None:
        self.options = options

    @abstractmethod
    def protect(self, value: str, t: torch.Tensor) -> torch.Tensor:
        """Transform value ``value`` before it is sent to the GPU side."""

    @abstractmethod
    def unprotect(self, value: str, t: torch.Tensor) -> torch.Tensor:
        """Transform a returned value ``value`` before the TEE uses it (or raise)."""

    @abstractmethod
    def plaintext(self, value: str) -> bool:
        """Whether the GPU side sees ``value`` in plaintext (for the exposure report)."""


class NoProtection(Protection):
    name = "none"

    def protect(self, value: str, t: torch.Tensor) -> torch.Tensor:
        return t

    def unprotect(self, value: str, t: torch.Tensor) -> torch.Tensor:
        return t

    def plaintext(self, value: str) -> bool:
        return True
