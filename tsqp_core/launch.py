"""Starting and stopping the GPU side for a run.

``run`` starts the server itself -- a child process for real transports, a thread for
``inproc`` -- and always stops it: on a normal end, an error or Ctrl-C, the child is
terminated, killed if it lingers, and reaped. With ``server.address`` set, the run uses a
server someone else started (``python -m tsqp_core serve``) and leaves it alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tsqp_core.transport import Watchdog

READY = "tsqp-ready "
#: How long a child gets to stop after SIGTERM before SIGKILL: after a clean run, and after
#: a failure (a stuck GPU side must not add seconds to an error already reported).
STOP_GRACE_S, STOP_GRACE_AFTER_FAILURE_S = 5.0, 1.0


@dataclass(frozen=True)
class ServerSpec:
    """Everything the GPU-side process needs, passed to it as JSON."""

    transport: dict[str, Any]
    address: str | None
    model_dir: str
    executor: dict[str, Any]
    dtype: str
    device: str
    threads: int
    max_sessions: int
    #: ``server.tamper``: corrupt replies on purpose (tests, demonstrations), or None.
    tamper: dict[str, Any] | None = None
    max_clients: int = 8
    idle_s: float = 600.0
    pin_memory: bool = True

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def build_server(spec: ServerSpec):
    """Construct the server and open its channel (in whatever process calls this)."""
    from tsqp_core.config import DTYPES, resolve_device
    from tsqp_core.plugins import get_plugins
    from tsqp_core.gpu.server import GpuServer

    plugins = get_plugins()
    transport = plugins.transports.create(spec.transport["name"], spec.transport.get("options"))
    executor = plugins.executors.create(spec.executor["name"], spec.executor.get("options"))
    from tsqp_core.gpu.tamper import Tamper

    server = GpuServer(Path(spec.model_dir), executor, spec.executor["name"], DTYPES[spec.dtype],
                       resolve_device(spec.device), spec.max_sessions,
                       Tamper(**spec.tamper) if spec.tamper is not None else None,
                       spec.max_clients, spec.idle_s, spec.pin_memory)
    return server, transport.listen(spec.address)


def child_main(spec_json: str) -> int:
    """Entry of the spawned GPU-side process: serve until terminated."""
    import torch

    from tsqp_core.gpu.server import serve_forever

    spec = ServerSpec(**json.loads(spec_json))
    _exit_with_parent()
    torch.set_num_threads(spec.threads)
    server, channel = build_server(spec)

    def ready(address: str) -> None:
        print(READY + json.dumps({"address": address, "pid": os.getpid()}), flush=True)

    serve_forever(server, channel, ready)
    return 0


def _exit_with_parent(poll_s: float = 0.5) -> None:
    """SIGTERM ourselves (a clean stop) once the run that started us is gone without stopping
    us -- killed with SIGKILL, or a sweep worker torn down: an orphaned GPU side would keep
    its memory, sockets and shared memory for good."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="tsqp-parent-watch").start()


class ServerStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class GpuSide:
    """A ready GPU side: where to reach it, how to tell it died, and the server object when
    it lives in this process (``inproc``)."""

    address: str
    watchdog: Watchdog | None
    server: Any = None
    #: The GPU side's process id: this one for ``inproc``, the child's, or None (external).
    pid: int | None = None


@contextlib.contextmanager
def gpu_side(spec: ServerSpec, *, in_process: bool, external: str | None,
             startup_timeout: float) -> Iterator[GpuSide]:
    """Yields a ready :class:`GpuSide`; stops what it started."""
    if external:
        yield GpuSide(external, None)
        return
    if in_process:
        server, channel = build_server(spec)
        stop = threading.Event()
        thread = threading.Thread(target=server.serve, args=(channel, stop), daemon=True,
                                  name="tsqp-gpu-side")
        thread.start()
        try:
            yield GpuSide(channel.address,
                          lambda: None if thread.is_alive() else "GPU-side thread ended", server,
                          os.getpid())
        finally:
            stop.set()
            thread.join(timeout=5)
            channel.close()
        return
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               THP_MEM_ALLOC_ENABLE=os.environ.get("THP_MEM_ALLOC_ENABLE", "1"),
               OMP_NUM_THREADS=str(spec.threads))
    with spawn_ready([sys.executable, "-m", "tsqp_core", "_child", spec.to_json()], env,
                     startup_timeout, "GPU server") as (address, watchdog, proc):
        yield GpuSide(address, watchdog, pid=proc.pid)


@contextlib.contextmanager
def spawn_ready(argv: list[str], env: dict[str, str], startup_timeout: float,
                what: str) -> Iterator[tuple[str, Watchdog, subprocess.Popen]]:
    """Start a child that prints ``READY {"address": ...}`` when it serves; yields
    ``(address, watchdog, process)`` and always stops and reaps it."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                            text=True)
    grace = STOP_GRACE_S
    try:
        address = _wait_ready(proc, startup_timeout, what)

        def watchdog() -> str | None:
            code = proc.poll()
            return None if code is None else f"{what} process exited with code {code}"

        yield address, watchdog, proc
    except BaseException:
        grace = STOP_GRACE_AFTER_FAILURE_S  # it may be stuck: the failure is reported already
        raise
    finally:
        stop_process(proc, grace)


def _wait_ready(proc: subprocess.Popen, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServerStartError(f"{what} did not become ready within {timeout:g} s")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
        if ready:
            line = proc.stdout.readline()
            if line.startswith(READY):
                return json.loads(line[len(READY):])["address"]
            if line:
                sys.stdout.write(line)
                continue
        if proc.poll() is not None:
            raise ServerStartError(f"{what} exited with code {proc.returncode} before it "
                                   "was ready (its messages are above)")


def stop_process(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """Terminate, then kill, and always reap."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()
