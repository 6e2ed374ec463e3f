"""The GPU side rejects every malformed request with an error reply and keeps serving."""

from __future__ import annotations

import threading

import msgpack
import pytest
import torch

from tsqp_core import codec, protocol
from tsqp_core.codec import Message
from tsqp_core.executor import UnfusedExecutor
from tsqp_core.gpu.server import GpuServer
from tsqp_core.models.source import fingerprint, resolve
from tsqp_core.partition import SeedPartition
from tsqp_core.plugins import PluginOptions
from tsqp_core.schedule import build_schedule, plan_entries
from tsqp_core.transport import ANONYMOUS, Peer

from conftest import compose


@pytest.fixture(scope="module")
def model_dir():
    return resolve(compose("model=tiny").model)


@pytest.fixture
def server(model_dir):
    return GpuServer(model_dir, UnfusedExecutor(PluginOptions()), "unfused", torch.float32,
                     torch.device("cpu"))


@pytest.fixture(scope="module")
def schedule():
    return build_schedule(16, SeedPartition(PluginOptions()).gpu_ops(), "op")


def reply(server, frames, peer=ANONYMOUS):
    """The server's answer as a codec message; a call frame's as ``{ok, id, t}`` and its
    tensor frames' bytes (names and shapes are the plan's, not the reply's)."""
    out = server.handle(frames, peer)
    if protocol.is_call_frame(out[0]):
        _, _, rid, *t = protocol.CALL_REPLY.unpack(out[0])
        return Message({"ok": True, "id": rid, "t": t},
                       {str(i): torch.frombuffer(bytearray(f), dtype=torch.uint8)
                        for i, f in enumerate(out[1:])})
    return codec.decode(out)


def call_frames(plan_id, index, tensors, *, s=7, past=0, last=False, batch=None, tokens=None,
                req_id=2):
    """A call request: its header, then each tensor's bytes (batch and tokens, unless given,
    from the first tensor's shape)."""
    first = next(iter(tensors.values()))
    req = protocol.CallRequest(int(plan_id, 16), index, s, past, last,
                               first.shape[0] if batch is None else batch,
                               first.shape[1] if tokens is None else tokens)
    return [req.frame(req_id), *(codec.tensor_buffer(t) for t in tensors.values())]


def wire_plan(schedule, dims):
    entries = plan_entries(schedule, [c.plain_wire(dims, "float32") for c in schedule.calls])
    return [e.to_wire() for e in entries]


def hello(server, model_dir, schedule, peer=ANONYMOUS, **over):
    h = {"m": "hello", "id": 1, "v": protocol.VERSION, "fingerprint": fingerprint(model_dir),
         "executor": "unfused", "dtype": "float32",
         "protection": {"name": "none", "options": {}},
         "plan": wire_plan(schedule, server.dims), "limits": {"batch": 2, "positions": 64},
         **over}
    return reply(server, codec.encode(Message(h)), peer)


def embed_call(server, plan_id, ids, peer=ANONYMOUS, c=0, **over):
    return reply(server, call_frames(plan_id, c, {"ids": ids}, **over), peer)


def assert_error(msg, *words):
    assert msg.header["ok"] is False
    for w in words:
        assert w in msg.header["error"], msg.header["error"]


#: An honest call header (request id 2) for the malformed variants below.
CALL = protocol.CallRequest(0, 0, 1, 0, False, 1, 4).frame(2)


@pytest.mark.parametrize("frames,words", [
    ([b"\xc1garbage"], ["a call header has 44 bytes, got 8"]),  # 0xc1 starts a call
    ([b"\xdagarbage"], ["msgpack"]),
    ([msgpack.packb([1, 2, 3])], ["map"]),
    ([], ["empty"]),
    ([b"x" * (codec.MAX_HEADER_BYTES + 1)], ["header larger"]),
    ([msgpack.packb({"id": 1, "m": "call", "tensors": [["ids", "int64", [1, 4]]]})],
     ["1 tensors but 0 buffers"]),
    ([msgpack.packb({"id": 1, "m": "call", "tensors": [["ids", "int64", [1, 4]]]}), b"\0" * 31],
     ["needs 32 bytes", "has 31"]),
    ([msgpack.packb({"id": 1, "m": "call", "tensors": [["ids", "complex", [1]]]}), b"\0" * 8],
     ["unsupported dtype"]),
    ([msgpack.packb({"id": 1, "m": "call", "tensors": [["ids", "int64", [-1]]]}), b""],
     ["bad shape"]),
    ([msgpack.packb({"id": "x", "m": "ping"})], ["id"]),
    ([msgpack.packb({"id": 1, "m": "nope"})], ["unknown method"]),
    ([msgpack.packb({"id": 1, "m": "call", "plan": "0", "c": 0, "s": 1, "past": 0})],
     ["unknown method 'call'"]),  # a call is a call frame, never msgpack
    (call_frames("00" * 8, 0, {"ids": torch.zeros(1, 4, dtype=torch.int64)}), ["hello first"]),
    ([CALL[:-1]], ["a call header has 44 bytes, got 43"]),
    ([CALL + b"\0"], ["a call header has 44 bytes, got 45"]),
    ([CALL[:1] + b"\x02" + CALL[2:]], ["not a call request header"]),
    ([CALL[:2] + b"\x06" + CALL[3:]], ["unknown call flags 0x6"]),
    ([protocol.CallRequest(0, 0, 1, 0, False, 0, 4).frame(2)], ["at least one row (batch 0"]),
    ([protocol.CallRequest(0, 0, 1, 0, False, 1, 0).frame(2)], ["at least one row", "tokens 0"]),
])
def test_malformed_requests_get_error_replies(server, frames, words):
    msg = reply(server, frames)
    assert_error(msg, *words)
    if frames and protocol.is_call_frame(frames[0]) and len(frames[0]) >= 16:
        assert msg.header["id"] == 2  # the error answers the call it refuses
    assert reply(server, codec.encode(Message({"m": "ping", "id": 9})).copy()).header["ok"]


def test_hello_refuses_a_mismatch(server, model_dir, schedule):
    refused = hello(server, model_dir, schedule, fingerprint="0" * 16)
    assert_error(refused, "fingerprint", "is not this server's")
    assert server.fingerprint not in refused.header["error"]  # a stranger learns nothing
    assert_error(hello(server, model_dir, schedule, dtype="bfloat16"), "dtype")
    assert_error(hello(server, model_dir, schedule, executor="fused"), "executor")
    assert_error(hello(server, model_dir, schedule, v=99), "protocol")
    assert_error(hello(server, model_dir, schedule, plan=[[[["embed", None]], [], ["h0"], [],
                                                            [["h0", "float32", ["B", "T", 64]]]]]),
                 "inputs")
    assert_error(hello(server, model_dir, schedule, plan=[[[["qkv_proj", 99]], [], [], [], []]]),
                 "unknown op")
    assert_error(hello(server, model_dir, schedule, plan="x"), "plan")
    assert_error(hello(server, model_dir, schedule, plan=[]), "no calls")
    # a wire layout the (absent) protection scheme does not declare
    bad = wire_plan(schedule, server.dims)
    bad[0][4] = [["h0", "bfloat16", ["B", "T", 64]]]
    assert_error(hello(server, model_dir, schedule, plan=bad), "wire layout")
    # two ops in one call for an executor that runs one op per call
    fused = wire_plan(build_schedule(16, schedule.gpu_kinds, "run"), server.dims)
    assert_error(hello(server, model_dir, schedule, plan=fused), "one op per call")
    assert_error(hello(server, model_dir, schedule, protection={"name": "nope"}), "unknown protection")


def test_calls_are_validated_and_the_server_keeps_serving(server, model_dir, schedule):
    plan_id = hello(server, model_dir, schedule).header["plan_id"]
    ids = torch.randint(0, 512, (1, 5))
    assert_error(embed_call(server, plan_id, ids.to(torch.int32)), "tensor 'ids': [1, 5] int64",
                 "needs 40 bytes, frame has 20")
    assert_error(embed_call(server, plan_id, ids, tokens=4), "needs 32 bytes, frame has 40")
    assert_error(reply(server, call_frames(plan_id, 0, {"ids": ids})[:1]),
                 "expected 1 tensors ['ids'], got 0 frames")
    assert_error(embed_call(server, plan_id, ids, c=10_000), "out of range")
    assert_error(embed_call(server, plan_id, ids + 1000), "out of range")
    assert_error(embed_call(server, plan_id, ids, past=10**9), "beyond what the hello declared")
    assert_error(embed_call(server, plan_id, torch.zeros(3, 5, dtype=torch.int64)),
                 "a call of batch 3", "declared (2, 64)")
    bad = reply(server, call_frames(plan_id, 1, {"0.x": torch.zeros(1, 5, 63)}))
    assert_error(bad, "tensor '0.x': [1, 5, 64] float32 needs 1280 bytes, frame has 1260")
    ok = embed_call(server, plan_id, ids)
    assert ok.header["ok"] and ok.header["id"] == 2
    assert [t.numel() for t in ok.tensors.values()] == [1 * 5 * 64 * 4]  # h0, float32


def test_cache_position_mismatch_resets_the_session(server, model_dir, schedule):
    plan_id = hello(server, model_dir, schedule).header["plan_id"]
    scores = next(c for c in schedule.calls if c.ops[0].kind == "attn_scores")
    q, k = torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 3, 16)
    first = reply(server, call_frames(plan_id, scores.index, {"0.qr": q, "0.kr": k}, s=11,
                                      tokens=3))
    assert first.header["ok"]
    again = reply(server, call_frames(plan_id, scores.index, {"0.qr": q, "0.kr": k}, s=11,
                                      tokens=3))
    assert_error(again, "cache holds 3 positions")
    assert 11 not in server._clients[ANONYMOUS].sessions


# --- clients are kept apart -----------------------------------------------------------------

A, B = Peer(b"a"), Peer(b"b", "bbbbbbbbkey")
IDS = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(0))


def test_a_plan_belongs_to_the_connection_that_made_it(server, model_dir, schedule):
    plan_id = hello(server, model_dir, schedule, A).header["plan_id"]
    assert embed_call(server, plan_id, IDS, A).header["ok"]
    assert_error(embed_call(server, plan_id, IDS, B), "unknown plan")  # same plan id, not B's
    for _ in range(10):  # B's hellos never evict A's plan
        hello(server, model_dir, schedule, B, limits={"batch": 1, "positions": 8})
    assert embed_call(server, plan_id, IDS, A).header["ok"]


def test_sessions_are_per_client_and_a_full_client_is_refused_not_evicted(server, model_dir,
                                                                          schedule):
    plan_a = hello(server, model_dir, schedule, A).header["plan_id"]
    plan_b = hello(server, model_dir, schedule, B).header["plan_id"]
    scores = next(c for c in schedule.calls if c.ops[0].kind == "attn_scores")

    def scores_call(peer, plan, session, past):
        q, k = torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 1, 16)
        return reply(server, call_frames(plan, scores.index, {"0.qr": q, "0.kr": k},
                                         s=session, past=past, tokens=1), peer)

    assert scores_call(A, plan_a, 1, 0).header["ok"]  # A's live generation
    for session in range(4):  # B fills its own sessions, then is refused
        assert scores_call(B, plan_b, session, 0).header["ok"]
    assert_error(scores_call(B, plan_b, 99, 0), "already has 4 live sessions", "max_sessions")
    assert scores_call(B, plan_b, 1, 1).header["ok"]  # B's session 1 is B's, at position 1
    assert scores_call(A, plan_a, 1, 1).header["ok"]  # A's session 1 lives on, untouched


def test_the_server_is_full_refuses_clearly_and_frees_on_departure_or_idleness(model_dir,
                                                                               schedule):
    server = GpuServer(model_dir, UnfusedExecutor(PluginOptions()), "unfused", torch.float32,
                       torch.device("cpu"), max_clients=2, idle_s=3600)
    assert hello(server, model_dir, schedule, A).header["ok"]
    assert hello(server, model_dir, schedule, B).header["ok"]
    assert_error(hello(server, model_dir, schedule, Peer(b"c")), "the GPU side is full",
                 "max_clients")
    server.forget(B)
    assert hello(server, model_dir, schedule, Peer(b"c")).header["ok"]
    server.idle_s = 0.0  # now everyone is idle: the longest idle makes room
    assert hello(server, model_dir, schedule, Peer(b"d")).header["ok"]
    assert A not in server._clients and server.clients == 2


def test_one_key_holds_at_most_half_the_connections(model_dir, schedule):
    server = GpuServer(model_dir, UnfusedExecutor(PluginOptions()), "unfused", torch.float32,
                       torch.device("cpu"), max_clients=4)
    for conn in (b"1", b"2"):
        assert hello(server, model_dir, schedule, Peer(conn, "samekey")).header["ok"]
    assert_error(hello(server, model_dir, schedule, Peer(b"3", "samekey")),
                 "this client key already holds 2 of the 4 connections")
    assert hello(server, model_dir, schedule, Peer(b"4", "otherkey")).header["ok"]


def test_requests_are_limited_before_and_after_hello(server, model_dir, schedule):
    big = torch.zeros(protocol.PRE_HELLO_BYTES, dtype=torch.uint8)
    msg = reply(server, codec.encode(Message({"m": "ping", "id": 5}, {"x": big})), A)
    assert_error(msg, "exceeds this connection's limit", "before hello")
    assert msg.header["id"] == 5
    plan_id = hello(server, model_dir, schedule, A).header["plan_id"]
    limit = server._clients[A].max_request()
    assert limit < protocol.PRE_HELLO_BYTES + (1 << 20)  # batch 2, 64 positions: small
    msg = reply(server, codec.encode(Message({"m": "ping", "id": 6},
                                             {"x": torch.zeros(limit, dtype=torch.uint8)})), A)
    assert_error(msg, "the largest call of its plans")
    # a call frame is held to its plan's layout frame by frame, before any tensor is made
    frames = call_frames(plan_id, 0, {"ids": IDS}, req_id=9)
    for huge in ([*frames[:-1], bytes(limit)], [*frames, *[b"x"] * 100_000]):
        msg = reply(server, huge, A)
        assert_error(msg, "ids" if len(huge) == len(frames) else "expected 1 tensors")
        assert msg.header["id"] == 9
    assert embed_call(server, plan_id, IDS, A).header["ok"]


def test_unexpected_errors_are_logged_rate_limited(capsys):
    from tsqp_core.errlog import RateLimitedLog

    log = RateLimitedLog("tsqp serve", burst=3, window_s=3600)
    written = [log(f"error {i}") for i in range(100)]
    assert written == [True] * 3 + [False] * 97 and log.suppressed == 97
    assert capsys.readouterr().err.count("tsqp serve: error") == 3


class _Lends:
    """A channel that lends memory (``pin``) and never has a request."""

    def __init__(self) -> None:
        self.pinned_with = []

    def pin(self, pinner) -> None:
        self.pinned_with.append(pinner)

    def recv(self, timeout):
        return None

    def departed(self):
        return []


@pytest.mark.parametrize("device,pin_memory,pinned", [
    ("cpu", True, "no (the device is cpu: nothing to pin for)"),
    ("cuda", False, "no (server.pin_memory is off)"),
    ("cuda", True, "fake"),
])
def test_a_cuda_server_pins_what_its_channel_lends_and_fences_each_call_by_events(
        model_dir, schedule, monkeypatch, device, pin_memory, pinned):
    """The server's half of the GPU data path, on a CPU with the device faked: on CUDA the
    channel's memory is handed to a pinner before serving; each call is fenced twice on the
    backend's stream -- after its compute and after its outputs' (queued) copies into the
    reply -- and never with a device-wide synchronize."""
    from tsqp_core.gpu import pinning
    from tsqp_core.gpu.reference import ReferenceBackend

    class FakePinner:
        def __init__(self, device) -> None:
            self.device = device

        def summary(self):
            return {"pinned": "fake"}

    log: list = []
    monkeypatch.setattr(pinning, "CudaPinner", FakePinner)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("device-wide"))
    server = GpuServer(model_dir, UnfusedExecutor(PluginOptions()), "unfused", torch.float32,
                       torch.device(device), pin_memory=pin_memory)

    class Spied(ReferenceBackend):  # computes on the CPU whatever the server's device
        def run(self, *args) -> None:
            log.append("run")
            super().run(*args)

        def synchronize(self) -> None:
            log.append("fence")

    monkeypatch.setattr(server.executor, "backend", lambda ckpt, kinds, dtype, _device:
                        Spied(ckpt, kinds, dtype, torch.device("cpu")))
    frames = codec.tensor_frames

    def placing(values, nbytes, reserve, non_blocking=False):
        log.append(("place", non_blocking))
        return frames(values, nbytes, reserve, non_blocking)

    monkeypatch.setattr(codec, "tensor_frames", placing)
    channel = _Lends()
    stop = threading.Event()
    stop.set()
    server.serve(channel, stop)
    assert len(channel.pinned_with) == (pinned == "fake")
    assert server.pinner is (channel.pinned_with[0] if channel.pinned_with else None)
    answer = hello(server, model_dir, schedule)
    assert answer.header["server"]["host_memory"]["pinned"] == pinned
    ok = embed_call(server, answer.header["plan_id"], torch.randint(0, 512, (1, 5)))
    assert ok.header["ok"]
    if device == "cuda":
        assert log == ["run", "fence", ("place", True), "fence"]
    else:  # the work is done when run() returns; copies from host memory block anyway
        assert log == ["run", "fence", ("place", False)]
