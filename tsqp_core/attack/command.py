"""``python -m tsqp_core attack [--mutant NAME] [OVERRIDES]``: record a run, attack it, decide.

Takes the same Hydra overrides as ``run``; the GPU side always runs in this process
(``transport=inproc``, whatever the overrides say), where every call is recorded. Runs the
harness (:func:`tsqp_core.attack.harness.evaluate`) on the configured prompt: the
unprotected twin, two forwards of the scheme, one more in a "fresh process"; prints the
attack table and the checks and writes ``results.json`` (``schema: tsqp.attack/1``) into the
Hydra output directory (``outputs/DATE/TIME-attack``).

``--mutant NAME`` runs one of the deliberately broken schemes of :mod:`.mutants` instead
(on the scheme it impersonates; add ``partition=linears`` for the ``otp`` ones).

Exit codes: 0 every check passed; 1 a check failed (the scheme leaks, or is broken); 2 bad
input.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

SCHEMA = "tsqp.attack/1"
EXIT_PASSED, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def attack(cfg: Any, outdir: Path, mutant: str | None = None) -> dict[str, Any]:
    from tsqp_core.attack.harness import evaluate, in_process
    from tsqp_core.run.results import host, write_results

    cfg = in_process(cfg)
    ev = evaluate(mutant or cfg.protection.name, cfg=cfg)
    result = {
        "schema": SCHEMA,
        "config": {"stage": cfg.stage, "executor": cfg.executor.name,
                   "partition": cfg.partition.name, "protection": cfg.protection.name,
                   "protection_options": dict(cfg.protection.options), "mutant": mutant,
                   "model": cfg.model.name, "dtype": cfg.dtype, "prompt": cfg.prompt},
        **ev.as_dict(),
        "table": ev.table(),
        "host": host(),
    }
    write_results(outdir, result)
    return result


def main(args: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    from tsqp_core.app import CONF_DIR, _exit_code, _runtime_errors, _user_errors

    mutant = None
    if args[:1] == ["--mutant"]:
        from tsqp_core.attack.mutants import MUTANT_OPTIONS, MUTANTS

        if len(args) < 2 or args[1] not in MUTANTS:
            print(f"usage: python -m tsqp_core attack --mutant {{{','.join(MUTANTS)}}} "
                  "[OVERRIDES]", file=sys.stderr)
            return EXIT_USAGE
        mutant, args = args[1], args[2:]
        base = MUTANTS[mutant].name
        opts = [f"protection.options.{k}={str(v).lower()}" for k, v in
                MUTANT_OPTIONS.get(mutant, {}).items()]
        args = [f"protection={base}", *opts, *args]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args = [*args, "hydra.run.dir=outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}-attack"]
    status = {"code": EXIT_PASSED}

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _attack(cfg: DictConfig) -> None:
        from tsqp_core.config import parse

        try:
            config = parse(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
            result = attack(config, Path(HydraConfig.get().runtime.output_dir), mutant)
        except (*_user_errors(), *_runtime_errors()) as exc:
            code, what = _exit_code(exc)
            print(f"tsqp attack: {what}: {exc}", file=sys.stderr)
            status["code"] = EXIT_USAGE if code == EXIT_USAGE else EXIT_FAILED
            return
        print(result["table"])
        verdict = "every check passed" if result["passed"] else \
            f"FAILED: {', '.join(result['failed'])}"
        print(f"{result['scheme']}: {verdict}")
        status["code"] = EXIT_PASSED if result["passed"] else EXIT_FAILED

    saved = sys.argv
    sys.argv = ["python -m tsqp_core attack", *args]
    try:
        _attack()
    finally:
        sys.argv = saved
    return status["code"]
