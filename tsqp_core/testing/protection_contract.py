"""One contract suite, run against every registered protection scheme on every partition
(or against the schemes named in ``TSQP_PROTECTION_NAMES``: ``python -m tsqp_core contract
protection NAME``).

A scheme either refuses a partition before anything starts (naming the ops it cannot
protect) or, on the same prompt:

* reproduces the unprotected run's logits within its declared ``tolerance``;
* reports an exposure that is true of what actually crossed: the GPU side's view is recorded
  (every request and reply, decoded) and compared with an unprotected twin run's -- a value
  said to be seen in plaintext is in the frames bit for bit, a value said to be masked is not;
* draws fresh randomness per call: the same input sent twice never gives the same wire
  tensors, unless the scheme declares itself deterministic (and then it always does).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tsqp_core.attack.view import ViewRecorder
from tsqp_core.graph import value_kind
from tsqp_core.metrics import Meter
from tsqp_core.plugins import get_plugins
from tsqp_core.protection import ProtectionRefused
from tsqp_core.run import connect, prepare
from tsqp_core.tee.pipeline import prefill
from tsqp_core.testing import compose, names

PROTECTIONS = names("protection")
PARTITIONS = get_plugins().partitions.names()
EXECUTORS = [e for e in ("unfused", "fused") if e in get_plugins().executors.names()]
IDS = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(7))


def overrides(protection: str, partition: str, executor: str) -> list[str]:
    return ["model=tiny", "transport=inproc", "threads.tee=1", "threads.gpu=1",
            f"protection.name={protection}", f"partition={partition}", f"executor={executor}"]


def recorded_run(protection: str, partition: str, executor: str, forwards: int = 2
                 ) -> tuple[Any, list[torch.Tensor], ViewRecorder]:
    """``forwards`` prefills of :data:`IDS` (each its own session), and the GPU side's view."""
    p = prepare(compose(*overrides(protection, partition, executor)))
    view = ViewRecorder()
    with connect(p, observers=[view]) as conn:
        logits = [prefill(conn.model, IDS, Meter()) for _ in range(forwards)]
    return p, logits, view


_twins: dict[tuple[str, str], Any] = {}


def twin(partition: str, executor: str) -> tuple[Any, list[torch.Tensor], ViewRecorder]:
    """The unprotected run of the same partition and executor (computed once)."""
    if (partition, executor) not in _twins:
        _twins[partition, executor] = recorded_run("none", partition, executor)
    return _twins[partition, executor]


def _bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def appears(value: torch.Tensor, tensors: list[torch.Tensor]) -> bool:
    """``value``'s bytes occur, as a whole, inside one of ``tensors``."""
    needle = _bytes(value)
    return any(needle in _bytes(t) for t in tensors)


def accepted(protection: str, partition: str, executor: str) -> bool:
    try:
        prepare(compose(*overrides(protection, partition, executor)))
    except ProtectionRefused:
        return False
    return True


CASES = [(pr, pa, ex) for pr in PROTECTIONS for pa in PARTITIONS for ex in EXECUTORS]


@pytest.mark.parametrize("protection,partition,executor", CASES)
def test_reproduces_the_unprotected_logits_or_refuses(protection, partition, executor):
    try:
        p = prepare(compose(*overrides(protection, partition, executor)))
    except ProtectionRefused as exc:
        gpu = get_plugins().partitions.create(
            partition, compose(*overrides("none", partition, executor)).partition.options
        ).gpu_ops()
        assert any(kind in str(exc) for kind in gpu), f"refusal names no op: {exc}"
        return
    _, logits, _ = recorded_run(protection, partition, executor)
    _, plain, _ = twin(partition, executor)
    tol = p.protection.tolerance[p.cfg.dtype]
    for a, b in zip(logits, plain):
        assert (a.float() - b.float()).abs().max().item() <= tol


@pytest.mark.parametrize("protection,partition,executor", CASES)
def test_exposure_is_true_of_what_crossed(protection, partition, executor):
    if not accepted(protection, partition, executor):
        pytest.skip("refused (checked above)")
    p, _, view = recorded_run(protection, partition, executor, forwards=1)
    _, _, plain_view = twin(partition, executor)
    claims = {(e["value"], e["how"]): e["plaintext"] for e in p.schedule.exposure(p.protection)}
    checked = 0
    for mine, plain in zip(view.calls, plain_view.calls):
        assert mine.call == plain.call
        for how, values, wire in (("sent to gpu", plain.inputs, mine.inputs),
                                  ("computed on gpu", plain.outputs, mine.outputs)):
            for name, value in values.items():
                claim = claims[value_kind(name), how]
                if value.numel() == 0 or value_kind(name) == "pos":
                    continue
                assert appears(value, list(wire.values())) == claim, (
                    f"{name} ({how}) is reported {'plaintext' if claim else 'masked'}")
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("protection,partition,executor", CASES)
def test_randomness_is_fresh_per_call(protection, partition, executor):
    if not accepted(protection, partition, executor):
        pytest.skip("refused (checked above)")
    p, _, view = recorded_run(protection, partition, executor, forwards=2)
    calls = len(p.schedule.calls)
    assert len(view.calls) == 2 * calls
    first, second = view.calls[:calls], view.calls[calls:]
    deterministic = type(p.protection).deterministic
    for a, b in zip(first, second):
        for name, t in a.inputs.items():
            same = torch.equal(t, b.inputs[name])
            if deterministic:
                assert same, f"{name}: a deterministic scheme sent the same input differently"
            elif value_kind(name) != "pos":
                assert not same, f"{name}: the same input crossed twice as the same wire tensor"
