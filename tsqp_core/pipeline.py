"""The TEE side of split inference: runs the schedule, keeps the private state.

:class:`SplitModel` walks the schedule of one forward: TEE ops run here (timed as TEE
compute), calls go through :class:`~tsqp_core.client.RemoteGpu` with the protection scheme
applied on the way out and back. Values are dropped as soon as no later step reads them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from tsqp_core import ops
from tsqp_core.client import RemoteGpu
from tsqp_core.decode import Generation, decode_loop
from tsqp_core.graph import Dims
from tsqp_core.metrics import Meter, now_ns
from tsqp_core.protection import Protection
from tsqp_core.schedule import RESULT, Call, Schedule


@dataclass
class Session:
    """One generation: its id on the GPU side, positions so far, and the TEE-side cache."""

    id: int = field(default_factory=lambda: secrets.randbits(62))
    past: int = 0
    cache: ops.KVCache = field(default_factory=ops.KVCache)


class SplitModel:
    def __init__(self, *, schedule: Schedule, dims: Dims, config: Any, weights: Mapping[str, torch.Tensor],
                 tee_impls: Mapping[str, ops.OpFn], remote: RemoteGpu, protection: Protection,
                 dtype: torch.dtype) -> None:
        self.schedule = schedule
        self.dims = dims
        self.weights = weights
        self.rope = ops.Rope(config, dims.head_dim)
        self.eps = float(config.rms_norm_eps)
        self.impls = {**ops.REFERENCE_OPS, **tee_impls}
        self.remote = remote
        self.protection = protection
        self.dtype = dtype

    @property
    def meter(self) -> Meter:
        return self.remote.meter

    def forward(self, ids: torch.Tensor, session: Session, last_only: bool = False) -> torch.Tensor:
        """Logits for ``ids`` ``[B, T]`` following ``session.past`` cached positions."""
        batch, tokens = ids.shape
        if session.past + tokens > self.dims.max_positions:
            raise ValueError(f"{session.past + tokens} positions exceed the model's context of "
                             f"{self.dims.max_positions}")
        env: dict[str, torch.Tensor] = {
            "ids": ids, "pos": torch.arange(session.past, session.past + tokens)}
        ctx = ops.OpContext(self.dims, self.weights, self.rope, self.eps, session.cache, last_only)
        meter = self.meter
        last_use = self.schedule.last_use
        for idx, step in enumerate(self.schedule.steps):
            if isinstance(step, Call):
                sent = {n: self.protection.protect(n, env[n]) for n in step.inputs}
                got = self.remote.call(step, sent, session=session.id, past=session.past,
                                       last_only=last_only, dims=self.dims, batch=batch,
                                       tokens=tokens, dtype=self.dtype)
                for n, t in got.items():
                    env[n] = self.protection.unprotect(n, t)
                reads = step.inputs
            else:
                t0 = now_ns()
                ops.run_op(self.impls, ctx, step, env)
                meter.add("tee_compute", now_ns() - t0)
                reads = step.inputs
            for n in reads:
                if last_use.get(n, -1) <= idx:
                    env.pop(n, None)
        session.past += tokens
        return env[RESULT]

    def end(self, session: Session) -> None:
        """Free the generation's GPU-side cache."""
        self.remote.end(session.id)


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class Sampler:
    """Greedy (temperature 0) or temperature/top-p sampling; always on the TEE side."""

    def __init__(self, cfg: Sampling) -> None:
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ``[B]`` from last-position logits ``[B, V]``."""
        if self.cfg.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.cfg.temperature, dim=-1)
        if self.cfg.top_p < 1.0:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < self.cfg.top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        return torch.multinomial(probs, 1, generator=self.gen).squeeze(-1)


def generate(model: SplitModel, prompt: torch.Tensor, new_tokens: int, sampler: Sampler,
             stop_ids: set[int] | None = None) -> Generation:
    """Prefill ``prompt`` then decode ``new_tokens`` steps with the KV cache; stops early only
    when every sequence has produced a stop token."""
    session = Session()
    meter = model.meter

    def pick(logits: torch.Tensor) -> torch.Tensor:
        with meter.time("tee_compute"):
            return sampler(logits)

    try:
        return decode_loop(
            lambda: model.forward(prompt, session, last_only=True)[:, -1],
            lambda tokens: model.forward(tokens, session, last_only=True)[:, -1],
            pick, new_tokens, stop_ids)
    finally:
        try:
            model.end(session)
        except Exception:
            pass  # the peer may be gone; the original error matters more
