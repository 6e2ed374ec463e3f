"""The transport contract (:mod:`tsqp_core.transport`), checked for every registered transport.

Each test runs once per name in the transport registry (or per name in
``TSQP_TRANSPORT_NAMES``: ``python -m tsqp_core contract transport NAME`` runs this suite
against one installed plugin), so a third-party transport is held to the same contract as
the built-ins. The server is the echo server
of :mod:`tsqp_core.bench_transport`: on a thread of this process (channels are plain objects),
and for out-of-process transports also in a child process, for a real cross-process round
trip and a ``kill -9`` of either side. Nothing here asserts a timing beyond "no hang".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack
import numpy
import pytest
import torch

from tsqp_core import codec
from tsqp_core.bench_transport import EchoServer, echo_process
from tsqp_core.plugins import get_plugins
from tsqp_core.testing import names, shm_names
from tsqp_core.transport import (ClientChannel, MessageTooLarge, PeerDead, PeerTimeout,
                                 ServerChannel, Transport, TransportError)

NAMES = names("transport")


def _ours() -> set[str]:
    """What tsqp transports have named in /dev/shm (see :func:`tsqp_core.testing.shm_names`)."""
    return shm_names()


@pytest.fixture(autouse=True)
def nothing_left_in_dev_shm():
    before = _ours()
    yield
    assert _ours() - before == set(), "a transport left names in /dev/shm"


@pytest.fixture(params=NAMES)
def transport(request) -> Transport:
    return get_plugins().transports.create(request.param)


class ThreadServer:
    """An echo server on a thread of this process."""

    def __init__(self, transport: Transport, address: str | None = None) -> None:
        self.channel = transport.listen(address)
        self.address = self.channel.address
        self._stop = threading.Event()
        self.thread = threading.Thread(target=EchoServer("codec").serve,
                                       args=(self.channel, self._stop, 0.02), daemon=True)
        self.thread.start()

    def watchdog(self) -> str | None:
        return None if self.thread.is_alive() else "echo thread ended"

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the server loop did not stop"
        self.channel.close()


@pytest.fixture
def server(transport):
    srv = ThreadServer(transport)
    yield srv
    srv.stop()


@pytest.fixture
def client(transport, server):
    channel = transport.connect(server.address, server.watchdog)
    yield channel
    channel.close()


_ids = iter(range(1, 1 << 62))


def call(channel: ClientChannel, tensors: dict[str, torch.Tensor] | None = None,
         timeout: float | None = 30, **header: Any) -> codec.Message:
    """One codec round trip; the reply must answer this request and say ok."""
    req_id = next(_ids)
    frames = codec.encode(codec.Message({"id": req_id, **header}, tensors or {}))
    reply = codec.decode(channel.request(frames, timeout), copy=True)
    assert reply.header["id"] == req_id
    assert reply.header["ok"] is True, reply.header
    return reply


def assert_same(got: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(sent)
    for name, t in sent.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_round_trip_keeps_dtype_shape_and_bits(client, dtype):
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.int64:
        t = torch.randint(-(2**62), 2**62, (3, 5, 7), generator=gen)
    else:
        t = (torch.randn(3, 5, 7, generator=gen) * 1e3).to(dtype)
    sent = {"x": t, "y": t[1:, ::2].contiguous()}
    assert_same(call(client, sent).tensors, sent)


@pytest.mark.parametrize("shape", [(0,), (3, 0, 4), (1,), (1, 1, 1), ()],
                         ids=["empty", "empty-3d", "one", "one-3d", "scalar"])
def test_empty_and_one_element_tensors(client, shape):
    sent = {"a": torch.full(shape, 7.5), "b": torch.ones(shape, dtype=torch.int64)}
    assert_same(call(client, sent).tensors, sent)


def test_frames_are_any_contiguous_buffers(client):
    """A call's tensors leave as numpy arrays of their own shape and dtype
    (:func:`codec.tensor_frames`), not flat bytes: a transport takes any C-contiguous buffer
    and carries its bytes (``memoryview(frame).cast("B")``; ``len(frame)`` is not its size)."""
    sent = {"a": torch.randn(3, 5, 7), "b": torch.randn(2, 9).to(torch.bfloat16),
            "c": torch.tensor(4.25), "d": torch.arange(6, dtype=torch.int64).view(2, 3),
            "e": torch.empty(0, 4)}
    buffers = [codec.tensor_array(t) for t in sent.values()]
    buffers[-1] = numpy.empty((0, 4), numpy.float32)  # zero-sized, not flat
    req_id = next(_ids)
    frames = codec.pack({"id": req_id}, codec.describe(sent), buffers)
    assert any(memoryview(f).ndim > 1 for f in frames[1:])
    reply = codec.decode(client.request(frames, 30), copy=True)
    assert reply.header["id"] == req_id and reply.header["ok"] is True, reply.header
    assert_same(reply.tensors, sent)


def test_a_64_mb_tensor(client):
    t = torch.arange(16 << 20, dtype=torch.float32)  # 64 MiB
    sent = {"big": t, "small": torch.tensor([1.0, 2.0])}
    got = call(client, sent, timeout=120).tensors
    assert_same(got, sent)


def test_many_tensors_in_one_message(client):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
    sent = {f"t{i}": torch.arange(i % 17, dtype=torch.float32).to(dtypes[i % 4]).reshape(-1, 1)
            for i in range(300)}
    assert_same(call(client, sent).tensors, sent)


def test_thousands_of_sequential_calls(client):
    x = torch.zeros(16)
    for i in range(3000):
        x[0] = i
        got = call(client, {"x": x}, step=i)
        assert got.header["step"] == i and got.tensors["x"][0].item() == i


def test_borrowed_frames_are_only_valid_until_the_next_request(transport, client):
    """Callers that keep a reply copy it (``decode(copy=True)``); the copy survives."""
    first = call(client, {"x": torch.full((1024,), 1.0)}).tensors["x"]
    call(client, {"x": torch.full((1024,), 2.0)})
    assert torch.equal(first, torch.full((1024,), 1.0))


# --- malformed messages ---------------------------------------------------------------------


MALFORMED = {
    "not-msgpack": [b"\xc1\xc1"],
    "not-a-map": [msgpack.packb([1, 2, 3])],
    "missing-buffer": [msgpack.packb({"id": 5, "tensors": [["x", "float32", [2]]]})],
    "short-buffer": [msgpack.packb({"id": 6, "tensors": [["x", "float32", [2]]]}), b"1234"],
    "bad-dtype": [msgpack.packb({"id": 7, "tensors": [["x", "complex64", [1]]]}), b"12345678"],
    "bad-shape": [msgpack.packb({"id": 8, "tensors": [["x", "float32", [-1]]]}), b""],
    "extra-buffer": [msgpack.packb({"id": 9}), b"stray"],
}


@pytest.mark.parametrize("frames", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_headers_get_an_error_and_the_server_keeps_serving(client, frames):
    reply = codec.decode(client.request(frames, 30), copy=True)
    assert reply.header["ok"] is False and reply.header["error"]
    sent = {"x": torch.arange(4)}
    assert_same(call(client, sent).tensors, sent)


LIMIT = 1 << 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_a_reply_written_into_reserved_memory_arrives_whole(client, dtype):
    """``ServerChannel.reserve``: a transport that lends its own memory for a reply's tensors
    (or none: ``None``) delivers what was written there, bit for bit, for calls of changing
    sizes -- empty tensors included -- and the ordinary path still works after it."""
    gen = torch.Generator().manual_seed(1)
    for shape in [(3, 5), (0,), (1000, 7), (2,)]:
        t = (torch.randn(shape, generator=gen) * 100).to(dtype)
        sent = {"a": t, "b": torch.arange(4), "c": torch.ones(0)}
        reply = call(client, sent, reserve=True)
        assert_same(reply.tensors, sent)
        assert_same(call(client, sent).tensors, sent)


# --- page-locked memory (ServerChannel.pin) ---------------------------------------------------


def _address(frame: Any) -> int:
    return int(numpy.frombuffer(frame, numpy.uint8).ctypes.data)


class RecordingPinner:
    """A :class:`~tsqp_core.transport.HostPinner` that keeps what is registered now and
    checks the rules a real one (``cudaHostRegister``) enforces: no two spans overlap, only
    what was registered is unregistered. ``refuse_read_only``: a device without read-only
    registration."""

    def __init__(self, refuse_read_only: bool = False) -> None:
        self.refuse_read_only = refuse_read_only
        self.live: dict[int, tuple[int, bool]] = {}
        self.log: list[tuple] = []
        self.problems: list[str] = []

    def register(self, address: int, nbytes: int, read_only: bool) -> bool:
        for at, (n, _) in self.live.items():
            if address < at + n and at < address + nbytes:
                self.problems.append(f"{address:#x}+{nbytes} overlaps {at:#x}+{n}")
        if read_only and self.refuse_read_only:
            self.log.append(("refused", nbytes, read_only))
            return False
        self.live[address] = (nbytes, read_only)
        self.log.append(("register", nbytes, read_only))
        return True

    def unregister(self, address: int) -> None:
        if self.live.pop(address, None) is None:
            self.problems.append(f"unregister of {address:#x}, never registered")
        self.log.append(("unregister",))

    def covering(self, frame: Any) -> tuple[int, bool] | None:
        """The live span ``frame`` (not empty) lies in: (bytes, read-only), or None."""
        n = memoryview(frame).nbytes
        at = _address(frame)
        for start, (size, read_only) in self.live.items():
            if start <= at and at + n <= start + size:
                return size, read_only
        return None


def serve_checked(channel: ServerChannel, pinner: RecordingPinner, stop: threading.Event,
                  strict: bool = True) -> None:
    """Pin ``channel`` with ``pinner``, then echo every request -- through reserved reply
    memory where the channel lends it -- checking as it goes (``strict``) that each frame
    read and each buffer written lies in a span registered at that moment, read-only for
    requests and writable for replies."""
    channel.pin(pinner)
    while not stop.is_set():
        frames = channel.recv(0.02)
        if frames is None:
            continue
        for i, f in enumerate(frames):
            if not strict or pinner.refuse_read_only or not memoryview(f).nbytes:
                continue  # (an empty frame has no memory to pin)
            span = pinner.covering(f)
            if span is None or not span[1]:
                pinner.problems.append(f"request frame {i} read from unpinned memory")
        buffers = channel.reserve([memoryview(f).nbytes for f in frames[1:]])
        if buffers is None:
            channel.send([bytes(memoryview(f)) for f in frames])
            continue
        for i, (buf, f) in enumerate(zip(buffers, frames[1:])):
            span = pinner.covering(buf) if memoryview(buf).nbytes else (0, False)
            if strict and (span is None or span[1]):
                pinner.problems.append(f"reply frame {i} written into unpinned memory")
            memoryview(buf).cast("B")[:] = memoryview(f).cast("B")
        channel.send([bytes(memoryview(frames[0])), *buffers])


def test_memory_a_transport_pins_is_registered_before_use_and_released(transport):
    """``ServerChannel.pin``: where a transport pins (it overrides ``pin``), every request
    frame its server reads and every reply buffer it writes lies in a span registered at
    that moment, spans never overlap, and nothing stays registered once the server is
    closed; messages arrive whole either way. A transport with no memory of its own takes
    the pinner and registers nothing."""
    channel = transport.listen()
    pins = type(channel).pin is not ServerChannel.pin
    pinner, stop = RecordingPinner(), threading.Event()
    thread = threading.Thread(target=serve_checked, args=(channel, pinner, stop, pins),
                              daemon=True)
    thread.start()
    client = transport.connect(channel.address)
    try:
        gen = numpy.random.default_rng(3)
        for sizes in ([1000], [3 << 20], [5, 0, 17], [64]):
            payload = [gen.bytes(n) for n in sizes]
            got = client.request([b"head", *payload], 30)
            assert [bytes(memoryview(g)) for g in got] == [b"head", *payload]
    finally:
        client.close()
        stop.set()
        thread.join(timeout=30)
        channel.close()
    assert pinner.problems == [] and pinner.live == {}
    assert bool(pinner.log) == pins, "a transport that overrides pin() should register"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_a_request_written_into_reserved_memory_arrives_whole(client, dtype):
    """``ClientChannel.reserve`` (``None`` where the transport lends no memory): tensors
    written there -- a strided one included -- arrive bit for bit; so does the next
    request sent the ordinary way."""
    gen = torch.Generator().manual_seed(2)
    for shape in [(4, 6), (0, 3), (700, 9)]:
        t = (torch.randn(shape, generator=gen) * 100).to(dtype)
        sent = {"a": t.t(), "b": torch.arange(3), "c": torch.ones(0)}
        sizes = [x.numel() * x.element_size() for x in sent.values()]
        buffers = client.reserve(sizes)
        if buffers is None:
            frames = codec.encode(codec.Message({"id": 5, "ok": True}, sent))
        else:
            assert [memoryview(b).nbytes for b in buffers] == sizes
            for x, buf in zip(sent.values(), buffers):
                codec.place(x, buf)
            frames = codec.pack({"id": 5}, codec.describe(sent), buffers)
        reply = codec.decode(client.request(frames, 30), copy=True)
        assert reply.header["id"] == 5 and reply.header["ok"] is True
        assert_same(reply.tensors, {k: v.contiguous() for k, v in sent.items()})
        assert_same(call(client, sent).tensors, {k: v.contiguous() for k, v in sent.items()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_request_into_buffers_of_the_reply_sizes_delivers_the_reply(client, dtype):
    """``ClientChannel.request_into``: with buffers of exactly the reply's tensor sizes, the
    reply arrives whole -- copied into those very buffers, or (a transport that does not
    take them) as ``request`` returns it; with buffers of other sizes (an error reply, a
    peer that sends something else) it comes back as ``request`` returns it, never cut to
    fit or refused by the transport."""
    gen = torch.Generator().manual_seed(3)
    for shape in [(3, 5), (0,), (700, 9), (1,)]:
        t = (torch.randn(shape, generator=gen) * 100).to(dtype)
        sent = {"a": t, "b": torch.arange(4)}
        frames = codec.encode(codec.Message({"id": 11}, sent))
        owned = [torch.empty_like(x) for x in sent.values()]
        buffers = [codec.tensor_buffer(x) for x in owned]
        reply = client.request_into(frames, buffers, 30)
        got = codec.decode(reply, copy=True)
        assert got.header["id"] == 11 and got.header["ok"] is True
        assert_same(got.tensors, sent)
        if all(r is b for r, b in zip(reply[1:], buffers)):  # taken: the bytes are in ours
            assert_same(dict(zip(sent, owned)), sent)
        wrong = [codec.tensor_buffer(torch.empty(x.numel() + 1, dtype=x.dtype))
                 for x in sent.values()]
        reply = client.request_into(codec.encode(codec.Message({"id": 12}, sent)), wrong, 30)
        assert not any(r is b for r, b in zip(reply[1:], wrong))
        assert_same(codec.decode(reply, copy=True).tensors, sent)
        error = client.request_into([b"\xc1\xc1"], buffers, 30)  # refused: one frame back
        assert len(error) == 1 and codec.decode(error, copy=True).header["ok"] is False


def test_a_message_too_large_is_an_error_and_the_channel_survives(transport):
    """``MessageTooLarge`` before anything is sent, the channel still usable; a reply too
    large becomes a small error reply to the same request. The transport names the option
    that caps one message (:attr:`Transport.size_limit_option`), set to 1 MiB here."""
    option = type(transport).size_limit_option
    if option is None:
        pytest.skip(f"{transport.name} carries messages of any size (size_limit_option None)")
    small = get_plugins().transports.create(transport.name, {option: LIMIT})
    srv = ThreadServer(small)
    client = small.connect(srv.address, srv.watchdog)
    try:
        with pytest.raises(MessageTooLarge):
            call(client, {"x": torch.zeros(2 * LIMIT, dtype=torch.uint8)})
        sent = {"x": torch.arange(5)}
        assert_same(call(client, sent).tensors, sent)
        frames = codec.encode(codec.Message({"id": 77, "grow": 2 * LIMIT}, {"x": torch.ones(2)}))
        reply = codec.decode(client.request(frames, 30), copy=True)
        assert reply.header["ok"] is False and reply.header["id"] == 77
        assert "reply not sent" in reply.header["error"]
        assert_same(call(client, sent).tensors, sent)
    finally:
        client.close()
        srv.stop()


# --- peers ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_each_connection_is_its_own_peer_and_its_departure_is_reported(transport):
    """What keeps clients apart on the GPU side: the server knows which connection sent a
    request, two connections are never the same peer, and a closed one is reported gone."""
    server = transport.listen()
    seen, gone = [], []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            frames = server.recv(0.02)
            gone.extend(server.departed())
            if frames is not None:
                seen.append(server.peer)
                server.send(EchoServer("codec").handle(frames))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        a = transport.connect(server.address)
        b = transport.connect(server.address)
        for channel in (a, b, a, b):
            call(channel)
        assert seen[0] == seen[2] and seen[1] == seen[3] and seen[0] != seen[1]
        a.close()
        deadline = time.monotonic() + 20
        while seen[0] not in gone:
            assert time.monotonic() < deadline, "a closed connection was never reported"
            time.sleep(0.05)
        call(b)
        assert seen[1] not in gone
        b.close()
    finally:
        stop.set()
        thread.join(10)
        server.close()


# --- close, timeouts, peer death -------------------------------------------------------------


def test_close_is_idempotent_and_final(transport, server):
    channel = transport.connect(server.address, server.watchdog)
    call(channel)
    channel.close()
    channel.close()
    with pytest.raises(TransportError):
        channel.request(codec.encode(codec.Message({"id": 1})), 5)
    other = transport.listen()
    other.close()
    other.close()


@pytest.mark.timeout(60)
def test_a_silent_server_times_out_and_the_channel_recovers(client):
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout):
        call(client, timeout=0.5, sleep=2.0)
    assert time.monotonic() - t0 < 0.5 + 1.5
    # the late reply to the abandoned request is never taken for the next one's
    sent = {"x": torch.arange(3)}
    assert_same(call(client, sent, timeout=30).tensors, sent)


@pytest.mark.timeout(60)
def test_a_stopped_server_is_noticed_within_the_timeout(transport, server, client):
    call(client)
    server.stop()
    t0 = time.monotonic()
    with pytest.raises((PeerDead, PeerTimeout)):
        call(client, timeout=2.0)
    assert time.monotonic() - t0 < 2.0 + 1.5


@pytest.mark.timeout(60)
def test_the_watchdog_ends_a_wait_without_timeout(transport, server, client):
    call(client)
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(PeerDead):
        call(client, timeout=None)
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(120)
def test_reconnect_after_a_server_restart(transport, server):
    """A server restarted at the same address serves new clients at once. A channel opened
    before the restart (its watchdog following whichever server is current, as a run's
    follows its child) either reconnects -- at most one request lost, as :class:`PeerDead`,
    then every request answered correctly (tcp, shm) -- or, for an in-process transport
    whose channel is bound to the server object that went away, fails every request with
    :class:`PeerDead`. Never a timeout, never another error, never a wrong reply."""
    current = [server]
    client = transport.connect(server.address, lambda: current[0].watchdog())
    sent = {"x": torch.arange(5)}
    try:
        assert_same(call(client, sent).tensors, sent)
        address = server.address
        server.stop()
        again = current[0] = ThreadServer(transport, address)
        try:
            assert again.address == address
            fresh = transport.connect(address, again.watchdog)
            try:
                assert_same(call(fresh, sent).tensors, sent)
            finally:
                fresh.close()
            outcomes = []
            for _ in range(3):
                try:
                    assert_same(call(client, sent, timeout=10).tensors, sent)
                    outcomes.append("ok")
                except PeerDead:
                    outcomes.append("dead")
            if transport.in_process:
                assert outcomes == ["dead"] * 3, outcomes
            else:
                assert outcomes in (["ok"] * 3, ["dead", "ok", "ok"]), outcomes
            # the new server was not disturbed by the old channel (closed first: a shm
            # server serves one client at a time)
            client.close()
            fresh = transport.connect(address, again.watchdog)
            try:
                assert_same(call(fresh, sent).tensors, sent)
            finally:
                fresh.close()
        finally:
            again.stop()
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_a_new_client_is_served_after_one_abandoned_a_request(transport, server):
    first = transport.connect(server.address, server.watchdog)
    with pytest.raises(PeerTimeout):
        call(first, timeout=0.2, sleep=1.0)
    first.close()
    second = transport.connect(server.address, server.watchdog)
    try:
        sent = {"x": torch.arange(6)}
        assert_same(call(second, sent, timeout=30).tensors, sent)
    finally:
        second.close()


# --- across processes -----------------------------------------------------------------------


def _out_of_process(transport: Transport) -> None:
    if transport.in_process:
        pytest.skip(f"{transport.name} serves from this process only")


@pytest.mark.timeout(180)
def test_cross_process_round_trip_then_kill_9_of_the_server(transport):
    _out_of_process(transport)
    with echo_process(transport.name, mode="codec") as (address, watchdog, proc):
        channel = transport.connect(address, watchdog)
        try:
            sent = {"a": torch.randn(64, 64), "b": torch.randn(3, 5).bfloat16(),
                    "c": torch.arange(1 << 21, dtype=torch.float32), "d": torch.empty(0)}
            assert_same(call(channel, sent).tensors, sent)
            killer = threading.Timer(0.5, os.kill, (proc.pid, signal.SIGKILL))
            killer.start()
            t0 = time.monotonic()
            with pytest.raises(PeerDead):
                call(channel, {"x": torch.ones(8)}, timeout=60, sleep=30)
            assert time.monotonic() - t0 < 0.5 + 5  # the watchdog, not the 60 s timeout
            killer.join()
        finally:
            channel.close()


CLIENT_LOOP = """
import sys, torch
from tsqp_core import codec
from tsqp_core.plugins import get_plugins
channel = get_plugins().transports.create(sys.argv[1]).connect(sys.argv[2])
for i in range(1, 1 << 30):
    frames = codec.encode(codec.Message({"id": i, "sleep": 0.02}, {"x": torch.ones(4096)}))
    channel.request(frames, 60)
    if i == 3:
        print("ok", flush=True)
"""


@pytest.mark.timeout(180)
def test_kill_9_of_a_client_mid_request_leaves_the_server_serving(transport, server):
    _out_of_process(transport)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_LOOP, transport.name, server.address],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ok"
        time.sleep(0.1)
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    channel = transport.connect(server.address, server.watchdog)
    try:
        sent = {"x": torch.arange(7)}
        assert_same(call(channel, sent, timeout=30).tensors, sent)
    finally:
        channel.close()
