"""The plugin system: discovery through entry points, registries, documented hooks."""

from __future__ import annotations

import inspect
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from pydantic import Field

from tsqp_core import hookimpl, hookspecs
from tsqp_core.plugins import FAMILIES, PluginError, PluginOptions, Plugins, make_plugin_manager
from tsqp_core.plugins import get_plugins
from tsqp_core.transport import Transport


def test_builtins_arrive_through_entry_points_like_any_plugin():
    names = {ep.name: ep.value for ep in entry_points(group="tsqp")}
    assert names["builtins"] == "tsqp_core.builtins"
    assert names["tcp"] == "tsqp_transport_tcp"
    plugins = get_plugins()
    assert {"inproc", "tcp"} <= set(plugins.transports.names())
    assert "unfused" in plugins.executors.names()
    assert {"seed", "attn_mlp", "layer", "custom"} <= set(plugins.partitions.names())
    tcp = next(e for e in plugins.transports.entries() if e.name == "tcp")
    assert tcp.package == "tsqp-transport-tcp" and tcp.version == "0.1.0"


def test_every_hook_is_documented_and_exercised():
    specs = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if n.startswith("tsqp_")]
    assert sorted(specs) == sorted(FAMILIES.values())
    for name in specs:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and "Register" in doc and "Called" in doc, name
    for family in FAMILIES:
        assert get_plugins().registry(family).names(), f"no {family} registered"


class Pigeon(Transport):
    name = "pigeon"

    class Options(PluginOptions):
        birds: int = Field(1, ge=1)

    def listen(self, address=None):
        raise NotImplementedError

    def connect(self, address, watchdog=None):
        raise NotImplementedError


class PigeonPlugin:
    @hookimpl
    def tsqp_register_transports(self, register):
        register(Pigeon)


def test_a_third_party_transport_registers_and_validates_its_options():
    plugins = Plugins(make_plugin_manager(PigeonPlugin()))
    assert "pigeon" in plugins.transports.names()
    t = plugins.transports.create("pigeon", {"birds": 3})
    assert t.options.birds == 3
    with pytest.raises(PluginError, match="birds"):
        plugins.transports.create("pigeon", {"birds": 0})
    with pytest.raises(PluginError, match=r"typo.*valid options: birds"):
        plugins.transports.create("pigeon", {"typo": 1})
    with pytest.raises(PluginError, match="choose one of: .*pigeon"):
        plugins.transports.get("owl")


def test_name_clashes_name_both_packages():
    class Clash:
        @hookimpl
        def tsqp_register_transports(self, register):
            register(Pigeon)

    with pytest.raises(PluginError, match="registered twice"):
        Plugins(make_plugin_manager(PigeonPlugin(), Clash()))


def test_plugins_command_lists_name_family_package_version_and_options():
    out = subprocess.run([sys.executable, "-m", "tsqp_core", "plugins"], capture_output=True,
                         text=True, check=True).stdout
    header, *rows = out.splitlines()
    assert header.split() == ["family", "name", "package", "version", "options", "(defaults)"]
    tcp = next(r.split() for r in rows if r.split()[:2] == ["transport", "tcp"])
    assert tcp[2] == "tsqp-transport-tcp"
    assert 'bind="tcp://127.0.0.1:0"' in tcp and "allow_remote=false" in tcp
    assert any(r.split() == ["executor", "unfused", "tsqp-core", "0.1.0", "-"] for r in rows)
    # the defaults a run starts from: the config file's, over the Options model's
    custom = next(r for r in rows if r.split()[:2] == ["partition", "custom"])
    assert 'gpu=["embed","qkv_proj"' in custom


def test_plugin_import_does_not_touch_cuda():
    code = ("import sys; from tsqp_core.plugins import get_plugins; get_plugins(); "
            "print('flash_attn' in sys.modules, 'torch.cuda' in sys.modules and "
            "__import__('torch').cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]
