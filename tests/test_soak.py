"""Memory and descriptors stay flat over many calls (a short :mod:`tsqp_core.soak`), what a
generation keeps owns its memory, and a failure is cleaned up in about a second -- not
another full timeout."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from tsqp_core.launch import STOP_GRACE_AFTER_FAILURE_S, spawn_ready
from tsqp_core.metrics import Meter
from tsqp_core.run import connect, prepare
from tsqp_core.soak import soak
from tsqp_core.tee import pipeline
from tsqp_core.tee.pipeline import generate, open_session
from tsqp_core.tee.sampling import Sampler, Sampling

from conftest import compose


def test_a_short_soak_is_flat():
    """The soak command itself, briefly (the 100,000-call figures: README)."""
    res = soak("tcp", calls=2000, warmup=600, new_tokens=8, extra=[], progress=False)
    assert res["calls"] >= 2000
    assert abs(res["tee_rss_growth"]) < 5 * 2**20, res
    assert abs(res["gpu_rss_growth"]) < 5 * 2**20, res
    assert res["tee_fds_growth"] == 0 and res["gpu_fds_growth"] == 0, res


def test_the_logits_a_generation_keeps_are_copies():
    """Views of a reply's buffer would pin it (on tcp: a zmq receive buffer per token)."""
    p = prepare(compose("model=tiny", "transport=inproc", "threads.tee=1"))
    with connect(p, batch=1, positions=16) as conn:
        gen = generate(conn.model, p.prompt[:, :4], 4, Sampler(Sampling()), Meter())
    for logits in gen.step_logits:
        assert logits._base is None and logits.is_contiguous()
        assert logits.untyped_storage().nbytes() == logits.numel() * logits.element_size()


def test_ending_a_session_after_a_failure_waits_briefly():
    class Model:
        def __init__(self):
            self.timeouts = []

        def end(self, session, timeout=None):
            self.timeouts.append(timeout)

    model = Model()
    with open_session(model):
        pass
    with pytest.raises(RuntimeError):
        with open_session(model):
            raise RuntimeError("a call timed out")
    assert model.timeouts == [None, pipeline.END_AFTER_FAILURE_S]


STUCK = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print('tsqp-ready {"address": "stuck://"}', flush=True)
time.sleep(120)
"""


def test_a_stuck_child_is_killed_soon_after_a_failure():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        with spawn_ready([sys.executable, "-c", STUCK], {}, 60, "stuck") as (_, _, proc):
            raise RuntimeError("the run failed")
    assert proc.returncode == -9
    assert time.monotonic() - t0 < STOP_GRACE_AFTER_FAILURE_S + 4  # not the 5 s grace
