"""The GPU side under a bounded, seeded, structure-aware fuzz (:mod:`tsqp_core.fuzz`): no
crash, no hang, no reply that breaks the protocol, no refusal from the server's catch-all
(a check missing somewhere), and honest work still done at the end. The long campaign is
``python -m tsqp_core fuzz --messages 100000`` (README, security notes)."""

from __future__ import annotations

import pytest

from tsqp_core.fuzz import campaign


def assert_clean(out) -> None:
    report = out.report()
    assert out.sent > 0 and out.ok > 0 and out.refused > 0, report
    assert out.crashes == 0 and out.hangs == 0, report
    assert out.bad_replies == [] and out.unexpected == [], report
    assert out.final_check == "ok", report


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_fuzz_the_server_in_process(seed):
    assert_clean(campaign(1500, seed, "direct", warmup=500))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["tcp", "shm"])
def test_fuzz_the_server_through_a_transport(target):
    out = campaign(1000, 21, target, timeout=30, warmup=300)
    assert_clean(out)
    assert out.memory["process"] == "server"
