"""Where time and bytes go: the breakdown every run reports (README, "results.json").

Categories are the seed's: ``serialize`` (codec work and message checks, both sides),
``transport`` (round trip minus everything the server reported doing), ``gpu_compute``
(the server's own timer, device synchronised), ``tee_compute`` (TEE-side ops and sampling),
``protect`` (the protection scheme's online work: sealing calls, opening and verifying
replies) and ``other`` (the rest of the wall time, so the parts always add up to the total).
Work a scheme does before the timed region (mask pools, probes) is reported apart, as
``offline``, never hidden in these.

``serialize`` is also kept in its parts (:data:`SERIALIZE_PARTS`, :meth:`Meter.serialize`), which
add up to it: where a call's own overhead goes, the figure the per-call work is judged by.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator
from contextlib import contextmanager

CATEGORIES = ("serialize", "transport", "gpu_compute", "tee_compute", "protect")
#: The parts of ``serialize``, in a call's order: the TEE side encodes the request, the GPU
#: side reads (and validates) it and encodes the reply, the TEE side checks and copies the
#: reply, then checks its values.
SERIALIZE_PARTS = ("encode_request", "server_reads", "server_encodes", "check_reply",
                   "value_check")

now_ns = time.perf_counter_ns


@dataclass
class MethodStats:
    calls: int = 0
    bytes_to_gpu: int = 0
    bytes_from_gpu: int = 0
    ns: int = 0

    def as_dict(self) -> dict:
        return {"calls": self.calls, "bytes": self.bytes_to_gpu + self.bytes_from_gpu,
                "bytes_to_gpu": self.bytes_to_gpu, "bytes_from_gpu": self.bytes_from_gpu,
                "ms": self.ns / 1e6}


@dataclass
class Meter:
    """Accumulates one measured span (a forward, a generation) of a split run."""

    ns: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    methods: dict[str, MethodStats] = field(default_factory=dict)
    #: ``serialize`` by part (:data:`SERIALIZE_PARTS`).
    parts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SERIALIZE_PARTS, 0))

    def add(self, category: str, ns: int) -> None:
        self.ns[category] += ns

    def serialize(self, part: str, ns: int) -> None:
        """``ns`` of ``serialize`` spent on ``part``."""
        self.ns["serialize"] += ns
        self.parts[part] += ns

    @contextmanager
    def time(self, category: str) -> Iterator[None]:
        t0 = now_ns()
        try:
            yield
        finally:
            self.ns[category] += now_ns() - t0

    def call(self, method: str, to_gpu: int, from_gpu: int, ns: int, *, encode_request: int,
             check_reply: int, server: Any, round_trip: int) -> None:
        """One call, ``ns`` in all: the TEE side's encoding and checking, the server's own
        parts (``server``: its ``decode_ns``, ``compute_ns`` and ``encode_ns``) and the
        transport, which is the ``round_trip`` less what the server reported. In one step:
        it runs on every call."""
        reads, compute, encodes = server.decode_ns, server.compute_ns, server.encode_ns
        parts, cats = self.parts, self.ns
        parts["encode_request"] += encode_request
        parts["server_reads"] += reads
        parts["server_encodes"] += encodes
        parts["check_reply"] += check_reply
        cats["serialize"] += encode_request + reads + encodes + check_reply
        cats["gpu_compute"] += compute
        cats["transport"] += round_trip - reads - compute - encodes
        self.record_call(method, to_gpu, from_gpu, ns)

    def record_call(self, method: str, to_gpu: int, from_gpu: int, ns: int) -> None:
        m = self.methods.setdefault(method, MethodStats())
        m.calls += 1
        m.bytes_to_gpu += to_gpu
        m.bytes_from_gpu += from_gpu
        m.ns += ns

    @property
    def calls(self) -> int:
        return sum(m.calls for m in self.methods.values())

    def rpc(self) -> dict:
        return {
            "calls": self.calls,
            "bytes_to_gpu": sum(m.bytes_to_gpu for m in self.methods.values()),
            "bytes_from_gpu": sum(m.bytes_from_gpu for m in self.methods.values()),
            "by_method": {k: v.as_dict() for k, v in self.methods.items()},
        }

    def serialize_parts(self) -> dict[str, float]:
        """``serialize`` by part, in ms (they add up to it)."""
        return {k: v / 1e6 for k, v in self.parts.items()}

    def breakdown(self, total_ns: int) -> dict[str, float]:
        out = {k: v / 1e6 for k, v in self.ns.items()}
        out["other"] = total_ns / 1e6 - sum(out.values())
        return out


def median(xs: list[float]) -> float | None:
    """The median as every figure of tsqp reports it: the *lower* middle element, one real
    observation (never the mean of two middle ones). One definition for the split and the
    monolithic side, for totals, ttft and tpot alike, so that ratios compare like with like
    and a statistic of parts never exceeds the same statistic of the wholes it bounds
    (each repeat's ttft <= its total, hence median ttft <= median total)."""
    return sorted(xs)[(len(xs) - 1) // 2] if xs else None


def median_index(xs: list[float]) -> int:
    """Index of the repeat that is the :func:`median`."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    return order[(len(xs) - 1) // 2]


def ratio_spread(split: list[float], mono: list[float]) -> dict[str, float] | None:
    """Per-repeat ratios ``split[i] / mono[i]`` (repeat i of each side): their min, median
    and max, reported beside the ratio of medians."""
    ratios = [a / b for a, b in zip(split, mono) if a is not None and b]
    if not ratios:
        return None
    return {"min": min(ratios), "median": median(ratios), "max": max(ratios)}
