"""The harness: run a scheme with a recorded GPU side, attack what it saw, and decide.

:func:`evaluate` runs a scheme (a registered one by name, or a mutant of :mod:`.mutants`) on
a prompt with the GPU side in this process, recorded by a
:class:`~tsqp_core.attack.view.ViewRecorder`, and applies every check:

| check | passes when |
|---|---|
| ``correctness`` | the logits are within the scheme's declared ``tolerance`` of the unprotected run's (an :class:`IntegrityError` fails it) |
| ``A1_nearest_embedding`` ... ``A4_order`` | the attack recovers no more than its blind baseline (the mean over ``BLIND_DRAWS`` blind views), or its ``hits = recovered * n`` are plausible there: ``P(Binomial(n, p0) >= hits) >= 1e-3`` with ``p0`` the blind rate, at least the chance rate ``1/vocab`` (with 5 prompt tokens and SmolLM2's vocabulary, a single hit fails) |
| ``chi2`` | every prime's input residues are uniform: p-value > ``1e-3 / k`` (Bonferroni over the k primes); float wires: not applicable |
| ``freshness`` | two forwards of the same input agree no more than independent masks would (residues: fraction of centred differences < p/8 at most its expectation ``~0.25`` plus ``max(6 sigma, 0.01)``; float wires: at most 1 % bit-identical elements) |
| ``randomness`` | the bytes drawn from the scheme's :class:`SecureRandom` cover the entropy of the masks on what crossed (``log2 p`` bits per residue, the element size per masked float) |
| ``repeats`` | the first forward of two fresh processes shares no wire tensor bit for bit |

A "fresh process" is modelled by resetting torch's default generator to
``torch.manual_seed(FRESH_PROCESS_SEED)`` (c10's ``default_rng_seed_val``): what every
process that seeds torch for reproducibility gets. (torch 2.13 seeds its default generator
from the OS at start-up, so without such a seed two processes differ; the generator is still
a Mersenne Twister, predictable from its outputs, and the randomness check does not depend
on seeding.)

``none`` fails (A1 ~100 %, freshness, repeats); ``otp`` must pass every check; every mutant
must fail at least one.

:func:`attack_section` is the lighter pass a normal ``run`` adds with ``attack=true``: one
recorded prefill pair, the attacks against their blind baseline and the statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch

from tsqp_core.attack.attacks import AttackResult, run_attacks
from tsqp_core.attack.blind import blind_forward
from tsqp_core.attack.public import PublicModel, WireDomain, domain_of
from tsqp_core.attack.stats import accounting, chi2, freshness, repeats
from tsqp_core.attack.view import Exchange, ViewRecorder
from tsqp_core.config import PluginChoice, RunConfig
from tsqp_core.metrics import Meter
from tsqp_core.protection import IntegrityError, Protection

#: The seed a "fresh process" starts torch's default generator with (c10 default_rng_seed_val).
FRESH_PROCESS_SEED = 67280421310721
#: The harness's defaults: the tiny model, only the weight products on the GPU side, the GPU
#: side in this process (recorded), one thread each, 32 random prompt tokens (< hidden 64, so
#: the row-space attacks have something to find).
DEFAULTS = ("model=tiny", "partition=linears", "transport=inproc", "threads.tee=1",
            "threads.gpu=1", "workload=prefill", "workload.prompt_tokens=32")
#: Family-wise false-alarm rate of the chi^2 check.
CHI2_ALPHA = 1e-3
#: An attack is above its baseline when its hits are this unlikely on a blind view.
ALPHA = 1e-3
#: Blind views drawn per attack (the baseline is their mean).
BLIND_DRAWS = 4


def compose(*overrides: str) -> RunConfig:
    """The validated config ``python -m tsqp_core run OVERRIDES`` would use."""
    from omegaconf import OmegaConf

    from tsqp_core.config import parse
    from tsqp_core.configs import compose as hydra_compose

    return parse(OmegaConf.to_container(hydra_compose(overrides), resolve=True))  # type: ignore[arg-type]


def in_process(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the GPU side started in this process, where it can be recorded."""
    server = cfg.server.model_copy(update={"address": None})
    return cfg.model_copy(update={"transport": PluginChoice(name="inproc"), "server": server})


@lru_cache(maxsize=4)
def public_model(model_dir: str, dtype: torch.dtype) -> PublicModel:
    return PublicModel.load(model_dir, dtype)


# --- recording -----------------------------------------------------------------------------------


@dataclass
class Recording:
    protection: Protection
    view: ViewRecorder
    ids: torch.Tensor
    logits: list[torch.Tensor]
    #: Bytes the scheme drew from its secure source, from bind to the end of the recorded
    #: forwards (a pool filled ahead of time counts: the check is a necessary condition).
    drawn: int
    model_dir: Path
    dtype: torch.dtype
    error: str | None = None

    @property
    def forwards(self) -> list[list[Exchange]]:
        assert self.view.hello is not None
        n = len(self.view.hello.plan)
        calls = self.view.calls
        return [calls[i:i + n] for i in range(0, len(calls) - n + 1, n)]


def record(cfg: RunConfig, scheme: type | None = None, forwards: int = 2,
           ids: torch.Tensor | None = None, fresh_process: bool = False) -> Recording:
    """``forwards`` prefills of the prompt (each its own session) with a recorded in-process
    GPU side; ``scheme`` replaces the configured protection object (a mutant impersonating
    it)."""
    from tsqp_core.run import connect, prepare
    from tsqp_core.tee.pipeline import prefill

    cfg = in_process(cfg)
    if fresh_process:
        torch.manual_seed(FRESH_PROCESS_SEED)
    p = prepare(cfg)
    if scheme is not None:
        p = replace(p, protection=scheme(p.protection.options))
    ids = p.prompt if ids is None else ids
    view = ViewRecorder()
    logits: list[torch.Tensor] = []
    error = None
    with connect(p, observers=[view]) as conn:
        assert p.protection.ctx is not None
        rng = p.protection.ctx.rng  # made for this connection: its count starts at bind
        try:
            for _ in range(forwards):
                logits.append(prefill(conn.model, ids, Meter()))
        except IntegrityError as exc:
            error = f"IntegrityError: {exc}"
        drawn = rng.drawn
    return Recording(p.protection, view, ids, logits, drawn, p.model_dir, cfg.torch_dtype, error)


# --- results ---------------------------------------------------------------------------------------


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if p >= 1.0:
        return 1.0
    if p <= 0.0:
        return 0.0
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
             + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


@dataclass
class AttackOutcome:
    """An attack's score on the recorded view against its blind baseline.

    At baseline when it recovers no more than the blind view, or when its count of hits is
    plausible under the blind rate: ``P(Binomial(n, p0) >= hits) >= ALPHA`` with ``p0`` the
    blind rate, at least the chance rate ``1 / vocab``."""

    name: str
    target: str | None
    recovered: float | None
    blind_baseline: float | None
    n: int
    chance: float
    plaintext: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def p0(self) -> float:
        return max(self.blind_baseline or 0.0, self.chance)

    @property
    def p_value(self) -> float | None:
        """How likely this many hits are on a view that carries nothing."""
        if self.recovered is None:
            return None
        return binomial_tail(round(self.recovered * self.n), self.n, self.p0)

    @property
    def limit(self) -> float | None:
        """The largest fraction still at baseline."""
        if self.recovered is None or self.n == 0:
            return None
        k = max(round((self.blind_baseline or 0.0) * self.n), 0)
        while k < self.n and binomial_tail(k + 1, self.n, self.p0) >= ALPHA:
            k += 1
        return k / self.n

    @property
    def at_baseline(self) -> bool:
        if self.recovered is None:
            return True  # the target never crosses
        return self.recovered <= (self.blind_baseline or 0.0) or self.p_value >= ALPHA

    def as_dict(self) -> dict[str, Any]:
        out = {"recovered": self.recovered, "blind_baseline": self.blind_baseline,
               "at_baseline": self.at_baseline, "n": self.n, "target": self.target,
               "p_value": self.p_value, "limit": self.limit, "chance": self.chance,
               **self.detail}
        if self.plaintext is not None:
            out["plaintext"] = self.plaintext
        return out


@dataclass
class Check:
    passed: bool
    value: Any = None
    limit: Any = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "value": self.value, "limit": self.limit,
                "detail": self.detail}


def attack_forward(fwd: Sequence[Exchange], rec: Recording,
                   plain: Sequence[Exchange] | None = None,
                   blind_draws: int = BLIND_DRAWS) -> dict[str, AttackOutcome]:
    """Every attack on ``fwd`` and on ``blind_draws`` blind views of it (the baseline is
    their mean), and on ``plain``, the unprotected twin's forward, when given."""
    from tsqp_core.attack.attacks import READS

    hello = rec.view.hello
    assert hello is not None
    pub = public_model(str(rec.model_dir), rec.dtype)
    domain = domain_of(hello.protection)
    real = run_attacks(fwd, pub, domain, rec.ids)
    blinds = [run_attacks(blind_forward(fwd, hello, rec.protection, READS), pub, domain, rec.ids)
              for _ in range(blind_draws)]
    plaintext = (run_attacks(plain, pub, WireDomain("float"), rec.ids) if plain is not None
                 else {})
    out = {}
    for name, r in real.items():
        scores = [b[name].recovered for b in blinds if b[name].recovered is not None]
        base = sum(scores) / len(scores) if scores else None
        out[name] = AttackOutcome(
            name, r.target, r.recovered, base, r.n, 1 / pub.dims.vocab,
            plaintext[name].recovered if name in plaintext else None,
            {**r.detail, **{f"blind_{k}": v for k, v in blinds[0][name].detail.items()
                            if k != "how"}} if blinds else dict(r.detail))
    return out


def statistics(rec: Recording) -> dict[str, Any]:
    hello = rec.view.hello
    assert hello is not None
    domain = domain_of(hello.protection)
    fwds = rec.forwards
    stats: dict[str, Any] = {
        "chi2": chi2(fwds, domain),
        "freshness": freshness(fwds[0], fwds[1], domain) if len(fwds) >= 2 else None,
        "randomness": accounting(fwds, rec.protection, domain, rec.drawn),
    }
    return stats


def stat_checks(stats: dict[str, Any]) -> dict[str, Check]:
    checks: dict[str, Check] = {}
    per = stats.get("chi2")
    if per:
        worst = min(v["p_value"] for v in per.values())
        limit = CHI2_ALPHA / len(per)
        checks["chi2"] = Check(worst > limit, worst, limit,
                               "smallest per-prime p-value of the input residues")
    else:
        checks["chi2"] = Check(True, None, None, "not applicable: no residue wires")
    fresh = stats.get("freshness")
    if fresh is not None:
        checks["freshness"] = Check(
            fresh["fraction"] <= fresh["limit"], fresh["fraction"], fresh["limit"],
            f"{fresh['kind']} wires of two forwards of the same input (fresh masks: "
            f"{fresh['expected']:.3f})")
    rnd = stats["randomness"]
    if rnd["needed_bytes"]:
        checks["randomness"] = Check(rnd["drawn_bytes"] >= rnd["needed_bytes"], rnd["drawn_bytes"],
                                     rnd["needed_bytes"],
                                     "bytes drawn from SecureRandom vs the masks' entropy")
    else:
        checks["randomness"] = Check(True, rnd["drawn_bytes"], 0,
                                     "nothing claimed masked: no randomness needed")
    return checks


def attack_checks(attacks: dict[str, AttackOutcome]) -> dict[str, Check]:
    return {name: Check(a.at_baseline, a.recovered, a.limit,
                        "target does not cross" if a.target is None else
                        f"recovered vs blind {_pct(a.blind_baseline)}, p={a.p_value:.2g} "
                        f"({a.target})")
            for name, a in attacks.items()}


# --- evaluate ---------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    scheme: str
    checks: dict[str, Check]
    attacks: dict[str, AttackOutcome]
    statistics: dict[str, Any]

    @property
    def failed(self) -> list[str]:
        return [name for name, c in self.checks.items() if not c.passed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "passed": self.passed, "failed": self.failed,
                "attacks": {n: a.as_dict() for n, a in self.attacks.items()},
                "statistics": self.statistics,
                "checks": {n: c.as_dict() for n, c in self.checks.items()}}

    def table(self) -> str:
        return format_table(self.scheme, self.attacks, self.checks)


def resolve_scheme(scheme: str | type) -> tuple[str, type | None, dict[str, Any]]:
    """``(registered name, mutant class or None, options)`` for a scheme name, a mutant name
    or a mutant class."""
    from tsqp_core.attack.mutants import MUTANT_OPTIONS, MUTANTS

    if isinstance(scheme, str) and scheme in MUTANTS:
        scheme = MUTANTS[scheme]
    if isinstance(scheme, type):
        return scheme.name, scheme, MUTANT_OPTIONS.get(getattr(scheme, "mutant", ""), {})
    return scheme, None, {}


def evaluate(scheme: str | type = "otp", overrides: Sequence[str] = (),
             cfg: RunConfig | None = None) -> Evaluation:
    """Run ``scheme`` (a registered name, a mutant name or class) on :data:`DEFAULTS` plus
    ``overrides`` (or on ``cfg``, whose protection it then replaces) and apply every check."""
    name, cls, options = resolve_scheme(scheme)
    if cfg is None:
        opts = [f"protection.options.{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k, v in options.items()]
        cfg = compose(*DEFAULTS, f"protection={name}", *opts, *overrides)
    plain = record(cfg.model_copy(update={"protection": PluginChoice(name="none")}), forwards=1)
    a = record(cfg, cls, forwards=2, ids=plain.ids, fresh_process=True)
    b = record(cfg, cls, forwards=1, ids=plain.ids, fresh_process=True)
    label = f"mutant:{cls.mutant}" if cls is not None and hasattr(cls, "mutant") else name

    checks: dict[str, Check] = {}
    tol = a.protection.tolerance.get(cfg.dtype, 0.0)
    if a.error or len(a.logits) < 2:
        checks["correctness"] = Check(False, None, tol, a.error or "the run did not finish")
    else:
        diff = max(float((x.float() - plain.logits[0].float()).abs().max()) for x in a.logits)
        checks["correctness"] = Check(diff <= tol, diff, tol,
                                      "max |dlogit| against the unprotected run")
    fwds = a.forwards
    if not fwds:
        return Evaluation(label, checks, {}, {})
    attacks = attack_forward(fwds[0], a, plain.forwards[0])
    checks.update(attack_checks(attacks))
    stats = statistics(a)
    checks.update(stat_checks(stats))
    if b.forwards:
        rep = repeats(fwds[0], b.forwards[0])
        stats["repeats"] = rep
        checks["repeats"] = Check(rep["identical"] == 0, rep["identical"], 0,
                                  f"wire tensors identical across two fresh processes "
                                  f"(of {rep['compared']})")
    return Evaluation(label, checks, attacks, stats)


def attack_section(cfg: RunConfig) -> dict[str, Any]:
    """What ``run`` adds with ``attack=true``: two recorded in-process prefills of the run's
    prompt with its own scheme, attacked against a blind view, and the view's statistics."""
    rec = record(cfg, forwards=2)
    if rec.error or not rec.forwards:
        return {"error": rec.error or "nothing recorded"}
    attacks = attack_forward(rec.forwards[0], rec)
    stats = statistics(rec)
    checks = {**attack_checks(attacks), **stat_checks(stats)}
    return {"attacks": {n: a.as_dict() for n, a in attacks.items()}, "statistics": stats,
            "checks": {n: c.as_dict() for n, c in checks.items()},
            "at_baseline": all(a.at_baseline for a in attacks.values()),
            "passed": all(c.passed for c in checks.values())}


# --- printing -------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(scheme: str, attacks: dict[str, AttackOutcome], checks: dict[str, Check]) -> str:
    lines = [f"attacks on {scheme} (GPU side with the public weights):",
             f"  {'attack':<22} {'target':<26} {'recovered':>9} {'blind':>7} {'plain':>7} "
             f"{'n':>4}  at baseline"]
    for a in attacks.values():
        lines.append(f"  {a.name:<22} {str(a.target):<26.26} {_pct(a.recovered):>9} "
                     f"{_pct(a.blind_baseline):>7} {_pct(a.plaintext):>7} {a.n:>4}  "
                     f"{'yes' if a.at_baseline else 'NO'}")
    lines.append("checks:")
    for name, c in checks.items():
        value = f"{c.value:.4g}" if isinstance(c.value, float) else str(c.value)
        limit = f"{c.limit:.4g}" if isinstance(c.limit, float) else str(c.limit)
        lines.append(f"  {name:<22} {'pass' if c.passed else 'FAIL':<5} {value:>12} "
                     f"(limit {limit}) {c.detail}")
    return "\n".join(lines)


def summary_line(section: dict[str, Any]) -> str:
    """One line for a run's summary."""
    if "error" in section:
        return f"attacks: not run ({section['error']})"
    parts = [f"{n.split('_')[0]}{'/' + n.split('_')[1] if n.startswith('A4') else ''} "
             f"{_pct(a['recovered'])} (blind {_pct(a['blind_baseline'])})"
             for n, a in section["attacks"].items() if a["recovered"] is not None]
    stats = section["statistics"]
    extra = []
    if stats.get("chi2"):
        extra.append(f"chi2 min p {min(v['p_value'] for v in stats['chi2'].values()):.3g}")
    if stats.get("freshness"):
        extra.append(f"freshness {stats['freshness']['fraction']:.3f}")
    verdict = "all at baseline" if section["at_baseline"] else "NOT at baseline"
    return "attacks: " + ", ".join(parts) + f": {verdict}" + ("; " + ", ".join(extra) if extra else "")
