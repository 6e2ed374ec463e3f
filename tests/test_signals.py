"""The kill/signal matrix: SIGINT, SIGTERM and SIGKILL, to the run (TEE side) and to the
GPU-side child it started, mid-generation, on every out-of-process transport.

Whatever is killed and however, afterwards: no process of ours is left, nothing of ours is
named in ``/dev/shm``, no traceback was printed, the run's exit is non-zero and, where the
run lived to say so, one line says why (130 interrupted, 143 terminated, 1 the GPU side
died). Cases run four at a time to keep the suite short."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tsqp_core.plugins import get_plugins

from conftest import shm_names

ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
TRANSPORTS = [n for n in get_plugins().transports.names()
              if not get_plugins().transports.get(n).in_process]
SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "KILL": signal.SIGKILL}
#: (transport, victim, signal); ``group`` is a terminal's Ctrl-C: the whole process group.
#: The GPU side handles SIGINT and SIGTERM with one handler (serve_forever): TERM stands for
#: both there.
CASES = ([(t, "run", sig) for t in TRANSPORTS for sig in SIGNALS]
         + [(t, "server", sig) for t in TRANSPORTS for sig in ("TERM", "KILL")]
         + [("shm", "group", "INT")] * ("shm" in TRANSPORTS))


#: The runs start as from a terminal: SIGINT and SIGTERM at their default disposition. In the
#: full suite (never alone) runs went on generating 120 s after SIGINT with SIGINT merely
#: pending, and unblocking the mask in the run did not end it: the likely cause is the pytest
#: process handing SIG_IGN down (a program started with SIGINT ignored keeps ignoring it, as
#: it must); what set it was not found, and a failure prints the run's SigIgn/SigBlk. The
#: mask is left as inherited: ``python -m tsqp_core`` unblocks SIGINT and SIGTERM itself
#: (the last test here).
AS_FROM_A_TERMINAL = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "signal.signal(signal.SIGTERM, signal.SIG_DFL); "
                      "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def run_command(*overrides: str) -> list[str]:
    return [sys.executable, "-c", AS_FROM_A_TERMINAL, "-m", "tsqp_core", "run", "model=tiny",
            "workload=generate", "workload.new_tokens=3000", "prompt=null", "threads.tee=1",
            "threads.gpu=1", *overrides]


def signal_state(pid: int) -> str:
    """The kernel's view of ``pid``'s ignored and blocked signals (for failure messages)."""
    try:
        lines = open(f"/proc/{pid}/status").read().splitlines()
    except OSError:
        return "gone"
    return " ".join(line.replace("\t", "") for line in lines if line.startswith(("SigIgn",
                                                                                  "SigBlk")))


def ours_in_dev_shm() -> set[str]:
    return shm_names()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _connected(pid: int) -> bool:
    """The GPU side has a client: an established TCP connection or a mapped shm segment."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    if any(link.startswith("/memfd:tsqp-") for link in links):
        return True
    inodes = {link[8:-1] for link in links if link.startswith("socket:[")}
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "01" and cols[9] in inodes:  # ESTABLISHED, one of its sockets
                return True
    return False


def one_case(transport: str, victim: str, sig: str, tmp: Path) -> dict:
    run = subprocess.Popen(
        run_command(f"transport={transport}", f"hydra.run.dir={tmp}"), env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    child = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and run.poll() is None:
            kids = _children(run.pid)
            if kids and _connected(kids[0]):
                child = kids[0]
                break
            time.sleep(0.2)
        assert child is not None, "the run never got its GPU side connected"
        time.sleep(1.0)  # well into generating
        if victim == "group":
            os.killpg(run.pid, SIGNALS[sig])
        else:
            os.kill(run.pid if victim == "run" else child, SIGNALS[sig])
        try:
            _, err = run.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            # where is it? (python -m tsqp_core prints its stacks on SIGUSR1)
            state = signal_state(run.pid)
            os.kill(run.pid, signal.SIGUSR1)
            time.sleep(2)
            os.killpg(run.pid, signal.SIGKILL)
            _, err = run.communicate()
            raise AssertionError(f"{transport}: SIG{sig} to the {victim}: still running "
                                 f"120 s later ({state}); its stacks:\n{err[-6000:]}"
                                 ) from None
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    deadline = time.monotonic() + 10  # an orphaned GPU side stops itself within a second
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    try:
        os.kill(child, 0)
        left = True
    except ProcessLookupError:
        left = False
    return {"rc": run.returncode, "err": err, "child_left": left}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_no_signal_leaves_anything_behind(tmp_path):
    before = ours_in_dev_shm()
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(one_case, *case, tmp_path / "-".join(case))
                   for case in CASES}
        results = {case: f.result() for case, f in futures.items()}
    time.sleep(1)
    assert ours_in_dev_shm() - before == set(), "a name was left in /dev/shm"
    expect = {("run", "INT"): (130, "tsqp: interrupted"), ("run", "TERM"): (143, "tsqp: terminated"),
              ("run", "KILL"): (-9, None), ("group", "INT"): (130, "tsqp: interrupted")}
    for (transport, victim, sig), r in results.items():
        where = f"{transport}: SIGKILL" if sig == "KILL" else f"{transport}: SIG{sig}"
        where += f" to the {victim}: rc {r['rc']}, stderr {r['err']!r:.600}"
        assert not r["child_left"], where
        assert "Traceback" not in r["err"], where
        assert r["rc"] != 0, where
        lines = [line for line in r["err"].splitlines() if line.startswith("tsqp:")]
        if victim in ("run", "group"):
            code, line = expect[victim, sig]
            assert r["rc"] == code, where
            assert lines == ([line] if line else []), where
        else:
            assert r["rc"] == 1, where
            assert len(lines) == 1 and lines[0].startswith("tsqp: run failed:"), where
            assert ("GPU server process exited with code" in lines[0]
                    or "the server closed the connection" in lines[0]), where


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_run_started_with_the_signals_blocked_still_stops_on_them(tmp_path):
    """A parent that spawns the run from a thread with SIGINT and SIGTERM blocked (a test
    runner's worker thread can be one) hands that mask down: the run unblocks them, or Ctrl-C
    would pend forever while it goes on generating."""
    import threading

    started: dict[str, subprocess.Popen] = {}

    def spawn() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        started["run"] = subprocess.Popen(
            run_command("transport=shm", f"hydra.run.dir={tmp_path}"), env=ENV,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)

    thread = threading.Thread(target=spawn)
    thread.start()
    thread.join()
    run = started["run"]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            kids = _children(run.pid)
            if kids and _connected(kids[0]):
                break
            time.sleep(0.2)
        time.sleep(1.0)
        state = signal_state(run.pid)
        os.kill(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the run did not stop on SIGINT ({state})") from None
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 130, err
    assert "tsqp: interrupted" in err
