"""``otp``: an exact one-time pad over residues, with Freivalds integrity checks.

**Threat model.** The GPU side knows the architecture and the public weights, sees every byte
that crosses, every value it computes, shapes and timing (T1, honest-but-curious), and may
return anything (T2, malicious). It must learn nothing about the prompt, the generated
tokens or the logits, and must not change a result unnoticed. Out of scope: metadata
(prompt length, number of steps, timing) and side channels of the TEE itself.

**Placement.** Only products of a private input with a public weight can be masked this way:
``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj`` and ``lm_head``. Every other op --
the embedding lookup (token ids never leave), norms, RoPE, attention with its KV cache
(two private operands), SiLU, residuals -- stays in the TEE: :meth:`OtpProtection.check`
refuses any partition that puts another op on the GPU side (``partition=linears`` is the
one it accepts: 4 calls per layer + 1).

**Protocol, per call** ``y = x W^T`` (``x`` ``[R, K]``, ``W`` ``[N, K]``):

1. *Fixed point* (:mod:`.fixed`): ``x_int = round(x 2**s_r)`` with a per-row power-of-two
   scale (the TEE's secret), ``|x_int| <= 2**(x_bits-1)``; ``W_int`` likewise per output row
   with ``w_bits``, public. Rows whose Cauchy-Schwarz bound ``||x_int|| max_j ||W_int,j||``
   would leave the ring give up low bits (counted as ``rows_shrunk``).
2. *Mask* (:mod:`.pool`): a fresh row ``r_i`` uniform in ``Z_{p_i}`` for each of ``k`` primes
   ``p_i < 256`` (:mod:`.rns`), drawn from the TEE's CSPRNG
   (:class:`~tsqp_core.protection.SecureRandom`, ``os.urandom``), used once. The GPU side
   receives ``x~_i = x_int + r_i mod p_i``, centred int8: uniform whatever ``x`` is -- a
   one-time pad, so the view is independent of the data (information-theoretic, per call).
3. *GPU side* (:mod:`.gpu`): ``k`` int8 GEMMs ``P_i = x~_i W_i^T mod p_i`` against the public
   weight residues (:mod:`.kernels`: ``torch._int_mm``, or an exact float64 GEMM).
4. *Unmask*: ``y_i = P_i - u_i mod p_i`` with ``u_i = r_i W_i^T`` made ahead of time;
   Garner's CRT rebuilds ``y_int`` exactly (bit for bit the integer product) in
   ``(-M/2, M/2]``, ``M = p_1 ... p_k``.
5. *Verify*: every residue must be a centred residue of its prime; ``|y_int|`` must be within
   the Cauchy-Schwarz bound of its row and column (``< 2**60``); with ``verify`` every row
   passes Freivalds' check modulo ``2**61 - 1`` (:mod:`.freivalds`) with a secret probe drawn
   fresh for every product and every forward: a wrong product passes with probability at
   most ``2**-61``. The first failure raises :class:`~tsqp_core.protection.IntegrityError`
   and the scheme refuses every later call: no retry, no second probe on the same data.
6. *Dequantise*: ``y = y_int 2**-(s_r + s_j)`` in float64, then the run's dtype.

Modes: ``fp32`` (28-bit inputs, 24-bit weights, 8 primes: fp32-level logits) and ``bf16``
(16/16 bits, 6 primes: bf16-level, 6 bytes per element on the wire instead of 8).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable, Literal, Sequence

import torch
from pydantic import Field

from tsqp_core.graph import Op, value_template
from tsqp_core.metrics import now_ns
from tsqp_core.plugins import PluginOptions
from tsqp_core.protection.base import (CallSite, ForwardShape, IntegrityError, Protection,
                                       ProtectionRefused, TeeContext)
from tsqp_core.protection.otp import freivalds
from tsqp_core.protection.otp.fixed import dequantize, quantize, shrink_to_bound
from tsqp_core.protection.otp.rns import Crt, modulus, primes
from tsqp_core.protection.otp.weights import LINEAR_KINDS, QuantWeight, quantized
from tsqp_core.protocol import CallWire, WireTensor

if TYPE_CHECKING:
    from tsqp_core.executor import Backend
    from tsqp_core.models.source import Checkpoint
    from tsqp_core.schedule import Call, Schedule

#: mode -> (input bits, weight bits, primes)
MODES: dict[str, tuple[int, int, int]] = {"fp32": (28, 24, 8), "bf16": (16, 16, 6)}


class OtpOptions(PluginOptions):
    #: ``fp32``: 28-bit inputs, 24-bit weights, 8 primes; ``bf16``: 16/16 bits, 6 primes.
    mode: Literal["fp32", "bf16"] = "fp32"
    #: Override the mode's fixed-point bits and number of primes.
    x_bits: int | None = Field(None, ge=2, le=31)
    w_bits: int | None = Field(None, ge=2, le=24)
    primes: int | None = Field(None, ge=2, le=8)
    #: Freivalds-check every product (exact, soundness 2**-61 per row).
    verify: bool = True
    #: Residue GEMMs: ``auto`` (int8 ``torch._int_mm`` where it runs, else float64),
    #: ``int8`` (required), ``float64`` (exact everywhere, slower).
    gemm: Literal["auto", "int8", "float64"] = "auto"
    #: Rows per product a background thread keeps ready (0: only what precompute asks for).
    pool_rows: int = Field(0, ge=0)
    #: Keep waiting masks sealed on disk (AES-256-GCM, key in TEE memory) under
    #: ``$TSQP_CACHE/pool`` instead of in memory.
    seal: bool = False


@dataclass
class _Pending:
    """One call between seal and open: what the TEE keeps to unmask and verify it."""

    key: tuple[int | None, str]
    x_int: torch.Tensor
    s_rows: torch.Tensor
    u: torch.Tensor
    shape: tuple[int, ...]


def _out_name(op: Op) -> str:
    return f"{op.kind}~" if op.layer is None else f"{op.layer}.{op.kind}~"


def _in_name(value: str) -> str:
    return f"{value}~"


class OtpProtection(Protection):
    __doc__ = __doc__
    name = "otp"
    Options = OtpOptions
    summary = ("exact one-time pad in residues mod k primes < 256 (int8 GEMMs on the GPU "
               "side, CRT in the TEE) with Freivalds checks; partition=linears only")
    threat_model = ("T1 honest-but-curious and T2 malicious GPU side holding the public "
                    "weights; metadata (lengths, timing) out of scope")

    def __init__(self, options: OtpOptions) -> None:  # type: ignore[override]
        super().__init__(options)
        xb, wb, k = MODES[options.mode]
        self.x_bits = options.x_bits or xb
        self.w_bits = options.w_bits or wb
        self.primes = primes(options.primes or k)
        self.M = modulus(self.primes)
        # |y_int| must stay inside the ring (centred CRT) and below Q/2 (Freivalds soundness)
        self.bound = min((self.M - 1) // 2, (freivalds.Q - 1) // 2)
        self.crt = Crt(self.primes)
        #: the primes and their halves, shaped to broadcast over ``[k, rows, width]``
        self._p = torch.tensor(self.primes, dtype=torch.int64).view(-1, 1, 1)
        self._half = self._p // 2
        self._weights: dict[Hashable, QuantWeight] = {}
        self._pending: dict[int, _Pending] = {}
        self._probes: dict[Hashable, deque] = {}
        self._probe_now: dict[Hashable, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._failed: str | None = None
        self.pool: Any = None
        self.counts = {"checks": 0, "rows_checked": 0, "failed": 0, "rows_shrunk": 0,
                       "probes_online": 0, "plain_bytes": 0, "wire_bytes": 0}
        self.setup_ms = 0.0
        self.online_ns = {"mask": 0, "unmask": 0, "crt": 0, "verify": 0}

    @property
    def tolerance(self) -> dict[str, float]:  # type: ignore[override]
        # against the unprotected run: fixed point at x_bits/w_bits, everything else exact
        if self.x_bits >= 24 and self.w_bits >= 20:
            return {"float32": 1e-4, "bfloat16": 0.5, "float16": 0.5}
        return {"float32": 0.25, "bfloat16": 0.5, "float16": 0.5}

    @property
    def params(self) -> str:
        return (f"k={len(self.primes)} primes < 256 (M = 2^{math.log2(self.M):.1f}), "
                f"x{self.x_bits}/w{self.w_bits}")

    # --- before anything starts -----------------------------------------------------------

    def check(self, schedule: "Schedule") -> None:
        unmasked = sorted({op.kind for call in schedule.calls for op in call.ops
                           if op.kind not in LINEAR_KINDS})
        if unmasked:
            raise ProtectionRefused(
                f"protection otp masks only weight products ({', '.join(LINEAR_KINDS)}); "
                f"this partition runs {', '.join(unmasked)} on the GPU side, where it would "
                "see unmasked data: use partition=linears")
        multi = [call.method for call in schedule.calls if len(call.ops) > 1]
        if multi:
            raise ProtectionRefused(f"protection otp needs one weight product per call; "
                                    f"calls {', '.join(sorted(set(multi)))} hold several")
        partial = [call.method for call in schedule.calls
                   if call.outputs != call.ops[0].outputs]
        if partial:
            raise ProtectionRefused(f"protection otp returns whole products; calls "
                                    f"{', '.join(sorted(set(partial)))} read only part of one")

    def wire(self, call: "Call", plain: CallWire) -> CallWire:
        """One int8 tensor in (``k`` residues of the masked input) and one out (``k``
        residues of the whole masked product, e.g. q|k|v side by side)."""
        (op,) = call.ops
        (x,) = plain.inputs
        k = len(self.primes)
        width = sum(t.shape[-1] for t in plain.outputs)  # type: ignore[misc]
        rows = tuple(plain.outputs[0].shape[:-1])
        return CallWire((WireTensor(_in_name(x.name), "int8", (k, *x.shape)),),
                        (WireTensor(_out_name(op), "int8", (k, *rows, width)),))

    # --- a run ------------------------------------------------------------------------------

    def bind(self, ctx: TeeContext) -> None:
        from tsqp_core.models.source import cache_root
        from tsqp_core.protection.otp.pool import MaskPool

        super().bind(ctx)
        t0 = now_ns()
        for call in ctx.schedule.calls:
            (op,) = call.ops
            key = (op.layer, op.kind)
            if key not in self._weights:
                self._weights[key] = quantized(ctx.weights, op, self.w_bits, self.primes,
                                               store=True)
        seal_dir = cache_root() / "pool" if self.options.seal else None  # type: ignore[attr-defined]
        self.pool = MaskPool(self._weights, self.primes, ctx.rng, self.options.gemm,  # type: ignore[attr-defined]
                             seal_dir)
        if self.options.pool_rows:  # type: ignore[attr-defined]
            self.pool.start({key: self.options.pool_rows for key in self._weights})  # type: ignore[attr-defined]
        self.setup_ms = (now_ns() - t0) / 1e6

    def _rows(self, call: "Call", shape: ForwardShape) -> int:
        tail = call.ops[0].kind == "lm_head" and shape.last_only
        return shape.batch * (1 if tail else shape.tokens)

    def precompute(self, forwards: Sequence[ForwardShape]) -> None:
        """Masks and unmasking factors for every row of ``forwards``, and one fresh probe per
        product per forward."""
        assert self.ctx is not None and self.pool is not None
        need: dict[Hashable, int] = {}
        for call in self.ctx.schedule.calls:
            key = (call.ops[0].layer, call.ops[0].kind)
            need[key] = need.get(key, 0) + sum(self._rows(call, f) for f in forwards)
        for key, rows in need.items():
            self.pool.fill(key, rows)
            if self.options.verify:  # type: ignore[attr-defined]
                probes = self._probes.setdefault(key, deque())
                while len(probes) < len(forwards):
                    probes.append(self._new_probe(key))

    def _new_probe(self, key: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.ctx is not None
        w = self._weights[key]
        s = freivalds.probe(w.out_features, self.ctx.rng)
        assert w.w_int is not None
        return s, freivalds.weight_probe(w.w_int, s)

    def _probe(self, key: Hashable, forward: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This forward's probe of ``key``: a new one for every forward, never reused."""
        now = self._probe_now.get(key)
        if now is None or now[0] != forward:
            queue = self._probes.get(key)
            if queue:
                s, w_s = queue.popleft()
            else:
                s, w_s = self._new_probe(key)
                self.counts["probes_online"] += 1
            now = self._probe_now[key] = (forward, s, w_s)
        return now[1], now[2]

    def seal(self, site: CallSite, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._failed:
            raise IntegrityError(f"session aborted after a failed integrity check: {self._failed}")
        t0 = now_ns()
        call = site.call
        (op,) = call.ops
        key = (op.layer, op.kind)
        w = self._weights[key]
        x = values[call.inputs[0]]
        shape = tuple(x.shape)
        x_int, s_rows = quantize(x.reshape(-1, shape[-1]), self.x_bits)
        x_int, s_rows, shrunk = shrink_to_bound(x_int, s_rows, w.max_norm, self.bound)
        self.counts["rows_shrunk"] += shrunk
        r, u, _ = self.pool.take(key, x_int.shape[0])
        masked = torch.remainder(x_int + r, self._p)  # r: int8 [k, rows, K], broadcast
        masked = torch.where(masked > self._half, masked - self._p, masked)
        self._pending[call.index] = _Pending(key, x_int, s_rows, u, shape)
        wire = masked.to(torch.int8).view(len(self.primes), *shape)
        self.counts["plain_bytes"] += x.numel() * x.element_size()
        self.counts["wire_bytes"] += wire.numel()
        self.online_ns["mask"] += now_ns() - t0
        return {_in_name(call.inputs[0]): wire}

    def open(self, site: CallSite, wire: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t0 = now_ns()
        call = site.call
        (op,) = call.ops
        pend = self._pending.pop(call.index)
        w = self._weights[pend.key]
        (got,) = wire.values()
        k, rows = len(self.primes), pend.x_int.shape[0]
        res = got.reshape(k, rows, -1).to(torch.int64)
        if bool((res.abs() > self._half).any()):
            bad = sorted({self.primes[i] for i in (res.abs() > self._half).nonzero()[:, 0].tolist()})
            self._fail(f"{op.label}: residues outside the centred range of prime(s) {bad}")
        t1 = now_ns()
        y_int = self.crt.rebuild(res - pend.u.to(torch.int64))
        t2 = now_ns()
        norms = pend.x_int.to(torch.float64).norm(dim=-1)
        limit = torch.outer(norms, w.norms) * (1 + 1e-9) + 1
        if bool((y_int.abs().to(torch.float64) > limit).any()):
            self._fail(f"{op.label}: a product outside its Cauchy-Schwarz bound")
        if self.options.verify:  # type: ignore[attr-defined]
            s, w_s = self._probe(pend.key, site.forward)
            ok = freivalds.verify(pend.x_int, y_int, s, w_s)
            self.counts["checks"] += 1
            self.counts["rows_checked"] += rows
            if not bool(ok.all()):
                self._fail(f"{op.label}: the product fails Freivalds' check "
                           f"({int((~ok).sum())} of {rows} rows)")
        t3 = now_ns()
        y = dequantize(y_int, pend.s_rows, w.exps, self.ctx.dtype if self.ctx else torch.float32)
        widths = [self._width(name) for name in op.outputs]
        parts = y.split(widths, dim=-1)
        out = {name: part.reshape(*pend.shape[:-1], part.shape[-1])
               for name, part in zip(op.outputs, parts) if name in call.outputs}
        self.counts["plain_bytes"] += sum(t.numel() * t.element_size() for t in out.values())
        self.counts["wire_bytes"] += got.numel()
        t4 = now_ns()
        self.online_ns["unmask"] += (t1 - t0) + (t4 - t3)
        self.online_ns["crt"] += t2 - t1
        self.online_ns["verify"] += t3 - t2
        return out

    def _width(self, value: str) -> int:
        assert self.ctx is not None
        last = value_template(value, self.ctx.dims)[-1]
        assert isinstance(last, int)
        return last

    def _fail(self, reason: str) -> None:
        self.counts["failed"] += 1
        self._failed = reason
        self._pending.clear()
        raise IntegrityError(f"the GPU side's reply failed an integrity check: {reason}; "
                             "the session is aborted")

    def end_session(self, session: int) -> None:
        self._pending.clear()

    def seen_as(self, value: str, how: str) -> str:
        return f"otp {self.params}"

    def report(self) -> dict[str, Any]:
        c = self.counts
        return {
            **super().report(),
            "params": {"x_bits": self.x_bits, "w_bits": self.w_bits, "k": len(self.primes),
                       "primes": list(self.primes),
                       "modulus_bits": round(math.log2(self.M), 2),
                       "verify": self.options.verify, "gemm": self.options.gemm},  # type: ignore[attr-defined]
            "random_source": "os.urandom (SecureRandom); one mask row per input row per call",
            # summed over every forward of the run (warm-up included); the breakdown's
            # ``protect`` is the median repeat's
            "online_ms_by_part_total": {k: v / 1e6 for k, v in self.online_ns.items()},
            "setup_ms": self.setup_ms,
            "pool": ({**self.pool.stats.as_dict(), "rows_available": self.pool.total_available(),
                      "products": len(self._weights)} if self.pool is not None else None),
            "integrity": {"checks": c["checks"], "rows_checked": c["rows_checked"],
                          "failed": c["failed"],
                          "soundness_bits": freivalds.SOUNDNESS_BITS if self.options.verify  # type: ignore[attr-defined]
                          else 0, "probes_made_online": c["probes_online"]},
            "rows_shrunk": c["rows_shrunk"],
            "bytes": {"plain": c["plain_bytes"], "wire": c["wire_bytes"],
                      "wire_over_plain": c["wire_bytes"] / c["plain_bytes"]
                      if c["plain_bytes"] else None},
        }

    # --- attacks (tsqp_core.attack) ----------------------------------------------------------

    def blind(self, spec: WireTensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Fresh centred residues, uniform modulo each prime along dim 0: what a masked input
        is whatever the data (from a CSPRNG of its own, not the run's counted one)."""
        from tsqp_core.protection.random import SecureRandom
        from tsqp_core.protection.otp.rns import centre

        rng = SecureRandom()
        return torch.stack([centre(rng.below(p, tuple(shape[1:])), p).to(torch.int8)
                            for p in self.primes])

    # --- the GPU side -----------------------------------------------------------------------

    def gpu_backend(self, inner: "Backend", ckpt: "Checkpoint", kinds: frozenset[str],
                    dtype: torch.dtype, device: torch.device) -> "Backend":
        from tsqp_core.protection.otp.gpu import ResidueBackend

        return ResidueBackend(ckpt, kinds, self.w_bits, self.primes, self.options.gemm, device)  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self._pending.clear()
        self._probes.clear()
        self._probe_now.clear()
