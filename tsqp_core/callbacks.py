"""Hydra callbacks, enabled in ``conf/config.yaml`` under ``hydra.callbacks``.

:class:`SweepReport` ends every ``run -m`` sweep by writing ``summary.csv``, ``summary.md``
and ``breakdown.png`` into the sweep directory -- the same files, from the same function,
as ``python -m tsqp_core report SWEEP_DIR``. It runs in the process that launched the sweep,
after the last job, whichever launcher ran the jobs (basic, joblib, submitit, ray): every job
wrote its own ``results.json`` (or ``failed.json``) into its own directory, and the summary is
gathered from those files. Failed jobs do not stop a sweep; the summary lists them, and
``run`` exits with their code (:data:`last_sweep`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: The report of the last sweep this process launched (``run`` reads its exit code).
last_sweep: Any = None


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from tsqp_core.report import NoResults, write_report

        global last_sweep
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            report = write_report(sweep_dir)
        except NoResults as exc:
            log.warning("no sweep report: %s", exc)
            return
        last_sweep = report
        log.info("sweep report: %s", ", ".join(str(p) for p in report.paths))
        if report.failures:
            print(f"tsqp: {len(report.failures)} of "
                  f"{len({r.path for r in report.runs} | {f.path for f in report.failures})} "
                  f"jobs failed; see {sweep_dir / 'summary.md'}", file=sys.stderr)
