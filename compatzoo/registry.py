"""Plugin manager: every component comes from an entry point in group ``compatzoo``.

Loading is tolerant (a broken plugin, whatever it raises on import, even SystemExit, is
reported and skipped) unless ``COMPATZOO_STRICT_PLUGINS=1``; duplicate names are an error
naming both distributions. A failed strict load or a duplicate is one
:class:`~compatzoo.errors.PluginLoadError`, raised again by every later
:func:`get_registry` call until :func:`reset_registry`.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata as metadata
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pluggy
from pydantic import BaseModel

from compatzoo import hookspecs
from compatzoo.errors import PluginError, PluginLoadError

log = logging.getLogger(__name__)

KINDS = ("encoder", "head", "loss", "upgrader", "scheduler", "dataset", "allocation", "bundle")
ENTRY_POINT_GROUP = "compatzoo"


class DuplicateComponentError(PluginLoadError):
    """Two plugins register the same (kind, name)."""


@dataclass(frozen=True)
class ComponentRecord:
    kind: str
    name: str
    component: Callable[..., Any]   # a class (or function) built as component(params, **runtime)
    plugin: str          # entry point name
    distribution: str
    version: str

    @property
    def params_model(self) -> type[BaseModel]:
        return self.component.Params


def with_params(params_model: type[BaseModel]) -> Callable[[Callable], Callable]:
    """Declare the params of a function component; classes set ``Params`` themselves."""

    def declare(function: Callable) -> Callable:
        function.Params = params_model
        return function

    return declare


@dataclass(frozen=True)
class FailedPlugin:
    plugin: str
    distribution: str
    error: str


def _describe_failure(exc: BaseException) -> str:
    """``Type: message`` of why a plugin failed, saying what a bare SystemExit means."""
    if isinstance(exc, SystemExit):
        return (f"SystemExit({exc.code!r}): the module called sys.exit() (or exit()) while "
                "being imported")
    return f"{type(exc).__name__}: {exc}"


def strict_mode() -> bool:
    return os.environ.get("COMPATZOO_STRICT_PLUGINS", "") not in ("", "0", "false", "False")


class Registry:
    """Components by (kind, name), built from hook implementations."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], ComponentRecord] = {}
        self.failed: list[FailedPlugin] = []
        self.plugins: dict[str, tuple[str, str]] = {}   # plugin name -> (distribution, version)
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)

    # ------------------------------------------------------------------ loading
    def load_entry_points(self, entry_points: Iterable[metadata.EntryPoint] | None = None,
                          strict: bool | None = None) -> None:
        strict = strict_mode() if strict is None else strict
        if entry_points is None:
            entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(entry_points, key=lambda e: (e.name != "core", e.name)):
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            version = ep.dist.version if ep.dist is not None else "0"
            try:
                module = ep.load()
                self.add_plugin(module, ep.name, dist, version)
            except (DuplicateComponentError, KeyboardInterrupt):
                raise  # never pick one of two same-named components; Ctrl-C stops
            except BaseException as exc:  # a plugin may fail in any way, even by calling
                # sys.exit() at import time: report it and go on (or stop, when strict)
                error = _describe_failure(exc)
                if strict:
                    raise PluginLoadError(
                        f"plugin '{ep.name}' from distribution '{dist}' failed to load: "
                        f"{error}. Reinstall or fix that package, or unset "
                        "COMPATZOO_STRICT_PLUGINS to skip it."
                    ) from exc
                log.warning("skipping plugin %s (%s): %s", ep.name, dist, error)
                log.debug("%s", traceback.format_exc())
                self.failed.append(FailedPlugin(ep.name, dist, error))

    def add_plugin(self, module: Any, plugin: str, distribution: str, version: str) -> None:
        """Register one plugin module and collect what its hook registers."""
        if self.manager.has_plugin(plugin):
            raise DuplicateComponentError(f"two plugins are named '{plugin}' ({self.plugins[plugin][0]} "
                              f"and {distribution}); rename one entry point")
        staged: list[ComponentRecord] = []

        def register(kind: str, name: str, component: Callable[..., Any], *extra: Any) -> None:
            if kind not in KINDS:
                raise PluginError(f"plugin '{plugin}' ({distribution}) registers unknown kind "
                                  f"'{kind}'; kinds are {', '.join(KINDS)}")
            if kind == "bundle":
                from compatzoo.bundles.sources import NamedBundle

                if not isinstance(component, NamedBundle) or extra:
                    raise PluginError(f"bundle '{name}' from {distribution} must be registered "
                                      "as register('bundle', name, NamedBundle(source=...)); "
                                      f"got {component!r}")
                staged.append(ComponentRecord(kind, name, component, plugin, distribution,
                                              version))
                return
            if extra:
                raise PluginError(f"{kind} '{name}' from {distribution}: register(kind, name, "
                                  f"component) takes the component alone ({len(extra)} more "
                                  "argument(s) given); declare its params model on it as "
                                  "`Params`")
            params_model = getattr(component, "Params", None)
            if not (isinstance(params_model, type) and issubclass(params_model, BaseModel)):
                raise PluginError(f"{kind} '{name}' from {distribution} must declare its params "
                                  "as a pydantic model in the attribute `Params` (found "
                                  f"{params_model!r})")
            staged.append(ComponentRecord(kind, name, component, plugin, distribution, version))

        self.manager.register(module, name=plugin)
        try:
            for impl in self.manager.hook.register_components.get_hookimpls():
                if impl.plugin_name == plugin:
                    impl.function(register=register)
            for record in staged:
                self._check_duplicate(record, staged)
        except Exception:
            self.manager.unregister(name=plugin)
            raise
        for record in staged:
            self._records[(record.kind, record.name)] = record
        self.plugins[plugin] = (distribution, version)

    def _check_duplicate(self, record: ComponentRecord, staged: list[ComponentRecord]) -> None:
        key = (record.kind, record.name)
        other = self._records.get(key)
        if other is None:
            same = [r for r in staged if (r.kind, r.name) == key]
            other = same[0] if len(same) > 1 else None
        if other is not None:
            raise DuplicateComponentError(
                f"{record.kind} '{record.name}' is registered twice: by distribution "
                f"'{other.distribution}' (plugin '{other.plugin}') and by '{record.distribution}'"
                f" (plugin '{record.plugin}'); uninstall one of them or rename the component"
            )

    # ------------------------------------------------------------------ queries
    def get(self, kind: str, name: str) -> ComponentRecord:
        if kind not in KINDS:
            raise PluginError(f"unknown component kind '{kind}'; kinds are {', '.join(KINDS)}")
        record = self._records.get((kind, name))
        if record is None:
            installed = self.names(kind)
            hint = ", ".join(installed) if installed else "none"
            plural = kind + ("es" if kind.endswith("s") else "s")
            failed = "".join(f"\n  (plugin '{f.plugin}' from {f.distribution} failed to load: "
                             f"{f.error})" for f in self.failed)
            raise PluginError(f"no {kind} named '{name}'; installed {plural}: {hint}. Install "
                              f"the plugin that provides it (e.g. pip install compatzoo[...])."
                              + failed)
        return record

    def names(self, kind: str, pattern: str = "*") -> list[str]:
        return sorted(n for k, n in self._records if k == kind and fnmatch.fnmatch(n, pattern))

    def records(self) -> list[ComponentRecord]:
        return sorted(self._records.values(), key=lambda r: (r.kind, r.name))


_REGISTRY: Registry | None = None
_LOAD_ERROR: PluginLoadError | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use.

    When loading fails (a broken plugin under strict loading, or two plugins with one
    name), the :class:`PluginLoadError` is kept and raised again by every later call,
    without importing the plugins again; spec validation lets it through as it is, so a
    broken plugin is one error, not one per component a spec names.
    """
    global _REGISTRY, _LOAD_ERROR
    if _LOAD_ERROR is not None:
        raise _LOAD_ERROR.with_traceback(None)
    if _REGISTRY is None:
        registry = Registry()
        try:
            registry.load_entry_points()
        except PluginLoadError as exc:
            _LOAD_ERROR = exc
            raise
        _REGISTRY = registry
    return _REGISTRY


def reset_registry() -> None:
    """Forget the loaded registry and any load failure (tests, or after installing or
    fixing a plugin at run time)."""
    global _REGISTRY, _LOAD_ERROR
    _REGISTRY = None
    _LOAD_ERROR = None
