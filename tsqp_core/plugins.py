"""Plugin discovery and the per-family registries.

Every implementation, built-in or third-party, arrives through the ``tsqp_register_*`` hooks
of the plugins found under the entry-point group ``tsqp``. The registries here are the one
truth of what is installed: lookups, name clashes and "unknown name" errors live here.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Mapping, TypeVar

import pluggy
from pydantic import BaseModel, ConfigDict, ValidationError

from tsqp_core import PROJECT, hookspecs

FAMILIES: dict[str, str] = {
    "transport": "tsqp_register_transports",
    "executor": "tsqp_register_executors",
    "tee_ops": "tsqp_register_tee_ops",
    "partition": "tsqp_register_partitions",
    "protection": "tsqp_register_protections",
}


class PluginError(ValueError):
    """A plugin name or option that cannot be used; the message says what can."""


class PluginOptions(BaseModel):
    """Base for every implementation's ``Options``: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    family: str
    cls: type[T]
    package: str
    version: str


class Registry(Generic[T]):
    """Implementations of one family, keyed by name."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, Entry[T]] = {}

    def add(self, cls: type[T], package: str, version: str) -> None:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"{package}: {self.family} {cls!r} has no string 'name'")
        options = getattr(cls, "Options", None)
        if not (isinstance(options, type) and issubclass(options, BaseModel)):
            raise PluginError(f"{package}: {self.family} '{name}' has no pydantic 'Options'")
        if name in self._entries:
            other = self._entries[name].package
            raise PluginError(
                f"{self.family} '{name}' is registered twice: by {other} and by {package}"
            )
        self._entries[name] = Entry(name, self.family, cls, package, version)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def get(self, name: str) -> type[T]:
        try:
            return self._entries[name].cls
        except KeyError:
            choices = ", ".join(self.names()) or "(none installed)"
            raise PluginError(
                f"unknown {self.family} '{name}'; choose one of: {choices}"
            ) from None

    def options(self, name: str, options: Mapping[str, Any] | None) -> BaseModel:
        """Validate ``options`` against the implementation's own pydantic model."""
        cls = self.get(name)
        try:
            return cls.Options(**dict(options or {}))  # type: ignore[attr-defined]
        except ValidationError as exc:
            fields = ", ".join(cls.Options.model_fields) or "(none)"  # type: ignore[attr-defined]
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '<options>'}: {e['msg']}"
                for e in exc.errors()
            )
            raise PluginError(
                f"bad options for {self.family} '{name}': {problems} (valid options: {fields})"
            ) from None

    def create(self, name: str, options: Mapping[str, Any] | BaseModel | None = None) -> T:
        if not isinstance(options, BaseModel):
            options = self.options(name, options)
        return self.get(name)(options)  # type: ignore[call-arg]


class Plugins:
    """The loaded plugin manager and one registry per family."""

    transports: Registry[Any]
    executors: Registry[Any]
    tee_ops: Registry[Any]
    partitions: Registry[Any]
    protections: Registry[Any]

    _attr: ClassVar[dict[str, str]] = {
        "transport": "transports",
        "executor": "executors",
        "tee_ops": "tee_ops",
        "partition": "partitions",
        "protection": "protections",
    }

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        dists = {id(plugin): (dist.project_name, dist.version)
                 for plugin, dist in pm.list_plugin_distinfo()}
        dists |= getattr(pm, "tsqp_dists", {})
        #: Entry points that failed to import: (name, package, error).
        self.broken: list[tuple[str, str, str]] = getattr(pm, "tsqp_broken", [])
        for family, hook_name in FAMILIES.items():
            registry: Registry[Any] = Registry(family)
            setattr(self, self._attr[family], registry)
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                package, version = dists.get(id(impl.plugin), (impl.plugin_name, "-"))
                impl.function(
                    register=functools.partial(registry.add, package=package, version=version)
                )

    def registry(self, family: str) -> Registry[Any]:
        try:
            return getattr(self, self._attr[family])
        except KeyError:
            raise PluginError(
                f"unknown plugin family '{family}'; choose one of: {', '.join(FAMILIES)}"
            ) from None

    def all_entries(self) -> list[Entry[Any]]:
        return [e for fam in FAMILIES for e in self.registry(fam).entries()]


def make_plugin_manager(*extra: object) -> pluggy.PluginManager:
    """A plugin manager with every ``tsqp`` entry point loaded, plus ``extra`` plugins.

    One broken third-party package must not take the others down: an entry point that
    fails to import is reported on stderr (and in ``Plugins.broken``) and skipped."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    dists: dict[int, tuple[str, str]] = {}
    broken: list[tuple[str, str, str]] = []
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != PROJECT or pm.get_plugin(ep.name) is not None:
                continue
            package = dist.metadata["name"]
            try:
                plugin = ep.load()
            except Exception as exc:  # any error in someone else's import
                broken.append((ep.name, package, f"{type(exc).__name__}: {exc}"))
                print(f"tsqp: plugin '{ep.name}' from {package} failed to load and is skipped: "
                      f"{type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            pm.register(plugin, name=ep.name)
            dists[id(plugin)] = (package, dist.version)
    for plugin in extra:
        pm.register(plugin)
    pm.tsqp_dists = dists  # type: ignore[attr-defined]
    pm.tsqp_broken = broken  # type: ignore[attr-defined]
    return pm


@functools.lru_cache(maxsize=1)
def get_plugins() -> Plugins:
    """The process-wide plugins, discovered once through the ``tsqp`` entry points."""
    return Plugins(make_plugin_manager())
