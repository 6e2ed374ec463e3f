"""Attacks that play the GPU side: from one recorded forward and the public weights, guess
the prompt. Each returns the fraction of the prompt it recovered, scored against the true
token ids (used for scoring only, never by the attack).

| attack | reads | decoder |
|---|---|---|
| ``A1_nearest_embedding`` | ``ids`` if they cross, else layer 0's ``qkv_proj`` input (``0.x``) | nearest ``c_v = gamma_0 RMSNorm(E_v)``; residue wires: rebuilt by CRT, nearest in direction |
| ``A2_keys`` | layer 0's keys (``0.k``, or the ``k`` columns of ``0.qkv_proj~``) | nearest ``W_k c_v``; residue wires: CRT, columns rescaled by the public weight scales, nearest in direction |
| ``A3_map`` | ``0.x`` | best guess under the declared mask distribution: float wires, nearest candidate (MAP for no mask or any isotropic Gaussian); residue wires, each candidate quantised as the scheme does and scored by circular residue distance ``sum 1 - cos(2 pi d / p)`` over every element and prime (chance under a uniform mask, exact under a small or zero one) |
| ``A4_bag`` | ``0.x`` | row-space membership: ``c_v`` whose distance to ``rowspace(0.x)`` is below ``tau ||c_v||``; scored by Jaccard index against the prompt's set of tokens |
| ``A4_order`` | ``0.x``, ``1.x`` | for each position in turn, the bag token whose layer-1 input (computed on the recovered prefix with the public weights) lies in ``rowspace(1.x)`` and adds the most new direction to the rows already recovered (else the closest) |

Token mixing (``A X`` with an invertible ``A``) keeps the row space, so A4 recovers the bag
and the order through it; a one-time pad leaves every row uniform, and every attack at
chance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from tsqp_core.attack.public import PublicModel, WireDomain
from tsqp_core.attack.view import Exchange

#: Relative distance to a row space below which a candidate counts as a member.
TAU = 1e-3
#: Candidates scored per block (bounds memory on a 128k vocabulary).
BLOCK = 8192


@dataclass
class AttackResult:
    name: str
    #: The wire tensor attacked (``None``: it does not cross in this partition).
    target: str | None
    #: Fraction recovered (``None`` when the target does not cross).
    recovered: float | None
    #: Positions (or, for the bag, distinct tokens) scored.
    n: int
    detail: dict[str, Any] = field(default_factory=dict)


# --- reading a forward ------------------------------------------------------------------------


def find_input(fwd: Sequence[Exchange], value: str) -> tuple[str, torch.Tensor] | None:
    """The wire tensor carrying ``value`` into the GPU side (``value`` or ``value~``)."""
    for ex in fwd:
        for name in (value, f"{value}~"):
            if name in ex.inputs:
                return name, ex.inputs[name]
    return None


def find_output(fwd: Sequence[Exchange], value: str, product: str) -> tuple[str, torch.Tensor] | None:
    """The wire tensor carrying ``value`` back (plain), or the whole masked ``product``."""
    for ex in fwd:
        for name in (value, product):
            if name in ex.outputs:
                return name, ex.outputs[name]
    return None


def as_rows(wire: torch.Tensor, domain: WireDomain) -> torch.Tensor:
    """The wire tensor as float64 rows ``[..., width]``: the values themselves, or for a
    residue wire ``[k, ..., width]`` the integers Garner's CRT rebuilds from the residues
    (for a one-time pad, uniform in the ring; unmasked, the fixed-point input itself)."""
    if domain.residue and wire.dtype == torch.int8:
        from tsqp_core.protection.otp.rns import Crt

        return Crt(domain.primes).rebuild(wire).to(torch.float64)
    return wire.to(torch.float64)


# --- decoders --------------------------------------------------------------------------------


def nearest(rows: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """argmin_v ||row - c_v||, per row (float64)."""
    rows, best, best_d = rows.double(), None, None
    for start in range(0, cands.shape[0], BLOCK):
        c = cands[start:start + BLOCK].double()
        d = (c * c).sum(-1)[None, :] - 2 * rows @ c.T
        val, idx = d.min(-1)
        if best is None:
            best, best_d = idx + start, val
        else:
            take = val < best_d
            best = torch.where(take, idx + start, best)
            best_d = torch.where(take, val, best_d)
    return best


def nearest_direction(rows: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """argmax_v cos(row, c_v), per row: the nearest candidate when the scale is unknown."""
    rows = rows.double()
    rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    best, best_s = None, None
    for start in range(0, cands.shape[0], BLOCK):
        c = cands[start:start + BLOCK].double()
        c = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        val, idx = (rows @ c.T).max(-1)
        if best is None:
            best, best_s = idx + start, val
        else:
            take = val > best_s
            best = torch.where(take, idx + start, best)
            best_s = torch.where(take, val, best_s)
    return best


def residue_decoder(wire: torch.Tensor, cands: torch.Tensor, domain: WireDomain,
                    quantised: torch.Tensor | None = None) -> torch.Tensor:
    """The best guess per row of a residue wire ``[k, ..., K]``: each candidate quantised to
    ``x_bits`` with its own power-of-two scale (as the scheme does; ``quantised`` if given),
    reduced mod each prime, and scored by ``sum cos(2 pi (w - c) / p)`` over elements and
    primes -- a matrix product of cosines and sines, so the whole vocabulary is scored at
    GEMM speed."""
    from tsqp_core.protection.otp.fixed import quantize

    k, width = wire.shape[0], wire.shape[-1]
    w = wire.reshape(k, -1, width).to(torch.int64)
    best, best_s = None, None
    for start in range(0, cands.shape[0], BLOCK):
        if quantised is not None:
            c_int = quantised[start:start + BLOCK].to(torch.int64)
        else:
            c_int, _ = quantize(cands[start:start + BLOCK].float(), domain.x_bits)
        score = torch.zeros(w.shape[1], c_int.shape[0], dtype=torch.float32)
        for i, p in enumerate(domain.primes):
            angle = torch.arange(p, dtype=torch.float64) * (2 * math.pi / p)
            cos, sin = angle.cos().float(), angle.sin().float()
            a, b = torch.remainder(w[i], p), torch.remainder(c_int, p)
            score += cos[a] @ cos[b].T + sin[a] @ sin[b].T
        val, idx = score.max(-1)
        if best is None:
            best, best_s = idx + start, val
        else:
            take = val > best_s
            best = torch.where(take, idx + start, best)
            best_s = torch.where(take, val, best_s)
    return best


def _score(pred: torch.Tensor, ids: torch.Tensor) -> float:
    return float((pred.reshape(-1) == ids.reshape(-1)).double().mean())


# --- the attacks -----------------------------------------------------------------------------


def a1_nearest_embedding(fwd: Sequence[Exchange], pub: PublicModel, domain: WireDomain,
                         ids: torch.Tensor) -> AttackResult:
    name = "A1_nearest_embedding"
    for ex in fwd:
        if "ids" in ex.inputs:  # the token ids themselves cross: nothing to decode
            return AttackResult(name, "ids", _score(ex.inputs["ids"], ids), ids.numel(),
                                {"how": "token ids cross"})
    found = find_input(fwd, "0.x")
    if found is None:
        return AttackResult(name, None, None, 0)
    wname, wire = found
    rows = as_rows(wire, domain).reshape(-1, pub.dims.hidden)
    if domain.residue and wire.dtype == torch.int8:
        pred, how = nearest_direction(rows, pub.normed_embeddings), "CRT, nearest direction"
    else:
        pred, how = nearest(rows, pub.normed_embeddings), "nearest candidate"
    return AttackResult(name, wname, _score(pred, ids), ids.numel(), {"how": how})


def a2_keys(fwd: Sequence[Exchange], pub: PublicModel, domain: WireDomain,
            ids: torch.Tensor) -> AttackResult:
    name = "A2_keys"
    found = find_output(fwd, "0.k", "0.qkv_proj~")
    if found is None:
        return AttackResult(name, None, None, 0)
    wname, wire = found
    if domain.residue and wire.dtype == torch.int8:
        from tsqp_core.protection.otp.fixed import quantize

        cols = as_rows(wire, domain)[..., pub.key_columns]
        # the product's columns carry the public per-row scales of W_int: undo them
        _, exps = quantize(pub.ckpt.get("model.layers.0.self_attn.k_proj.weight", torch.float32),
                           domain.w_bits)
        rows = torch.ldexp(cols, -exps.to(torch.int64)).reshape(-1, cols.shape[-1])
        pred, how = nearest_direction(rows, pub.keys), "CRT, nearest direction"
    else:
        pred, how = nearest(wire.reshape(-1, wire.shape[-1]), pub.keys), "nearest candidate"
    return AttackResult(name, wname, _score(pred, ids), ids.numel(), {"how": how})


def a3_map(fwd: Sequence[Exchange], pub: PublicModel, domain: WireDomain,
           ids: torch.Tensor) -> AttackResult:
    name = "A3_map"
    found = find_input(fwd, "0.x")
    if found is None:
        return AttackResult(name, None, None, 0)
    wname, wire = found
    if domain.residue and wire.dtype == torch.int8:
        pred = residue_decoder(wire, pub.normed_embeddings, domain,
                               pub.quantised_embeddings(domain.x_bits))
        how = "circular residue distance to each quantised candidate"
    else:
        pred = nearest(wire.reshape(-1, pub.dims.hidden), pub.normed_embeddings)
        how = "nearest candidate (MAP under no mask or an isotropic Gaussian one)"
    return AttackResult(name, wname, _score(pred, ids), ids.numel(), {"how": how})


def _basis(rows: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``[r, d]`` of the row space of ``rows`` ``[n, d]`` (float64)."""
    if rows.numel() == 0 or not bool(rows.abs().max() > 0):
        return rows.new_zeros(0, rows.shape[-1])
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    rank = int((s > s[0] * 1e-9).sum())
    return vh[:rank]


def _distance(vecs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``||v - Q Q^T v|| / ||v||`` per row of ``vecs``."""
    v = vecs.double()
    r = v - (v @ basis.T) @ basis if basis.shape[0] else v
    return r.norm(dim=-1) / v.norm(dim=-1).clamp_min(1e-300)


def _bags(fwd: Sequence[Exchange], pub: PublicModel, domain: WireDomain, batch: int,
          max_bag: int) -> tuple[str, list[torch.Tensor]] | None:
    found = find_input(fwd, "0.x")
    if found is None:
        return None
    wname, wire = found
    rows = as_rows(wire, domain).reshape(batch, -1, pub.dims.hidden)
    bags = []
    for b in range(batch):
        basis = _basis(rows[b])
        dist = torch.cat([_distance(pub.normed_embeddings[s:s + BLOCK], basis)
                          for s in range(0, pub.dims.vocab, BLOCK)])
        members = (dist < TAU).nonzero().flatten()
        members = members[dist[members].argsort()][:max_bag]
        bags.append(members)
    return wname, bags


def a4_bag(fwd: Sequence[Exchange], pub: PublicModel, domain: WireDomain,
           ids: torch.Tensor, max_bag: int | None = None) -> AttackResult:
    name = "A4_bag"
    batch = ids.shape[0]
    got = _bags(fwd, pub, domain, batch, max_bag or pub.dims.vocab)
    if got is None:
        return AttackResult(name, None, None, 0)
    wname, bags = got
    scores, n, fp = [], 0, 0
    for b in range(batch):
        truth = set(ids[b].tolist())
        bag = set(bags[b].tolist())
        scores.append(len(truth & bag) / len(truth | bag))
        n += len(truth)
        fp += len(bag - truth)
    return AttackResult(name, wname, sum(scores) / batch, n,
                        {"how": f"row-space membership, tau={TAU}; Jaccard index",
                         "bag": sum(len(x) for x in bags), "false_positives": fp})


def a4_order(fwd: Sequence[Exchange], pub: PublicModel, domain: WireDomain,
             ids: torch.Tensor, layer: int = 1) -> AttackResult:
    name = "A4_order"
    batch, tokens = ids.shape
    got = _bags(fwd, pub, domain, batch, max(2 * tokens, 64))
    later = find_input(fwd, f"{layer}.x")
    if got is None or later is None:
        return AttackResult(name, None, None, 0)
    wname, bags = got
    rows = as_rows(later[1], domain).reshape(batch, -1, pub.dims.hidden)
    from tsqp_core.ops import KVCache

    pred = torch.full((batch, tokens), -1, dtype=torch.int64)
    for b in range(batch):
        bag = bags[b]
        if bag.numel() == 0:
            continue
        basis = _basis(rows[b])
        prefix, chosen = KVCache(), []
        for t in range(tokens):
            trial = KVCache({i: x.expand(bag.numel(), *x.shape[1:]) for i, x in prefix.k.items()},
                            {i: x.expand(bag.numel(), *x.shape[1:]) for i, x in prefix.v.items()})
            x = pub.layer_input(bag.view(-1, 1), layer, trial, past=t)[:, -1].double()
            dist = _distance(x, basis)
            inside = dist < TAU
            if bool(inside.any()):
                # in the row space *and* a new direction: a candidate that repeats an earlier
                # row (e.g. the first token again, which attends to two equal values) adds none
                novelty = _distance(x, _basis(torch.stack(chosen))) if chosen else dist.new_ones(
                    dist.shape)
                pick = int(torch.where(inside, novelty, -1.0).argmax())
            else:
                pick = int(dist.argmin())
            pred[b, t] = bag[pick]
            chosen.append(x[pick])
            pub.layer_input(bag[pick].view(1, 1), layer, prefix, past=t)  # extend the prefix
    return AttackResult(name, f"{wname}, {later[0]}", _score(pred, ids), ids.numel(),
                        {"how": f"bag candidates, layer-{layer} input in rowspace({later[0]})"})


#: The values the attacks read (a blind view needs only the calls that carry them).
READS = frozenset({"ids", "0.x", "0.k", "0.qkv_proj", "1.x"})

ATTACKS = (a1_nearest_embedding, a2_keys, a3_map, a4_bag, a4_order)


def run_attacks(fwd: Sequence[Exchange], pub: PublicModel, domain: WireDomain,
                ids: torch.Tensor) -> dict[str, AttackResult]:
    results = [attack(fwd, pub, domain, ids) for attack in ATTACKS]
    return {r.name: r for r in results}
