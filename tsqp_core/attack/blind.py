"""Blind views: what the GPU side would see if the data carried no information.

A blind forward has the recorded forward's calls, wire names and shapes, with every tensor
replaced by a fresh draw from the scheme's own mask distribution
(:meth:`tsqp_core.protection.Protection.blind`: zeros for ``none``, uniform residues for
``otp``). An attack's score on it is the baseline: what guessing achieves when nothing
leaks (the chance rate, or a decoder's favourite "hub" token). A protected run must do no
better.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Collection, Sequence

from tsqp_core.attack.view import Exchange
from tsqp_core.protection import Protection
from tsqp_core.protocol import Hello


def blind_forward(fwd: Sequence[Exchange], hello: Hello, scheme: Protection,
                  reads: Collection[str] | None = None) -> list[Exchange]:
    """A blind twin of ``fwd``; with ``reads`` (value names), only the calls that carry one
    of them (``value`` or ``value~``) -- the rest are left out, never copied."""
    out = []
    for ex in fwd:
        names = [n.removesuffix("~") for n in (*ex.inputs, *ex.outputs)]
        if reads is not None and not any(n in reads for n in names):
            continue
        wire = hello.plan[ex.call].wire
        specs = {t.name: t for t in (*wire.inputs, *wire.outputs)}
        out.append(replace(
            ex,
            inputs={n: scheme.blind(specs[n], tuple(t.shape)) for n, t in ex.inputs.items()},
            outputs={n: scheme.blind(specs[n], tuple(t.shape)) for n, t in ex.outputs.items()}))
    return out
