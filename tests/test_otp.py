"""The ``otp`` scheme: its arithmetic is exact, every protected product is bit-exact against
the unmasked integer product, every injected corruption is caught, masks are never reused,
and the sealed pool rejects anything but what it wrote."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tsqp_core.metrics import Meter
from tsqp_core.protection import IntegrityError, SecureRandom
from tsqp_core.protection.otp import OtpProtection
from tsqp_core.protection.otp import freivalds
from tsqp_core.protection.otp.fixed import dequantize, quantize, shrink_to_bound
from tsqp_core.protection.otp.kernels import residue_matmul
from tsqp_core.protection.otp.pool import MaskPool
from tsqp_core.protection.otp.rns import PRIMES, Crt, centre, modulus, primes, residues
from tsqp_core.protection.otp.weights import quantize_weight
from tsqp_core.run import connect, prepare
from tsqp_core.tee.pipeline import generate, prefill
from tsqp_core.tee.sampling import Sampler, Sampling

from conftest import compose

STAGE4 = ("model=tiny", "stage=stage4", "transport=inproc", "threads.tee=1", "threads.gpu=1")


# --- arithmetic --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 6, 8])
def test_crt_rebuilds_every_integer_of_the_ring(k):
    ps = primes(k)
    crt = Crt(ps)
    half = (crt.M - 1) // 2
    gen = torch.Generator().manual_seed(k)
    y = torch.randint(-half, half + 1, (4000,), generator=gen)
    y = torch.cat([y, torch.tensor([0, 1, -1, half, -half])])
    res = residues(y, ps)
    assert res.dtype == torch.int8
    assert all(int(res[i].abs().max()) <= p // 2 for i, p in enumerate(ps))
    assert torch.equal(crt.rebuild(res), y)
    # any representative of each class works (residues plus multiples of p)
    shifted = res.to(torch.int64) + torch.tensor(ps).view(-1, 1) * 3
    assert torch.equal(crt.rebuild(shifted), y)


def test_more_primes_than_int64_holds_is_refused():
    assert modulus(PRIMES[:8]) < 2**63 <= modulus(PRIMES[:9])
    with pytest.raises(ValueError, match="fit int64"):
        primes(9)


def test_quantisation_bounds_and_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 300, generator=gen) * torch.logspace(-6, 6, 64).unsqueeze(-1)
    x[3] = 0.0
    for bits in (16, 28):
        x_int, s = quantize(x, bits)
        assert int(x_int.abs().max()) <= 2 ** (bits - 1)
        back = dequantize(x_int, s, torch.zeros(1, dtype=torch.int64), torch.float64)
        peak = x.double().abs().amax(-1, keepdim=True).clamp_min(1e-300)
        assert float(((back - x.double()).abs() / peak).max()) <= 2.0 ** -(bits - 1)
        assert torch.equal(x_int[3], torch.zeros_like(x_int[3]))


def test_rows_too_large_for_the_ring_give_up_low_bits():
    x_int, s = quantize(torch.full((3, 4000), 1.5), 28)  # every element at the row's peak
    w_norm = 2.0**23 * math.sqrt(4000)
    bound = 2**60
    assert float(x_int.double().norm(dim=-1).max()) * w_norm > bound
    small, s2, shrunk = shrink_to_bound(x_int, s, w_norm, bound)
    assert shrunk == 3
    assert float(small.double().norm(dim=-1).max()) * w_norm <= bound
    # the value is kept: same numbers at a coarser scale
    assert torch.allclose(torch.ldexp(small.double(), -s2.unsqueeze(-1)),
                          torch.ldexp(x_int.double(), -s.unsqueeze(-1)), rtol=1e-6)


@pytest.mark.parametrize("gemm", ["auto", "float64"])
@pytest.mark.parametrize("shape", [(1, 64, 128), (7, 37, 53), (33, 160, 64)])
def test_residue_gemm_is_exact(gemm, shape):
    rows, k_in, n_out = shape
    ps = primes(8)
    gen = torch.Generator().manual_seed(rows)
    x = torch.stack([torch.randint(-(p // 2), p // 2 + 1, (rows, k_in), generator=gen)
                     for p in ps]).to(torch.int8)
    t = torch.stack([torch.randint(-(p // 2), p // 2 + 1, (k_in, n_out), generator=gen)
                     for p in ps]).to(torch.int8)
    got = residue_matmul(x, t, ps, gemm)
    for i, p in enumerate(ps):
        want = centre(x[i].long() @ t[i].long(), p)
        assert torch.equal(got[i].long(), want)


def test_freivalds_agrees_with_python_integers():
    rng = SecureRandom()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-2**27, 2**27, (3, 40), generator=gen)
    w = torch.randint(-2**23, 2**23, (50, 40), generator=gen)
    y = torch.randint(-2**60, 2**60, (3, 50), generator=gen)
    s = freivalds.probe(50, rng)
    assert int(s.min()) >= 0 and int(s.max()) < freivalds.Q
    q, sl = freivalds.Q, s.tolist()
    w_s = freivalds.weight_probe(w, s)
    assert w_s.tolist() == [sum(int(w[j, c]) * sl[j] for j in range(50)) % q for c in range(40)]
    assert freivalds.left(y, s).tolist() == [sum(int(v) * t for v, t in zip(row, sl)) % q
                                             for row in y.tolist()]
    assert freivalds.right(x, w_s).tolist() == [
        sum(int(v) * int(t) for v, t in zip(row, w_s.tolist())) % q for row in x.tolist()]


# --- the scheme on a real model ------------------------------------------------------------


def test_every_protected_product_is_bit_exact(monkeypatch):
    """Each call's rebuilt integers equal the unmasked integer product x_int . W_int, exactly
    (int64 on the CPU), for every call of a prefill and a few decode steps."""
    checked = []
    real = OtpProtection.open

    def open_and_compare(self, site, wire):
        pend = self._pending[site.call.index]
        w = self._weights[pend.key]
        out = real(self, site, wire)
        y = torch.cat([out[n].reshape(-1, out[n].shape[-1]) for n in site.call.outputs], -1)
        exact = pend.x_int @ w.w_int.to(torch.int64).T  # the integer product, exactly
        assert torch.equal(y, dequantize(exact, pend.s_rows, w.exps, y.dtype)), site.call.method
        checked.append(site.call.method)
        return out

    monkeypatch.setattr(OtpProtection, "open", open_and_compare)
    p = prepare(compose(*STAGE4))
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    with connect(p) as conn:
        generate(conn.model, ids, 3, Sampler(Sampling()), Meter())
    assert len(checked) == 3 * 65 and set(checked) == {"qkv_proj", "o_proj", "gate_up_proj",
                                                      "down_proj", "lm_head"}


@pytest.fixture(scope="module")
def one_product():
    """A bound ``otp`` scheme and the GPU side's backend, ready to protect layer 3's
    ``gate_up_proj`` of the tiny model by hand."""
    p = prepare(compose(*STAGE4))
    with connect(p) as conn:
        scheme, model = p.protection, conn.model
        server = conn.local_server
        call = next(c for c in p.schedule.calls if c.method == "gate_up_proj" and c.layer == 3)
        wire = p.wires[call.index]
        backend = next(iter(next(iter(server._clients.values())).plans.values())).backend
        yield scheme, call, wire, backend


def _protected_reply(scheme, call, wire, backend, x):
    """Seal ``x`` for ``call``, compute the reply as an honest GPU side would."""
    from tsqp_core.executor import GpuCall
    from tsqp_core.protection import CallSite
    from tsqp_core.protocol import sizes

    b, t, _ = x.shape
    scheme.forwards = getattr(scheme, "forwards", 0) + 1
    site = CallSite(call, wire, session=1, forward=scheme.forwards, past=0, batch=b, tokens=t,
                    last_only=False, sizes=sizes(b, t, 0, False))
    sealed = scheme.seal(site, {call.inputs[0]: x})
    env = dict(sealed)
    backend.run(GpuCall(call.index, call.ops, wire), env, None, False)
    return site, {wire.outputs[0].name: env[wire.outputs[0].name]}


@pytest.mark.parametrize("kind", ["one residue", "one element, every residue"])
def test_a_thousand_injected_corruptions_are_all_caught(one_product, kind):
    """1000 trials, each a fresh sealed call whose honest reply gets one corruption: a
    single residue changed (caught by the range check or Freivalds), or one element of the
    product changed by +-1..1000 consistently in every residue (the rebuilt integer stays in
    range: only Freivalds can catch it)."""
    scheme, call, wire, backend = one_product
    rnd = random.Random(kind)
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(5))
    caught = 0
    for _ in range(1000):
        scheme._failed = None
        site, reply = _protected_reply(scheme, call, wire, backend, x)
        (name, res), = reply.items()
        res = res.clone()
        k, n = res.shape[0], res[0].numel()
        where = rnd.randrange(n)
        flat = res.view(k, -1).to(torch.int64)
        if kind == "one residue":
            i = rnd.randrange(k)
            p = scheme.primes[i]
            flat[i, where] = int(centre(flat[i, where] + rnd.randrange(1, p), p))
        else:
            delta = rnd.choice([-1, 1]) * rnd.randrange(1, 1000)
            for i, p in enumerate(scheme.primes):
                flat[i, where] = int(centre(flat[i, where] + delta, p))
        try:
            scheme.open(site, {name: flat.to(torch.int8).view(res.shape)})
        except IntegrityError:
            caught += 1
    scheme._failed = None
    assert caught == 1000


def test_after_a_failed_check_the_scheme_refuses_to_go_on(one_product):
    scheme, call, wire, backend = one_product
    x = torch.randn(1, 2, 64)
    site, reply = _protected_reply(scheme, call, wire, backend, x)
    (name, res), = reply.items()
    bad = res.clone()
    bad.view(-1)[0] = int(centre(bad.view(-1)[0].long() + 1, scheme.primes[0]))
    with pytest.raises(IntegrityError):
        scheme.open(site, {name: bad})
    with pytest.raises(IntegrityError, match="session aborted"):
        scheme.seal(site, {call.inputs[0]: x})
    scheme._failed = None


def test_honest_replies_verify(one_product):
    scheme, call, wire, backend = one_product
    for t in (1, 5, 17):
        x = torch.randn(2, t, 64) * 10.0 ** random.Random(t).uniform(-3, 3)
        site, reply = _protected_reply(scheme, call, wire, backend, x)
        out = scheme.open(site, reply)
        ref = torch.nn.functional.linear(x.double(), torch.cat(
            [backend_w.double() for backend_w in scheme.ctx.weights.of(call.ops[0])]))
        got = torch.cat([out[n] for n in call.outputs], -1).double()
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6


# --- masks: fresh, counted, never reused; the sealed store ----------------------------------


def _pool(tmp_path=None, rows=4):
    w = quantize_weight(torch.randn(24, 16), 24, primes(8), keep_int=True)
    return MaskPool({"w": w}, primes(8), SecureRandom(), "auto", tmp_path), w


def test_masks_are_uniform_fresh_and_handed_out_once():
    pool, w = _pool()
    pool.fill("w", 300)
    r1, u1, first1 = pool.take("w", 200)
    r2, u2, first2 = pool.take("w", 150)  # 100 from the pool, 50 made on the spot
    assert (first1, first2) == (0, 200)
    assert pool.stats.underruns == 1 and pool.stats.underrun_rows == 50
    assert pool.stats.rows_taken == 350 and pool.available("w") == 0
    rows = torch.cat([r1, r2], dim=1)  # [k, 350, 16]
    flat = rows.permute(1, 0, 2).reshape(350, -1)
    assert len({tuple(r.tolist()) for r in flat}) == 350  # no two mask rows alike
    for i, p in enumerate(pool.primes):  # uniform over the centred residues of p
        counts = torch.bincount(rows[i].reshape(-1).long() + p // 2, minlength=p).double()
        expected = rows[i].numel() / p
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < p + 6 * math.sqrt(2 * p)  # p-1 dof; a 6-sigma bound
    for i, p in enumerate(pool.primes):  # u really is r . W^T mod p
        assert torch.equal(u1[i].long(), centre(r1[i].long() @ w.residues[i].long(), p))


def test_the_sealed_store_round_trips_and_rejects_tampering(tmp_path):
    pool, _ = _pool(tmp_path)
    pool.fill("w", 10)
    pool.fill("w", 20)  # two blocks: rows 0-9 and 10-19
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2 and all(f.stat().st_mode & 0o077 == 0 for f in files)
    assert pool.stats.bytes_sealed > 0
    r, u, first = pool.take("w", 10)
    assert first == 0 and r.shape[1] == 10
    assert len(list(tmp_path.iterdir())) == 1  # taken blocks are deleted
    # a block altered on disk, or replaced by another one, fails authentication
    (left,) = tmp_path.iterdir()
    data = bytearray(left.read_bytes())
    data[5] ^= 1
    left.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="authentication"):
        pool.take("w", 10)
    pool.close()


def test_a_replayed_sealed_block_is_rejected(tmp_path):
    pool, _ = _pool(tmp_path)
    pool.fill("w", 10)
    (first_block,) = tmp_path.iterdir()
    old = first_block.read_bytes()
    pool.fill("w", 20)
    second = next(f for f in tmp_path.iterdir() if f != first_block)
    pool.take("w", 10)
    second.write_bytes(old)  # roll the next block back to an earlier one
    with pytest.raises(IntegrityError, match="authentication"):
        pool.take("w", 10)
    pool.close()


# --- end to end ----------------------------------------------------------------------------


def test_stage4_matches_transformers(run_tiny):
    res = run_tiny("stage=stage4", "transport=inproc", "workload=generate",
                   "workload.prompt_tokens=12", "workload.new_tokens=6", "reference=true")
    assert res["rpc"]["calls_per_forward"] == 65
    assert res["reference"]["tokens_match"] is True
    assert res["reference"]["max_abs_logit_diff"] <= 1e-4
    assert all(not e["plaintext"] and e["seen_as"].startswith("otp") for e in res["exposure"])
    prot = res["protection"]
    assert prot["scheme"] == "otp" and prot["integrity"]["failed"] == 0
    assert prot["integrity"]["checks"] == res["rpc"]["calls"]
    assert prot["integrity"]["soundness_bits"] == 61
    assert prot["pool"]["underruns"] == 0 and prot["offline_ms"] > 0
    assert prot["bytes"]["wire_over_plain"] == pytest.approx(2.0)  # 8 B of residues per fp32
    assert res["server"]["attention"].startswith("none")


def test_bf16_mode_is_within_bf16_level(run_tiny):
    res = run_tiny("stage=stage4", "transport=inproc", "workload=prefill",
                   "workload.prompt_tokens=24", "protection.options.mode=bf16", "reference=true")
    assert res["protection"]["params"]["k"] == 6 and res["protection"]["params"]["x_bits"] == 16
    assert res["reference"]["max_abs_logit_diff"] <= 0.1
    assert res["protection"]["bytes"]["wire_over_plain"] == pytest.approx(1.5)


def test_a_tampered_reply_ends_the_run_with_an_integrity_error(run_tiny):
    with pytest.raises(IntegrityError, match="integrity check"):
        run_tiny("stage=stage4", "transport=inproc", "workload=prefill",
                 "workload.prompt_tokens=8", "server.tamper={what:element,call:9}")


def test_otp_on_a_partition_with_nonlinear_gpu_ops_is_refused_before_anything_starts():
    from tsqp_core.protection import ProtectionRefused

    with pytest.raises(ProtectionRefused, match="runs attn_context, attn_scores, embed on the GPU"):
        prepare(compose("model=tiny", "stage=stage4", "partition=seed"))


def test_the_cli_refuses_stage4_on_the_seed_partition_at_once(tmp_path):
    """The done-when check: exit 2, the ops named, nothing started."""
    import os
    import subprocess
    import sys
    import time

    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "tsqp_core", "run", "stage=stage4",
                          "model=tiny", "partition=seed", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    assert res.returncode == 2, res.stderr
    assert "embed" in res.stderr and "attn_scores" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "results.json").exists()
    assert time.monotonic() - t0 < 60
