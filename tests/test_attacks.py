"""The attack suite and the mutation tests (tsqp_core.attack).

Plaintext is recovered (~100 %), a one-time pad leaves every attack at its blind baseline
and passes every statistic, a blind view is at chance, and every deliberately broken scheme
(tsqp_core.attack.mutants) fails at least the check meant to catch it. A harness that passes
a broken scheme is itself a bug.
"""

from __future__ import annotations

import json

import pytest
import torch

from tsqp_core.attack import harness
from tsqp_core.attack.attacks import a3_map, residue_decoder
from tsqp_core.attack.command import main as attack_main
from tsqp_core.attack.mutants import MUTANTS
from tsqp_core.attack.public import WireDomain
from tsqp_core.attack.stats import chi2, freshness, p_value
from tsqp_core.attack.view import Exchange
from tsqp_core.protection.otp.fixed import quantize
from tsqp_core.protection.otp.rns import centre, primes
from tsqp_core.protocol import WireTensor

ATTACKS = ("A1_nearest_embedding", "A2_keys", "A3_map", "A4_bag", "A4_order")
#: The check each mutant is built to trip (it may trip others too).
CAUGHT_BY = {
    "reused_mask": {"freshness", "randomness"},
    "gaussian_mask": {"A1_nearest_embedding", "A2_keys", "A3_map"},
    "torch_rng": {"randomness", "repeats"},
    "token_mixing": {"A4_bag", "A4_order"},
    "wrong_weight": {"correctness"},
}

_evaluations: dict[str, harness.Evaluation] = {}


def evaluation(scheme: str) -> harness.Evaluation:
    if scheme not in _evaluations:
        _evaluations[scheme] = harness.evaluate(scheme)
    return _evaluations[scheme]


# --- the two registered schemes --------------------------------------------------------------


def test_plaintext_is_recovered_and_the_blind_view_is_at_chance():
    ev = evaluation("none")
    for name in ATTACKS:
        a = ev.attacks[name]
        assert a.recovered >= 0.95, f"{name}: {a.recovered}"
        assert a.blind_baseline <= 0.1, f"{name} blind: {a.blind_baseline}"
        assert not a.at_baseline
    assert "A1_nearest_embedding" in ev.failed
    # no mask: the wire repeats, across forwards and across processes
    assert {"freshness", "repeats"} <= set(ev.failed)
    assert ev.checks["correctness"].passed


def test_otp_is_at_baseline_and_passes_every_check():
    ev = evaluation("otp")
    assert ev.passed, ev.table()
    for name in ATTACKS:
        a = ev.attacks[name]
        assert a.at_baseline and a.recovered <= 3 / a.n, f"{name}: {a.recovered}"
        assert a.plaintext >= 0.95  # the same attack on the unprotected twin
    fresh = ev.statistics["freshness"]
    assert abs(fresh["fraction"] - 0.25) < 0.01 and abs(fresh["expected"] - 0.25) < 0.002
    assert min(v["p_value"] for v in ev.statistics["chi2"].values()) > harness.CHI2_ALPHA / 8
    rnd = ev.statistics["randomness"]
    assert rnd["drawn_bytes"] >= rnd["needed_bytes"] > 0
    assert ev.statistics["repeats"]["identical"] == 0


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_every_mutant_is_caught(mutant):
    ev = evaluation(mutant)
    assert not ev.passed, f"the harness passed the broken scheme {mutant}:\n{ev.table()}"
    assert CAUGHT_BY[mutant] <= set(ev.failed), ev.table()


def test_mutants_are_not_installable():
    from tsqp_core.plugins import get_plugins

    names = set(get_plugins().protections.names())
    assert names.isdisjoint(MUTANTS)
    # each impersonates a registered scheme's wire layout
    assert {cls.name for cls in MUTANTS.values()} <= names


# --- decoders and statistics on synthetic views ---------------------------------------------------


def _residue_wire(x_int: torch.Tensor, ps: tuple[int, ...], mask_bound: int | None,
                  gen: torch.Generator) -> torch.Tensor:
    """Centred residues of ``x_int + r``: ``r`` uniform in each ring (None) or in
    ``[-mask_bound, mask_bound]``."""
    out = []
    for p in ps:
        if mask_bound is None:
            r = torch.randint(0, p, x_int.shape, generator=gen)
        else:
            r = torch.randint(-mask_bound, mask_bound + 1, x_int.shape, generator=gen)
        out.append(centre(x_int + r, p).to(torch.int8))
    return torch.stack(out)


@pytest.mark.parametrize("mask,expect", [(0, "all"), (3, "all"), (None, "chance")])
def test_residue_decoder_is_exact_without_a_mask_and_chance_under_a_uniform_one(mask, expect):
    pub = harness.public_model(str(_tiny_dir()), torch.float32)
    ids = torch.randint(0, pub.dims.vocab, (1, 40), generator=torch.Generator().manual_seed(3))
    dom = WireDomain("residue", primes(8), 28, 24)
    x_int, _ = quantize(pub.normed_embeddings[ids[0]], 28)
    wire = _residue_wire(x_int, dom.primes, mask, torch.Generator().manual_seed(4))
    pred = residue_decoder(wire.view(8, 1, 40, -1), pub.normed_embeddings, dom)
    hit = float((pred == ids[0]).double().mean())
    assert hit == 1.0 if expect == "all" else hit <= 3 / 40
    # through the attack itself, on a view holding only that call
    ex = Exchange(0, 1, 0, False, (("qkv_proj", 0),), {"0.x~": wire.view(8, 1, 40, -1)}, {})
    assert a3_map([ex], pub, dom, ids).recovered == hit


def _tiny_dir():
    from tsqp_core.models.source import resolve

    return resolve(harness.compose(*harness.DEFAULTS).model)


def test_chi2_and_freshness_tell_fresh_from_reused_and_biased():
    ps = primes(3)
    dom = WireDomain("residue", ps, 28, 24)
    gen = torch.Generator().manual_seed(0)

    def uniform(shape):
        return torch.stack([centre(torch.randint(0, p, shape, generator=gen), p).to(torch.int8)
                            for p in ps])

    def ex(t):
        return [Exchange(0, 1, 0, False, (("qkv_proj", 0),), {"0.x~": t}, {})]

    a, b = uniform((64, 512)), uniform((64, 512))
    assert min(v["p_value"] for v in chi2([ex(a)], dom).values()) > 1e-4
    biased = a.clone()
    biased[:, :8] = 0  # 1.6 % of the residues stuck at zero
    assert min(v["p_value"] for v in chi2([ex(biased)], dom).values()) < 1e-6
    fresh = freshness(ex(a), ex(b), dom)
    assert abs(fresh["fraction"] - fresh["expected"]) < 0.01 and fresh["fraction"] <= fresh["limit"]
    reused = freshness(ex(a), ex(a), dom)
    assert reused["fraction"] == 1.0 > reused["limit"]


def test_p_value_and_binomial_tail():
    assert p_value(250.0, 250) == pytest.approx(0.4881, abs=2e-3)
    assert p_value(400.0, 250) < 1e-7
    assert harness.binomial_tail(0, 10, 0.1) == 1.0
    assert harness.binomial_tail(1, 5, 1 / 49152) == pytest.approx(1 - (1 - 1 / 49152) ** 5)
    assert harness.binomial_tail(3, 32, 1 / 512) < harness.ALPHA < harness.binomial_tail(2, 32, 1 / 512)


def test_blind_views_carry_no_data():
    from tsqp_core.protection.none import NoProtection
    from tsqp_core.protection.otp import OtpOptions, OtpProtection

    spec = WireTensor("0.x", "float32", ("B", "T", 64))
    assert torch.equal(NoProtection(NoProtection.Options()).blind(spec, (1, 4, 64)),
                       torch.zeros(1, 4, 64))
    otp = OtpProtection(OtpOptions())
    blind = otp.blind(WireTensor("0.x~", "int8", (8, "B", "T", 64)), (8, 2, 16, 64))
    assert blind.dtype == torch.int8 and blind.shape == (8, 2, 16, 64)
    for i, p in enumerate(otp.primes):
        assert int(blind[i].abs().max()) <= p // 2
        # roughly uniform: each of the p residues appears
        assert torch.unique(blind[i]).numel() > p * 0.9
    assert not torch.equal(blind, otp.blind(WireTensor("0.x~", "int8", (8, "B", "T", 64)),
                                            (8, 2, 16, 64)))


# --- the run hook and the command -------------------------------------------------------------------


def test_a_stage4_run_reports_its_attacks_at_baseline(run_tiny):
    res = run_tiny("stage=stage4", "transport=inproc", "workload=prefill",
                   "workload.prompt_tokens=24")
    section = res["attacks"]
    assert section["at_baseline"] and section["passed"], section
    assert set(section["attacks"]) == set(ATTACKS)
    assert res["protection"]["attacks"] == section["attacks"]
    assert all(a["recovered"] is not None and a["n"] > 0 for a in section["attacks"].values())


def test_a_plaintext_run_with_attack_true_shows_the_leak(run_tiny):
    res = run_tiny("partition=linears", "transport=inproc", "workload=prefill",
                   "workload.prompt_tokens=24", "attack=true")
    a1 = res["attacks"]["attacks"]["A1_nearest_embedding"]
    assert a1["recovered"] == 1.0 and not a1["at_baseline"]
    assert res["attacks"]["at_baseline"] is False


def test_the_attack_command_writes_results_and_exits_by_verdict(tmp_path, capsys):
    common = ["model=tiny", "partition=linears", "threads.tee=1", "threads.gpu=1",
              "workload.prompt_tokens=24", "transport=tcp"]  # forced in process anyway
    assert attack_main([*common, "protection=otp", f"hydra.run.dir={tmp_path}/otp"]) == 0
    res = json.loads((tmp_path / "otp" / "results.json").read_text())
    assert res["schema"] == "tsqp.attack/1" and res["passed"]
    for name in ATTACKS:
        entry = res["attacks"][name]
        assert {"recovered", "blind_baseline", "at_baseline", "n", "target"} <= set(entry)
        assert entry["at_baseline"]
    assert res["statistics"]["chi2"] and res["statistics"]["freshness"]
    out = capsys.readouterr().out
    assert "A1_nearest_embedding" in out and "every check passed" in out
    assert attack_main(["--mutant", "token_mixing", *common,
                        f"hydra.run.dir={tmp_path}/mix"]) == 1
    mix = json.loads((tmp_path / "mix" / "results.json").read_text())
    assert mix["scheme"] == "mutant:token_mixing" and "A4_bag" in mix["failed"]
    assert attack_main(["--mutant", "nonsense"]) == 2


# --- real weights ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_text_prompt_is_recovered_from_plaintext_and_the_blind_view_is_not():
    """Real weights and real text (SmolLM2, 49 152 tokens): what ``none`` on ``linears`` gives
    away. (``otp`` on SmolLM2 is left to ``python -m tsqp_core attack``: binding it quantises
    every weight on both sides, about a minute here.)"""
    prompt = ("The Eiffel Tower was built for the 1889 World Fair in Paris, and today "
              "millions of tourists climb it every year.")
    plain = harness.attack_section(harness.compose(
        "model=smollm2-135m", "partition=linears", "protection=none", "threads.tee=1",
        "threads.gpu=1", f"prompt='{prompt}'"))
    for name in ATTACKS:
        a = plain["attacks"][name]
        assert a["recovered"] >= 0.95 and not a["at_baseline"], (name, a)
        assert a["blind_baseline"] <= 0.1, (name, a)
