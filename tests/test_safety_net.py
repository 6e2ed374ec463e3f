"""A safety net for checks that nothing else in the suite would miss if they went away.

Each test here was written against a deliberate bug (noted in its docstring) that the rest
of the suite let through: the client's reply checks switched off, top-p keeping the tail,
RoPE positions rounded through bf16, a breakdown category counted twice. All run the tiny
model in-process and take well under ten seconds each.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest
import torch

from tsqp_core import codec
from tsqp_core.client import RemoteError, RemoteGpu
from tsqp_core.codec import Message
from tsqp_core.executor import UnfusedExecutor
from tsqp_core.models.source import fingerprint, resolve
from tsqp_core.partition import SeedPartition
from tsqp_core.pipeline import Sampler, Sampling
from tsqp_core.plugins import PluginOptions
from tsqp_core.schedule import build_schedule
from tsqp_core.server import GpuServer
from tsqp_core.transport import ClientChannel

from conftest import compose

# --- 1. the client's reply checks: a misbehaving server ----------------------------------

Tamper = Callable[[dict[str, Any], dict[str, torch.Tensor]], Any]


class TamperingChannel(ClientChannel):
    """A real :class:`GpuServer` answering in this thread, with call replies rewritten by
    ``tamper(header, tensors)`` (which edits them in place, or returns raw frames)."""

    def __init__(self, server: GpuServer) -> None:
        self.server = server
        self.tamper: Tamper | None = None

    def request(self, frames, timeout):
        method = codec.decode(list(frames)).header.get("m")
        reply = self.server.handle(list(frames))
        if self.tamper is None or method != "call":
            return reply
        msg = codec.decode(reply, copy=True)
        raw = self.tamper(msg.header, msg.tensors)
        return raw if raw is not None else codec.encode(msg)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tampered():
    """A hello'd :class:`RemoteGpu` on the seed partition, and a function making its
    ``qkv_proj`` call of layer 0 (three outputs) with a given tamper."""
    model_dir = resolve(compose("model=tiny").model)
    server = GpuServer(model_dir, UnfusedExecutor(PluginOptions()), "unfused", torch.float32,
                       torch.device("cpu"))
    schedule = build_schedule(16, SeedPartition(PluginOptions()).gpu_ops(),
                              lambda run: [[o] for o in run])
    channel = TamperingChannel(server)
    remote = RemoteGpu(channel, borrowed=False, timeout=5)
    remote.hello(fingerprint=fingerprint(model_dir), executor="unfused", dtype="float32",
                 schedule=schedule)
    call = next(c for c in schedule.calls if c.method == "qkv_proj")
    assert call.outputs == ("0.q", "0.k", "0.v")
    x = torch.randn(1, 4, server.dims.hidden, generator=torch.Generator().manual_seed(0))

    def make(tamper: Tamper | None) -> dict[str, torch.Tensor]:
        channel.tamper = tamper
        try:
            return remote.call(call, {call.inputs[0]: x}, session=1, past=0, last_only=False,
                               dims=server.dims, batch=1, tokens=4, dtype=torch.float32)
        finally:
            channel.tamper = None

    return make


def test_an_honest_reply_passes_the_checks(tampered):
    """The control: the harness itself does not trip the checks."""
    out = tampered(lambda h, t: None)
    assert list(out) == ["0.q", "0.k", "0.v"]
    assert out["0.q"].shape == (1, 4, 64) and out["0.k"].shape == (1, 4, 32)


def _set(key: str, value: Any) -> Tamper:
    def tamper(h, t):
        h[key] = value
    return tamper


def _drop(key: str) -> Tamper:
    def tamper(h, t):
        h.pop(key, None)
    return tamper


def _tensors(edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Tamper:
    def tamper(h, t):
        new = edit(dict(t))
        t.clear()
        t.update(new)
    return tamper


def _bump_id(h, t):
    h["id"] += 1


def _rename(t):
    return {("0.qq" if k == "0.q" else k): v for k, v in t.items()}


def _reorder(t):
    return {k: t[k] for k in ("0.k", "0.q", "0.v")}


BAD_REPLIES: dict[str, tuple[Tamper, list[str]]] = {
    # request id
    "id-off-by-one": (_bump_id, ["reply id", "does not match request"]),
    "id-missing": (_drop("id"), ["reply id None", "does not match"]),
    # status
    "ok-false-with-error": (lambda h, t: h.update(ok=False, error="layer 0 exploded: xyzzy"),
                            ["GPU side refused call", "layer 0 exploded: xyzzy"]),
    "ok-false-no-error": (lambda h, t: h.update(ok=False), ["refused call", "no reason given"]),
    "ok-missing": (_drop("ok"), ["refused call"]),
    "ok-truthy-not-true": (_set("ok", 1), ["refused call"]),
    # output names
    "missing-tensor": (_tensors(lambda t: {k: v for k, v in t.items() if k != "0.k"}),
                       ["expected tensors ['0.q', '0.k', '0.v']", "got ['0.q', '0.v']"]),
    "extra-tensor": (_tensors(lambda t: {**t, "0.x": t["0.q"]}),
                     ["expected tensors", "'0.x'"]),
    "renamed-tensor": (_tensors(_rename), ["expected tensors", "'0.qq'"]),
    "reordered-tensors": (_tensors(_reorder), ["expected tensors", "got ['0.k', '0.q', '0.v']"]),
    "no-tensors": (_tensors(lambda t: {}), ["expected tensors", "got []"]),
    # shapes and dtypes
    "short-sequence": (_tensors(lambda t: {**t, "0.q": t["0.q"][:, :3].contiguous()}),
                       ["tensor '0.q' is [1, 3, 64]", "expected [1, 4, 64]"]),
    "wrong-width": (_tensors(lambda t: {**t, "0.k": t["0.q"]}),
                    ["tensor '0.k' is [1, 4, 64]", "expected [1, 4, 32]"]),
    "flattened": (_tensors(lambda t: {**t, "0.v": t["0.v"].reshape(-1)}),
                  ["tensor '0.v' is [128]", "expected [1, 4, 32]"]),
    "bf16-instead-of-fp32": (_tensors(lambda t: {**t, "0.v": t["0.v"].bfloat16()}),
                             ["tensor '0.v'", "torch.bfloat16", "expected [1, 4, 32] torch.float32"]),
    "int64-instead-of-fp32": (_tensors(lambda t: {**t, "0.q": t["0.q"].long()}),
                              ["tensor '0.q'", "torch.int64", "expected [1, 4, 64] torch.float32"]),
    # the server's timing field
    "t-missing": (_drop("t"), ["bad timing field None"]),
    "t-not-a-list": (_set("t", "fast"), ["bad timing field 'fast'"]),
    "t-too-short": (_set("t", [1, 2]), ["bad timing field [1, 2]"]),
    "t-too-long": (_set("t", [1, 2, 3, 4]), ["bad timing field [1, 2, 3, 4]"]),
    "t-negative": (_set("t", [10, -5, 10]), ["bad timing field [10, -5, 10]"]),
    "t-float": (_set("t", [10, 2.5, 10]), ["bad timing field [10, 2.5, 10]"]),
    "t-string": (_set("t", [10, "2", 10]), ["bad timing field"]),
    # not a codec message at all
    "not-msgpack": (lambda h, t: [b"\xc1\xc1"], ["malformed reply from the GPU side"]),
    "buffer-short": (lambda h, t: codec.encode(Message(h, t))[:-1] + [b"1234"],
                     ["malformed reply", "needs", "bytes"]),
}


@pytest.mark.parametrize("tamper,words", BAD_REPLIES.values(), ids=BAD_REPLIES.keys())
def test_a_bad_reply_raises_remote_error_naming_the_problem(tampered, tamper, words):
    """Catches: any of ``RemoteGpu._request``'s / ``RemoteGpu.call``'s reply checks deleted
    (the call would return the bad reply, or fail with some other error)."""
    with pytest.raises(RemoteError) as exc:
        tampered(tamper)
    message = str(exc.value)
    for w in words:
        assert w in message, message
