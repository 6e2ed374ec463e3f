"""The decode loop shared by the split pipeline and the monolithic reference.

Both sides are timed by the same code, so their ``ttft``/``tpot`` mean the same thing:
``ttft`` is prefill + the first token's sampling; each later step is its forward + sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tsqp_core.metrics import now_ns


@dataclass
class Generation:
    tokens: list[list[int]]  # [B][new]
    step_logits: list[torch.Tensor]  # per step: the last-position logits [B, V] it sampled from
    ttft_ns: int
    step_ns: list[int]


def decode_loop(prefill: Callable[[], torch.Tensor], step: Callable[[torch.Tensor], torch.Tensor],
                pick: Callable[[torch.Tensor], torch.Tensor], new_tokens: int,
                stop_ids: set[int] | None = None) -> Generation:
    """``prefill()`` gives the prompt's last-position logits ``[B, V]``; ``step(tokens [B, 1])``
    the next ones; ``pick`` samples. Runs ``new_tokens`` steps, or until every sequence's last
    token is in ``stop_ids``."""
    seen: list[torch.Tensor] = []
    step_ns: list[int] = []
    t0 = now_ns()
    logits = prefill()
    out: list[list[int]] = [[] for _ in range(logits.shape[0])]
    ttft, forward_ns = 0, 0
    for i in range(new_tokens):
        ts = now_ns()
        nxt = pick(logits)
        seen.append(logits)
        for row, tok in zip(out, nxt.tolist()):
            row.append(tok)
        if i == 0:
            ttft = now_ns() - t0
        else:
            step_ns.append(now_ns() - ts + forward_ns)
        if i + 1 == new_tokens or (stop_ids and all(r[-1] in stop_ids for r in out)):
            break
        ts = now_ns()
        logits = step(nxt[:, None])
        forward_ns = now_ns() - ts
    if new_tokens == 0:
        ttft = now_ns() - t0
    return Generation(out, seen, ttft, step_ns)
