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


ATTENTION_OPS = frozenset({"rope", "attn_scores", "attn_softmax", "attn_context"})


def attention_kernel(fuses_attention: bool, gpu_ops: frozenset[str]) -> str:
    """The transformers attention kernel that rounds like the split run.

    In bf16 the two differ by more than a near-tie's logit gap: a split run that ships or
    materialises attention scores and probabilities rounds them to the dtype, as ``eager``
    does; a fused one never materialises them, as ``sdpa`` does not. Comparing each with its
    like keeps ``tokens_match`` a statement about the split, not about the kernel choice."""
    return "sdpa" if fuses_attention and ATTENTION_OPS <= gpu_ops else "eager"


class Reference:
    def __init__(self, model_dir: Path, dtype: torch.dtype, attention: str = "sdpa") -> None:
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attention).eval()
        self.attention = attention
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
