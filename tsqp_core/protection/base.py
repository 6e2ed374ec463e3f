"""The protection contract: what a call's tensors become before they leave the TEE, and what
the reply must satisfy before the TEE uses it.

A protection scheme sees each call whole, as a :class:`CallSite` (which call of the plan, its
ops and the weights they multiply, session, forward, positions, batch, tokens, prefill or
decode), never one loose tensor at a time. Its life in a run, in order:

1. **Before anything starts** (TEE side, no GPU side yet): :meth:`Protection.check` sees the
   schedule and refuses what it cannot protect (:class:`ProtectionRefused`, naming the ops);
   :meth:`Protection.wire` declares, per call, the tensors that cross -- names, dtypes and
   shape templates (:class:`tsqp_core.protocol.CallWire`). The layout is part of the plan
   agreed at ``hello``; the client and the server both validate every call against it.
2. **Connected**: :meth:`Protection.bind` gives it a :class:`TeeContext` -- model dims,
   dtype, the schedule, a cryptographically secure random source, lazy read access to the
   public weights -- and :meth:`Protection.precompute` runs outside the timed region before
   each measured span (mask pools, probes); its time is reported as ``offline``.
3. **Per call**: :meth:`Protection.seal` turns the call's input values into wire tensors;
   :meth:`Protection.open` turns the reply's wire tensors into the call's output values, or
   raises :class:`IntegrityError` -- the run ends with that message, never retries. Both are
   timed as ``protect`` in the latency breakdown.
4. **Reporting**: :meth:`Protection.seen_as` says, per value, what the GPU side sees
   (``"plaintext"`` or the scheme and its parameters); :meth:`Protection.report` fills the
   ``protection`` section of ``results.json``.

A scheme may ship a GPU-side part: :meth:`Protection.gpu_backend` wraps the executor's
backend on the GPU side (selected at ``hello``, where the client names the scheme and its
options); import its heavy code lazily there, never at module import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Sequence

import torch

from tsqp_core.graph import Dims, Op
from tsqp_core.plugins import PluginError, PluginOptions
from tsqp_core.protocol import CallWire, WireTensor
from tsqp_core.protection.random import SecureRandom

if TYPE_CHECKING:
    from tsqp_core.executor import Backend
    from tsqp_core.models.source import Checkpoint
    from tsqp_core.schedule import Call, Schedule


class IntegrityError(RuntimeError):
    """A reply from the GPU side failed an integrity check (a product that does not verify,
    a non-finite or implausible value). The session is over: never retried."""


class ProtectionRefused(PluginError):
    """The scheme cannot protect this schedule (e.g. nonlinear ops on the GPU side)."""


class CallSite(NamedTuple):
    """One call leaving the TEE: everything a protection needs to act on it. (Immutable; a
    named tuple because one is made for every call: a quarter of a frozen dataclass's cost.)"""

    call: "Call"
    #: The layout agreed at hello: what :meth:`Protection.seal` must produce and what the
    #: reply holds when it reaches :meth:`Protection.open`.
    wire: CallWire
    session: int
    #: Forwards run by this model so far, this one included (1 for the first).
    forward: int
    past: int
    batch: int
    tokens: int
    last_only: bool
    #: The values of the shape symbols (``B``, ``T``, ``S``, ``L``) for this call.
    sizes: dict[str, int]

    @property
    def phase(self) -> str:
        """``prefill`` (the first forward of a session) or ``decode``."""
        return "prefill" if self.past == 0 else "decode"


@dataclass(frozen=True)
class ForwardShape:
    """A forward a workload is about to run (for :meth:`Protection.precompute`)."""

    batch: int
    tokens: int
    past: int
    last_only: bool


class PublicWeights:
    """Lazy, read-only access to the model's public weights, by op. Nothing is loaded until
    asked for; what is asked for is the checkpoint's own numbers (the GPU side has them too)."""

    def __init__(self, ckpt: "Checkpoint") -> None:
        self._ckpt = ckpt

    @property
    def path(self) -> Any:
        """The checkpoint directory (identifies the weights)."""
        return self._ckpt.path

    def of(self, op: Op, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """The weights ``op`` multiplies, in :data:`~tsqp_core.models.source.OP_WEIGHTS`
        order (``qkv_proj``: Wq, Wk, Wv; ``gate_up_proj``: Wgate, Wup), each ``[out, in]``."""
        from tsqp_core.models.source import OP_WEIGHTS

        names = [n.format(i=op.layer) for n in OP_WEIGHTS.get(op.kind, ())]
        return [self._ckpt.get(n, dtype) for n in names]


@dataclass(frozen=True)
class TeeContext:
    """What a protection is bound to on the TEE side."""

    dims: Dims
    dtype: torch.dtype
    schedule: "Schedule"
    #: The one random source for masks and probes (see :class:`SecureRandom`).
    rng: SecureRandom
    weights: PublicWeights


class Protection(ABC):
    """Base of every protection scheme. Subclasses set ``name`` and ``Options`` and state in
    their docstring the threat model and the guarantee, naming every random source."""

    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    #: One line for ``plugins`` and reports.
    summary: ClassVar[str] = ""
    #: Who it defends against, for reports (``T1 honest-but-curious``, ...).
    threat_model: ClassVar[str] = ""
    #: True only for schemes whose wire tensors are a function of the inputs alone (``none``);
    #: every other scheme must draw fresh randomness per call (the contract suite checks).
    deterministic: ClassVar[bool] = False
    #: Largest |logit difference| against the unprotected run, by dtype name.
    tolerance: ClassVar[dict[str, float]] = {}

    def __init__(self, options: PluginOptions) -> None:
        self.options = options
        self.ctx: TeeContext | None = None

    # --- before anything starts (TEE side) ------------------------------------------------

    def check(self, schedule: "Schedule") -> None:
        """Raise :class:`ProtectionRefused` naming the ops this scheme cannot protect."""

    def wire(self, call: "Call", plain: CallWire) -> CallWire:
        """The tensors that cross in ``call``, given the unprotected layout ``plain``. A pure
        function of the call and the options: the GPU side recomputes it at ``hello`` and
        refuses a plan that disagrees."""
        return plain

    # --- a run (TEE side) -------------------------------------------------------------------

    def bind(self, ctx: TeeContext) -> None:
        """Called once the run is connected, before anything is timed."""
        self.ctx = ctx

    def precompute(self, forwards: Sequence[ForwardShape]) -> None:
        """Work for the coming ``forwards``, outside the timed region (reported offline)."""

    @abstractmethod
    def seal(self, site: CallSite, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The call's input values (``site.call.inputs``) -> its wire inputs, exactly as
        ``site.wire.inputs`` declares them (names, order, dtypes, shapes)."""

    @abstractmethod
    def open(self, site: CallSite, wire: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reply's wire outputs (already checked against ``site.wire.outputs``) -> the
        call's output values (``site.call.outputs``); raise :class:`IntegrityError` if the
        reply does not verify."""

    def end_session(self, session: int) -> None:
        """A generation ended: drop its per-session state."""

    def close(self) -> None:
        """The run is over: stop any worker, drop every secret. Idempotent."""

    @abstractmethod
    def seen_as(self, value: str, how: str) -> str:
        """What the GPU side sees of ``value`` (``how``: ``sent to gpu`` or ``computed on
        gpu``): ``"plaintext"``, or the scheme and its parameters."""

    def report(self) -> dict[str, Any]:
        """The ``protection`` section of ``results.json``."""
        return {"scheme": self.name, "threat_model": self.threat_model,
                "params": self.options.model_dump()}

    # --- attacks (tsqp_core.attack) ------------------------------------------------------------

    def blind(self, spec: WireTensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A wire tensor ``spec`` of concrete ``shape`` that carries no data: a fresh draw from
        this scheme's own mask distribution (what crosses when the data is independent of the
        prompt). Attacks run on such a *blind view* give the baseline a protected run must
        match (:mod:`tsqp_core.attack`). Never drawn from the run's counted random source."""
        raise NotImplementedError(f"protection {self.name} declares no blind view")

    # --- the GPU side -------------------------------------------------------------------------

    def gpu_backend(self, inner: "Backend", ckpt: "Checkpoint", kinds: frozenset[str],
                    dtype: torch.dtype, device: torch.device) -> "Backend":
        """The backend the GPU side runs this scheme's calls with; the default runs the wire
        tensors through ``inner`` unchanged (schemes whose wire is the plain values)."""
        return inner
