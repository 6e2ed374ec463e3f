"""From partition + grouping to the steps of one forward: TEE ops and GPU calls.

A call's *inputs* are the values its ops read that were made outside it (they cross to the
GPU side); its *outputs* are the values it makes that a later step, or the caller, reads
(they cross back). Everything else stays on the GPU side for the duration of the call.

How GPU ops group into calls is declared data, not executor code, so the TEE host builds the
schedule without the executor's package (:data:`GROUPINGS`): an executor declares its
grouping (``Executor.grouping``), and so can its config (``executor.grouping``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from tsqp_core.graph import (DESCRIPTIONS, INTEGER_VALUES, Dims, Op, forward_ops, value_kind,
                             value_template)
from tsqp_core.protocol import CallWire, PlanEntry, WireTensor

if TYPE_CHECKING:
    from tsqp_core.protection import Protection

RESULT = "logits"


@dataclass(frozen=True)
class Call:
    index: int
    ops: tuple[Op, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @functools.cached_property  # read several times on every call
    def method(self) -> str:
        """The name calls are reported under: the op kind, or ``first..last`` of a run."""
        first, last = self.ops[0].kind, self.ops[-1].kind
        return first if len(self.ops) == 1 else f"{first}..{last}"

    @property
    def layer(self) -> int | None:
        return self.ops[0].layer

    def plain_wire(self, dims: Dims, dtype: str) -> CallWire:
        """The wire layout without protection: each value as itself, in the run's dtype
        (token ids and positions as int64)."""

        def spec(name: str) -> WireTensor:
            return WireTensor(name, "int64" if name in INTEGER_VALUES else dtype,
                              value_template(name, dims))

        return CallWire(tuple(map(spec, self.inputs)), tuple(map(spec, self.outputs)))


Step = Op | Call


@dataclass(frozen=True)
class Schedule:
    steps: tuple[Step, ...]
    gpu_kinds: frozenset[str]
    #: value -> index of the last step that reads it (values absent are never read again).
    last_use: dict[str, int] = field(compare=False)

    @property
    def calls(self) -> list[Call]:
        return [s for s in self.steps if isinstance(s, Call)]

    def exposure(self, protection: "Protection") -> list[dict]:
        """What reaches the GPU side, per value kind: sent to it, or computed there, and how
        the protection scheme says it is seen (``plaintext`` or the scheme and parameters)."""
        seen: dict[tuple, dict] = {}

        def add(name: str, op: Op, how: str) -> None:
            kind = value_kind(name)
            as_ = protection.seen_as(name, how)
            entry = seen.setdefault((kind, op.kind, how), {
                "tensor": DESCRIPTIONS.get(kind, kind), "value": kind, "op": op.kind,
                "how": how, "plaintext": as_ == "plaintext", "seen_as": as_, "layers": 0})
            entry["layers"] += 1

        for call in self.calls:
            readers = {n: op for op in call.ops for n in op.inputs}
            for name in call.inputs:
                add(name, readers[name], "sent to gpu")
            for op in call.ops:
                for name in op.outputs:
                    add(name, op, "computed on gpu")
        return list(seen.values())


def gpu_runs(ops: Sequence[Op], gpu_kinds: frozenset[str]) -> list[list[Op]]:
    """Maximal runs of consecutive GPU-side ops."""
    runs: list[list[Op]] = []
    prev_gpu = False
    for op in ops:
        on_gpu = op.kind in gpu_kinds
        if on_gpu:
            if prev_gpu:
                runs[-1].append(op)
            else:
                runs.append([op])
        prev_gpu = on_gpu
    return runs


#: How a maximal run of GPU ops becomes calls: ``op``, one call per op (the seed's
#: schedule); ``run``, one call per run.
GROUPINGS: dict[str, Callable[[list[Op]], list[list[Op]]]] = {
    "op": lambda run: [[op] for op in run],
    "run": lambda run: [list(run)],
}


def grouping_fn(grouping: str) -> Callable[[list[Op]], list[list[Op]]]:
    try:
        return GROUPINGS[grouping]
    except KeyError:
        raise ValueError(f"unknown grouping {grouping!r}; choose one of: "
                         f"{', '.join(GROUPINGS)}") from None


def build_schedule(n_layers: int, gpu_kinds: frozenset[str], grouping: str) -> Schedule:
    """The steps of one forward. Linear in the number of ops."""
    group = grouping_fn(grouping)
    ops = forward_ops(n_layers)
    position = {id(op): i for i, op in enumerate(ops)}
    groups: dict[int, list[Op]] = {}  # index of first op -> ops of that call
    for run in gpu_runs(ops, gpu_kinds):
        for g in group(run):
            groups[position[id(g[0])]] = g
    raw: list[Op | list[Op]] = []
    i = 0
    while i < len(ops):
        if i in groups:
            raw.append(groups[i])
            i += len(groups[i])
        else:
            raw.append(ops[i])
            i += 1
    # which step reads each value last
    last_use: dict[str, int] = {}
    for idx, step in enumerate(raw):
        for op in step if isinstance(step, list) else [step]:
            for n in op.inputs:
                last_use[n] = idx
    last_use[RESULT] = len(raw)
    steps: list[Step] = []
    n_calls = 0
    for idx, step in enumerate(raw):
        if not isinstance(step, list):
            steps.append(step)
            continue
        made = [n for op in step for n in op.outputs]
        made_set = set(made)
        inputs = tuple(dict.fromkeys(n for op in step for n in op.inputs if n not in made_set))
        outputs = tuple(n for n in made if last_use.get(n, -1) > idx)
        steps.append(Call(n_calls, tuple(step), inputs, outputs))
        n_calls += 1
    return Schedule(tuple(steps), gpu_kinds, last_use)


def plan_entries(schedule: Schedule, wires: Sequence[CallWire]) -> tuple[PlanEntry, ...]:
    """The plan sent at ``hello``: each call's ops and its (possibly protected) wire."""
    return tuple(PlanEntry(tuple((op.kind, op.layer) for op in call.ops), call.inputs,
                           call.outputs, wire)
                 for call, wire in zip(schedule.calls, wires))
