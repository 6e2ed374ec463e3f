"""Where a run's configuration comes from: the core's config groups and every plugin's own.

The core's groups live in :data:`CONF_DIR` (``tsqp_core/conf``, package data, so an installed
wheel has them). A plugin package ships its own group files in a ``conf/`` directory inside
the package its ``tsqp`` entry point names (``my_plugin/conf/transport/unix.yaml``: ``name``
and ``options`` with their defaults); once the package is installed, :class:`PluginConfigs`
(a Hydra search-path plugin) finds that directory, so ``transport=unix`` selects it like a
built-in. An installed implementation that ships no file still gets a group option, built
from its ``Options`` defaults. Selecting by name (``transport.name=unix``) is read as the
group choice ``transport=unix``, so the options of one implementation never leak into
another's.

Everything that composes the run configuration goes through here (:func:`compose`, and the
``run`` app through :func:`install` and :func:`normalize_overrides`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

from tsqp_core import PROJECT

#: The core's config groups (``config.yaml`` and one directory per group).
CONF_DIR = Path(__file__).resolve().parent / "conf"


def _suffix(stage: str | None) -> str:
    """``-stage3`` for a run composed from a stage preset, nothing otherwise (output dirs)."""
    return f"-{stage}" if stage else ""


# Registered on import: every process that composes or resolves tsqp's configuration (a
# launcher's workers included: they unpickle the task function, which imports this) has it.
OmegaConf.register_new_resolver("tsqp_suffix", _suffix, replace=True)

#: Config groups that pick a plugin implementation by name.
PLUGIN_GROUPS = ("transport", "executor", "partition", "protection", "tee_ops")


@functools.lru_cache(maxsize=1)
def plugin_conf_dirs() -> tuple[tuple[str, Path], ...]:
    """``(distribution, conf directory)`` of every installed package with a ``tsqp`` entry
    point whose package ships a ``conf/`` directory. Found without importing the plugin: the
    directory sits next to the module the entry point names (or in its top-level package)."""
    found: dict[Path, str] = {}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != PROJECT:
                continue
            for conf in _conf_dirs_of(ep.module):
                if conf != CONF_DIR:
                    found.setdefault(conf, dist.metadata["name"])
    return tuple((dist, conf) for conf, dist in found.items())


def _conf_dirs_of(module: str) -> Iterator[Path]:
    parts = module.split(".")
    for depth in range(len(parts), 0, -1):  # the module's own package first, then its parents
        try:
            spec = importlib.util.find_spec(".".join(parts[:depth]))
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            conf = Path(location).resolve() / "conf"
            if conf.is_dir():
                yield conf
                return


def conf_dirs() -> list[Path]:
    """Every directory config groups are read from: the core's first, then each plugin's."""
    return [CONF_DIR, *(conf for _, conf in plugin_conf_dirs())]


def group_files(group: str) -> dict[str, Path]:
    """The option files of ``group``, by option name, over all config directories (the first
    directory that has a name wins, as in Hydra's search path)."""
    files: dict[str, Path] = {}
    for conf in conf_dirs():
        for path in sorted((conf / group).glob("*.yaml")):
            files.setdefault(path.stem, path)
    return files


def group_options(group: str) -> list[str]:
    """Every option ``GROUP=NAME`` accepts: files, plus installed implementations of a plugin
    family that ship no file (their option is generated)."""
    names = set(group_files(group))
    if group in PLUGIN_GROUPS:
        from tsqp_core.plugins import get_plugins

        names |= set(get_plugins().registry(group).names())
    return sorted(names)


def default_options(cls: type) -> dict[str, Any]:
    """An implementation's options with their defaults, as plain data (required options, which
    have no default, are left out: the user must give them)."""
    from pydantic_core import to_jsonable_python

    options = getattr(cls, "Options")
    out: dict[str, Any] = {}
    for key, field in options.model_fields.items():
        if field.is_required():
            continue
        out[key] = to_jsonable_python(field.get_default(call_default_factory=True))
    return out


def effective_options(group: str, name: str, cls: type) -> dict[str, Any]:
    """What ``GROUP=NAME`` starts from: the implementation's defaults, overlaid with the
    ``options`` of its config file when it ships one."""
    out = default_options(cls)
    path = group_files(group).get(name)
    if path is not None:
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if isinstance(node, dict) and isinstance(node.get("options"), dict):
            out.update(node["options"])
    return out


def _store_generated_options() -> None:
    """A group option ``{name, options: defaults}`` in Hydra's ConfigStore for every installed
    implementation whose package ships no config file for it."""
    from hydra.core.config_store import ConfigStore

    from tsqp_core.plugins import get_plugins

    store = ConfigStore.instance()
    for group in PLUGIN_GROUPS:
        files = group_files(group)
        for entry in get_plugins().registry(group).entries():
            if entry.name not in files:
                store.store(group=group, name=entry.name, provider=f"tsqp ({entry.package})",
                            node={"name": entry.name, "options": default_options(entry.cls)})


class PluginConfigs(SearchPathPlugin):
    """Adds every installed plugin's ``conf/`` directory to the search path of tsqp's own
    configuration (and of nothing else: other Hydra apps in the same environment are left
    alone)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        mains = [e.path for e in search_path.get_path() if e.provider == "main"]
        if not any(_same_dir(path, CONF_DIR) for path in mains if path):
            return
        for dist, conf in plugin_conf_dirs():
            search_path.append(provider=f"tsqp plugin {dist}", path=f"file://{conf}")
        _store_generated_options()


def _same_dir(path: str, directory: Path) -> bool:
    path = path[len("file://"):] if path.startswith("file://") else path
    try:
        return Path(path).resolve() == directory
    except OSError:
        return False


def install() -> None:
    """Register :class:`PluginConfigs` with Hydra (idempotent); done before every compose."""
    from hydra.core.plugins import Plugins

    Plugins.instance().register(PluginConfigs)


_NAME_OVERRIDE = re.compile(rf"^({'|'.join(PLUGIN_GROUPS)})\.name=([A-Za-z0-9_.,-]+)$")


def normalize_overrides(args: Iterable[str]) -> list[str]:
    """``transport.name=unix`` -> ``transport=unix`` (also in sweeps: ``transport.name=a,b``)
    when every name is an option of the group, so the chosen implementation gets its own
    options and defaults instead of keeping another's. A name that is not an option here (an
    executor installed only on the GPU host) is left as it is."""
    out = []
    for arg in args:
        m = _NAME_OVERRIDE.match(arg)
        if m and set(m.group(2).split(",")) <= set(group_options(m.group(1))):
            arg = f"{m.group(1)}={m.group(2)}"
        out.append(arg)
    return out


def compose(overrides: Iterable[str] = ()) -> Any:
    """The configuration ``python -m tsqp_core run OVERRIDES`` would use, as Hydra composes it
    (a DictConfig, not yet validated: see :func:`tsqp_core.config.parse`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    install()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=normalize_overrides(overrides))
