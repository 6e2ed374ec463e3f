"""The TEE side of split inference: runs the schedule, keeps the private state.

:class:`SplitModel` walks the schedule of one forward. TEE ops run here (timed as
``tee_compute``). A call leaves the TEE as one :class:`~tsqp_core.protection.CallSite`: the
protection scheme seals its input values into the wire tensors agreed at ``hello``
(``protect``), :class:`~tsqp_core.tee.client.RemoteGpu` sends them and checks the reply, and
the scheme opens the reply into the call's output values (``protect``) -- or raises
:class:`~tsqp_core.protection.IntegrityError` -- and every value it opened must pass the
content check of :mod:`tsqp_core.tee.validate` (finite, plausibly sized: ``serialize``).
Values are dropped as soon as no later step reads them; what a forward returns owns its
memory (it never pins a transport's receive buffer).
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
from tsqp_core.tee.validate import ValueCheck


@dataclass
class Session:
    """One generation: its id on the GPU side, positions so far, and the TEE-side cache."""

    id: int = field(default_factory=lambda: secrets.randbits(62))
    past: int = 0
    cache: ops.KVCache = field(default_factory=ops.KVCache)


class SplitModel:
    def __init__(self, *, schedule: Schedule, wires: Sequence[CallWire], dims: Dims, config: Any,
                 weights: Mapping[str, torch.Tensor], tee_impls: Mapping[str, ops.OpFn],
                 remote: RemoteGpu, protection: Protection,
                 check: ValueCheck | None = None) -> None:
        self.schedule = schedule
        self.wires = list(wires)
        self.dims = dims
        self.weights = weights
        self.rope = ops.Rope(config, dims.head_dim)
        self.eps = float(config.rms_norm_eps)
        self.impls = {**ops.REFERENCE_OPS, **tee_impls}
        self.remote = remote
        self.protection = protection
        self.check = check or ValueCheck(torch.float32)
        #: Forwards run so far (a call site's ``forward``).
        self.forwards = 0
        #: Per step, worked out once: the step, its call's wire layout (``None``: a TEE op,
        #: then its implementation) and the values no later step reads.
        last_use = schedule.last_use
        self._plan: list[tuple[Any, CallWire | None, ops.OpFn | None, tuple[str, ...]]] = [
            (step, self.wires[step.index] if isinstance(step, Call) else None,
             None if isinstance(step, Call) else self.impls[step.kind],
             tuple(n for n in step.inputs if last_use.get(n, -1) <= idx))
            for idx, step in enumerate(schedule.steps)]

    def forward(self, ids: torch.Tensor, session: Session, meter: Meter,
                last_only: bool = False) -> torch.Tensor:
        """Logits for ``ids`` ``[B, T]`` following ``session.past`` cached positions.

        Runs in ``torch.inference_mode``, as the monolithic reference does: no op on this
        side is ever differentiated, and autograd's bookkeeping is a dispatch per op. The
        logits are an inference tensor: read them, or ``clone()`` them to change in place."""
        with torch.inference_mode():
            return self._forward(ids, session, meter, last_only)

    def _forward(self, ids: torch.Tensor, session: Session, meter: Meter,
                 last_only: bool) -> torch.Tensor:
        batch, tokens = ids.shape
        if session.past + tokens > self.dims.max_positions:
            raise ValueError(f"{session.past + tokens} positions exceed the model's context of "
                             f"{self.dims.max_positions}")
        remote = self.remote
        if batch > remote.batch or session.past + tokens > remote.positions:
            # beyond what the hello declared (the workload's shapes): declare more, growing
            # in steps so that a long generation says hello a few times, not every token
            remote.widen(batch, min(self.dims.max_positions,
                                    max(session.past + tokens, 2 * remote.positions)))
        self.forwards += 1
        env: dict[str, torch.Tensor] = {
            "ids": ids, "pos": torch.arange(session.past, session.past + tokens)}
        ctx = ops.OpContext(self.dims, self.weights, self.rope, self.eps, session.cache, last_only)
        call_sizes = sizes(batch, tokens, session.past, last_only)
        protection, check, forwards = self.protection, self.check, self.forwards
        # the meter learns each category once per forward, not once per step (a method
        # call per step is a microsecond in a run); a failed forward's time is reported too
        protect_ns = check_ns = tee_ns = 0
        try:
            for step, wire, impl, drops in self._plan:
                if wire is not None:
                    site = CallSite(step, wire, session.id, forwards, session.past, batch,
                                    tokens, last_only, call_sizes)
                    t0 = now_ns()
                    sealed = protection.seal(site, {n: env[n] for n in step.inputs})
                    t1 = now_ns()
                    reply = remote.call(site, sealed, meter)
                    t2 = now_ns()
                    opened = protection.open(site, reply)
                    t3 = now_ns()
                    protect_ns += t1 - t0 + t3 - t2
                    check.check(site, opened)
                    for n in step.outputs:
                        env[n] = opened[n]
                    check_ns += now_ns() - t3
                else:
                    t0 = now_ns()
                    for n, value in zip(step.outputs,
                                        impl(ctx, step, *[env[n] for n in step.inputs])):
                        env[n] = value
                    tee_ns += now_ns() - t0
                for n in drops:
                    env.pop(n, None)
        finally:
            meter.add("protect", protect_ns)
            meter.serialize("value_check", check_ns)
            meter.add("tee_compute", tee_ns)
        session.past += tokens
        return env[RESULT]

    def end(self, session: Session, timeout: float | None = None) -> None:
        """Free the generation's GPU-side cache and the scheme's per-session state
        (``timeout``: for the ``end`` request, default the run's call timeout)."""
        try:
            self.remote.end(session.id, timeout=timeout)
        finally:
            self.protection.end_session(session.id)


#: After a failed call, how long ``end`` may wait: the peer is likely gone or stuck, and a
#: failure must not cost a second full timeout.
END_AFTER_FAILURE_S = 1.0


@contextlib.contextmanager
def open_session(model: SplitModel) -> Iterator[Session]:
    """A session that is always ended; when the work inside failed, ending it waits at most
    :data:`END_AFTER_FAILURE_S` and a failure to end it (the peer may be gone) does not hide
    the original error."""
    session = Session()
    try:
        yield session
    except BaseException:
        with contextlib.suppress(Exception):
            model.end(session, timeout=END_AFTER_FAILURE_S)
        raise
    model.end(session)


def generate(model: SplitModel, prompt: torch.Tensor, new_tokens: int, sampler: Sampler,
             meter: Meter, stop_ids: set[int] | None = None) -> Generation:
    """Prefill ``prompt`` then decode ``new_tokens`` steps with the KV cache; stops early only
    when every sequence has produced a stop token."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        with meter.time("tee_compute"):
            return sampler(logits)

    def last(ids: torch.Tensor) -> torch.Tensor:
        # each step's logits are kept (the reference compares them): a copy, so that none
        # pins the receive buffer its reply arrived in
        return model.forward(ids, session, meter, last_only=True)[:, -1].clone()

    with open_session(model) as session:
        return decode_loop(lambda: last(prompt), last, pick, new_tokens, stop_ids)


def prefill(model: SplitModel, ids: torch.Tensor, meter: Meter) -> torch.Tensor:
    """One forward over ``ids`` in a session of its own, all logits."""
    with open_session(model) as session:
        return model.forward(ids, session, meter)
