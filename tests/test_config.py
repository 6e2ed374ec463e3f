"""Every config group option composes and validates -- the core's (tsqp_core/conf), each
installed plugin's own files and the options generated for plugins that ship none; presets
pick what they say; options of one implementation never leak into another's."""

from __future__ import annotations

import pytest

from tsqp_core.configs import group_options
from tsqp_core.plugins import get_plugins

from conftest import compose

GROUPS = ["transport", "executor", "partition", "protection", "tee_ops", "model", "workload",
          "stage"]


def options(group: str) -> list[str]:
    return group_options(group)


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


def test_plugins_bring_their_own_config_files():
    from tsqp_core.configs import CONF_DIR, group_files

    tcp = group_files("transport")["tcp"]
    assert CONF_DIR not in tcp.parents and tcp.parent.parent.parent.name == "tsqp_transport_tcp"
    assert group_files("executor")["fused"].parent.parent.parent.name == "tsqp_executor_fused"


@pytest.mark.parametrize("args", [
    ("transport.name=inproc",), ("stage=stage3", "transport.name=inproc"),
    ("stage=stage3", "transport=inproc"), ("transport=shm", "transport.name=inproc"),
])
def test_options_of_one_implementation_never_leak_into_another(args):
    cfg = compose(*args)
    assert cfg.transport.name == "inproc" and cfg.transport.options == {}


def test_a_stage_preset_keeps_its_own_choices_unless_overridden():
    cfg = compose("stage=stage3")
    assert (cfg.transport.name, cfg.executor.name, cfg.dtype) == ("shm", "fused", "bfloat16")
    assert set(cfg.transport.options) == {"arena_bytes", "connect_timeout_s", "spin_us",
                                            "max_clients", "native"}


def test_a_plugin_without_a_config_file_gets_one_from_its_option_defaults(monkeypatch):
    """An installed implementation that ships no file is still ``GROUP=NAME``: its options
    start from its Options model's defaults."""
    from tsqp_core import plugins as plugins_module
    from tsqp_core.plugins import PluginOptions, Plugins, make_plugin_manager
    from tsqp_core.transport import Transport

    class Owl(Transport):
        name = "owl"

        class Options(PluginOptions):
            hoots: int = 3
            night: bool = True

        def listen(self, address=None):
            raise NotImplementedError

        def connect(self, address, watchdog=None):
            raise NotImplementedError

    class OwlPlugin:
        from tsqp_core import hookimpl

        @hookimpl
        def tsqp_register_transports(self, register):
            register(Owl)

    from hydra.core.config_store import ConfigStore

    owls = Plugins(make_plugin_manager(OwlPlugin()))
    monkeypatch.setattr(plugins_module, "get_plugins", lambda: owls)
    assert "owl" in group_options("transport")
    try:
        for args in (("transport=owl",), ("stage=stage1", "transport.name=owl")):
            cfg = compose(*args, "transport.options.hoots=5")
            assert cfg.transport.model_dump() == {"name": "owl",
                                                  "options": {"hoots": 5, "night": True}}
    finally:  # the generated option lives in a process-wide store: leave no owl behind
        ConfigStore.instance().repo["transport"].pop("owl.yaml", None)


def test_a_name_that_is_no_option_here_is_left_to_validation():
    """An executor installed only on the GPU host: ``executor.name=X`` stays a name."""
    cfg = compose("executor.name=elsewhere", "+executor.grouping=run", "server.address=tcp://h:1")
    assert cfg.executor.name == "elsewhere" and cfg.executor.grouping == "run"
