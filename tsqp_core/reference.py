"""The monolithic baseline and oracle: Hugging Face transformers on the same weights.

Runs in the TEE process with the same dtype and thread budget as the split run, so its
latency is the ``split / monolithic`` denominator and its logits are the correctness check.
With ``compile`` it is compiled the way the fused executor compiles the split run's programs
(``torch.compile``, inductor, :data:`INDUCTOR_OPTIONS`; CUDA graphs on CUDA), decoding with a
static cache, and :meth:`Reference.warm` compiles it before any timer starts.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from tsqp_core.decode import Generation, decode_loop
from tsqp_core.metrics import now_ns

ATTENTION_OPS = frozenset({"rope", "attn_scores", "attn_softmax", "attn_context"})
#: Inductor settings of a compiled reference: those of the fused executor's compiled
#: programs (``tsqp_executor_fused.compiled.INDUCTOR_OPTIONS``), bf16 rounded where eager
#: rounds.
INDUCTOR_OPTIONS = {"emulate_precision_casts": True}


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
                 device: torch.device = torch.device("cpu"), compile: bool = False) -> None:
        from transformers import LlamaForCausalLM

        self.device = device
        self.model = LlamaForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attention).to(device).eval()
        self.attention = attention
        self.version = __import__("transformers").__version__
        self.compiled = compile
        #: Wall time of :meth:`warm` (compiling, plus the one run that compiles).
        self.compile_ms: float | None = None
        self._forward = self.model.forward
        if compile:
            options = dict(INDUCTOR_OPTIONS)
            if device.type == "cuda":
                options["triton.cudagraphs"] = True  # what mode="reduce-overhead" sets
            self._forward = torch.compile(self.model.forward, options=options)

    @property
    def impl(self) -> str:
        how = ", torch.compile inductor" + (" + CUDA graphs" if self.device.type == "cuda"
                                             else "") if self.compiled else ""
        return f"transformers {self.version} ({self.attention} attention, {self.device}{how})"

    def warm(self, prompt: torch.Tensor, new_tokens: int, generate: bool) -> None:
        """Compile (a compiled reference) by running the workload once, untimed."""
        if not self.compiled:
            return
        t0 = now_ns()
        if generate:
            self.generate(prompt, new_tokens)
        else:
            self.prefill(prompt)
        self.compile_ms = (now_ns() - t0) / 1e6

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        t0 = now_ns()
        logits = self._forward(ids.to(self.device), use_cache=False).logits.cpu()
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
        if self.compiled:
            return self._generate_static(prompt, new_tokens, key)
        return decode_loop(
            lambda: self.model(prompt.to(dev), logits_to_keep=1, **kv).logits[:, -1].cpu(),
            lambda tokens: self.model(tokens.to(dev), **kv).logits[:, -1].cpu(),
            lambda logits: logits.argmax(-1), new_tokens)

    def _generate_static(self, prompt: torch.Tensor, new_tokens: int, key: str) -> Generation:
        """Greedy decoding, compiled: transformers' static cache sized for the workload and
        explicit cache positions, so every decode step has the same shapes (one graph)."""
        from transformers import StaticCache

        dev, tokens = self.device, prompt.shape[1]
        kv = {key: StaticCache(config=self.model.config, max_cache_len=tokens + new_tokens),
              "use_cache": True}
        at = [tokens]

        def step(ids: torch.Tensor) -> torch.Tensor:
            pos = torch.tensor([at[0]], device=dev)
            at[0] += 1
            return self._forward(ids.to(dev), cache_position=pos, **kv).logits[:, -1].cpu()

        return decode_loop(
            lambda: self._forward(prompt.to(dev), cache_position=torch.arange(tokens, device=dev),
                                  logits_to_keep=1, **kv).logits[:, -1].cpu(),
            step, lambda logits: logits.argmax(-1), new_tokens)
