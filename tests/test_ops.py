"""The reference ops agree with transformers' own building blocks."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from tsqp_core import ops
from tsqp_core.graph import Dims, Op
from tsqp_core.schedule import build_schedule, gpu_runs
from tsqp_core.graph import forward_ops

ROPES = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
]


@pytest.mark.parametrize("rope", ROPES, ids=["default", "llama3"])
def test_rope_tables_match_transformers(rope):
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=131072,
                      rope_parameters=rope)
    hf = LlamaRotaryEmbedding(cfg)
    mine = ops.Rope(cfg, 64)
    pos = torch.tensor([0, 1, 7, 500, 9000, 100000])
    cos, sin = hf(torch.zeros(1, 1, dtype=torch.float32), pos[None])
    c, s = mine.cos_sin(pos, torch.float32)
    torch.testing.assert_close(c, cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(s, sin[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden,scale", [(64, 300.0), (96, 3.0), (576, 1e-3), (2048, 40.0)])
def test_rms_norm_matches_transformers(dtype, hidden, scale):
    """Bit for bit in every dtype: on the CPU through torch's one-call rms_norm in fp32 (with
    the weight when all is fp32, else cast and scaled after it, as transformers does)."""
    gen = torch.Generator().manual_seed(hidden)
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    norm.weight.data = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    norm = norm.to(dtype)
    x = (torch.randn(2, 5, hidden, generator=gen) * scale).to(dtype)
    torch.testing.assert_close(ops.rms_norm(x, norm.weight, 1e-5), norm(x), rtol=0, atol=0)
    last = x[:, -1:]  # final_norm's last position: a view
    torch.testing.assert_close(ops.rms_norm(last, norm.weight, 1e-5), norm(last), rtol=0,
                               atol=0)


def test_causal_softmax_with_a_cache_offset():
    dims = Dims(1, 8, 2, 1, 4, 8, 10, 100)
    ctx = ops.OpContext(dims, {}, None, 1e-5, ops.KVCache())
    s = torch.randn(1, 2, 3, 7)
    (p,) = ops.op_attn_softmax(ctx, Op("attn_softmax", 0, (), ()), s)
    # query i sits at position 4 + i: keys beyond it get zero weight
    for i in range(3):
        assert torch.all(p[0, :, i, 5 + i:] == 0)
        assert torch.all(p[0, :, i, : 5 + i] > 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 2, 3))


def test_a_forward_shares_its_rope_tables_and_mask_across_layers():
    """One context is one forward: the RoPE tables at its positions and its causal mask are
    made by the first layer and reused by the rest -- and what they hold is what each layer
    would have made itself."""
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      rope_parameters=ROPES[1])
    dims = Dims(1, 64, 4, 2, 16, 160, 10, 4096)
    rope = ops.Rope(cfg, 16)
    ctx = ops.OpContext(dims, {}, rope, 1e-5, ops.KVCache())
    pos = torch.arange(5, 8)
    q, k = torch.randn(1, 3, 64), torch.randn(1, 3, 32)
    first = ops.op_rope(ctx, Op("rope", 0, (), ()), q, k, pos)
    tables = ctx.cos_sin(pos, torch.float32)
    again = ops.op_rope(ctx, Op("rope", 1, (), ()), q, k, pos)
    assert all(a is b for a, b in zip(ctx.cos_sin(pos, torch.float32), tables))
    fresh = ops.op_rope(ops.OpContext(dims, {}, rope, 1e-5, ops.KVCache()), Op("rope", 1, (), ()),
                        q, k, pos)
    for a, b, c in zip(first, again, fresh):
        assert torch.equal(a, b) and torch.equal(a, c)
    other = torch.arange(9, 12)  # another forward's positions are never served stale tables
    torch.testing.assert_close(ctx.cos_sin(other, torch.float32)[0],
                               rope.cos_sin(other, torch.float32)[0], rtol=0, atol=0)
    assert ctx.blocked(3, 7, pos.device) is ctx.blocked(3, 7, pos.device)
    assert torch.equal(ctx.blocked(3, 7, pos.device), ~ops.causal_mask(3, 7, pos.device))
    assert not torch.equal(ctx.blocked(2, 7, pos.device)[:, :6],
                           ctx.blocked(3, 7, pos.device)[:2, :6])


def test_gqa_attention_matches_repeated_kv():
    dims = Dims(1, 16, 4, 2, 4, 8, 10, 100)
    cache = ops.KVCache()
    ctx = ops.OpContext(dims, {}, None, 1e-5, cache)
    qr, kr = torch.randn(2, 4, 5, 4), torch.randn(2, 2, 5, 4)
    v = torch.randn(2, 5, 8)
    (s,) = ops.op_attn_scores(ctx, Op("attn_scores", 0, (), ()), qr, kr)
    (p,) = ops.op_attn_softmax(ctx, Op("attn_softmax", 0, (), ()), s)
    (c,) = ops.op_attn_context(ctx, Op("attn_context", 0, (), ()), p, v)
    k_rep = kr.repeat_interleave(2, dim=1)
    v_rep = v.view(2, 5, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1)
    want = torch.nn.functional.scaled_dot_product_attention(qr, k_rep, v_rep, is_causal=True)
    torch.testing.assert_close(c, want.transpose(1, 2).reshape(2, 5, 16), rtol=1e-5, atol=1e-5)
    assert cache.length(0, "k") == 5 and cache.length(0, "v") == 5


def test_schedule_call_counts_and_boundaries():
    seed = frozenset({"embed", "qkv_proj", "attn_scores", "attn_context", "o_proj",
                      "gate_up_proj", "down_proj", "lm_head"})
    one = build_schedule(16, seed, "op")
    assert len(one.calls) == 98
    first = one.calls[1]
    assert first.ops[0].kind == "qkv_proj" and first.inputs == ("0.x",)
    assert first.outputs == ("0.q", "0.k", "0.v")
    fused = build_schedule(16, seed, "run")
    # only PV and the o projection are adjacent on the GPU side: one call fewer per layer
    assert len(fused.calls) == 98 - 16
    assert [op.kind for op in fused.calls[3].ops] == ["attn_context", "o_proj"]
    everything = frozenset(op.kind for op in forward_ops(2))
    whole = build_schedule(2, everything, "run")
    assert len(whole.calls) == 1 and whole.calls[0].inputs == ("ids", "pos")
    assert whole.calls[0].outputs == ("logits",)
    assert len(gpu_runs(forward_ops(2), frozenset())) == 0


# --- the torch TEE-op library: fewer calls, the reference's bits --------------------------

ALL_ROPES = ROPES + [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
]


def _counted_rope_c(monkeypatch) -> list:
    """The TEE ops' RoPE in C (``tee/_rope.c``), its calls counted in the list returned."""
    from tsqp_core import tee_ops

    if tee_ops._rope is None:
        pytest.skip("tsqp_core.tee._rope was not built")
    calls: list = []
    real = tee_ops._rope.rope
    monkeypatch.setattr(tee_ops, "_rope", type("Counted", (), {
        "rope": staticmethod(lambda *a: (calls.append(a), real(*a))[1])}))
    return calls


@pytest.fixture(params=["c", "torch"])
def rope_path(request, monkeypatch):
    """The TEE ops' RoPE in C (its calls counted) or in torch (C taken away: None)."""
    from tsqp_core import tee_ops

    if request.param == "torch":
        monkeypatch.setattr(tee_ops, "_rope", None)
        return None
    return _counted_rope_c(monkeypatch)


@pytest.mark.parametrize("rope", ALL_ROPES, ids=["default", "llama3", "linear", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,tokens,heads,kv_heads,head_dim",
                         [(1, 1, 4, 2, 16), (2, 5, 4, 4, 8), (1, 17, 6, 2, 64), (3, 2, 2, 1, 4)])
def test_tee_rope_and_softmax_give_the_reference_bits(rope, dtype, batch, tokens, heads,
                                                      kv_heads, head_dim, rope_path):
    """:class:`TorchTeeOps`' RoPE (in C and in torch) and softmax against the reference
    ops, bit for bit, at prefill and decode shapes, grouped and plain attention, every RoPE
    type (dynamic past its context too), both dtypes, values spanning magnitudes."""
    from tsqp_core.tee_ops import TorchTeeOps

    impls = TorchTeeOps(None).implementations()
    cfg = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=64,
                      rope_parameters=rope)
    dims = Dims(1, heads * head_dim, heads, kv_heads, head_dim, 8, 10, 256)
    gen = torch.Generator().manual_seed(batch * 1000 + tokens * 10 + heads)
    for past in (0, 3, 100):  # 100 + tokens: past the dynamic RoPE's context
        pos = torch.arange(past, past + tokens)
        scale = 10.0 ** torch.randint(-3, 4, (batch, tokens, 1), generator=gen)
        q = (torch.randn(batch, tokens, heads * head_dim, generator=gen) * scale).to(dtype)
        k = (torch.randn(batch, tokens, kv_heads * head_dim, generator=gen) * scale).to(dtype)
        s = (torch.randn(batch, heads, tokens, past + tokens, generator=gen) * 30).to(dtype)
        got, want = [], []
        for library, out in ((impls, got), (ops.REFERENCE_OPS, want)):
            ctx = ops.OpContext(dims, {}, ops.Rope(cfg, head_dim), 1e-5, ops.KVCache())
            for layer in range(2):  # the second layer reuses the first one's tables
                out += library["rope"](ctx, Op("rope", layer, (), ()), q, k, pos)
            out += library["attn_softmax"](ctx, Op("attn_softmax", 0, (), ()), s)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(a, b)
    if rope_path is not None:  # the C path ran: two layers, three offsets
        assert len(rope_path) == 6


def test_tee_rope_takes_torch_where_c_may_not_read(monkeypatch):
    """Strided, mismatched or large inputs go to torch's path -- C reads raw memory, so
    nothing it is given can be larger than what it is told -- with the same bits."""
    from tsqp_core.tee_ops import ROPE_C_MAX, op_rope

    rope_path = _counted_rope_c(monkeypatch)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      rope_parameters=ROPES[1])
    dims = Dims(1, 64, 4, 2, 16, 160, 10, 4096)
    op = Op("rope", 0, (), ())
    pos = torch.arange(3)
    wide = torch.randn(1, 3, 128)
    cases = [(wide[..., :64], torch.randn(1, 3, 32)),  # strided
             (torch.randn(1, 3, 64), torch.randn(1, 3, 32).double()),  # dtypes differ
             (torch.randn(1, 3, 48), torch.randn(1, 3, 32)),  # not heads * head_dim
             (torch.randn(1, 3, 64), torch.randn(1, 2, 32))]  # k of other tokens
    big = ROPE_C_MAX // 64 + 1
    cases.append((torch.randn(1, big, 64), torch.randn(1, big, 32)))
    for q, k in cases:
        ctx = ops.OpContext(dims, {}, ops.Rope(cfg, 16), 1e-5, ops.KVCache())
        p = torch.arange(q.shape[1])
        try:
            want = ops.op_rope(ops.OpContext(dims, {}, ops.Rope(cfg, 16), 1e-5,
                                             ops.KVCache()), op, q, k, p)
        except RuntimeError:  # shapes the reference refuses: so must the fast path
            with pytest.raises(RuntimeError):
                op_rope(ctx, op, q, k, p)
            continue
        got = op_rope(ctx, op, q, k, p)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert rope_path == []
    op_rope(ops.OpContext(dims, {}, ops.Rope(cfg, 16), 1e-5, ops.KVCache()), op,
            torch.randn(1, 3, 64), torch.randn(1, 3, 32), pos)
    assert len(rope_path) == 1  # and a plain one does take C


def test_tee_rope_c_refuses_bad_arguments():
    """The C entry point checks what it can before it reads anything."""
    from tsqp_core import tee_ops

    if tee_ops._rope is None:
        pytest.skip("tsqp_core.tee._rope was not built")
    rope = tee_ops._rope.rope
    with pytest.raises(TypeError):
        rope(0, 0, 0)
    with pytest.raises(ValueError):  # an odd head_dim has no halves
        rope(0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 3, 0)
    with pytest.raises(ValueError):  # no data where there are values
        rope(0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 0)
    with pytest.raises(ValueError):  # an unknown kind
        rope(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2)
    rope(0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 0)  # nothing to rotate: nothing read


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI installs with a C compiler")
def test_ci_builds_the_rope_c_kernel():
    """``make setup`` builds ``tsqp_core.tee._rope`` where a compiler is at hand, as CI's
    is: a silently skipped build would leave only the torch path tested."""
    from tsqp_core import tee_ops

    assert tee_ops._rope is not None


def test_the_tee_rope_tables_follow_the_forward():
    """Signed tables are made once per forward's positions, never served for other ones."""
    from tsqp_core.tee_ops import op_rope

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      rope_parameters=ROPES[1])
    dims = Dims(1, 64, 4, 2, 16, 160, 10, 4096)
    ctx = ops.OpContext(dims, {}, ops.Rope(cfg, 16), 1e-5, ops.KVCache())
    q, k = torch.randn(1, 1, 64), torch.randn(1, 1, 32)
    for p in (torch.tensor([5]), torch.tensor([9])):
        got = op_rope(ctx, Op("rope", 0, (), ()), q, k, p)
        want = ops.op_rope(ops.OpContext(dims, {}, ops.Rope(cfg, 16), 1e-5, ops.KVCache()),
                           Op("rope", 0, (), ()), q, k, p)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
