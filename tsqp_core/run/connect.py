"""Reaching the GPU side: one context manager that starts it (or finds a running one),
connects, says hello and yields a ready :class:`~tsqp_core.tee.pipeline.SplitModel`.

The run and the tests use this one piece of wiring; whatever it started is stopped when the
block ends, however it ends.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from tsqp_core.graph import Op
from tsqp_core.launch import ServerSpec, gpu_side
from tsqp_core.models.source import load_weights
from tsqp_core.protection import PublicWeights, SecureRandom, TeeContext
from tsqp_core.protocol import Hello, HelloReply
from tsqp_core.run.prepare import Prepared
from tsqp_core.schedule import plan_entries
from tsqp_core.tee.client import RemoteError, RemoteGpu
from tsqp_core.tee.pipeline import SplitModel
from tsqp_core.tee.validate import ValueCheck


@dataclass
class Connected:
    model: SplitModel
    #: What the GPU side said it runs (device, dtype, executor options, attention kernel).
    hello: HelloReply
    #: The server object when it runs in this process (``transport=inproc``), else None.
    local_server: Any
    #: The GPU side's process id (this process for inproc; None for server.address).
    server_pid: int | None = None
    #: Where the GPU side listens, and how to tell it died (for a second connection).
    address: str = ""
    watchdog: Any = None


def server_spec(p: Prepared) -> ServerSpec:
    cfg = p.cfg
    # the transport's options as settled for this machine (Transport.fit), not as written
    transport = {"name": cfg.transport.name, "options": p.transport.options.model_dump()}
    return ServerSpec(transport=transport, address=None,
                      model_dir=str(p.model_dir),
                      executor={"name": cfg.executor.name, "options": cfg.executor.options},
                      dtype=cfg.dtype, device=cfg.device, threads=cfg.threads.gpu,
                      max_sessions=cfg.server.max_sessions, tamper=cfg.server.tamper,
                      max_clients=cfg.server.max_clients, idle_s=cfg.server.idle_s,
                      pin_memory=cfg.server.pin_memory)


@contextlib.contextmanager
def connect(p: Prepared, observers: Sequence[Callable[[list, list], None]] = (), *,
            batch: int | None = None, positions: int | None = None) -> Iterator[Connected]:
    """A connected split model. ``observers`` watch every request the GPU side receives and
    its reply, from the hello on (see :meth:`tsqp_core.gpu.server.GpuServer.observe`); they
    need the GPU side in this process (``transport=inproc``). ``batch`` and ``positions``:
    the largest any forward will use, declared at hello (default: the workload's); the GPU
    side refuses calls beyond them."""
    cfg = p.cfg
    batch = int(p.prompt.shape[0]) if batch is None else batch
    positions = p.positions if positions is None else positions
    if observers and not p.transport.in_process:
        raise ValueError("observing the GPU side needs it in this process: transport=inproc")
    tee_kinds = {step.kind for step in p.schedule.steps if isinstance(step, Op)}
    weights = load_weights(p.ckpt, tee_kinds, cfg.torch_dtype)
    with gpu_side(server_spec(p), in_process=p.transport.in_process,
                  external=cfg.server.address,
                  startup_timeout=cfg.server.startup_timeout_s) as side:
        for observer in observers:
            side.server.observe(observer)
        channel = p.transport.connect(side.address, side.watchdog)
        try:
            remote = RemoteGpu(channel, borrowed=p.transport.borrowed_frames,
                               timeout=cfg.server.timeout_s)
            ctx = TeeContext(p.ckpt.dims, cfg.torch_dtype, p.schedule, SecureRandom(),
                             PublicWeights(p.ckpt))
            hello_msg = Hello(fingerprint=p.fingerprint, executor=cfg.executor.name,
                              dtype=cfg.dtype,
                              protection={"name": cfg.protection.name,
                                          "options": dict(cfg.protection.options)},
                              plan=plan_entries(p.schedule, p.wires),
                              batch=batch, positions=positions)
            if side.server is not None:
                # one process: bind first, so the GPU side's setup can reuse what the
                # scheme prepared (public-weight residues)
                p.protection.bind(ctx)
                hello = remote.hello(hello_msg, timeout=cfg.server.startup_timeout_s)
            else:
                # two processes: the TEE binds while the GPU side sets up for the hello
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    binding = pool.submit(p.protection.bind, ctx)
                    try:
                        hello = remote.hello(hello_msg, timeout=cfg.server.startup_timeout_s)
                    finally:
                        binding.result()
            if hello.dims != p.ckpt.dims.__dict__:
                raise RemoteError(f"the GPU side reports model dimensions {hello.dims}, not "
                                  f"this model's {p.ckpt.dims.__dict__}")
            model = SplitModel(schedule=p.schedule, wires=p.wires, dims=p.ckpt.dims,
                               config=p.ckpt.config, weights=weights,
                               tee_impls=p.tee_ops.implementations(), remote=remote,
                               protection=p.protection,
                               check=ValueCheck(cfg.torch_dtype, cfg.server.max_abs_value))
            yield Connected(model, hello, side.server, side.pid, side.address, side.watchdog)
        finally:
            p.protection.close()
            channel.close()
