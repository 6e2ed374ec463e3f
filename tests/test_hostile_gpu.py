"""A hostile GPU side: every lie of ``server.tamper`` ends the run with its own clear error.

The fast half runs the tiny model in this process (``transport=inproc``) and checks the
exception and its words; the slow half runs ``python -m tsqp_core run`` against a lying GPU
side in a child process (tcp and shm), and checks the exit code (never 0), the one-line
message and that no traceback and no escape code reaches the terminal.

Under ``protection=none`` a lie that is finite and plausible (``element``, ``zero``) cannot be
told from an honest reply -- that is what protection is for -- so those two run under
``otp``, whose checks catch them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest
import torch

from tsqp_core.protection import IntegrityError
from tsqp_core.run.bench import max_abs_diff
from tsqp_core.tee.client import RemoteError
from tsqp_core.tee.validate import ValueCheck

OTP = ("partition=linears", "protection=otp")

#: lie -> (extra overrides, the error, words its message must hold)
IN_PROCESS = {
    "nan": ((), IntegrityError, ["call 97 (lm_head)", "'logits'", "1 NaN"]),
    "inf": ((), IntegrityError, ["'logits'", "1 infinite"]),
    "huge": ((), IntegrityError, ["|value| up to 1e+30", "server.max_abs_value"]),
    "timing": ((), RemoteError, ["call lm_head: bad timings [", ", 1000000000000000, "]),
    "error": ((), RemoteError, ["GPU side refused lm_head", "[truncated]"]),
    "oversize": ((), RemoteError, ["reply to lm_head has 16779", "the plan allows; not read"]),
    "no_plan_id": ((), RemoteError, ["malformed hello reply", "'plan_id'"]),
    "dims": ((), RemoteError, ["reports model dimensions", "'hidden': 128"]),
    "element": (OTP, IntegrityError, ["failed an integrity check"]),
    "zero": (OTP, IntegrityError, ["failed an integrity check"]),
}


@pytest.mark.parametrize("what", IN_PROCESS, ids=IN_PROCESS)
def test_every_lie_is_a_clear_error(run_tiny, what):
    overrides, error, words = IN_PROCESS[what]
    call = 64 if overrides == OTP else 97  # the last call: lm_head
    with pytest.raises(error) as exc:
        run_tiny("transport=inproc", "workload=generate", "workload.new_tokens=2",
                 "workload.prompt_tokens=8", *overrides,
                 f"server.tamper={{what:{what},call:{call}}}")
    message = str(exc.value)
    for w in words:
        assert w in message, message
    assert "\x1b" not in message and "\x07" not in message


def test_the_tamper_leaves_other_calls_honest(run_tiny):
    """The control: a lie aimed at a call the run never makes changes nothing."""
    res = run_tiny("transport=inproc", "workload=generate", "workload.new_tokens=2",
                   "workload.prompt_tokens=8", "server.tamper={what:nan,call:500}")
    assert len(res["tokens"][0]) == 2


def test_value_check_bounds():
    from tsqp_core.protection import CallSite

    class _Call:
        index, method = 3, "o_proj"

    site = CallSite(_Call(), None, 1, 1, 0, 1, 1, False, {})  # type: ignore[arg-type]
    check = ValueCheck(torch.float32)
    check.check(site, {"x": torch.full((4,), 1e5), "ids": torch.tensor([1 << 40])})
    for bad in (float("nan"), float("inf"), -float("inf"), 1e30, -2.0**25):
        t = torch.zeros(8)
        t[5] = bad
        with pytest.raises(IntegrityError, match=r"call 3 \(o_proj\)"):
            check.check(site, {"x": t})
    assert ValueCheck(torch.float16).max_abs == 65504.0
    assert ValueCheck(torch.float32, 10.0).max_abs == 10.0
    with pytest.raises(IntegrityError, match="beyond the 10"):
        ValueCheck(torch.float32, 10.0).check(site, {"x": torch.tensor([11.0])})


def _torch_answer(t: torch.Tensor, limit: float) -> bool:
    lo, hi = torch.aminmax(t.float())
    return -limit <= float(lo) and float(hi) <= limit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_c_value_check_answers_as_torch_does(dtype):
    """``_bounds.within`` against aminmax and double comparisons: NaN, infinities, values at,
    just above and just below the limit (limits a float cannot hold included), subnormals,
    negative zero, a bad value at every position of a vectorised loop's tail."""
    validate = pytest.importorskip("tsqp_core.tee.validate")
    if validate._bounds is None:
        pytest.skip("tsqp_core.tee._bounds was not built")
    within, kind = validate._bounds.within, validate._KINDS[dtype]
    gen = torch.Generator().manual_seed(7)
    limits = [2.0**24, 65504.0, 10.0, 100000.1, 1e-3, 3.4e38, 1e300]
    specials = [float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3e38, -3e38]
    cases = 0
    for limit in limits:
        near = [limit, -limit, math.nextafter(limit, 0), math.nextafter(limit, math.inf),
                -math.nextafter(limit, math.inf)]
        for n in (1, 3, 8, 17, 64, 1000):
            base = (torch.randn(n, generator=gen) * min(limit, 1e6) / 10).to(dtype)
            for bad in [None, *specials, *near]:
                for at in ((0, n // 2, n - 1) if bad is not None else (None,)):
                    t = base.clone()
                    if at is not None:  # beyond the dtype's range: an infinity
                        t[at] = torch.tensor(bad, dtype=torch.float64)
                    want = _torch_answer(t, limit)
                    assert within(t.data_ptr(), t.numel(), kind, limit) is want, (
                        limit, n, bad, at, dtype)
                    cases += 1
    assert cases > 1000
    for args in ((0, 1, kind, 1.0), (1, -1, kind, 1.0), (1, 1, 2, 1.0), (1, 1, kind, 0.0),
                 (1, 1, kind, math.inf), (1, 1, kind, math.nan)):
        with pytest.raises(ValueError):
            within(*args)


def test_the_value_check_takes_the_same_decisions_on_either_path(monkeypatch):
    """ValueCheck with and without its C loop: small, strided, large (torch's aminmax on
    every thread) and float16 (no C loop) values, honest and lying."""
    from tsqp_core.protection import CallSite
    from tsqp_core.tee import validate

    class _Call:
        index, method = 3, "o_proj"

    site = CallSite(_Call(), None, 1, 1, 0, 1, 1, False, {})  # type: ignore[arg-type]
    values = {"small": torch.randn(1, 1, 64), "strided": torch.randn(8, 64).t(),
              "large": torch.randn(64, 1024), "bf16": torch.randn(1, 1, 64).bfloat16(),
              "half": torch.randn(1, 1, 64).half()}

    def decisions() -> list[str]:
        out = []
        check = validate.ValueCheck(torch.float32, 1000.0)
        for name, t in values.items():
            for bad in (None, float("nan"), 2000.0, -1e30):
                v = t.clone()  # keeps the strides
                if bad is not None:
                    v[(-1,) * v.dim()] = bad
                try:
                    check.check(site, {name: v})
                    out.append("ok")
                except IntegrityError as exc:
                    out.append(str(exc))
        return out

    fast = decisions()
    monkeypatch.setattr(validate, "_bounds", None)
    assert decisions() == fast
    assert fast.count("ok") == len(values)  # only the honest ones pass
    assert not values["strided"].is_contiguous()


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI installs with a C compiler")
def test_ci_builds_the_value_checks_c_loop():
    """``make setup`` builds ``tsqp_core.tee._bounds`` where a compiler is at hand, as CI's
    is: a silently skipped build would leave only the torch path tested."""
    from tsqp_core.tee import validate

    assert validate._bounds is not None


def test_a_nan_never_compares_as_equal():
    """Python's ``max(0.0, nan)`` is 0.0: the reference check must not inherit that."""
    a = torch.tensor([[1.0, 2.0]])
    assert max_abs_diff(a, a.clone()) == 0.0
    for bad in (float("nan"), float("inf")):
        b = a.clone()
        b[0, 1] = bad
        assert max_abs_diff(a, b) == math.inf and max_abs_diff(b, a) == math.inf
        assert max(0.0, max_abs_diff(a, b)) == math.inf


def test_a_hostile_server_description_is_cleaned():
    from tsqp_core.codec import ProtocolError
    from tsqp_core.protocol import HelloReply

    r = HelloReply.parse({"plan_id": "0123456789abcdef", "dims": {"hidden": 64},
                          "server": {"attention": "\x1b[2Jeager" + "x" * 500,
                                     "nested": {"a": ["\x07", 1, 2.5, None]}}})
    assert r.server["attention"].startswith("?[2Jeager") and len(r.server["attention"]) < 220
    assert r.server["nested"]["a"][0] == "?"
    ok = "0123456789abcdef"
    for bad in ({"plan_id": "a\x1bb", "dims": {}, "server": {}},
                {"plan_id": "0123456789abcdeg", "dims": {}, "server": {}},
                {"plan_id": ok + "0", "dims": {}, "server": {}},
                {"plan_id": ok, "dims": {"hidden": "64"}, "server": {}},
                {"plan_id": ok, "dims": {}, "server": {"x": b"bytes"}},
                {"plan_id": ok, "dims": {}, "server": {"x": [[[[[[1]]]]]]}}):
        with pytest.raises(ProtocolError):
            HelloReply.parse(bad)


# --- the CLI against a lying child process ---------------------------------------------------

ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")

#: (transport, lie, exit code, words on stderr)
CLI = [
    ("tcp", "nan", 3, ["integrity check failed", "1 NaN"]),
    ("shm", "stall", 1, ["no reply from", "within 3 s"]),
]  # error text and the rest: in process above; a GPU side that dies: tests/test_signals.py


@pytest.mark.slow
@pytest.mark.parametrize("transport,what,code,words", CLI,
                         ids=[f"{t}-{w}" for t, w, *_ in CLI])
def test_the_cli_exits_non_zero_with_one_clear_line(tmp_path, transport, what, code, words):
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "tsqp_core", "run", "model=tiny", f"transport={transport}",
         "workload=generate", "workload.new_tokens=2", "workload.prompt_tokens=8",
         "threads.tee=1", "threads.gpu=1", "server.timeout_s=3",
         f"server.tamper={{what:{what},call:50}}", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, env=ENV)
    elapsed = time.monotonic() - t0
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr and "\x1b" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("tsqp:")]
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert len(lines[0]) < 3000
    if what == "stall":  # the timeout, then a brief cleanup: not a second timeout
        assert elapsed < 60, elapsed
