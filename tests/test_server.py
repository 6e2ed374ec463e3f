"""The GPU side rejects every malformed request with an error reply and keeps serving."""

from __future__ import annotations

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


def reply(server, frames):
    return codec.decode(server.handle(frames))


def wire_plan(schedule, dims):
    entries = plan_entries(schedule, [c.plain_wire(dims, "float32") for c in schedule.calls])
    return [e.to_wire() for e in entries]


def hello(server, model_dir, schedule, **over):
    h = {"m": "hello", "id": 1, "v": protocol.VERSION, "fingerprint": fingerprint(model_dir),
         "executor": "unfused", "dtype": "float32",
         "protection": {"name": "none", "options": {}},
         "plan": wire_plan(schedule, server.dims), **over}
    return reply(server, codec.encode(Message(h)))


def embed_call(server, plan_id, ids, **over):
    h = {"m": "call", "id": 2, "plan": plan_id, "c": 0, "s": 7, "past": 0, "last": False, **over}
    return reply(server, codec.encode(Message(h, {"ids": ids})))


def assert_error(msg, *words):
    assert msg.header["ok"] is False
    for w in words:
        assert w in msg.header["error"], msg.header["error"]


@pytest.mark.parametrize("frames,words", [
    ([b"\xc1garbage"], ["msgpack"]),
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
     ["hello first"]),
])
def test_malformed_requests_get_error_replies(server, frames, words):
    assert_error(reply(server, frames), *words)
    assert reply(server, codec.encode(Message({"m": "ping", "id": 9})).copy()).header["ok"]


def test_hello_refuses_a_mismatch(server, model_dir, schedule):
    assert_error(hello(server, model_dir, schedule, fingerprint="0" * 16), "fingerprint")
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
    assert_error(embed_call(server, plan_id, ids.to(torch.int32)), "expected int64")
    assert_error(embed_call(server, plan_id, ids, c=10_000), "out of range")
    assert_error(embed_call(server, plan_id, ids + 1000), "out of range")
    assert_error(embed_call(server, plan_id, ids, past=10**9), "exceed")
    bad = reply(server, codec.encode(Message(
        {"m": "call", "id": 3, "plan": plan_id, "c": 1, "s": 7, "past": 0, "last": False},
        {"0.x": torch.zeros(1, 5, 63)})))
    assert_error(bad, "shape")
    ok = embed_call(server, plan_id, ids)
    assert ok.header["ok"] and ok.tensors["h0"].shape == (1, 5, 64)


def test_cache_position_mismatch_resets_the_session(server, model_dir, schedule):
    plan_id = hello(server, model_dir, schedule).header["plan_id"]
    scores = next(c for c in schedule.calls if c.ops[0].kind == "attn_scores")
    q, k = torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 3, 16)
    head = {"m": "call", "id": 4, "plan": plan_id, "c": scores.index, "s": 11, "last": False}
    first = reply(server, codec.encode(Message({**head, "past": 0}, {"0.qr": q, "0.kr": k})))
    assert first.header["ok"]
    again = reply(server, codec.encode(Message({**head, "past": 0}, {"0.qr": q, "0.kr": k})))
    assert_error(again, "cache holds 3 positions")
    assert 11 not in server._sessions
