"""The validated shape of a run's configuration (what Hydra composes from ``conf/``).

Hydra composes; pydantic validates, with unknown keys rejected at every level, so a typo
fails before any process starts. Each plugin validates its own ``options`` (see
:meth:`tsqp_core.plugins.Registry.options`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tsqp_core.models.source import ModelSpec


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginChoice(Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class ExecutorChoice(PluginChoice):
    #: How GPU ops group into calls (``op`` | ``run``): declared so that a TEE host without
    #: the executor's package can plan; ``null`` asks the installed executor.
    grouping: Literal["op", "run"] | None = None


class Workload(Strict):
    kind: Literal["prefill", "generate", "bench"]
    batch: int = Field(1, ge=1)
    prompt_tokens: int = Field(128, ge=1)
    new_tokens: int = Field(0, ge=0)
    warmup: int = Field(0, ge=0)
    repeats: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    #: With a reference: time the split and the monolithic model repeat by repeat in turn
    #: (ABBA), both models loaded at once, so that a drift over seconds (a GPU's clocks)
    #: slows both sides of a pair. Default: every split repeat, then the GPU side stops and
    #: the monolithic ones run with the machine to themselves.
    interleave: bool = False


class Threads(Strict):
    tee: int = Field(2, ge=1)
    gpu: int = Field(2, ge=1)


class Server(Strict):
    #: Address of a running ``tsqp_core serve``; ``null`` starts one for the run.
    address: str | None = None
    startup_timeout_s: float = Field(300.0, gt=0)
    timeout_s: float = Field(120.0, gt=0)
    #: Live generations per client (one more is refused, never a live one evicted).
    max_sessions: int = Field(4, ge=1)
    #: Clients one GPU side serves at once; a client idle this long may be dropped for a
    #: new one.
    max_clients: int = Field(8, ge=1)
    idle_s: float = Field(600.0, gt=0)
    #: On CUDA, page-lock the memory the transport lends (shm's arenas) so each input and
    #: output is one DMA (see tsqp_core/gpu/pinning.py); off: copies go through pageable
    #: memory, for comparison. Nothing to pin on a CPU or over tcp.
    pin_memory: bool = True
    #: Largest |value| accepted from the GPU side (null: 2**24 capped by the dtype; see
    #: tsqp_core/tee/validate.py).
    max_abs_value: float | None = Field(None, gt=0)
    #: Make the GPU side lie on purpose (see tsqp_core/gpu/tamper.py): tests and demos only.
    tamper: dict[str, Any] | None = None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ReferenceTolerance(Strict):
    """The largest max |Δlogit| against transformers a ``reference=true`` run accepts, per
    dtype (a protection scheme's own declared tolerance is added). fp32 agrees to ~1e-4 on
    the models here (3.7e-4 on the 1B shape at 1024 tokens); bf16 keeps 8 bits, and two
    correct implementations that round in another order differ by up to ~0.5 on the tiny
    model; a real bug (a wrong mask, a wrong RoPE sign) moves logits by several units."""

    float32: float = Field(1e-3, ge=0)
    bfloat16: float = Field(0.6, ge=0)
    float16: float = Field(0.1, ge=0)


class RunConfig(Strict):
    #: The stage preset the run was composed from (``stage=stage3``); ``None``: no preset.
    stage: str | None = None
    transport: PluginChoice
    executor: ExecutorChoice
    partition: PluginChoice
    protection: PluginChoice
    tee_ops: PluginChoice
    model: ModelSpec
    workload: Workload
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    #: GPU-side device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:N``.
    device: str = "auto"
    prompt: str | None = None
    reference: bool = False
    #: Beyond it (or with other greedy tokens) a reference=true run exits 4 (app.EXIT_REFERENCE).
    reference_tolerance: ReferenceTolerance = ReferenceTolerance()
    #: After the timed part, one extra recorded in-process prefill pair, attacked with the
    #: public weights (tsqp_core.attack): ``attacks`` in results.json.
    attack: bool = False
    #: Compile the monolithic reference (torch.compile, as the fused executor's ``compile``);
    #: ``None``: exactly when the GPU side compiled the split run's programs.
    reference_compile: bool | None = None
    seed: int = 0
    threads: Threads = Threads()
    server: Server = Server()

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class ConfigError(ValueError):
    pass


def parse(raw: dict[str, Any]) -> RunConfig:
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    try:
        return RunConfig(**raw)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device
