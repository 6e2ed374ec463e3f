"""Shared fixtures: composing configs the way the CLI does, and running them in-process."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tsqp_core.testing import shm_names  # noqa: E402,F401  (tests import it from here)

torch.set_num_threads(1)


def compose(*overrides: str):
    """The validated RunConfig that ``python -m tsqp_core run OVERRIDES`` would use."""
    from omegaconf import OmegaConf

    from tsqp_core.config import parse
    from tsqp_core.configs import compose as hydra_compose

    cfg = hydra_compose(overrides)
    return parse(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]


def run_config(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    from tsqp_core.run import run

    cfg = compose(*overrides)
    return run(cfg, tmp_path)


@pytest.fixture
def run_tiny(tmp_path):
    """Run the tiny model with extra overrides; returns results.json as a dict."""

    def _run(*overrides: str) -> dict[str, Any]:
        return run_config(tmp_path, "model=tiny", "threads.tee=1", "threads.gpu=1", *overrides)

    return _run


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
