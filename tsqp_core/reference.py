"""The monolithic baseline and oracle: Hugging Face transformers on the same weights.

Runs in the TEE process with the same dtype and thread budget as the split run, so its
latency is the ``split / monolithic`` denominator and its logits are the correctness check.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tsqp_core.decode import Generation, decode_loop
from tsqp_core.metrics import now_ns

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
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> Generation:
        """Greedy decoding with transformers' own KV cache."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        return decode_loop(
            lambda: self.model(prompt, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1],
            lambda tokens: self.model(tokens, cache=cache, use_cache=True).logits[:, -1],
            lambda logits: logits.argmax(-1), new_tokens)
