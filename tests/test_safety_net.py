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

from tsqp_core import codec, protocol
from tsqp_core.executor import UnfusedExecutor
from tsqp_core.gpu.server import GpuServer
from tsqp_core.metrics import Meter
from tsqp_core.models.source import fingerprint, resolve
from tsqp_core.partition import SeedPartition
from tsqp_core.plugins import PluginOptions
from tsqp_core.protection import CallSite
from tsqp_core.protocol import Hello, sizes
from tsqp_core.schedule import build_schedule, plan_entries
from tsqp_core.tee.client import RemoteError, RemoteGpu
from tsqp_core.tee.sampling import Sampler, Sampling
from tsqp_core.transport import ClientChannel

from conftest import compose

# --- 1. the client's reply checks: a misbehaving server ----------------------------------

Tamper = Callable[[dict[str, Any], dict[str, torch.Tensor]], Any]


class TamperingChannel(ClientChannel):
    """A real :class:`GpuServer` answering in this thread, with call replies rewritten by
    ``tamper(header, tensors)`` -- the header as ``{"kind", "id", "t"}``, the tensors read
    with the plan's layout ``slots`` -- which edits them in place, or returns raw frames."""

    def __init__(self, server: GpuServer) -> None:
        self.server = server
        self.tamper: Tamper | None = None
        self.slots: tuple[protocol.Slot, ...] = ()

    def request(self, frames, timeout):
        reply = self.server.handle(list(frames))
        if self.tamper is None or not protocol.is_call_frame(frames[0]):
            return reply
        _, kind, rid, *t = protocol.CALL_REPLY.unpack(reply[0])
        header = {"kind": kind, "id": rid, "t": t}
        tensors = protocol.read_tensors(self.slots, reply[1:], copy=True)
        raw = self.tamper(header, tensors)
        if raw is not None:
            return raw
        return [protocol.CALL_REPLY.pack(protocol.CALL_TAG, header["kind"], header["id"],
                                         *header["t"]),
                *(codec.tensor_buffer(x) for x in tensors.values())]

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tampered():
    """A hello'd :class:`RemoteGpu` on the seed partition, and a function making its
    ``qkv_proj`` call of layer 0 (three outputs) with a given tamper."""
    model_dir = resolve(compose("model=tiny").model)
    server = GpuServer(model_dir, UnfusedExecutor(PluginOptions()), "unfused", torch.float32,
                       torch.device("cpu"))
    schedule = build_schedule(16, SeedPartition(PluginOptions()).gpu_ops(), "op")
    wires = [c.plain_wire(server.dims, "float32") for c in schedule.calls]
    channel = TamperingChannel(server)
    remote = RemoteGpu(channel, borrowed=False, timeout=5)
    remote.hello(Hello(fingerprint(model_dir), "unfused", "float32",
                       {"name": "none", "options": {}}, plan_entries(schedule, wires),
                       batch=1, positions=16))
    call = next(c for c in schedule.calls if c.method == "qkv_proj")
    assert call.outputs == ("0.q", "0.k", "0.v")
    channel.slots = protocol.CallLayout(wires[call.index]).slots(1, 4, 0, False)[1]
    x = torch.randn(1, 4, server.dims.hidden, generator=torch.Generator().manual_seed(0))
    site = CallSite(call, wires[call.index], session=1, forward=1, past=0, batch=1, tokens=4,
                    last_only=False, sizes=sizes(1, 4, 0, False))

    def make(tamper: Tamper | None) -> dict[str, torch.Tensor]:
        channel.tamper = tamper
        try:
            return remote.call(site, {call.inputs[0]: x}, Meter())
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


def _tensors(edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Tamper:
    def tamper(h, t):
        new = edit(dict(t))
        t.clear()
        t.update(new)
    return tamper


def _bump_id(h, t):
    h["id"] += 1


def _reorder(t):
    return {k: t[k] for k in ("0.k", "0.q", "0.v")}


def _msgpack(**fields: Any) -> Tamper:
    """Answer with a msgpack message (what errors are) instead of a call frame."""
    def tamper(h, t):
        return codec.pack({k: h["id"] if v is ID else v for k, v in fields.items()}, [], [])
    return tamper


#: Stands for the request's own id in :func:`_msgpack`.
ID = object()


def _header(edit: Callable[[bytes], bytes]) -> Tamper:
    def tamper(h, t):
        head = protocol.CALL_REPLY.pack(protocol.CALL_TAG, h["kind"], h["id"], *h["t"])
        return [edit(head), *(codec.tensor_buffer(x) for x in t.values())]
    return tamper


# Names, dtypes and shapes do not travel in a call's reply (the plan fixes them), so a reply
# can only get them wrong as frames of the wrong number or size.
BAD_REPLIES: dict[str, tuple[Tamper, list[str]]] = {
    # request id
    "id-off-by-one": (_bump_id, ["reply id", "does not match request"]),
    # status: an error is a msgpack reply to the request
    "error-with-text": (_msgpack(id=ID, ok=False, error="layer 0 exploded: xyzzy"),
                        ["GPU side refused qkv_proj", "layer 0 exploded: xyzzy"]),
    "error-no-text": (_msgpack(id=ID, ok=False), ["refused qkv_proj", "no reason given"]),
    "error-for-another-id": (_msgpack(id=12345, ok=False, error="x"),
                             ["call qkv_proj", "reply id 12345 does not match"]),
    "ok-as-msgpack": (_msgpack(id=ID, ok=True), ["call qkv_proj",
                                                 "a call's reply must be a call frame"]),
    "ok-missing": (_msgpack(id=ID), ["call qkv_proj", "reply has no 'ok'"]),
    # frames: how many
    "missing-tensor": (_tensors(lambda t: {k: v for k, v in t.items() if k != "0.k"}),
                       ["expected 3 tensors ['0.q', '0.k', '0.v']", "got 2 frames"]),
    "extra-tensor": (_tensors(lambda t: {**t, "0.x": t["0.q"]}), ["got 4 frames"]),
    "no-tensors": (_tensors(lambda t: {}), ["expected 3 tensors", "got 0 frames"]),
    # frames: how big (what a wrong shape or dtype comes to)
    "short-sequence": (_tensors(lambda t: {**t, "0.q": t["0.q"][:, :3].contiguous()}),
                       ["tensor '0.q': [1, 4, 64] float32 needs 1024 bytes, frame has 768"]),
    "wrong-width": (_tensors(lambda t: {**t, "0.k": t["0.q"]}),
                    ["tensor '0.k': [1, 4, 32] float32 needs 512 bytes, frame has 1024"]),
    "reordered-tensors": (_tensors(_reorder), ["tensor '0.q'", "frame has 512"]),
    "bf16-instead-of-fp32": (_tensors(lambda t: {**t, "0.v": t["0.v"].bfloat16()}),
                             ["tensor '0.v'", "needs 512 bytes, frame has 256"]),
    "int64-instead-of-fp32": (_tensors(lambda t: {**t, "0.q": t["0.q"].long()}),
                              ["tensor '0.q'", "needs 1024 bytes, frame has 2048"]),
    # the header itself
    "request-kind": (_set("kind", 1), ["call qkv_proj", "not a call reply header"]),
    "header-short": (_header(lambda b: b[:-1]), ["a call reply header has 40 bytes, got 39"]),
    "header-long": (_header(lambda b: b + b"\0"), ["a call reply header has 40 bytes, got 41"]),
    # the server's timings
    "t-beyond-an-hour": (_set("t", [0, 10**15, 0]), ["bad timings [0, 1000000000000000, 0]"]),
    "t-beyond-the-round-trip": (_set("t", [0, 10**12, 0]),
                                ["the server claims 1000000000000 ns", "end to end"]),
    # not a message at all
    "garbage": (lambda h, t: [b"\x00\x01"], ["call qkv_proj", "not valid msgpack"]),
    "empty": (lambda h, t: [], ["call qkv_proj", "empty reply"]),
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

    from tsqp_core.tee.pipeline import generate

    prompt = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(4))
    with split_model(*FAST) as (model, server):
        per_forward = len(model.schedule.calls)
        meter = Meter()
        full = generate(model, prompt, 10, Sampler(Sampling()), meter)
        calls_full = meter.calls
        tokens = full.tokens[0]
        assert len(tokens) == 10
        # stop at the third token (the first time that token appears)
        stop = tokens[2]
        first = tokens.index(stop)
        meter = Meter()
        early = generate(model, prompt, 10, Sampler(Sampling()), meter,
                         stop_ids={stop, 100_000})
        assert early.tokens[0] == tokens[:first + 1]
        assert len(early.step_logits) == first + 1
        # the prefill and one forward per token fed back: none after the stop token
        assert meter.calls == (first + 1) * per_forward
        assert calls_full == 10 * per_forward
        # a stop id the model never produces, and None: the full length
        never = (set(range(512)) - set(tokens)).pop()
        for stop_ids in (None, set(), {never}):
            again = generate(model, prompt, 10, Sampler(Sampling()), Meter(), stop_ids=stop_ids)
            assert again.tokens == full.tokens
        assert not server.live_sessions()


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


# --- 3. RoPE in bf16 past position 256, and LLaMA-3 RoPE end to end -----------------------
#
# bf16 holds integers exactly only up to 256: a position rounded through bf16 on the way
# to the tables (``pos.to(bfloat16)``, ``arange(n, dtype=bfloat16)``) is right below 257 and
# wrong from there on (257 -> 256, 259 -> 260, ...). The tiny model's Llama-3 rope scaling
# has original_max_position_embeddings 256 as well.

POSITIONS = 4096


@pytest.fixture(scope="module")
def tiny_ckpt():
    from test_executor_parity import compose as parity_compose

    from tsqp_core.models.source import Checkpoint

    return Checkpoint(resolve(parity_compose().model))


def _hf_rope(ckpt, pos: torch.Tensor, dtype: torch.dtype):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cos, sin = LlamaRotaryEmbedding(ckpt.config)(torch.zeros(1, dtype=dtype), pos[None])
    return cos[0], sin[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rope_tables_are_computed_in_fp32_then_cast(tiny_ckpt, dtype):
    """Catches: positions (or angles) rounded through the model's dtype before cos/sin."""
    from tsqp_core.ops import Rope

    rope = Rope(tiny_ckpt.config, tiny_ckpt.dims.head_dim)
    pos = torch.arange(POSITIONS)
    cos, sin = rope.cos_sin(pos, dtype)
    assert cos.shape == sin.shape == (POSITIONS, tiny_ckpt.dims.head_dim) and cos.dtype == dtype
    # fp32 angles from exact integer positions, then one cast
    angles = pos.float()[:, None] * rope.inv_freq.float()[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    assert torch.equal(cos, angles.cos().to(dtype)) and torch.equal(sin, angles.sin().to(dtype))
    # transformers' own LLaMA rotary embedding (Llama-3 scaling included), bit for bit
    hf_cos, hf_sin = _hf_rope(tiny_ckpt, pos, dtype)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)
    # and within one rounding (half an ulp of the dtype) of the float64 truth at every
    # position, plus the fp32 angle's own rounding (|angle| < 4096 rad, 2**-24 relative)
    truth = pos.double()[:, None] * rope.inv_freq.double()[None, :]
    truth = torch.cat([truth, truth], dim=-1)
    half_ulp = {torch.bfloat16: 2 ** -9, torch.float16: 2 ** -12, torch.float32: 2 ** -25}[dtype]
    bound = half_ulp + POSITIONS * 2 ** -23
    assert (cos.double() - truth.cos()).abs().max() <= bound
    assert (sin.double() - truth.sin()).abs().max() <= bound
    # neighbours past 256 are distinct positions (the fastest frequency turns ~1 rad a step)
    assert not torch.equal(cos[257], cos[256]) and not torch.equal(cos[259], cos[260])


def test_fused_rope_tables_match_rope_past_256(tiny_ckpt):
    """The fused backend's precomputed half-width tables, and RoPE applied with them, agree
    with :class:`Rope` and with transformers at positions 256..4095. Catches: tables built
    over bf16 positions, or indexed by rounded ones."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from tsqp_executor_fused.backend import rope_inplace

    from tsqp_core.ops import Rope
    from tsqp_core.plugins import get_plugins

    dtype, d = torch.bfloat16, tiny_ckpt.dims
    backend = get_plugins().executors.create("fused").backend(
        tiny_ckpt, frozenset({"rope"}), dtype, torch.device("cpu"))
    half = d.head_dim // 2
    cos, sin = Rope(tiny_ckpt.config, d.head_dim).cos_sin(torch.arange(POSITIONS), dtype)
    assert backend._cos.shape == (POSITIONS, half) and backend._cos.dtype == dtype
    assert torch.equal(backend._cos, cos[:, :half]) and torch.equal(backend._sin, sin[:, :half])
    assert torch.equal(cos[:, half:], cos[:, :half])  # what makes half-width tables enough
    # RoPE over q [B, T, H, d] at positions past 256, as the fused attention step applies it
    pos = torch.tensor([256, 257, 258, 259, 300, 511, 513, 1025, 4095])
    q = torch.randn(1, len(pos), d.heads, d.head_dim,
                    generator=torch.Generator().manual_seed(0)).to(dtype)
    got = q.clone()
    rope_inplace(got, *backend._cos_sin(pos))
    hf_cos, hf_sin = _hf_rope(tiny_ckpt, pos, dtype)
    want, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), hf_cos[None],
                                   hf_sin[None])
    assert torch.equal(got, want.transpose(1, 2))


def test_tee_rope_op_in_bf16_past_256(tiny_ckpt):
    """The reference RoPE op (TEE side, and the unfused GPU side) in bf16 at positions past
    256 matches transformers bit for bit. Catches: ``pos`` cast to the activations' dtype."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from tsqp_core import ops
    from tsqp_core.graph import forward_ops

    d, dtype = tiny_ckpt.dims, torch.bfloat16
    pos = torch.arange(250, 330)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, len(pos), d.heads * d.head_dim, generator=gen).to(dtype)
    k = torch.randn(1, len(pos), d.kv_heads * d.head_dim, generator=gen).to(dtype)
    ctx = ops.OpContext(d, {}, ops.Rope(tiny_ckpt.config, d.head_dim), 1e-5, ops.KVCache())
    op = next(o for o in forward_ops(d.layers) if o.kind == "rope")
    qr, kr = ops.REFERENCE_OPS["rope"](ctx, op, q, k, pos)
    hf_cos, hf_sin = _hf_rope(tiny_ckpt, pos, dtype)
    want_q, want_k = apply_rotary_pos_emb(ops.split_heads(q, d.heads),
                                          ops.split_heads(k, d.kv_heads), hf_cos[None], hf_sin[None])
    assert torch.equal(qr, want_q) and torch.equal(kr, want_k)


#: A prompt of 300 tokens and 6 new ones: positions 0..305, well past 256.
LONG = ("workload=generate", "workload.prompt_tokens=300", "workload.new_tokens=6",
        "reference=true", "seed=9")


def _transformers_bf16_eps(seed: int, prompt_tokens: int, new_tokens: int) -> float:
    """transformers' own bf16 error on the run's prompt (both kernels), as in
    test_executor_parity's ``hf`` fixture."""
    from test_executor_parity import compose as parity_compose
    from test_executor_parity import first_steps_diff

    from tsqp_core.reference import Reference

    prompt = torch.randint(0, 512, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    model_dir = resolve(parity_compose().model)
    fp32 = Reference(model_dir, torch.float32, "sdpa").generate(prompt, new_tokens)
    return max(first_steps_diff(Reference(model_dir, torch.bfloat16, attn).generate(prompt, new_tokens), fp32)
               for attn in ("sdpa", "eager"))


@pytest.mark.parametrize("executor,partition", [("fused", "layer"), ("unfused", "seed")],
                         ids=["fused-layer-gpu-rope", "unfused-seed-tee-rope"])
def test_bf16_generation_past_position_256_matches_transformers(tmp_path, executor, partition):
    """Stage-3-like (bf16, inproc) with positions up to 305 and Llama-3 rope scaling, against
    transformers bf16 with the kernel that rounds alike: same tokens, logits within the bf16
    bound of test_executor_parity. Catches: RoPE positions rounded through bf16 in the fused
    tables (GPU side) or in the reference op (TEE side)."""
    from test_executor_parity import bf16_tol, run_tiny

    res = run_tiny(tmp_path, f"executor={executor}", f"partition={partition}", "dtype=bfloat16",
                   *LONG)
    assert res["workload"]["prompt_tokens"] + res["workload"]["new_tokens"] > 300
    assert res["config"]["dtype"] == "bfloat16"
    ref = res["reference"]
    assert ref["tokens_match"] is True, (res["tokens"], ref["reference_tokens"])
    assert ref["max_abs_logit_diff"] <= bf16_tol(_transformers_bf16_eps(9, 300, 6))


@pytest.mark.parametrize("executor,partition", [("fused", "layer"), ("unfused", "seed")],
                         ids=["fused-layer-gpu-rope", "unfused-seed-tee-rope"])
def test_fp32_generation_past_position_256_matches_transformers(tmp_path, executor, partition):
    from test_executor_parity import FP32_TOL, run_tiny

    res = run_tiny(tmp_path, f"executor={executor}", f"partition={partition}", "dtype=float32",
                   *LONG)
    assert res["reference"]["tokens_match"] is True
    assert res["reference"]["max_abs_logit_diff"] <= FP32_TOL


# --- 4. the latency breakdown: a known delay lands in its own category --------------------
#
# ``other`` is the remainder, so the parts add up to ``total`` by construction; what keeps
# the breakdown honest is that ``other`` never goes negative (nothing counted twice) and
# that a delay injected at a known place shows up in that place's category and nowhere else.

DELAY_S = 0.020


def assert_breakdown_adds_up(res: dict[str, Any]) -> dict[str, float]:
    lat = res["latency_ms"]
    parts, total = lat["breakdown"], lat["total"]
    assert set(parts) == {"serialize", "transport", "gpu_compute", "tee_compute", "protect",
                          "other"}
    assert all(v >= 0 for v in parts.values()), parts  # ``other`` included: nothing counted twice
    assert abs(sum(parts.values()) - total) <= 0.05 * total
    assert parts["other"] <= 0.25 * total, parts
    return parts


def _slowed(fn: Callable, counter: list[int], delay_s: float = DELAY_S) -> Callable:
    def slow(*args, **kwargs):
        counter.append(1)
        time.sleep(delay_s)
        return fn(*args, **kwargs)
    return slow


def test_a_gpu_side_delay_lands_in_gpu_compute(run_tiny, monkeypatch):
    """The GPU side's backend sleeps 20 ms per call: ``gpu_compute`` grows by calls x 20 ms,
    ``transport`` and ``tee_compute`` do not. Catches: gpu_compute counted twice (or ten
    times), the server's timer missing the backend run, transport not net of the server's
    time."""
    from tsqp_executor_fused.backend import FusedBackend

    calls: list[int] = []
    monkeypatch.setattr(FusedBackend, "run", _slowed(FusedBackend.run, calls))
    res = run_tiny(*FAST, "workload=prefill", "workload.prompt_tokens=16")
    assert len(calls) == res["rpc"]["calls"] == 18  # the inproc server runs in this process
    known = len(calls) * DELAY_S * 1e3
    parts = assert_breakdown_adds_up(res)
    assert known <= parts["gpu_compute"] <= 1.5 * known + 20, parts
    assert parts["transport"] < 0.25 * known, parts
    assert parts["tee_compute"] < 0.25 * known, parts


def test_a_tee_op_delay_lands_in_tee_compute(run_tiny, monkeypatch):
    """Each TEE-side ``input_norm`` sleeps 20 ms: ``tee_compute`` grows by 16 x 20 ms, the
    GPU-side categories do not. Catches: TEE ops untimed or timed twice, or timed as a
    GPU-side category."""
    from tsqp_core import ops
    from tsqp_core.tee_ops import TorchTeeOps

    calls: list[int] = []
    impls = {**ops.REFERENCE_OPS, "input_norm": _slowed(ops.REFERENCE_OPS["input_norm"], calls)}
    monkeypatch.setattr(TorchTeeOps, "implementations", lambda self: impls)
    res = run_tiny(*FAST, "workload=prefill", "workload.prompt_tokens=16")
    assert len(calls) == 16  # layer partition: input_norm stays in the TEE, once per layer
    known = len(calls) * DELAY_S * 1e3
    parts = assert_breakdown_adds_up(res)
    assert known <= parts["tee_compute"] <= 1.5 * known + 20, parts
    assert parts["gpu_compute"] < 0.25 * known, parts
    assert parts["transport"] < 0.25 * known, parts


def test_a_value_check_delay_lands_in_its_serialize_part(run_tiny, monkeypatch):
    """The TEE's value check sleeps 20 ms per call: ``serialize`` grows by calls x 20 ms and
    so does its ``value_check`` part, no other part; the parts add up to ``serialize``.
    Catches: a part timed into the wrong name, parts that do not add up, a part missing from
    results.json."""
    from tsqp_core.tee.validate import ValueCheck

    calls: list[int] = []
    monkeypatch.setattr(ValueCheck, "check", _slowed(ValueCheck.check, calls))
    res = run_tiny(*FAST, "workload=prefill", "workload.prompt_tokens=16")
    assert len(calls) == res["rpc"]["calls"] == 18
    known = len(calls) * DELAY_S * 1e3
    parts = assert_breakdown_adds_up(res)
    split = res["latency_ms"]["serialize_parts"]
    assert list(split) == ["encode_request", "server_reads", "server_encodes", "check_reply",
                           "value_check"]
    assert sum(split.values()) == pytest.approx(parts["serialize"], rel=1e-6)
    assert known <= split["value_check"] <= 1.5 * known + 20, split
    assert all(v < 0.25 * known for k, v in split.items() if k != "value_check"), split


def test_sampling_time_lands_in_tee_compute(run_tiny, monkeypatch):
    """Sampling is TEE work: a sampler slowed by 50 ms per token shows in ``tee_compute``
    of a generate run, and ``other`` stays non-negative."""
    calls: list[int] = []
    monkeypatch.setattr(Sampler, "__call__", _slowed(Sampler.__call__, calls, 0.050))
    res = run_tiny(*FAST, "workload=generate", "workload.prompt_tokens=8",
                   "workload.new_tokens=4")
    assert len(calls) == 4 and len(res["tokens"][0]) == 4
    known = 4 * 50.0
    parts = assert_breakdown_adds_up(res)
    assert known <= parts["tee_compute"] <= 1.5 * known + 20, parts
    assert parts["gpu_compute"] < 0.5 * known and parts["transport"] < 0.5 * known, parts
