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


# --- 2. sampling -------------------------------------------------------------------------

#: Probabilities in a shuffled vocabulary of 8: the nucleus of top-p 0.85 is the three most
#: likely (0.40 + 0.30 + 0.16 = 0.86 crosses 0.85 with the third), the tail the other five.
PROBS = {5: 0.40, 2: 0.30, 7: 0.16, 0: 0.06, 3: 0.04, 6: 0.02, 1: 0.01, 4: 0.01}
NUCLEUS_085 = {5, 2, 7}


def _logits(probs: dict[int, float], rows: int) -> torch.Tensor:
    p = torch.tensor([probs[i] for i in range(len(probs))], dtype=torch.float64)
    return p.log().float().expand(rows, -1).contiguous()


def _draws(sampler: Callable[[torch.Tensor], torch.Tensor], probs: dict[int, float],
           rows: int = 4000) -> torch.Tensor:
    out = sampler(_logits(probs, rows))
    assert out.shape == (rows,) and out.dtype == torch.int64
    return out


def assert_nucleus(samples: torch.Tensor, nucleus: set[int], probs: dict[int, float]) -> None:
    """Every sample lies in the nucleus, every nucleus token appears, at about its
    renormalised probability."""
    counts = torch.bincount(samples, minlength=len(probs))
    seen = {i for i, c in enumerate(counts.tolist()) if c}
    assert seen <= nucleus, f"sampled outside the nucleus: {sorted(seen - nucleus)}"
    assert seen == nucleus, f"nucleus tokens never sampled: {sorted(nucleus - seen)}"
    mass = sum(probs[i] for i in nucleus)
    for i in nucleus:
        assert abs(counts[i].item() / len(samples) - probs[i] / mass) < 0.05


def test_greedy_is_argmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 100, generator=gen)
    for temperature in (0.0, -1.0):
        got = Sampler(Sampling(temperature=temperature, top_p=0.5, seed=3))(logits)
        assert torch.equal(got, logits.argmax(-1))
    assert Sampler(Sampling())(logits.bfloat16()).tolist() == logits.bfloat16().argmax(-1).tolist()


def test_a_seed_makes_sampling_reproducible_and_another_seed_changes_it():
    """Catches: the sampler drawing from the global RNG, or ignoring its seed."""
    logits = torch.zeros(200, 50)  # uniform: 200 draws of 50 tokens agree by chance ~never

    def draw(seed: int) -> list[int]:
        sampler = Sampler(Sampling(temperature=1.0, top_p=1.0, seed=seed))
        return sampler(logits).tolist() + sampler(logits).tolist()  # two calls: the stream goes on

    torch.manual_seed(1)
    a = draw(7)
    torch.manual_seed(2)  # the global RNG must not matter
    assert draw(7) == a
    assert draw(8) != a
    assert a[:200] != a[200:], "successive calls continue the stream, not restart it"


def test_top_p_keeps_exactly_the_nucleus():
    """Catches: a top-p mask that is inverted (keeps the tail), off by one (drops the token
    that crosses top_p), or scattered back to the wrong vocabulary ids."""
    sampler = Sampler(Sampling(temperature=1.0, top_p=0.85, seed=0))
    assert_nucleus(_draws(sampler, PROBS), NUCLEUS_085, PROBS)
    # the most likely token is always kept, even when it alone exceeds top_p
    sampler = Sampler(Sampling(temperature=1.0, top_p=0.1, seed=0))
    assert_nucleus(_draws(sampler, PROBS), {5}, PROBS)
    # top_p = 1: everything can be drawn
    sampler = Sampler(Sampling(temperature=1.0, top_p=1.0, seed=0))
    flat = {i: 1 / 8 for i in range(8)}
    assert_nucleus(_draws(sampler, flat), set(range(8)), flat)


def test_the_nucleus_check_fails_a_sampler_that_keeps_the_tail():
    """The check above can fail: a top-p with the mask inverted keeps the tail."""

    def tail_sampler(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = ~(sorted_p.cumsum(-1) - sorted_p < 0.85)  # the bug: the tail instead
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
        return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).squeeze(-1)

    with pytest.raises(AssertionError, match="outside the nucleus"):
        assert_nucleus(_draws(tail_sampler, PROBS), NUCLEUS_085, PROBS)


def _tempered(probs: dict[int, float], temperature: float) -> dict[int, float]:
    w = {i: p ** (1 / temperature) for i, p in probs.items()}
    return {i: x / sum(w.values()) for i, x in w.items()}


@pytest.mark.parametrize("temperature,nucleus", [
    (0.25, {5, 2}),           # tempered shares 0.745, 0.236, ...: cumulative 0 and 0.745 < 0.8
    (1.0, {5, 2, 7}),         # 0.40, 0.30, 0.16: cumulative 0, 0.40, 0.70 < 0.8, then 0.86
    (2.0, {5, 2, 7, 0, 3}),   # 0.267, 0.231, 0.169, 0.104, 0.085: ... 0.771 < 0.8, then 0.856
])
def test_top_p_takes_the_nucleus_of_the_tempered_distribution(temperature, nucleus):
    """Catches: top-p applied before the temperature (the nucleus would not change with it)."""
    sampler = Sampler(Sampling(temperature=temperature, top_p=0.8, seed=1))
    tempered = _tempered(PROBS, temperature)
    assert_nucleus(_draws(sampler, PROBS), nucleus, tempered)


def test_a_small_temperature_is_greedy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 64, generator=gen)
    logits.scatter_add_(-1, logits.argmax(-1, keepdim=True), torch.ones(500, 1))  # gap >= 1
    sampler = Sampler(Sampling(temperature=1e-3, top_p=1.0, seed=0))
    assert torch.equal(sampler(logits), logits.argmax(-1))
    # and a temperature of 1 is not greedy on the same logits
    assert not torch.equal(Sampler(Sampling(temperature=1.0, seed=0))(logits), logits.argmax(-1))


FAST = ("transport=inproc", "executor=fused", "partition=layer")


def test_generation_stops_at_a_stop_token_and_not_without_one():
    """Catches: ``stop_ids`` ignored, a stop checked one step late (an extra forward), or a
    stop token dropped from the output."""
    from test_executor_parity import split_model

    from tsqp_core.pipeline import generate

    prompt = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(4))
    with split_model(*FAST) as (model, server):
        per_forward = len(model.schedule.calls)
        full = generate(model, prompt, 10, Sampler(Sampling()))
        calls_full = model.meter.calls
        tokens = full.tokens[0]
        assert len(tokens) == 10
        # stop at the third token (the first time that token appears)
        stop = tokens[2]
        first = tokens.index(stop)
        model.remote.meter = type(model.meter)()
        early = generate(model, prompt, 10, Sampler(Sampling()), stop_ids={stop, 100_000})
        assert early.tokens[0] == tokens[:first + 1]
        assert len(early.step_logits) == first + 1
        # the prefill and one forward per token fed back: none after the stop token
        assert model.meter.calls == (first + 1) * per_forward
        assert calls_full == 10 * per_forward
        # a stop id the model never produces, and None: the full length
        never = (set(range(512)) - set(tokens)).pop()
        for stop_ids in (None, set(), {never}):
            again = generate(model, prompt, 10, Sampler(Sampling()), stop_ids=stop_ids)
            assert again.tokens == full.tokens
        assert not server._sessions


def test_a_run_samples_with_the_workload_temperature_top_p_and_seed(run_tiny):
    """``workload.temperature``, ``workload.top_p`` and ``seed`` reach the sampler of a
    generate run. Catches: any of them dropped on the way (the run would be greedy, or not
    reproducible), or top-p keeping anything but the top token at a tiny top_p."""

    def tokens(seed: int, temperature: float, top_p: float = 1.0) -> list[int]:
        res = run_tiny(*FAST, "workload=generate", "workload.prompt_tokens=8",
                       "workload.new_tokens=24", f"workload.temperature={temperature}",
                       f"workload.top_p={top_p}", f"seed={seed}")
        assert len(res["tokens"][0]) == 24
        return res["tokens"][0]

    greedy = tokens(1, 0.0)
    # At temperature 50 the tiny model's logits (std ~2) leave a near-uniform distribution
    # over 512 tokens: the draws are the sampler's seed's, not the prompt's (``seed`` also
    # seeds the random prompt), and 24 of them never all match greedy by chance.
    hot = tokens(1, 50.0)
    assert hot == tokens(1, 50.0), "the same seed must give the same tokens"
    assert hot != greedy, "temperature must reach the sampler"
    assert tokens(2, 50.0) != hot, "another seed must give other tokens"
    # a nucleus of one token is greedy, whatever the temperature
    assert tokens(1, 50.0, top_p=1e-6) == greedy, "top_p must reach the sampler"
