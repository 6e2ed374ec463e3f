"""Statistics of recorded views: are the masks uniform, fresh, really random, and drawn from
the counted secure source?

* :func:`chi2` -- per prime, the residues sent to the GPU side against the uniform
  distribution on the centred residues (``p - 1`` degrees of freedom; p-value from the
  regularised upper incomplete gamma function).
* :func:`freshness` -- two forwards of the same input: the fraction of elements whose centred
  difference is below ``p/8`` (uniform and independent: ``~(2 floor(p/8) + 1)/p ~ 0.25``; a
  reused mask: 1.0). Float wires: the fraction of bit-identical elements (fresh: ~0).
* :func:`accounting` -- bytes the scheme drew from its :class:`SecureRandom` against the
  entropy of the masks it claims: ``log2 p`` bits per residue, the element size per masked
  float, nothing for values it declares plaintext.
* :func:`repeats` -- wire tensors of the first forward of two fresh processes that are bit
  for bit the same (a predictable generator, or no mask at all).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from tsqp_core.attack.public import WireDomain
from tsqp_core.attack.view import Exchange
from tsqp_core.protection import Protection


def p_value(chi2_value: float, dof: int) -> float:
    """P(X >= chi2_value) for X ~ chi^2(dof)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(chi2_value / 2, dtype=torch.float64)))


def _residue_inputs(fwd: Sequence[Exchange], domain: WireDomain) -> list[torch.Tensor]:
    k = len(domain.primes)
    return [t for ex in fwd for t in ex.inputs.values()
            if t.dtype == torch.int8 and t.dim() >= 1 and t.shape[0] == k]


def chi2(fwds: Sequence[Sequence[Exchange]], domain: WireDomain) -> dict[str, Any] | None:
    """Per prime: chi^2 of the input residues against uniform, its dof and p-value."""
    if not domain.residue:
        return None
    wires = [t for fwd in fwds for t in _residue_inputs(fwd, domain)]
    if not wires:
        return None
    per = {}
    for i, p in enumerate(domain.primes):
        vals = torch.cat([t[i].reshape(-1).to(torch.int64) for t in wires]) + p // 2
        if bool((vals < 0).any() or (vals >= p).any()):
            per[str(p)] = {"n": int(vals.numel()), "chi2": math.inf, "dof": p - 1,
                           "p_value": 0.0, "note": "residues outside the centred range"}
            continue
        counts = torch.bincount(vals, minlength=p).to(torch.float64)
        expect = vals.numel() / p
        stat = float(((counts - expect) ** 2 / expect).sum())
        per[str(p)] = {"n": int(vals.numel()), "chi2": stat, "dof": p - 1,
                       "p_value": p_value(stat, p - 1)}
    return per


def freshness(a: Sequence[Exchange], b: Sequence[Exchange], domain: WireDomain
              ) -> dict[str, Any] | None:
    """Compare the input wires of two forwards of the same input, call by call."""
    close = n = 0
    expect = 0.0
    kind = "float"
    for xa, xb in zip(a, b):
        for name, ta in xa.inputs.items():
            tb = xb.inputs.get(name)
            if tb is None or tb.shape != ta.shape or ta.numel() == 0:
                continue
            if domain.residue and ta.dtype == torch.int8 and ta.shape[0] == len(domain.primes):
                kind = "residue"
                for i, p in enumerate(domain.primes):
                    d = torch.remainder(ta[i].to(torch.int64) - tb[i].to(torch.int64), p)
                    d = torch.where(d > p // 2, d - p, d)
                    close += int((d.abs() < p / 8).sum())
                    n += d.numel()
                    expect += d.numel() * (2 * math.ceil(p / 8 - 1) + 1) / p
            elif ta.is_floating_point():
                close += int((ta == tb).sum())
                n += ta.numel()
    if n == 0:
        return None
    q = expect / n
    return {"kind": kind, "fraction": close / n, "expected": q, "n": n,
            "limit": q + max(6 * math.sqrt(max(q, 1 / n) * (1 - q) / n), 0.01)}


def entropy_bytes(fwds: Sequence[Sequence[Exchange]], scheme: Protection,
                  domain: WireDomain) -> float:
    """The randomness the masks on what crossed need, in bytes."""
    need = 0.0
    for fwd in fwds:
        for ex in fwd:
            for name, t in ex.inputs.items():
                value = name.removesuffix("~")
                if scheme.seen_as(value, "sent to gpu") == "plaintext":
                    continue
                if domain.residue and t.dtype == torch.int8 and t.shape[0] == len(domain.primes):
                    per = t[0].numel()
                    need += sum(per * math.log2(p) / 8 for p in domain.primes)
                else:
                    need += t.numel() * t.element_size()
    return need


def accounting(fwds: Sequence[Sequence[Exchange]], scheme: Protection, domain: WireDomain,
               drawn: int) -> dict[str, Any]:
    need = entropy_bytes(fwds, scheme, domain)
    return {"drawn_bytes": drawn, "needed_bytes": need,
            "ratio": drawn / need if need else None}


def repeats(a: Sequence[Exchange], b: Sequence[Exchange]) -> dict[str, Any]:
    """Input wire tensors identical between two fresh processes' first forwards."""
    same = total = 0
    for xa, xb in zip(a, b):
        for name, ta in xa.inputs.items():
            tb = xb.inputs.get(name)
            if tb is None or ta.numel() == 0 or name == "pos":
                continue
            total += 1
            same += int(tb.shape == ta.shape and torch.equal(ta, tb))
    return {"identical": same, "compared": total}
