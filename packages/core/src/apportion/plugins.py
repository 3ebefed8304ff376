"""Plugin discovery and loading.

One :class:`pluggy.PluginManager` per process, fed from the ``apportion`` entry-point
group. Every plugin loads in isolation: an import error, an incompatible API declaration,
a registration hook that raises or a duplicate component name is recorded on that plugin
and the plugin is skipped. Environment switches:

- ``APPORTION_PLUGINS=a,b``: load only these plugins (entry-point or distribution names;
  an empty value loads none). The core baselines are always present.
- ``APPORTION_DISABLE_PLUGINS=a,b``: never load these.
- ``APPORTION_STRICT_PLUGINS=1``: any plugin failure raises :class:`PluginError` (CI sets it).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from apportion import API_VERSION, __version__, hookspecs
from apportion.errors import ApportionError, DuplicateComponentError, PluginError
from apportion.registry import CORE_PROVIDER, Registry

ENTRY_POINT_GROUP = "apportion"

#: registration hook name -> component kind
REGISTRATION_HOOKS: dict[str, str] = {
    "apportion_register_attention": "attention",
    "apportion_register_kv_policies": "kv-policy",
    "apportion_register_allocators": "allocator",
    "apportion_register_trainer_strategies": "trainer-strategy",
    "apportion_register_prompt_strategies": "prompt-strategy",
    "apportion_register_benchmarks": "benchmark",
}


@dataclass
class PluginInfo:
    """What ``apportion plugins`` reports about one plugin."""

    name: str
    distribution: str
    version: str
    module: str = ""
    api: str | None = None
    components: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    skipped: str | None = None
    #: names this plugin registers that another plugin registered first (skipped, name by name)
    clashes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None and not self.clashes

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "api": self.api,
            "kinds": sorted(k for k, v in self.components.items() if v),
            "components": {k: sorted(v) for k, v in self.components.items() if v},
            "error": self.error,
            "skipped": self.skipped,
            "clashes": list(self.clashes),
        }


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


def strict_mode() -> bool:
    return os.environ.get("APPORTION_STRICT_PLUGINS", "").lower() in {"1", "true", "yes"}


def check_api(plugin: str, distribution: str, declared: Any) -> None:
    """Refuse a plugin whose declared ``APPORTION_API`` range excludes this core's API."""
    if declared is None:
        return
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import Version

    try:
        spec = SpecifierSet(str(declared))
    except InvalidSpecifier:
        raise PluginError(
            f"plugin {plugin!r} ({distribution}) declares APPORTION_API={declared!r}, which is "
            f"not a version range like '>=1.0,<2'"
        ) from None
    if Version(API_VERSION) not in spec:
        raise PluginError(
            f"plugin {plugin!r} ({distribution}) requires apportion core API {declared}, but "
            f"apportion-core {__version__} provides API {API_VERSION}"
        )


class PluginHost:
    """The plugin manager plus the registry and the load report it produced."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("apportion")
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.plugins: list[PluginInfo] = []
        self._info_by_plugin: dict[int, PluginInfo] = {}

        from apportion.baselines import plugin as core_plugin

        core = PluginInfo("core", CORE_PROVIDER, __version__, module=core_plugin.__name__)
        self._core = core_plugin
        self._add(core_plugin, core)
        if load_entry_points:
            self._load_entry_points()
        self._register_components()
        self.registry.broken = [
            (p.name, p.distribution, p.version, str(p.error)) for p in self.plugins if p.error
        ]
        problems = self.problems()
        if problems and strict_mode():
            lines = "\n".join(f"  {line}" for line in problems)
            raise PluginError(f"APPORTION_STRICT_PLUGINS=1 and plugins failed:\n{lines}")

    # ------------------------------------------------------------------ loading
    def _add(self, module: Any, info: PluginInfo) -> None:
        self.pm.register(module, name=info.name)
        self._info_by_plugin[id(module)] = info
        self.plugins.append(info)

    def _load_entry_points(self) -> None:
        allow = _env_list("APPORTION_PLUGINS")
        deny = set(_env_list("APPORTION_DISABLE_PLUGINS") or [])
        seen: set[str] = set()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if ep.name in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ep.name)
            info = PluginInfo(ep.name, dist, version, module=ep.value)
            names = {ep.name, dist}
            if names & deny:
                info.skipped = "disabled by APPORTION_DISABLE_PLUGINS"
                self.plugins.append(info)
                continue
            if allow is not None and not (names & set(allow)):
                info.skipped = "not in APPORTION_PLUGINS"
                self.plugins.append(info)
                continue
            try:
                module = ep.load()
                info.api = getattr(module, "APPORTION_API", None)
                check_api(ep.name, f"{dist} {version}", info.api)
                self._add(module, info)
            except Exception as exc:  # isolation: one broken plugin never stops the rest
                info.error = _describe(exc)
                self.plugins.append(info)

    def _register_components(self) -> None:
        for hook_name, kind in REGISTRATION_HOOKS.items():
            caller = getattr(self.pm.hook, hook_name)
            # the core baselines first, then plugins in entry-point name order: the same
            # order on every machine, so a clash always falls on the same plugin
            impls = sorted(
                caller.get_hookimpls(),
                key=lambda impl: (impl.plugin is not self._core, self._plugin_name(impl)),
            )
            for impl in impls:
                info = self._info_by_plugin.get(id(impl.plugin))
                if info is None or info.error:
                    continue
                staged = Registry()
                register = staged.register_function(kind, info.distribution, info.version)
                try:
                    impl.function(*[register for _ in impl.argnames])
                except Exception as exc:
                    info.error = f"{hook_name}: {_describe(exc)}"
                    self._unregister(info)
                    continue
                for spec in staged.specs(kind):
                    try:
                        self.registry.add(spec)
                    except DuplicateComponentError as exc:
                        # the clash is this plugin's, for this name only: the component
                        # registered first, and the rest of this plugin, stay
                        info.clashes.append(str(exc))
                        continue
                    info.components.setdefault(kind, []).append(spec.name)

    def _plugin_name(self, impl: Any) -> str:
        info = self._info_by_plugin.get(id(impl.plugin))
        return info.name if info is not None else ""

    def _unregister(self, info: PluginInfo) -> None:
        """Drop everything a failed plugin registered so far, and its hooks."""
        for kind, names in info.components.items():
            for name in names:
                self.registry.remove(kind, name)
        info.components.clear()
        plugin = self.pm.get_plugin(info.name)
        if plugin is not None:
            self.pm.unregister(plugin)

    def problems(self) -> list[str]:
        """One line per plugin that failed, and per name a plugin could not register."""
        out = [
            f"{p.name} ({p.distribution} {p.version}): {p.error}" for p in self.plugins if p.error
        ]
        out += [
            f"{p.name} ({p.distribution} {p.version}): {c}" for p in self.plugins for c in p.clashes
        ]
        return out

    @property
    def hook(self) -> Any:
        return self.pm.hook


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApportionError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


_lock = threading.Lock()
_host: PluginHost | None = None


def get_plugin_host() -> PluginHost:
    """The process-wide :class:`PluginHost`, built on first use."""
    global _host
    with _lock:
        if _host is None:
            _host = PluginHost()
        return _host


def get_registry() -> Registry:
    return get_plugin_host().registry


def reset() -> None:
    """Forget the loaded plugins (tests use this after changing the environment)."""
    global _host
    with _lock:
        _host = None
