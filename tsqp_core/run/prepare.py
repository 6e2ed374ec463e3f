"""Everything a run can check before any process starts: plugins and their options, the
model (what tsqp cannot run is refused here, exit 2), the schedule and what the protection
scheme makes of it, the tokenizer and the prompt."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tsqp_core.config import ConfigError, RunConfig, resolve_device
from tsqp_core.models.source import Checkpoint, ModelError, ModelSpec, fingerprint, resolve
from tsqp_core.ops import rope_parameters
from tsqp_core.plugins import PluginError, get_plugins
from tsqp_core.protocol import CallWire
from tsqp_core.schedule import Schedule, build_schedule
from tsqp_core.transport import ThreadBudget, TransportError


class InputError(ValueError):
    """The workload cannot run on this model (prompt too long, no tokenizer, ...)."""


@dataclass
class Prepared:
    cfg: RunConfig
    transport: Any
    partition: Any
    protection: Any
    tee_ops: Any
    #: The executor's plugin when it is installed here (its options are then validated
    #: here too); the TEE side never runs it.
    executor: Any
    grouping: str
    model_dir: Path
    ckpt: Checkpoint
    fingerprint: str
    schedule: Schedule
    #: Per call, the wire layout the protection scheme declares (agreed at hello).
    wires: list[CallWire]
    prompt: torch.Tensor
    tokenizer: Any
    #: What the model section of results.json says about the checkpoint and the prompt.
    model_info: dict[str, Any]

    @property
    def positions(self) -> int:
        """The most positions any forward of the workload attends over."""
        w = self.cfg.workload
        return int(self.prompt.shape[1]) + (w.new_tokens if w.kind in ("generate", "bench")
                                             else 0)


def prepare(cfg: RunConfig) -> Prepared:
    """All validation that needs no GPU side."""
    plugins = get_plugins()
    objs = {fam: plugins.registry(fam).create(getattr(cfg, fam).name, getattr(cfg, fam).options)
            for fam in ("transport", "partition", "protection", "tee_ops")}
    # options that depend on the machine (shm's spin) are settled now, and recorded so
    objs["transport"].fit(thread_budget(cfg.threads.tee, cfg.threads.gpu))
    executor, grouping = executor_grouping(cfg)
    if cfg.server.tamper is not None:
        from pydantic import ValidationError

        from tsqp_core.gpu.tamper import Tamper

        try:
            Tamper(**cfg.server.tamper)
        except ValidationError as exc:
            raise ConfigError(f"server.tamper: {exc.errors()[0]['loc']}: "
                              f"{exc.errors()[0]['msg']}") from None
    if cfg.server.address is None:  # a server we start here must find its device here
        resolve_device(cfg.device)
    else:
        try:
            objs["transport"].check_address(cfg.server.address)
        except TransportError as exc:
            raise ConfigError(f"server.address: {exc}") from None
    model_dir = resolve(cfg.model)
    ckpt = Checkpoint(model_dir)  # refuses unsupported configs (RoPE type, biases, ...)
    ckpt.check_weights()
    schedule = build_schedule(ckpt.dims.layers, objs["partition"].gpu_ops(), grouping)
    objs["protection"].check(schedule)
    wires = [objs["protection"].wire(call, call.plain_wire(ckpt.dims, cfg.dtype))
             for call in schedule.calls]
    tokenizer, tokenizer_note = choose_tokenizer(cfg.model, model_dir)
    prompt, prompt_note = make_prompt(cfg, ckpt, tokenizer)
    if cfg.model.path is not None:  # a user's checkpoint: say what the prompt became
        print(f"tsqp: checkpoint {model_dir}: {tokenizer_note}; {prompt_note}", file=sys.stderr)
    digest = fingerprint(model_dir)
    info = {"name": cfg.model.name, "path": str(model_dir), "fingerprint": digest,
            "source": "checkpoint" if cfg.model.path is not None else cfg.model.source,
            "rope": rope_parameters(ckpt.config)["rope_type"],
            "tokenizer": tokenizer_note, "prompt": prompt_note}
    return Prepared(cfg, executor=executor, grouping=grouping, model_dir=model_dir, ckpt=ckpt,
                    fingerprint=digest, schedule=schedule, wires=wires, prompt=prompt,
                    tokenizer=tokenizer, model_info=info, **objs)


def thread_budget(tee: int, gpu: int) -> ThreadBudget:
    """The run's threads against this machine's cores and what other work keeps busy now."""
    return ThreadBudget(tee, gpu, usable_cores(), busy_cores())


def busy_cores(looks: int = 10, every_s: float = 0.01) -> int:
    """Cores other work keeps busy now: the fewest runnable tasks besides this one seen in
    ``looks`` reads of ``procs_running`` (``/proc/stat``), ``every_s`` apart -- the fewest,
    so that a task that merely wakes up briefly does not count. Not the load average: that
    still counts, for a minute, the runs that just ended (a sweep's previous jobs). Where
    there is no ``/proc/stat``, the load average rounded down."""
    try:
        least = None
        for i in range(looks):
            if i:
                time.sleep(every_s)
            with open("/proc/stat", "rb") as fh:
                for line in fh:
                    if line.startswith(b"procs_running "):
                        running = int(line.split()[1])
                        least = running if least is None else min(least, running)
                        break
        if least is not None:
            return max(0, least - 1)
    except (OSError, ValueError):
        pass
    try:
        return int(os.getloadavg()[0])
    except OSError:
        return 0


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose_tokenizer(spec: ModelSpec, model_dir: Path) -> tuple[Any, str]:
    """The tokenizer, and one line saying where it came from (or why there is none).

    A checkpoint given by ``model.path`` brings its own tokenizer or none: ``hf`` then reads
    as ``auto`` (the directory's files when present, else random token ids)."""
    from tsqp_core.models.tokenizers import TOKENIZER_FILES, load_tokenizer, tokenizer_files

    kind = spec.tokenizer
    if kind == "auto" or (kind == "hf" and spec.path is not None):
        files = tokenizer_files(model_dir)
        if not files:
            return None, f"no tokenizer in the directory (none of {', '.join(TOKENIZER_FILES)})"
        kind, where = "hf", f"tokenizer from the directory ({', '.join(files)})"
    elif kind == "none":
        return None, "no tokenizer (model.tokenizer=none)"
    else:
        where = f"{kind} tokenizer"
    try:
        return load_tokenizer(kind, model_dir), where
    except Exception as exc:  # transformers / tiktoken: any failure to read the files
        raise ModelError(f"cannot load the {kind} tokenizer for {model_dir}: "
                         f"{type(exc).__name__}: {exc} (model.tokenizer=none runs on random "
                         "token ids)") from None


def executor_grouping(cfg: RunConfig) -> tuple[Any, str]:
    """The executor plugin (if installed here, its options validated) and its grouping: the
    plugin's declaration, or ``executor.grouping`` when the plugin lives only on the GPU host
    (``server.address`` set)."""
    registry = get_plugins().executors
    declared = cfg.executor.grouping
    if cfg.executor.name not in registry.names():
        if cfg.server.address is None:  # the server this run starts runs it here
            registry.get(cfg.executor.name)  # "unknown executor ...; choose one of: ..."
        if declared is None:
            raise PluginError(
                f"executor '{cfg.executor.name}' is not installed here, so how it groups GPU "
                "ops into calls is unknown: set executor.grouping=op|run (or install it); "
                f"installed: {', '.join(registry.names()) or '(none)'}")
        return None, declared
    executor = registry.create(cfg.executor.name, cfg.executor.options)
    if declared is not None and declared != executor.grouping:
        raise ConfigError(f"executor.grouping={declared} but executor '{cfg.executor.name}' "
                          f"groups by {executor.grouping!r}")
    return executor, executor.grouping


def make_prompt(cfg: RunConfig, ckpt: Checkpoint, tokenizer: Any) -> tuple[torch.Tensor, str]:
    """The prompt's token ids and one line saying what they are. Text needs a tokenizer: a
    prompt the user wrote is refused without one; the model preset's default prompt gives
    way to seeded random ids."""
    w = cfg.workload
    text = cfg.prompt if w.kind != "bench" else None  # a benchmark times shapes, not text
    if text is not None and tokenizer is None:
        if text != cfg.model.default_prompt:
            raise InputError(f"model '{cfg.model.path or cfg.model.name}' has no tokenizer; "
                             "drop prompt= (or prompt=null) to use random token ids")
        text = None
    if text is not None:
        ids = tokenizer.encode(text)
        if not ids:
            raise InputError("the prompt encodes to no tokens")
        bad = sorted({i for i in ids if not 0 <= i < ckpt.dims.vocab})
        if bad:
            raise InputError(f"the tokenizer gives token ids {bad[:5]} outside the model's "
                             f"vocabulary of {ckpt.dims.vocab}: tokenizer and model do not "
                             "match")
        prompt = torch.tensor([ids] * w.batch, dtype=torch.int64)
        note = f"prompt text of {len(ids)} tokens"
    else:
        gen = torch.Generator().manual_seed(cfg.seed)
        prompt = torch.randint(0, ckpt.dims.vocab, (w.batch, w.prompt_tokens), generator=gen)
        note = (f"the prompt is {w.prompt_tokens} seeded random token ids "
                f"(workload.prompt_tokens, seed {cfg.seed})")
    need = prompt.shape[1] + (w.new_tokens if w.kind in ("generate", "bench") else 0)
    if need > ckpt.dims.max_positions:
        raise InputError(f"prompt of {prompt.shape[1]} tokens + {need - prompt.shape[1]} new "
                         f"tokens exceeds the model's context of {ckpt.dims.max_positions}")
    return prompt, note
