"""The TEE side of split inference: runs the schedule, keeps the private state.

:class:`SplitModel` walks the schedule of one forward. TEE ops run here (timed as
``tee_compute``). A call leaves the TEE as one :class:`~tsqp_core.protection.CallSite`: the
protection scheme seals its input values into the wire tensors agreed at ``hello``
(``protect``), :class:`~tsqp_core.tee.client.RemoteGpu` sends them and checks the reply, and
the scheme opens the reply into the call's output values (``protect``) -- or raises
:class:`~tsqp_core.protection.IntegrityError`. Values are dropped as soon as no later step
reads them.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch

from tsqp_core import ops
from tsqp_core.decode import Generation, decode_loop
from tsqp_core.graph import Dims
from tsqp_core.metrics import Meter, now_ns
from tsqp_core.protection import CallSite, Protection
from tsqp_core.protocol import CallWire, sizes
from tsqp_core.schedule import RESULT, Call, Schedule
from tsqp_core.tee.client import RemoteGpu
from tsqp_core.tee.sampling import Sampler


@dataclass
class Session:
    """One generation: its id on the GPU side, positions so far, and the TEE-side cache."""

    id: int = field(default_factory=lambda: secrets.randbits(62))
    past: int = 0
    cache: ops.KVCache = field(default_factory=ops.KVCache)


class SplitModel:
    def __init__(self, *, schedule: Schedule, wires: Sequence[CallWire], dims: Dims, config: Any,
                 weights: Mapping[str, torch.Tensor], tee_impls: Mapping[str, ops.OpFn],
                 remote: RemoteGpu, protection: Protection) -> None:
        self.schedule = schedule
        self.wires = list(wires)
        self.dims = dims
        self.weights = weights
        self.rope = ops.Rope(config, dims.head_dim)
        self.eps = float(config.rms_norm_eps)
        self.impls = {**ops.REFERENCE_OPS, **tee_impls}
        self.remote = remote
        self.protection = protection
        #: Forwards run so far (a call site's ``forward``).
        self.forwards = 0

    def forward(self, ids: torch.Tensor, session: Session, meter: Meter,
                last_only: bool = False) -> torch.Tensor:
        """Logits for ``ids`` ``[B, T]`` following ``session.past`` cached positions."""
        batch, tokens = ids.shape
        if session.past + tokens > self.dims.max_positions:
            raise ValueError(f"{session.past + tokens} positions exceed the model's context of "
                             f"{self.dims.max_positions}")
        self.forwards += 1
        env: dict[str, torch.Tensor] = {
            "ids": ids, "pos": torch.arange(session.past, session.past + tokens)}
        ctx = ops.OpContext(self.dims, self.weights, self.rope, self.eps, session.cache, last_only)
        call_sizes = sizes(batch, tokens, session.past, last_only)
        last_use, protection, remote = self.schedule.last_use, self.protection, self.remote
        for idx, step in enumerate(self.schedule.steps):
            if isinstance(step, Call):
                site = CallSite(step, self.wires[step.index], session.id, self.forwards,
                                session.past, batch, tokens, last_only, call_sizes)
                t0 = now_ns()
                sealed = protection.seal(site, {n: env[n] for n in step.inputs})
                t1 = now_ns()
                reply = remote.call(site, sealed, meter)
                t2 = now_ns()
                opened = protection.open(site, reply)
                for n in step.outputs:
                    env[n] = opened[n]
                meter.add("protect", t1 - t0 + now_ns() - t2)
            else:
                t0 = now_ns()
                ops.run_op(self.impls, ctx, step, env)
                meter.add("tee_compute", now_ns() - t0)
            for n in step.inputs:
                if last_use.get(n, -1) <= idx:
                    env.pop(n, None)
        session.past += tokens
        return env[RESULT]

    def end(self, session: Session) -> None:
        """Free the generation's GPU-side cache and the scheme's per-session state."""
        try:
            self.remote.end(session.id)
        finally:
            self.protection.end_session(session.id)


@contextlib.contextmanager
def open_session(model: SplitModel) -> Iterator[Session]:
    """A session that is always ended; when the work inside failed, a failure to end it (the
    peer may be gone) does not hide the original error."""
    session = Session()
    try:
        yield session
    except BaseException:
        with contextlib.suppress(Exception):
            model.end(session)
        raise
    model.end(session)


def generate(model: SplitModel, prompt: torch.Tensor, new_tokens: int, sampler: Sampler,
             meter: Meter, stop_ids: set[int] | None = None) -> Generation:
    """Prefill ``prompt`` then decode ``new_tokens`` steps with the KV cache; stops early only
    when every sequence has produced a stop token."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        with meter.time("tee_compute"):
            return sampler(logits)

    with open_session(model) as session:
        return decode_loop(
            lambda: model.forward(prompt, session, meter, last_only=True)[:, -1],
            lambda tokens: model.forward(tokens, session, meter, last_only=True)[:, -1],
            pick, new_tokens, stop_ids)


def prefill(model: SplitModel, ids: torch.Tensor, meter: Meter) -> torch.Tensor:
    """One forward over ``ids`` in a session of its own, all logits."""
    with open_session(model) as session:
        return model.forward(ids, session, meter)
