"""The plugin manager: built-in plugins, entry-point plugins, and the registries they fill."""

from __future__ import annotations

import difflib
import importlib
import os
import re
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from typing import Any, TypeVar

import pluggy

import kvd
from kvd.core import hookspecs
from kvd.core.errors import KvdError
from kvd.core.registry import Registry

T = TypeVar("T")

ENTRY_POINT_GROUP = "kvd"
ALLOWLIST_ENV = "KVD_LOAD_PLUGINS"

BUILTIN_PLUGINS: tuple[str, ...] = (
    "kvd.plugins.models",
    "kvd.plugins.aligners",
    "kvd.plugins.rope",
    "kvd.plugins.projectors",
    "kvd.plugins.fusions",
    "kvd.plugins.losses",
    "kvd.plugins.datasets",
)


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin comes from: its registered name, distribution and version."""

    name: str
    package: str
    version: str


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded or whose hook raised; reported, never fatal to --help."""

    name: str
    package: str
    error: str


@dataclass
class Plugins:
    """A loaded plugin manager with one registry per kind."""

    pm: pluggy.PluginManager
    info: dict[str, PluginInfo]
    failures: list[PluginFailure] = field(default_factory=list)
    registries: dict[str, Registry[Any]] = field(default_factory=dict)

    def registry(self, kind: str) -> Registry[Any]:
        return self.registries[kind]


def allowed_plugins() -> set[str] | None:
    """The `DIST:NAME` entries of KVD_LOAD_PLUGINS (distribution and entry-point name), as
    given; None when the variable is unset (= all)."""
    raw = os.environ.get(ALLOWLIST_ENV)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def normalised(dist: str) -> str:
    """A distribution name compared as pip does (PEP 503): case and runs of -_. ignored."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def allow_key(package: str, name: str) -> str:
    """How KVD_LOAD_PLUGINS names an entry point: `DIST:NAME`."""
    return f"{normalised(package)}:{name}"


def load_plugins(*, entry_points: bool = True) -> Plugins:
    """A fresh manager: built-ins, then entry points in group `kvd` (filtered by the allowlist)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins = Plugins(pm=pm, info={})
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        plugins.info[module_name] = PluginInfo(module_name, "kvd", kvd.__version__)
    if entry_points:
        _load_entry_points(plugins)
    pm.check_pending()
    _fill_registries(plugins)
    return plugins


def _load_entry_points(plugins: Plugins) -> None:
    """Entry points of group `kvd`; with KVD_LOAD_PLUGINS, only those it names as DIST:NAME
    (a bare NAME would let any module on the path that claims that name be imported: it is
    reported, not loaded)."""
    allowed = allowed_plugins()
    if allowed is not None:
        wanted = {allow_key(*entry.split(":", 1)) for entry in allowed if ":" in entry}
        for bare in sorted(entry for entry in allowed if ":" not in entry):
            plugins.failures.append(
                PluginFailure(
                    bare,
                    "?",
                    f"{ALLOWLIST_ENV} entry {bare!r} names no distribution: write DIST:{bare} "
                    "(`kvd plugins` lists each plugin's package)",
                )
            )
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        package = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        if allowed is not None and allow_key(package, ep.name) not in wanted:
            continue
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin is reported by name, never fatal
            plugins.failures.append(PluginFailure(ep.name, package, f"{type(exc).__name__}: {exc}"))
            continue
        problem = _register_checked(plugins.pm, module, ep.name)
        if problem:
            plugins.failures.append(PluginFailure(ep.name, package, problem))
            continue
        plugins.info[ep.name] = PluginInfo(ep.name, package, version)


def _register_checked(pm: pluggy.PluginManager, module: object, name: str) -> str | None:
    """Register `module`; a hook name kvd does not define unregisters it and says which."""
    try:
        pm.register(module, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:  # taken name, bad signature
        return str(exc)
    unknown = [
        hook
        for hook, caller in vars(pm.hook).items()
        if not hook.startswith("_")
        and not caller.has_spec()
        and any(impl.plugin_name == name for impl in caller.get_hookimpls())
    ]
    if not unknown:
        return None
    pm.unregister(name=name)
    hints = []
    for hook in unknown:
        close = difflib.get_close_matches(hook, list(hookspecs.KINDS.values()), n=1)
        hints.append(f"{hook!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"implements unknown hook(s) {', '.join(hints)}"


def _fill_registries(plugins: Plugins) -> None:
    for kind, hook_name in hookspecs.KINDS.items():
        registry: Registry[Any] = Registry(kind)
        hook = getattr(plugins.pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):  # registration order: built-ins first
            info = plugins.info[impl.plugin_name]
            register = partial(
                registry.add, plugin=info.name, package=info.package, version=info.version
            )
            try:
                impl.function(register=register)
            except KvdError:
                raise
            except Exception as exc:
                if impl.plugin_name in BUILTIN_PLUGINS:
                    raise
                plugins.failures.append(
                    PluginFailure(info.name, info.package, f"{type(exc).__name__}: {exc}")
                )
        plugins.registries[kind] = registry


_CURRENT: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugins, loaded once."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = load_plugins()
    return _CURRENT


def reset_plugins() -> None:
    """Forget the loaded plugins (tests, or after changing KVD_LOAD_PLUGINS)."""
    global _CURRENT
    _CURRENT = None


def registry(kind: str) -> Registry[Any]:
    """The registry of `kind` from the process-wide plugins."""
    return get_plugins().registry(kind)


def component(kind: str, name: str, base: type[T]) -> type[T]:
    """The class registered as `name` of `kind`, checked to subclass `base` (the kind's base class,
    which the caller knows): a plugin that registered something else is named in the error, so
    the types downstream of a registry hold."""
    found = registry(kind).get(name)
    if not (isinstance(found, type) and issubclass(found, base)):
        entry = registry(kind).entry(name)
        raise KvdError(
            f"{kind} component {name!r} (plugin {entry.plugin!r} of {entry.package} "
            f"{entry.version}) is not a {base.__module__}.{base.__qualname__}",
            hint="fix or uninstall that plugin (see `kvd plugins`)",
        )
    return found
