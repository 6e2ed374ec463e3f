"""Sampling, always on the TEE side: greedy, or temperature with an optional top-p nucleus."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class Sampler:
    """Greedy (temperature 0) or temperature/top-p sampling with its own seeded generator."""

    def __init__(self, cfg: Sampling) -> None:
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ``[B]`` from last-position logits ``[B, V]``."""
        if self.cfg.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.cfg.temperature, dim=-1)
        if self.cfg.top_p < 1.0:
            # the nucleus: the most probable tokens whose mass reaches top_p (a token is kept
            # while the mass before it is still short of top_p)
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < self.cfg.top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        return torch.multinomial(probs, 1, generator=self.gen).squeeze(-1)
