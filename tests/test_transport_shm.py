"""What the ``shm`` transport promises beyond the common contract
(tests/test_transport_contract.py): sealed segments no peer can shrink, semaphore names that
are unlinked once both sides hold them, several clients at once, arena limits that are
errors and never crashes, guards against stale or torn messages, and stage 1 end to end.
Kill -9 and Ctrl-C of either side: tests/test_signals.py."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import threading
import time

import posix_ipc
import pytest
import torch

from tsqp_core import codec
from tsqp_core.bench_transport import EchoServer
from tsqp_core.plugins import PluginError, get_plugins
from tsqp_core.testing.transport_contract import RecordingPinner, serve_checked
from tsqp_core.transport import MessageTooLarge, PeerDead, TransportError

from conftest import shm_names

shm = pytest.importorskip("tsqp_transport_shm")



def ours() -> set[str]:
    return shm_names()


@pytest.fixture(autouse=True)
def nothing_left_in_dev_shm():
    before = ours()
    yield
    assert ours() - before == set()


def make(**options):
    return get_plugins().transports.create("shm", options)


class Served:
    """An echo server thread and a connected client."""

    def __init__(self, transport) -> None:
        self.server = transport.listen()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=EchoServer("codec").serve,
                                       args=(self.server, self.stop, 0.02), daemon=True)
        self.thread.start()
        self.client = transport.connect(self.server.address)

    def call(self, tensors=None, **header):
        frames = codec.encode(codec.Message({"id": 1, **header}, tensors or {}))
        return codec.decode(self.client.request(frames, 30), copy=True)

    def close(self) -> None:
        self.client.close()
        self.stop.set()
        self.thread.join(timeout=30)
        self.server.close()


#: Both ways of doing the per-message work: the compiled module and the Python path.
PATHS = [pytest.param(False, id="python"),
         pytest.param(True, id="native", marks=pytest.mark.skipif(
             shm._native is None, reason="the C module was not built"))]


@pytest.fixture(params=PATHS)
def served(request):
    s = Served(make(arena_bytes=1 << 20, native=request.param))
    yield s
    s.close()


def test_both_paths_take_frames_of_any_shape(served):
    """The contract's any-buffer frames (numpy arrays of any shape, zero-sized ones
    included) on the C path and on the Python one, which the contract suite does not pick."""
    from tsqp_core.testing.transport_contract import test_frames_are_any_contiguous_buffers

    test_frames_are_any_contiguous_buffers(served.client)


def test_options_are_validated():
    with pytest.raises(PluginError, match="arena_bytes"):
        make(arena_bytes=10)
    with pytest.raises(PluginError, match="typo"):
        make(typo=1)


def test_addresses():
    t = make()
    with pytest.raises(TransportError, match="shm://NAME"):
        t.connect("tcp://127.0.0.1:5555")
    with pytest.raises(PeerDead, match="no shm server"):
        t.connect("shm://nobody-listens-here")
    server = t.listen("shm://tsqp-test-fixed-name")
    try:
        assert server.address == "shm://tsqp-test-fixed-name"
        with pytest.raises(TransportError, match="cannot listen"):
            t.listen(server.address)
    finally:
        server.close()


def test_segments_are_sealed_memfds_and_semaphore_names_go_once_connected(served):
    served.call()
    assert ours() == set()  # the semaphore names went at the end of the handshake
    for link in (served.server._links[0], served.client._link):
        for region in (link.req, link.rep):
            seals = fcntl.fcntl(region.fd, fcntl.F_GET_SEALS)
            assert seals & shm.SEALS == shm.SEALS
            assert os.readlink(f"/proc/self/fd/{region.fd}").startswith("/memfd:tsqp-")


@pytest.mark.parametrize("side", ["server", "client"])
def test_a_hostile_peer_cannot_shrink_a_segment_under_the_reader(served, side):
    """The SIGBUS hole of shared files: ``ftruncate`` by one side made the other's reads
    fault. Sealed segments refuse it, whoever tries, and the link keeps working."""
    served.call()
    link = served.server._links[0] if side == "server" else served.client._link
    for region in (link.req, link.rep):
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, shm.CTRL_BYTES + (2 << 20))
    assert served.call({"x": torch.ones(3)}).tensors["x"].tolist() == [1.0, 1.0, 1.0]


def test_a_client_refuses_segments_a_server_could_still_shrink():
    """A hostile server that passes plain (unsealed) memory is refused with a clear error."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(shm._abstract("tsqp-test-unsealed"))
    listener.listen(1)

    def hostile():
        conn, _ = listener.accept()
        arena = 1 << 16
        fds = [os.memfd_create("x", os.MFD_CLOEXEC) for _ in range(2)]
        for fd in fds:
            os.ftruncate(fd, shm.CTRL_BYTES + arena)
        name = f"/tsqp-{os.getpid()}-0badc0de-1-"
        shm._send_msg(conn, {"v": shm.VERSION, "req": name + "req", "rep": name + "rep",
                             "arena": arena}, fds)
        time.sleep(0.5)
        conn.close()
        for fd in fds:
            os.close(fd)

    thread = threading.Thread(target=hostile)
    thread.start()
    try:
        with pytest.raises(TransportError, match="without the seals"):
            make().connect("shm://tsqp-test-unsealed")
    finally:
        thread.join()
        listener.close()


def test_a_request_too_large_for_the_arena_is_an_error_and_the_link_survives(served):
    with pytest.raises(MessageTooLarge, match="arena_bytes"):
        served.call({"x": torch.zeros(1 << 20, dtype=torch.uint8)})
    assert served.call({"x": torch.ones(3)}).tensors["x"].tolist() == [1.0, 1.0, 1.0]


def test_a_reply_too_large_for_the_arena_becomes_an_error_reply(served):
    reply = served.call({"x": torch.ones(2)}, grow=2 << 20)
    assert reply.header["ok"] is False
    assert "reply not sent" in reply.header["error"] and "arena_bytes" in reply.header["error"]
    assert reply.header["id"] == 1
    assert served.call({"x": torch.ones(2)}).header["ok"] is True


def test_a_message_that_fills_the_arena_exactly(served):
    def frames(n):
        return codec.encode(codec.Message({"id": 1}, {"x": torch.zeros(n, dtype=torch.uint8)}))

    header = len(frames(1 << 19)[0])  # msgpack writes any n in [2**16, 2**32) equally wide
    fits = (1 << 20) - 64 - shm._align(header)  # table (2 entries, padded) + header + tensor
    reply = codec.decode(served.client.request(frames(fits), 30))
    assert reply.header["ok"] is True and reply.tensors["x"].numel() == fits
    with pytest.raises(MessageTooLarge):
        served.client.request(frames(fits + 1), 30)


def test_a_request_out_of_sequence_drops_the_link_and_the_client_reconnects(served):
    served.call()
    served.client._link.seq += 5  # the next request carries a number the server does not expect
    with pytest.raises(PeerDead, match="closed the connection"):
        served.call()
    assert served.call({"x": torch.ones(1)}).header["ok"] is True  # a new handshake


@pytest.mark.parametrize("native", PATHS)
def test_reader_rejects_control_blocks_that_do_not_describe_a_message(native):
    region = shm._Region(shm._segment(shm.CTRL_BYTES + (1 << 16), "tsqp-test"), 1 << 16,
                         writer=True, native=native)
    with pytest.raises(shm._Malformed, match="magic"):
        region.read(1)
    region.write(3, [b"abc", b""])
    assert [bytes(f) for f in region.read(3)] == [b"abc", b""]
    with pytest.raises(shm._Malformed, match="numbered 3"):
        region.read(4)
    shm._table(2).pack_into(region.view, shm.CTRL_BYTES, 64, 3, 64, 1 << 20)  # out of bounds
    with pytest.raises(shm._Malformed, match="outside"):
        region.read(3)
    shm._table(2).pack_into(region.view, shm.CTRL_BYTES, 64, 3, 2**64 - 32, 64)  # wraps
    with pytest.raises(shm._Malformed, match="outside"):
        region.read(3)
    shm._CTRL.pack_into(region.view, 0, shm.MAGIC, 3, 1 << 30, 0, 64)
    with pytest.raises(shm._Malformed, match="frames"):
        region.read(3)
    shm._CTRL.pack_into(region.view, 0, shm.MAGIC, 3, 2, 0, (1 << 16) + 1)  # beyond the arena
    with pytest.raises(shm._Malformed, match="frames"):
        region.read(3)
    region.close()


def _region(native: bool) -> "shm._Region":
    return shm._Region(shm._segment(shm.CTRL_BYTES + (1 << 16), "tsqp-test"), 1 << 16,
                       writer=True, native=native)


MESSAGES = [[b"head"], [b"h", b"", b"x" * 100, bytes(range(256)) * 3], [b""], [],
            [b"\xc1" * 40, memoryview(b"abcdefgh").cast("d")]]


@pytest.mark.skipif(shm._native is None, reason="the C module was not built")
@pytest.mark.parametrize("writer,reader", [(True, False), (False, True), (True, True)],
                         ids=["c-to-python", "python-to-c", "c-to-c"])
def test_the_c_module_and_the_python_path_speak_the_same_layout(writer, reader):
    """Either side may run either path (a client without a compiler, a server with one):
    what one writes, the other reads, frame for frame -- reserved views included."""
    out, into = _region(writer), _region(reader)
    try:
        for seq, frames in enumerate(MESSAGES, 1):
            out.write(seq, frames)
            into.view[:] = out.view  # the other side's mapping of the same bytes
            assert [bytes(f) for f in into.read(seq)] == [bytes(f) for f in frames]
        views = out.reserve([5, 0, 70])
        for view, fill in zip(views, (b"abcde", b"", b"z" * 70)):
            view[:] = fill
        before = out.copied
        out.write(9, [b"header", *views])
        assert out.copied - before == len(b"header")  # the reserved frames were in place
        into.view[:] = out.view
        assert [bytes(f) for f in into.read(9)] == [b"header", b"abcde", b"", b"z" * 70]
    finally:
        out.close()
        into.close()


@pytest.mark.skipif(shm._native is None, reason="the C module was not built")
def test_reading_into_buffers_copies_only_a_message_of_exactly_their_sizes():
    region = _region(True)
    try:
        region.write(1, [b"head", b"abc", b"defgh"])
        outs = [bytearray(3), bytearray(5)]
        got = region.read(1, outs)
        assert got[0] == b"head" and got[1] is outs[0] and got[2] is outs[1]
        assert outs == [bytearray(b"abc"), bytearray(b"defgh")]
        for wrong in ([bytearray(3)], [bytearray(3), bytearray(4)],
                      [bytearray(3), bytearray(5), bytearray(1)]):
            got = region.read(1, wrong)  # views, as without buffers; nothing written
            assert [bytes(f) for f in got] == [b"head", b"abc", b"defgh"]
            assert not any(w != bytearray(len(w)) for w in wrong)
        region.write(2, [b"h" * 5000, b"abc", b"defgh"])  # a header too large to copy
        got = region.read(2, outs)
        assert isinstance(got[1], memoryview) and bytes(got[0]) == b"h" * 5000
        region.write(3, [b"head", b"abc", b"defgh"])
        with pytest.raises(BufferError):  # buffers of the right sizes, one read-only
            region.read(3, [bytearray(3), b"12345"])
    finally:
        region.close()


def test_native_true_without_the_c_module_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shm, "_native", None)
    from tsqp_core.transport import ThreadBudget

    with pytest.raises(TransportError, match="not built"):
        make(native=True).fit(ThreadBudget(1, 1, 2))
    transport = make()
    transport.fit(ThreadBudget(1, 1, 2))
    assert transport.options.native is False  # auto: the Python path, recorded as such


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI installs with a C compiler")
def test_ci_builds_the_c_module():
    """The install (``make setup``) builds ``_native`` where a compiler is at hand, as CI's
    is: a silently skipped build would leave the Python path as the only one tested."""
    assert shm._native is not None


def test_names_left_by_a_dead_server_are_swept_on_listen():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"/tsqp-{dead.pid}-deadbeef-1-req"
    live = f"/tsqp-{os.getpid()}-deadbeef-1-rep"
    for name in (stale, live):
        posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=4096).close_fd()
        posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600).close()
    try:
        make().listen().close()
        assert ours() >= {live[1:], "sem." + live[1:]}
        assert not ours() & {stale[1:], "sem." + stale[1:]}
    finally:
        shm._unlink([stale, live])


def test_several_clients_and_an_idle_one_blocks_nobody(served):
    """The first client stays connected and silent; others are served meanwhile, each as
    its own peer, and a client that stalls mid-handshake holds up nobody either."""
    t = make(connect_timeout_s=2)
    staller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staller.connect(shm._abstract(shm._parse(served.server.address)))  # never answers
    others = [t.connect(served.server.address) for _ in range(3)]
    try:
        for i, other in enumerate(others * 3):
            frames = codec.encode(codec.Message({"id": i}, {"x": torch.full((4,), float(i))}))
            reply = codec.decode(other.request(frames, 10), copy=True)
            assert reply.header["id"] == i and reply.tensors["x"][0].item() == i
        assert served.call({"x": torch.ones(1)}).header["ok"] is True  # the idle one still works
    finally:
        for other in others:
            other.close()
        staller.close()


def test_a_full_server_refuses_clearly_and_frees_the_slot_when_a_client_leaves():
    s = Served(make(arena_bytes=1 << 16, max_clients=2))
    try:
        second = make().connect(s.server.address)
        with pytest.raises(TransportError, match="the server is full"):
            make().connect(s.server.address)
        second.close()
        deadline = time.monotonic() + 10
        while True:  # the server notices the departure within a slice
            try:
                third = make().connect(s.server.address)
                break
            except TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        third.close()
    finally:
        s.close()


def test_the_server_reports_each_client_as_its_own_peer_and_departures():
    t = make(arena_bytes=1 << 16)
    server = t.listen()
    seen, gone = [], []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            frames = server.recv(0.05)
            gone.extend(server.departed())
            if frames is not None:
                seen.append(server.peer)
                server.send(frames)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        a, b = t.connect(server.address), t.connect(server.address)
        for c in (a, b, a):
            c.request([b"x"], 10)
        assert seen[0] == seen[2] != seen[1]
        a.close()
        deadline = time.monotonic() + 10
        while seen[0] not in gone:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert seen[1] not in gone
        b.close()
    finally:
        stop.set()
        thread.join(10)
        server.close()


# --- stage 1, end to end ---------------------------------------------------------------------


def test_stage1_prefill_matches_transformers(run_tiny):
    res = run_tiny("stage=stage1", "workload=prefill", "workload.prompt_tokens=48",
                   "reference=true", "seed=3")
    assert res["config"]["transport"] == "shm"
    assert res["rpc"]["calls_per_forward"] == 98 and res["rpc"]["calls"] == 98
    assert res["reference"]["max_abs_logit_diff"] <= 1e-4
    assert res["reference"]["tokens_match"] is True


def test_stage1_generate_matches_transformers(run_tiny):
    """Decode steps reuse the GPU side's KV cache across requests: it must own its memory,
    not keep views of borrowed shm frames."""
    res = run_tiny("stage=stage1", "workload=generate", "workload.prompt_tokens=20",
                   "workload.new_tokens=8", "reference=true", "seed=5")
    assert res["reference"]["tokens_match"] is True
    assert res["reference"]["max_abs_logit_diff"] <= 1e-4


# --- spinning: chosen from the thread budget, adapted to how long waits take -----------------


@pytest.mark.parametrize("tee,gpu,cores,busy,want", [
    (1, 1, 2, 0, shm.SPIN_US), (2, 2, 2, 0, 0), (1, 2, 2, 0, 0), (4, 4, 16, 0, shm.SPIN_US),
    (1, 1, 2, 1, 0), (4, 4, 16, 8, shm.SPIN_US), (4, 4, 16, 9, 0)])
def test_auto_spin_follows_the_thread_budget(tee, gpu, cores, busy, want):
    from tsqp_core.transport import ThreadBudget

    transport = get_plugins().transports.create("shm")
    assert transport.options.spin_us is None  # auto until a run settles it
    transport.fit(ThreadBudget(tee, gpu, cores, busy))
    assert transport.options.spin_us == want
    chosen = get_plugins().transports.create("shm", {"spin_us": 70})
    chosen.fit(ThreadBudget(tee, gpu, cores, busy))
    assert chosen.options.spin_us == 70  # a value the user set is theirs


def test_busy_cores_counts_a_process_that_computes_now():
    """What the budget calls busy: a spinning process counts while it runs (the load
    average it leaves behind afterwards does not decide anything)."""
    import subprocess
    import sys

    from tsqp_core.run.prepare import busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores() >= 1
    finally:
        spinner.kill()
        spinner.wait()


def test_a_run_records_the_spin_it_chose(tmp_path):
    from conftest import run_config

    result = run_config(tmp_path, "model=tiny", "transport=shm", "threads.tee=1",
                        "threads.gpu=1", "workload=prefill", "workload.prompt_tokens=4")
    options = result["config"]["transport_options"]
    assert options["spin_us"] in (shm.SPIN_US, 0)  # 0 when the machine is busy right now


def test_the_spin_shrinks_after_long_waits_and_comes_back_after_a_short_one():
    spin = shm._Spin(500e-6)
    for _ in range(10):
        spin.done(0.01)  # a 10 ms wait: spinning would not have caught it
    assert spin.now == pytest.approx(500e-6 / 16)
    spin.done(200e-6)  # answered within the spin
    assert spin.now == 500e-6
    spin.done(0.01)
    assert spin.now == pytest.approx(250e-6)
    never = shm._Spin(0.0)
    never.done(0.0)
    never.done(1.0)
    assert never.now == 0.0


# --- page-locking the arenas for a device (ServerChannel.pin; the rules every transport
# --- keeps: the contract suite's test_memory_a_transport_pins_...) --------------------------


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("refuse_read_only", [False, True], ids=["pinned", "no-read-only"])
def test_a_pinned_server_registers_each_arena_span_before_use_and_all_of_it_on_close(
        native, refuse_read_only):
    transport = make(arena_bytes=8 << 20, native=native)
    server = transport.listen()
    pinner = RecordingPinner(refuse_read_only)
    stop = threading.Event()
    thread = threading.Thread(target=serve_checked, args=(server, pinner, stop), daemon=True)
    thread.start()
    client = transport.connect(server.address)
    try:
        for sizes in ([1000], [3 << 20], [1000, 17], [5 << 20, 100], [64]):
            payload = [os.urandom(n) for n in sizes]
            got = client.request([b"head", *payload], 30)
            assert [bytes(g) for g in got] == [b"head", *payload]
        assert pinner.problems == []
        registered = [e for e in pinner.log if e[0] == "register"]
        # the reply arena grew twice past a 2 MiB step (3 MB, then 5 MB): registered three
        # times, each larger, the smaller one unregistered first (no overlap: checked above)
        reply = [n for _, n, read_only in registered if not read_only]
        assert len(reply) == 3 and reply == sorted(reply) and reply[-1] >= (5 << 20)
        request = [n for _, n, read_only in registered if read_only]
        if refuse_read_only:  # asked once, then used as it is
            assert request == [] and [e for e in pinner.log if e[0] == "refused"] == [
                ("refused", shm.CTRL_BYTES + shm.RESERVE_STEP, True)]
        else:
            assert len(request) == 3 and request[-1] >= (5 << 20)
    finally:
        client.close()
        stop.set()
        thread.join(timeout=30)
        server.close()
    assert pinner.live == {} and pinner.problems == []


def test_pinning_a_server_that_has_links_covers_them_from_the_next_message():
    transport = make(arena_bytes=4 << 20)
    server = transport.listen()
    pinner = RecordingPinner()
    stop = threading.Event()

    def first_then_pinned() -> None:
        while not stop.is_set():  # one plain echo on the link before pin() is called
            frames = server.recv(0.02)
            if frames is not None:
                server.send([bytes(f) for f in frames])
                break
        serve_checked(server, pinner, stop)

    thread = threading.Thread(target=first_then_pinned, daemon=True)
    thread.start()
    client = transport.connect(server.address)
    try:
        for tag, payload in ((b"a", b"x" * 100), (b"b", b"y" * 5000)):
            assert [bytes(g) for g in client.request([tag, payload], 30)] == [tag, payload]
        # pin() covered the live link's reply arena at once, its request arena from the
        # next request on, and the checked echo found both in place
        assert pinner.problems == [] and sorted(ro for _, ro in pinner.live.values()) == [
            False, True]
        client.close()
        deadline = time.monotonic() + 10  # the server notices the departure, drops the link
        while pinner.live and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pinner.live == {}  # unregistered as the link went, not only at close
    finally:
        client.close()
        stop.set()
        thread.join(timeout=30)
        server.close()
