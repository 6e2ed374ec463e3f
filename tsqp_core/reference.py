"""The monolithic baseline and oracle: Hugging Face transformers on the same weights.

Runs in the TEE process with the same dtype and thread budget as the split run, so its
latency is the ``split / monolithic`` denominator and its logits are the correctness check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tsqp_core.metrics import now_ns


@dataclass
class RefGeneration:
    tokens: list[list[int]]
    step_logits: list[torch.Tensor]
    ttft_ns: int
    step_ns: list[int]


class Reference:
    impl = "transformers"

    def __init__(self, model_dir: Path, dtype: torch.dtype) -> None:
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        self.version = __import__("transformers").__version__

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        t0 = now_ns()
        logits = self.model(ids, use_cache=False).logits
        return logits, now_ns() - t0

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> RefGeneration:
        """Greedy decoding with transformers' own KV cache."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out: list[list[int]] = [[] for _ in range(prompt.shape[0])]
        seen: list[torch.Tensor] = []
        step_ns: list[int] = []
        t0 = now_ns()
        logits = self.model(prompt, cache=cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1]
        ttft = 0
        for step in range(new_tokens):
            ts = now_ns()
            nxt = logits.argmax(-1)
            seen.append(logits)
            for row, tok in zip(out, nxt.tolist()):
                row.append(tok)
            if step == 0:
                ttft = now_ns() - t0
            else:
                step_ns.append(now_ns() - ts + pending)
            if step + 1 == new_tokens:
                break
            ts = now_ns()
            logits = self.model(nxt[:, None], cache=cache, use_cache=True).logits[:, -1]
            pending = now_ns() - ts
        return RefGeneration(out, seen, ttft, step_ns)
