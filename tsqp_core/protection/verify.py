"""``verify``: no masking, but every weight product the GPU side returns is checked.

**Threat model.** T2 only for integrity, none for privacy: the GPU side sees everything in
plaintext (the exposure report says so) and may return wrong results. For every call that is
exactly one weight product (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``,
``lm_head``) whose input crosses and whose outputs come back -- every call of the ``linears``
partition, the projection calls of ``seed`` -- the TEE checks ``y = x W^T`` with Freivalds'
algorithm in floating point: for secret Gaussian probes ``s`` (drawn fresh for every product
and forward from the OS CSPRNG), ``|y.s - x.(W^T s)|`` must stay below a tolerance that
covers the honest rounding of the GPU's GEMM,
``tau = sigmas * (u_acc sqrt(K) ||x|| ||W||_F + u_out ||y||)`` (unit roundoffs of the
accumulation and the output dtype). Non-finite outputs fail at once.

**What it catches and what it cannot.** A changed element of size ``e`` shows in the
residual as ``e * s_j``, ``s_j ~ N(0, 1)``: it is caught by a probe with probability
``P(|N(0,1)| > tau/e)``. The tolerance is a worst-case bound (honest runs stay below 2 % of
it), so what passes is larger than a float GEMM's own error: measured with 2 probes on a
layer-3 ``gate_up_proj`` (fp32, 1000 trials each), one element off by 1e-2 / 1e-3 x rms(y)
is caught 999 / 820 times on the tiny model, and 0.1 / 0.01 x rms(y) 987 / 254 times on
SmolLM2; smaller errors pass by construction (only the exact ``otp`` scheme checks bit for
bit). Calls of several ops (the fused ``layer``/``attn_mlp``
calls), and attention, norms and activations computed on the GPU side, are not verified:
``report()`` counts them. A failed check ends the session, never retried.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any, Hashable, Sequence

import torch
from pydantic import Field

from tsqp_core.metrics import now_ns
from tsqp_core.plugins import PluginOptions
from tsqp_core.protection.base import CallSite, ForwardShape, IntegrityError, Protection
from tsqp_core.protection.otp.weights import LINEAR_KINDS

if TYPE_CHECKING:
    from tsqp_core.schedule import Call

#: Unit roundoff of each dtype (half an ulp of 1).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11,
                 torch.float64: 2.0**-53}


class VerifyOptions(PluginOptions):
    #: Independent Gaussian probes per product and forward.
    probes: int = Field(2, ge=1, le=16)
    #: The tolerance in standard deviations of the honest residual's bound.
    sigmas: float = Field(8.0, gt=0)


def gaussian(n: int, cols: int, rng: Any) -> torch.Tensor:
    """``[n, cols]`` standard normal float64 draws from ``rng``'s bytes (Box-Muller)."""
    u = rng.int64((2, n * cols), bits=53).to(torch.float64) / 2.0**53
    u1 = u[0].clamp_min(2.0**-53)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u[1])).view(n, cols)


class VerifyProtection(Protection):
    __doc__ = __doc__
    name = "verify"
    Options = VerifyOptions
    summary = ("plaintext, but every returned weight product Freivalds-checked in floating "
               "point (integrity only, no privacy)")
    threat_model = "T2 integrity of weight products within a float tolerance; no privacy"
    deterministic = True
    tolerance = {"float32": 0.0, "bfloat16": 0.0, "float16": 0.0}

    def __init__(self, options: VerifyOptions) -> None:  # type: ignore[override]
        super().__init__(options)
        self._weights: dict[Hashable, torch.Tensor] = {}
        self._fro: dict[Hashable, float] = {}
        self._probes: dict[Hashable, deque] = {}
        self._now: dict[Hashable, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._failed: str | None = None
        self.counts = {"checks": 0, "rows_checked": 0, "failed": 0, "unverified_calls": 0,
                       "largest_residual_over_tau": 0.0, "probes_online": 0}
        self.verify_ns = 0

    def _checked(self, call: "Call") -> bool:
        return (len(call.ops) == 1 and call.ops[0].kind in LINEAR_KINDS
                and call.outputs == call.ops[0].outputs)

    def bind(self, ctx) -> None:
        super().bind(ctx)
        for call in ctx.schedule.calls:
            if self._checked(call):
                (op,) = call.ops
                w = torch.cat(ctx.weights.of(op, torch.float32)).to(torch.float64)
                self._weights[op.layer, op.kind] = w
                self._fro[op.layer, op.kind] = float(w.norm())

    def precompute(self, forwards: Sequence[ForwardShape]) -> None:
        for key in self._weights:
            queue = self._probes.setdefault(key, deque())
            while len(queue) < len(forwards):
                queue.append(self._new_probe(key))

    def _new_probe(self, key: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.ctx is not None
        w = self._weights[key]
        s = gaussian(w.shape[0], self.options.probes, self.ctx.rng)  # type: ignore[attr-defined]
        return s, w.T @ s  # [N, P], [K, P]

    def _probe(self, key: Hashable, forward: int) -> tuple[torch.Tensor, torch.Tensor]:
        now = self._now.get(key)
        if now is None or now[0] != forward:
            queue = self._probes.get(key)
            if queue:
                s, w_s = queue.popleft()
            else:
                s, w_s = self._new_probe(key)
                self.counts["probes_online"] += 1
            now = self._now[key] = (forward, s, w_s)
        return now[1], now[2]

    def seal(self, site: CallSite, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._failed:
            raise IntegrityError(f"session aborted after a failed integrity check: {self._failed}")
        if self._checked(site.call):
            self._inputs[site.call.index] = values[site.call.inputs[0]]
        return values

    def open(self, site: CallSite, wire: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t0 = now_ns()
        try:
            for name, t in wire.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    self._fail(f"{site.call.method}: non-finite values in '{name}'")
            if not self._checked(site.call):
                self.counts["unverified_calls"] += 1
                return wire
            self._verify(site, wire)
            return wire
        finally:
            self.verify_ns += now_ns() - t0

    def _verify(self, site: CallSite, wire: dict[str, torch.Tensor]) -> None:
        assert self.ctx is not None
        call = site.call
        (op,) = call.ops
        key = (op.layer, op.kind)
        x = self._inputs.pop(call.index).reshape(-1, self._weights[key].shape[1])
        y = torch.cat([wire[n] for n in call.outputs], dim=-1).reshape(x.shape[0], -1)
        s, w_s = self._probe(key, site.forward)
        x64, y64 = x.to(torch.float64), y.to(torch.float64)
        residual = (y64 @ s - x64 @ w_s).abs()  # [R, P]
        u_acc = UNIT_ROUNDOFF.get(x.dtype, 2.0**-24)
        u_acc = max(u_acc, 2.0**-24)  # GEMMs accumulate in at least fp32
        u_out = UNIT_ROUNDOFF.get(y.dtype, 2.0**-24)
        tau = self.options.sigmas * (  # type: ignore[attr-defined]
            u_acc * math.sqrt(x.shape[1]) * x64.norm(dim=-1) * self._fro[key]
            + u_out * y64.norm(dim=-1)) + 1e-300
        ratio = residual / tau.unsqueeze(-1)
        self.counts["checks"] += 1
        self.counts["rows_checked"] += x.shape[0]
        worst = float(ratio.max()) if ratio.numel() else 0.0
        self.counts["largest_residual_over_tau"] = max(self.counts["largest_residual_over_tau"],
                                                       worst)
        if worst > 1.0:
            self._fail(f"{op.label}: the product fails Freivalds' check (residual "
                       f"{worst:.3g} x the float tolerance)")

    def _fail(self, reason: str) -> None:
        self.counts["failed"] += 1
        self._failed = reason
        self._inputs.clear()
        raise IntegrityError(f"the GPU side's reply failed an integrity check: {reason}; "
                             "the session is aborted")

    def seen_as(self, value: str, how: str) -> str:
        return "plaintext"

    def report(self) -> dict[str, Any]:
        c = self.counts
        return {**super().report(),
                "integrity": {"checks": c["checks"], "rows_checked": c["rows_checked"],
                              "failed": c["failed"], "soundness_bits": 0,
                              "kind": "float Freivalds, Gaussian probes",
                              "unverified_calls": c["unverified_calls"],
                              "largest_residual_over_tau": c["largest_residual_over_tau"],
                              "probes_made_online": c["probes_online"]},
                "online_ms_by_part_total": {"verify": self.verify_ns / 1e6}}
