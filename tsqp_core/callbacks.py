"""Hydra callbacks, enabled in ``conf/config.yaml`` under ``hydra.callbacks``.

:class:`SweepReport` ends every ``run -m`` sweep by writing ``summary.csv``, ``summary.md``
and ``breakdown.png`` into the sweep directory -- the same files, from the same function,
as ``python -m tsqp_core report SWEEP_DIR``. It runs in the process that launched the sweep,
after the last job, whichever launcher ran the jobs (basic, joblib, ...).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from tsqp_core.report import NoResults, write_report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            paths = write_report(sweep_dir)
        except NoResults as exc:
            log.warning("no sweep report: %s", exc)
            return
        log.info("sweep report: %s", ", ".join(str(p) for p in paths))
