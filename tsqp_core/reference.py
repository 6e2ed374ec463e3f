"""The monolithic baseline and oracle: Hugging Face transformers on the same weights.

Runs in the TEE process with the same dtype and thread budget as the split run, so its
latency is the ``split / monolithic`` denominator and its logits are the correctness check.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from tsqp_core.decode import Generation, decode_loop
from tsqp_core.metrics import now_ns

ATTENTION_OPS = frozenset({"rope", "attn_scores", "attn_softmax", "attn_context"})


def attention_kernel(server_attention: str, gpu_ops: frozenset[str]) -> str:
    """The transformers attention kernel that rounds like the split run.

    In bf16 the two differ by more than a near-tie's logit gap: a split run that ships or
    materialises attention scores and probabilities rounds them to the dtype, as ``eager``
    does; a fused one never materialises them, as ``sdpa`` does not. ``server_attention`` is
    the kernel the GPU side reported at hello; attention that is split across calls or kept
    in the TEE runs the reference ops, which materialise scores. Comparing each with its like
    keeps ``tokens_match`` a statement about the split, not about the kernel choice."""
    fused = server_attention in ("sdpa", "flash-attn")
    return "sdpa" if fused and ATTENTION_OPS <= gpu_ops else "eager"


class Reference:
    """transformers' LlamaForCausalLM on ``device`` -- the GPU side's device, so the
    monolithic time is measured on the same hardware. Logits come back to the CPU (inside
    the timer: the split run pays for the same trip), where the split run's are."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, attention: str = "sdpa",
                 device: torch.device = torch.device("cpu")) -> None:
        from transformers import LlamaForCausalLM

        self.device = device
        self.model = LlamaForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attention).to(device).eval()
        self.attention = attention
        self.version = __import__("transformers").__version__

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        t0 = now_ns()
        logits = self.model(ids.to(self.device), use_cache=False).logits.cpu()
        return logits, now_ns() - t0

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> Generation:
        """Greedy decoding with transformers' own KV cache."""
        from transformers import DynamicCache

        # transformers renamed past_key_values to cache (5.2x); an unknown keyword would be
        # swallowed by **kwargs and silently decode without the cache
        params = inspect.signature(self.model.forward).parameters
        key = "cache" if "cache" in params else "past_key_values"
        kv = {key: DynamicCache(config=self.model.config), "use_cache": True}
        dev = self.device
        return decode_loop(
            lambda: self.model(prompt.to(dev), logits_to_keep=1, **kv).logits[:, -1].cpu(),
            lambda tokens: self.model(tokens.to(dev), **kv).logits[:, -1].cpu(),
            lambda logits: logits.argmax(-1), new_tokens)
