"""The mask pool: one-use input masks and their unmasking factors, made before they are needed.

For a weight product ``y = x W^T`` the scheme sends ``x + r`` and subtracts ``u = r W^T``
afterwards. ``u`` costs a GEMM per prime and is as large as the output, so it is made ahead
of time, outside the timed path: a *row* is one input row's mask ``r`` (``[k, K]`` centred
residues, uniform modulo each prime, from the TEE's CSPRNG) with its ``u`` (``[k, N]``). A
call of ``T`` rows takes ``T`` rows; each row carries a number from a per-product counter
that only goes up, and a row is handed out once and then dropped: a mask is never reused.

When the pool holds too few rows for a call (an *underrun*) the missing rows are made on
the spot and the time is reported as online -- never by reusing a row. Rows are made by
:meth:`MaskPool.fill` (called from the scheme's precompute, before the timer starts) and, if
enabled, by a background thread that keeps ``target_rows`` per product ready.

**Sealed store.** With ``seal_dir`` the rows wait on disk instead of in memory, each block
encrypted with AES-256-GCM under a key that exists only in this process (the TEE), with the
block's counter as nonce and (product, first counter, row count) as associated data. The
index of what was written stays in memory: a block replaced by an older one, replayed under
another counter, truncated or altered fails authentication and is an
:class:`~tsqp_core.protection.IntegrityError`; a block is deleted when taken.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable

import torch

from tsqp_core.metrics import now_ns
from tsqp_core.protection.base import IntegrityError
from tsqp_core.protection.otp.kernels import Gemm, residue_matmul
from tsqp_core.protection.otp.weights import QuantWeight


@dataclass
class _Block:
    first: int
    rows: int
    r: torch.Tensor | None  # int8 [k, rows, K] (None while sealed on disk)
    u: torch.Tensor | None  # int8 [k, rows, N]
    path: Path | None = None
    #: Shapes of r and u while they are sealed on disk.
    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None


@dataclass
class PoolStats:
    rows_made: int = 0
    rows_taken: int = 0
    underruns: int = 0
    underrun_rows: int = 0
    #: Time spent making rows ahead of time / on the spot (an underrun).
    offline_ns: int = 0
    online_ns: int = 0
    bytes_sealed: int = 0

    def as_dict(self) -> dict[str, Any]:
        made_s = self.offline_ns / 1e9
        return {"rows_made": self.rows_made, "rows_taken": self.rows_taken,
                "underruns": self.underruns, "underrun_rows": self.underrun_rows,
                "refill_rows_per_s": (self.rows_made - self.underrun_rows) / made_s
                if made_s else None,
                "offline_ms": self.offline_ns / 1e6, "online_ms": self.online_ns / 1e6,
                "bytes_sealed": self.bytes_sealed}


class _Sealer:
    """AES-256-GCM blocks on disk; the key and the index never leave this process."""

    def __init__(self, directory: Path) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))  # os.urandom inside
        self.run_id = os.urandom(8).hex()

    def __repr__(self) -> str:  # the key stays out of logs
        return f"_Sealer({self.dir})"

    @staticmethod
    def _aad(key: Hashable, first: int, rows: int) -> bytes:
        return repr((key, first, rows)).encode()

    def seal(self, key: Hashable, block: _Block) -> int:
        assert block.r is not None and block.u is not None
        payload = block.r.numpy().tobytes() + block.u.numpy().tobytes()
        nonce = block.first.to_bytes(12, "little")
        sealed = self._aead.encrypt(nonce, payload, self._aad(key, block.first, block.rows))
        block.path = self.dir / f"{self.run_id}-{abs(hash(key)) % 10**12}-{block.first}.bin"
        tmp = block.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(sealed)
        os.replace(tmp, block.path)
        block.shapes = (tuple(block.r.shape), tuple(block.u.shape))
        block.r = block.u = None
        return len(sealed)

    def open(self, key: Hashable, block: _Block) -> None:
        from cryptography.exceptions import InvalidTag

        assert block.path is not None
        try:
            data = block.path.read_bytes()
        except OSError as exc:
            raise IntegrityError(f"sealed mask block {block.first} is gone: {exc}") from None
        try:
            payload = self._aead.decrypt(block.first.to_bytes(12, "little"), data,
                                         self._aad(key, block.first, block.rows))
        except InvalidTag:
            raise IntegrityError(f"sealed mask block {block.first} fails authentication "
                                 "(altered, replayed or rolled back)") from None
        finally:
            block.path.unlink(missing_ok=True)
        assert block.shapes is not None
        r_shape, u_shape = block.shapes
        n_r = r_shape[0] * r_shape[1] * r_shape[2]
        flat = torch.frombuffer(bytearray(payload), dtype=torch.int8)
        block.r = flat[:n_r].view(r_shape)
        block.u = flat[n_r:].view(u_shape)


@dataclass
class _Queue:
    weight: QuantWeight
    blocks: deque = field(default_factory=deque)
    ready: int = 0
    #: Counter of the next row made; rows handed out are below ``taken``.
    next: int = 0
    taken: int = 0


class MaskPool:
    """One-use masks per weight product (``key``: e.g. ``(layer, kind)``)."""

    def __init__(self, weights: dict[Hashable, QuantWeight], primes: tuple[int, ...], rng: Any,
                 gemm: Gemm = "auto", seal_dir: Path | None = None) -> None:
        self.primes = primes
        self.rng = rng
        self.gemm = gemm
        self.stats = PoolStats()
        self._queues = {key: _Queue(w) for key, w in weights.items()}
        self._lock = threading.Lock()
        self._sealer = _Sealer(seal_dir) if seal_dir is not None else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"MaskPool({len(self._queues)} products, k={len(self.primes)})"

    # --- making rows ----------------------------------------------------------------------

    def _make(self, q: _Queue, rows: int) -> _Block:
        w = q.weight
        k, width = len(self.primes), w.in_features
        r = torch.stack([self.rng.below(p, (rows, width)) for p in self.primes])
        r = torch.where(r > torch.tensor(self.primes).view(k, 1, 1) // 2,
                        r - torch.tensor(self.primes).view(k, 1, 1), r).to(torch.int8)
        u = residue_matmul(r, w.residues, self.primes, self.gemm)
        block = _Block(q.next, rows, r, u)
        q.next += rows
        return block

    def fill(self, key: Hashable, rows: int) -> None:
        """Have at least ``rows`` rows of ``key`` ready (made now, counted offline)."""
        q = self._queues[key]
        with self._lock:
            missing = rows - q.ready
            if missing <= 0:
                return
            t0 = now_ns()
            block = self._make(q, missing)
            if self._sealer is not None:
                self.stats.bytes_sealed += self._sealer.seal(key, block)
            q.blocks.append(block)
            q.ready += missing
            self.stats.rows_made += missing
            self.stats.offline_ns += now_ns() - t0

    def available(self, key: Hashable) -> int:
        return self._queues[key].ready

    def total_available(self) -> int:
        return sum(q.ready for q in self._queues.values())

    # --- taking rows ----------------------------------------------------------------------

    def take(self, key: Hashable, rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``rows`` fresh rows of ``key``: masks ``r`` int8 ``[k, rows, K]``, factors ``u``
        int8 ``[k, rows, N]`` and the counter of the first. Each row is handed out once."""
        q = self._queues[key]
        with self._lock:
            parts_r, parts_u = [], []
            first = q.taken
            need = rows
            while need and q.blocks:
                block = q.blocks[0]
                if block.r is None and self._sealer is not None:
                    self._sealer.open(key, block)
                if block.first != q.taken:  # never happens unless the index is corrupt
                    raise IntegrityError(f"mask counter {block.first} where {q.taken} was due")
                n = min(need, block.rows)
                parts_r.append(block.r[:, :n])
                parts_u.append(block.u[:, :n])
                if n == block.rows:
                    q.blocks.popleft()
                else:  # the rest stays, in memory now; its first row moves on
                    q.blocks[0] = _Block(block.first + n, block.rows - n, block.r[:, n:],
                                         block.u[:, n:])
                q.taken += n
                q.ready -= n
                need -= n
            if need:  # underrun: make the rest now, on the timed path, and say so
                t0 = now_ns()
                block = self._make(q, need)
                parts_r.append(block.r)
                parts_u.append(block.u)
                q.taken += need
                self.stats.underruns += 1
                self.stats.underrun_rows += need
                self.stats.rows_made += need
                self.stats.online_ns += now_ns() - t0
            self.stats.rows_taken += rows
        r = parts_r[0] if len(parts_r) == 1 else torch.cat(parts_r, dim=1)
        u = parts_u[0] if len(parts_u) == 1 else torch.cat(parts_u, dim=1)
        return r, u, first

    # --- background refill -----------------------------------------------------------------

    def start(self, target_rows: dict[Hashable, int], period_s: float = 0.05) -> None:
        """Keep ``target_rows[key]`` rows of each product ready from a background thread."""
        if self._thread is not None:
            return

        def refill() -> None:
            while not self._stop.is_set():
                for key, rows in target_rows.items():
                    if self._stop.is_set():
                        return
                    self.fill(key, rows)
                self._stop.wait(period_s)

        self._thread = threading.Thread(target=refill, daemon=True, name="tsqp-mask-pool")
        self._thread.start()

    def close(self) -> None:
        """Stop refilling; drop every row (sealed files included)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            for q in self._queues.values():
                for block in q.blocks:
                    if block.path is not None:
                        block.path.unlink(missing_ok=True)
                    if block.r is not None:
                        block.r.zero_()
                        block.u.zero_()
                q.blocks.clear()
                q.ready = 0
