"""Every config in conf/ composes and validates; presets pick what they say."""

from __future__ import annotations

import pytest

from tsqp_core.app import CONF_DIR
from tsqp_core.plugins import get_plugins

from conftest import compose

GROUPS = ["transport", "executor", "partition", "protection", "tee_ops", "model", "workload",
          "stage"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,name", [(g, n) for g in GROUPS for n in options(g)])
def test_every_config_composes_and_validates(group, name):
    cfg = compose(f"{group}={name}")
    if group not in ("model", "workload", "stage"):
        choice = getattr(cfg, group)
        get_plugins().registry(group).options(choice.name, choice.options)


def test_group_option_names_match_plugin_names():
    for group in ("transport", "executor", "partition", "protection", "tee_ops"):
        registry = get_plugins().registry(group)
        for name in options(group):
            assert compose(f"{group}={name}").model_dump()[group]["name"] == name
            registry.get(name)


def test_stage0_is_the_seed_system():
    cfg = compose("stage=stage0")
    assert (cfg.transport.name, cfg.executor.name, cfg.partition.name, cfg.dtype) == (
        "tcp", "unfused", "seed", "float32")
    assert cfg.stage == "stage0"


def test_defaults_are_the_main_job():
    cfg = compose()
    assert cfg.model.name == "smollm2-135m" and cfg.workload.kind == "generate"
    assert cfg.prompt == "The capital of France is"
    assert compose("model=tiny").prompt is None
