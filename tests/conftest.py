"""Shared fixtures: composing configs the way the CLI does, and running them in-process."""

from __future__ import annotations

import os
import re

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tsqp_core.app import CONF_DIR  # noqa: E402

torch.set_num_threads(1)


_SHM_NAME = re.compile(r"(?:sem\.)?tsqp-(\d+)-")


def shm_names() -> set[str]:
    """tsqp's names in /dev/shm, except those of *another live* process: a server elsewhere
    on this machine (another test run) names semaphores for the millisecond of each
    handshake. A name whose process is dead, or is this one, always counts."""
    try:
        entries = os.listdir("/dev/shm")
    except FileNotFoundError:
        return set()
    out = set()
    for name in entries:
        if not name.startswith(("tsqp", "sem.tsqp")):
            continue
        m = _SHM_NAME.match(name)
        if m and int(m.group(1)) != os.getpid():
            try:
                os.kill(int(m.group(1)), 0)
                continue  # alive, and not us
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        out.add(name)
    return out


def compose(*overrides: str):
    """The validated RunConfig that ``python -m tsqp_core run OVERRIDES`` would use."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from tsqp_core.config import parse

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
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
