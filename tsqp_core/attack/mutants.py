"""Deliberately broken protection schemes: the harness must fail every one of them.

**None of these protects anything. They are not registered as plugins and cannot be
selected with ``protection.name``;** the attack harness (:mod:`.harness`) runs them by
swapping the prepared run's protection object for one of these classes. Each impersonates
the wire layout of a real scheme -- a subclass of ``otp`` (name ``otp``) or of ``none``
(name ``none``) -- so the GPU side accepts it at ``hello`` and computes exactly what it
computes for the real one.

| mutant | broken how | expected to be caught by |
|---|---|---|
| ``reused_mask`` | ``otp`` whose masks are drawn once per product and row count and reused in every later forward (the seed's ``self.pregenerated`` bug) | freshness, randomness accounting |
| ``gaussian_mask`` | a float additive mask ``N(0, (0.1 rms(x))^2)`` per row, unmasked with ``R W^T`` in float64 | A1-A3 |
| ``torch_rng`` | ``otp`` whose masks come from ``torch``'s default (Mersenne Twister) generator | randomness accounting, repeats across fresh processes |
| ``token_mixing`` | ``A X`` with a fresh random orthogonal ``A`` per call and batch row (GELO without full-rank shields), unmixed with ``A^T`` | A4 (bag and order) |
| ``wrong_weight`` | ``otp`` whose unmasking factors are ``R W'`` with the next layer's weight of the same kind, Freivalds off | correctness |

(``wrong_weight``: with a wrong ``u`` the rebuilt integer is uniform in the ring, so even with
Freivalds off ``otp``'s own Cauchy-Schwarz range check raises ``IntegrityError`` on the first
call; the harness's correctness check counts that as a failure. ``reused_mask`` also fails
``chi2``, which pools both forwards: the second forward's residues repeat the first's.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tsqp_core.graph import value_template
from tsqp_core.protection import CallSite, NoProtection, SecureRandom
from tsqp_core.protection.otp import OtpProtection
from tsqp_core.protocol import WireTensor

#: Two 53-bit uniforms give two normals (Box-Muller): 8 bytes per normal.
_U53 = float(2**53)


def secure_normal(rng: SecureRandom, n: int) -> torch.Tensor:
    """``n`` standard normals (float64) from the secure source, by Box-Muller."""
    m = (n + 1) // 2
    u = (rng.int64((2, m), bits=53).to(torch.float64) + 0.5) / _U53
    r = torch.sqrt(-2 * torch.log(u[0]))
    z = torch.cat([r * torch.cos(2 * math.pi * u[1]), r * torch.sin(2 * math.pi * u[1])])
    return z[:n]


class Mutant:
    """Marks a broken scheme: ``mutant`` is its name in reports and tests."""

    mutant: ClassVar[str]
    #: What it breaks, in one line.
    broken: ClassVar[str]


# --- otp with a broken mask source -------------------------------------------------------------


class ReusedMaskOtp(Mutant, OtpProtection):
    mutant = "reused_mask"
    broken = "otp with masks drawn once per product and reused across forwards"

    def bind(self, ctx) -> None:
        super().bind(ctx)
        take, memo = self.pool.take, {}

        def pregenerated(key, rows):
            if (key, rows) not in memo:
                memo[key, rows] = take(key, rows)
            return memo[key, rows]

        self.pool.take = pregenerated


class TorchRandom:
    """The :class:`SecureRandom` interface over torch's default generator: predictable
    (Mersenne Twister, recoverable from its outputs; the same stream in every process that
    seeds it alike). Counts nothing: no byte comes from the secure source."""

    drawn = 0

    def below(self, p: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(0, p, shape, dtype=torch.int64)


class TorchRngOtp(Mutant, OtpProtection):
    mutant = "torch_rng"
    broken = "otp with masks from torch's default generator instead of the OS CSPRNG"

    def bind(self, ctx) -> None:
        super().bind(ctx)
        self.pool.rng = TorchRandom()


class WrongWeightOtp(Mutant, OtpProtection):
    mutant = "wrong_weight"
    broken = "otp unmasking with R W' for the next layer's weight W' of the same kind"

    def bind(self, ctx) -> None:
        from tsqp_core.protection.otp.pool import MaskPool

        super().bind(ctx)
        layers = ctx.dims.layers
        wrong = {(layer, kind): self._weights[((layer + 1) % layers, kind)
                                              if layer is not None else (layer, kind)]
                 for layer, kind in self._weights}
        self.pool.close()
        self.pool = MaskPool(wrong, self.primes, ctx.rng, self.options.gemm)


# --- float schemes impersonating ``none`` -------------------------------------------------------


@dataclass
class _Pending:
    shape: tuple[int, ...]
    state: Any


class _FloatMutant(Mutant, NoProtection):
    deterministic = False
    tolerance = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.5}
    how: ClassVar[str] = ""

    def __init__(self, options) -> None:
        super().__init__(options)
        self._pending: dict[int, _Pending] = {}
        self._w: dict[tuple, list[torch.Tensor]] = {}

    def seen_as(self, value: str, how: str) -> str:
        return self.how

    def _weights(self, site: CallSite) -> list[torch.Tensor]:
        assert self.ctx is not None
        (op,) = site.call.ops
        if (op.layer, op.kind) not in self._w:
            self._w[op.layer, op.kind] = self.ctx.weights.of(op, torch.float64)
        return self._w[op.layer, op.kind]

    def _widths(self, site: CallSite) -> list[int]:
        assert self.ctx is not None
        return [int(value_template(n, self.ctx.dims)[-1]) for n in site.call.ops[0].outputs]


class GaussianMask(_FloatMutant):
    mutant = "gaussian_mask"
    broken = "float additive mask N(0, (0.1 rms)^2), the seed's matmul masks"
    sigma = 0.1
    how = "gauss sigma=0.1 rms (float additive mask)"

    def seal(self, site: CallSite, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.ctx is not None
        (name,) = site.call.inputs
        x = values[name].to(torch.float64)
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        r = secure_normal(self.ctx.rng, x.numel()).view(x.shape) * (self.sigma * rms)
        u = torch.cat([r @ w.T for w in self._weights(site)], dim=-1)
        self._pending[site.call.index] = _Pending(tuple(x.shape), u)
        return {name: (x + r).to(values[name].dtype)}

    def open(self, site: CallSite, wire: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        u = self._pending.pop(site.call.index).state
        parts = u.split(self._widths(site), dim=-1)
        outs = site.call.ops[0].outputs
        return {n: (wire[n].to(torch.float64) - part).to(wire[n].dtype)
                for n, part in zip(outs, parts) if n in site.call.outputs}

    def blind(self, spec: WireTensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The mask alone, at unit rms."""
        n = math.prod(shape)
        return (secure_normal(SecureRandom(), n) * self.sigma).view(shape).to(
            getattr(torch, spec.dtype))


class TokenMixing(_FloatMutant):
    mutant = "token_mixing"
    broken = "token mixing A X with a fresh orthogonal A per call (no full-rank shields)"
    how = "token mixing (A X, fresh orthogonal A per call)"

    def seal(self, site: CallSite, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.ctx is not None
        (name,) = site.call.inputs
        x = values[name].to(torch.float64)
        b, t = x.shape[0], x.shape[1]
        g = secure_normal(self.ctx.rng, b * t * t).view(b, t, t)
        a, _ = torch.linalg.qr(g)
        self._pending[site.call.index] = _Pending(tuple(x.shape), a)
        return {name: (a @ x).to(values[name].dtype)}

    def open(self, site: CallSite, wire: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        a = self._pending.pop(site.call.index).state
        return {n: (a.transpose(-1, -2) @ wire[n].to(torch.float64)).to(wire[n].dtype)
                for n in site.call.outputs}

    def blind(self, spec: WireTensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Mixing data that carries nothing (zeros) gives zeros."""
        return torch.zeros(shape, dtype=getattr(torch, spec.dtype))


MUTANTS: dict[str, type] = {m.mutant: m for m in (ReusedMaskOtp, GaussianMask, TorchRngOtp,
                                                    TokenMixing, WrongWeightOtp)}
#: Options each mutant runs with (on top of its base scheme's defaults).
MUTANT_OPTIONS: dict[str, dict[str, Any]] = {"wrong_weight": {"verify": False}}


def base_scheme(cls: type) -> str:
    """The registered scheme whose wire layout ``cls`` impersonates."""
    return cls.name
