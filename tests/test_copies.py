"""Bytes copied per call, counted on each side: one copy per direction.

The GPU side serves over shared memory on a thread of this process, so both sides' counters
can be read. A request's tensors are copied once into the request arena and read in place by
the GPU side: a small request of host tensors by the transport as it writes the message
(views of the tensors are its frames), anything else by the TEE side straight into the arena
(``ClientChannel.reserve``; strided values too). A reply likewise is written once into the
reply arena -- small ones by the GPU side's transport, others by the GPU side itself
(``ServerChannel.reserve``: on a device, the one device-to-host copy) -- and copied once out
of it by the TEE side: a copy the TEE must make anyway, since the GPU side can still write to
that memory, so values are checked and used only from the TEE's own copy."""

from __future__ import annotations

import threading

import pytest
import torch

from tsqp_core import codec

from tsqp_core.gpu.server import GpuServer
from tsqp_core.metrics import Meter
from tsqp_core.models.source import resolve
from tsqp_core.plugins import get_plugins
from tsqp_core.run import connect, prepare
from tsqp_core.tee.pipeline import Session

from conftest import compose

pytestmark = pytest.mark.timeout(300)


def _nbytes(frames) -> list[int]:
    return [memoryview(f).nbytes for f in frames]


@pytest.mark.parametrize("native", [False, True], ids=["python", "native"])
@pytest.mark.parametrize("stage,dtype", [("stage2", "float32"), ("stage3", "bfloat16"),
                                         ("stage1", "float32")])
def test_each_direction_is_copied_once(stage, dtype, native, monkeypatch):
    """Over either path of the shm transport: with its C module, the TEE side's copy out of
    a small reply goes straight into the tensors it keeps (``request_into``); a large one
    (here the 70-token prefill's logits, 70 KiB in bf16) is lent and copied by torch."""
    shm = pytest.importorskip("tsqp_transport_shm")
    if native and shm._native is None:
        pytest.skip("the shm transport's C module was not built")
    option = f"transport.options.native={str(native).lower()}"
    from tsqp_core.tee import client as tee_client

    taken: list[bool] = []
    real_taken = tee_client._taken
    monkeypatch.setattr(tee_client, "_taken",
                        lambda reply, buffers: taken.append(real_taken(reply, buffers))
                        or taken[-1])
    cfg = compose(f"stage={stage}", "model=tiny", "threads.tee=1")
    server = GpuServer(resolve(cfg.model), get_plugins().executors.create(cfg.executor.name),
                       cfg.executor.name, cfg.torch_dtype, torch.device("cpu"))
    seen: list[tuple[list[int], list[int]]] = []
    # bytes each side reserved in its transport's memory, per call (0: none), by call order
    reserved: dict[str, list[int]] = {"tee": [], "gpu": []}
    pending = {"tee": 0, "gpu": 0}

    def observe(req, rep):
        seen.append((_nbytes(req), _nbytes(rep)))
        for side in reserved:
            reserved[side].append(pending[side])
            pending[side] = 0

    def counting(side, reserve):
        def counted(sizes):
            buffers = reserve(sizes)
            pending[side] += sum(sizes) if buffers is not None else 0
            return buffers
        return counted

    server.observe(observe)
    channel = get_plugins().transports.create("shm", {"native": native}).listen()
    channel.reserve = counting("gpu", channel.reserve)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(channel, stop, 0.05), daemon=True)
    thread.start()
    try:
        p = prepare(compose(f"stage={stage}", "model=tiny", f"server.address={channel.address}",
                            "threads.tee=1", option))
        assert p.transport.options.native is native
        with connect(p, batch=1, positions=80) as conn:
            model, remote = conn.model, conn.model.remote
            remote.channel.reserve = counting("tee", remote.channel.reserve)
            session, meter = Session(), Meter()
            ids = torch.randint(0, conn.hello.dims["vocab"], (1, 70))
            # a prefill, then two decode steps
            for tokens in (ids, ids[:, :1], ids[:, 1:2]):
                before_taken = len(taken)
                counts = (remote.channel.copied_bytes, remote.copied_bytes,
                          server.copied_bytes, channel.copied_bytes)
                first = len(seen)
                model.forward(tokens, session, meter, last_only=tokens.shape[1] == 1)
                calls = seen[first:]
                assert len(calls) == len(model.schedule.calls)
                request_tensors = sum(sum(req[1:]) for req, _ in calls)
                request_headers = sum(req[0] for req, _ in calls)
                reply_tensors = sum(sum(rep[1:]) for _, rep in calls)
                reply_headers = sum(rep[0] for _, rep in calls)
                assert reply_tensors > 0
                tee_transport, tee_own, gpu_own, gpu_transport = (
                    now - then for now, then in zip(
                        (remote.channel.copied_bytes, remote.copied_bytes,
                         server.copied_bytes, channel.copied_bytes), counts))
                by_tee, by_gpu = (sum(reserved[side][first:]) for side in ("tee", "gpu"))
                # request: tensors once into the arena -- by the TEE side where it reserved
                # them, else by its transport with the header
                assert tee_transport == request_headers + request_tensors - by_tee
                # reply: once into the arena, likewise; once out of it by the TEE side
                assert gpu_transport == reply_headers + reply_tensors - by_gpu
                assert gpu_own == by_gpu
                assert tee_own == by_tee + reply_tensors
                # reserved: every large message (and strided values: stage1's rotated
                # queries and keys); a small one of host tensors goes as views
                assert by_tee >= sum(sum(req[1:]) for req, _ in calls
                                     if sum(req[1:]) > codec.SMALL_COPY)
                assert by_gpu == sum(sum(rep[1:]) for _, rep in calls
                                     if sum(rep[1:]) > codec.SMALL_COPY)
                if tokens.shape[1] == 70:
                    assert by_gpu  # the logits: 70 KiB and more
                    # stage1's rotated queries and keys are strided [B, H, T, d] views
                    assert bool(by_tee) == (stage == "stage1")
                else:  # a decode step: every request small and contiguous
                    assert by_tee == 0
                large = sum(sum(rep[1:]) > codec.SMALL_COPY for _, rep in calls)
                assert (large > 0) == (tokens.shape[1] == 70)  # the prefill's logits at least
                assert len(taken) - before_taken == len(calls) - large
            model.end(session)
        assert taken and all(t is native for t in taken)  # native: the reply copied into ours
    finally:
        stop.set()
        thread.join(10)
        channel.close()
