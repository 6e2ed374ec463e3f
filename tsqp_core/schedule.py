"""From partition + executor to the steps of one forward: TEE ops and GPU calls.

A call's *inputs* are the values its ops read that were made outside it (they cross to the
GPU side); its *outputs* are the values it makes that a later step, or the caller, reads
(they cross back). Everything else stays on the GPU side for the duration of the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from tsqp_core.graph import DESCRIPTIONS, Op, forward_ops, value_kind

RESULT = "logits"


@dataclass(frozen=True)
class Call:
    index: int
    ops: tuple[Op, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def method(self) -> str:
        """The name calls are reported under: the op kind, or ``first..last`` of a run."""
        first, last = self.ops[0].kind, self.ops[-1].kind
        return first if len(self.ops) == 1 else f"{first}..{last}"

    def to_wire(self) -> list:
        return [[[op.kind, op.layer] for op in self.ops], list(self.inputs), list(self.outputs)]


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

    def wire_plan(self) -> list:
        return [c.to_wire() for c in self.calls]

    def exposure(self, plaintext: Callable[[str], bool]) -> list[dict]:
        """What reaches the GPU side, per value kind: sent to it, or computed there."""
        seen: dict[tuple, dict] = {}
        for call in self.calls:
            readers = {n: op for op in call.ops for n in op.inputs}
            for name in call.inputs:
                kind = value_kind(name)
                key = (kind, readers[name].kind, "sent")
                seen.setdefault(key, {
                    "tensor": DESCRIPTIONS.get(kind, kind), "value": kind,
                    "op": readers[name].kind, "how": "sent to gpu",
                    "plaintext": plaintext(name), "layers": 0})["layers"] += 1
            for op in call.ops:
                for name in op.outputs:
                    kind = value_kind(name)
                    key = (kind, op.kind, "computed")
                    seen.setdefault(key, {
                        "tensor": DESCRIPTIONS.get(kind, kind), "value": kind, "op": op.kind,
                        "how": "computed on gpu", "plaintext": True, "layers": 0})["layers"] += 1
        return list(seen.values())


Grouping = Callable[[list[Op]], list[list[Op]]]


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


def build_schedule(n_layers: int, gpu_kinds: frozenset[str], group: Grouping) -> Schedule:
    ops = forward_ops(n_layers)
    groups: dict[int, list[Op]] = {}  # index of first op -> ops of that call
    for run in gpu_runs(ops, gpu_kinds):
        for g in group(run):
            groups[ops.index(g[0])] = g
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
        inputs = tuple(dict.fromkeys(n for op in step for n in op.inputs if n not in made))
        outputs = tuple(n for n in made if last_use.get(n, -1) > idx)
        steps.append(Call(n_calls, tuple(step), inputs, outputs))
        n_calls += 1
    return Schedule(tuple(steps), gpu_kinds, last_use)
