"""One run: prepare (validate everything), connect (start or reach the GPU side, hello),
measure, compare with transformers, write ``results.json``.

Everything that can be checked is checked before a process starts (:mod:`.prepare`); the GPU
side is always stopped at the end (:mod:`.connect`). Workloads: ``prefill`` (one forward,
full logits: the seed's benchmark), ``generate`` (prefill + decode with a KV cache) and
``bench`` (split against monolithic in one run: prefill of ``prompt_tokens`` seeded random
ids, then ``new_tokens`` decode steps, timed for the split pipeline and then for transformers
on the same weights, dtype and ``threads.tee`` -- or both in turn, repeat by repeat, with
``workload.interleave``; see :mod:`.bench` and :mod:`.results`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tsqp_core.config import RunConfig
from tsqp_core.run.bench import Monolithic, measure
from tsqp_core.run.connect import Connected, connect
from tsqp_core.run.prepare import InputError, Prepared, prepare
from tsqp_core.run.results import (SCHEMA, add_ratios, build, check_reference,
                                   reference_failure, reference_tolerance, summary,
                                   write_results)

__all__ = ["SCHEMA", "Connected", "InputError", "Prepared", "connect", "prepare",
           "reference_failure", "run", "summary"]


def run(cfg: RunConfig, outdir: Path) -> dict[str, Any]:
    p = prepare(cfg)
    torch.set_num_threads(cfg.threads.tee)
    compared = cfg.reference or cfg.workload.kind == "bench"
    interleaved = compared and cfg.workload.interleave
    mono: Monolithic | None = None
    with connect(p) as conn:
        server = conn.hello.server
        if interleaved:  # loaded before the first repeat; each side in turn with the other
            mono = Monolithic(p, server)
        measured = measure(p, conn.model, mono)
    result = build(p, measured, server)
    if compared:
        if mono is None:
            # The GPU side is stopped by now: the monolithic model has the TEE process's
            # threads (threads.tee) to itself, as the split run's TEE side had.
            mono = Monolithic(p, server)
            mono.run_all(measured.outputs)
        result["reference"] = mono.section(measured.outputs, interleaved)
        check_reference(result["reference"], reference_tolerance(p))
        add_ratios(result)
    else:
        result["reference"] = None
    if cfg.attack:  # after the timed part: one recorded in-process prefill pair, attacked
        from tsqp_core.attack.harness import attack_section

        try:
            section = attack_section(cfg)
        except Exception as exc:  # the measured run stands; say why its attack pass did not
            section = {"error": f"{type(exc).__name__}: {exc}"}
        result["attacks"] = section
        result["protection"]["attacks"] = section.get("attacks")
    write_results(outdir, result)  # also when the reference check failed: see reference_failure
    return result
