"""The component registry: kind -> name -> :class:`ComponentSpec`.

A spec holds the component's class, or a ``"module:Class"`` path to it that is imported on
first use, so building the registry imports no plugin code beyond the entry-point modules
(``apportion plugins`` never imports torch). Everything else about a component (its summary,
options, incompatibilities) is read from the class itself: a component is named once.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from apportion import KINDS
from apportion.errors import (
    ConfigError,
    DuplicateComponentError,
    PluginError,
    UnknownComponentError,
)

if TYPE_CHECKING:
    from pydantic import BaseModel

CORE_PROVIDER = "apportion-core"

#: Where the first-party components of each kind come from, for "install ..." hints.
FAMILY_OF_KIND: dict[str, str] = {
    "attention": "apportion-attention",
    "kv-policy": "apportion-kvcache",
    "allocator": "apportion-offload",
    "trainer-strategy": "apportion-rl",
    "prompt-strategy": "apportion-icl",
    "benchmark": "apportion-eval",
}


def resolve(target: Any) -> Any:
    """Import ``"package.module:attr"`` (or return ``target`` unchanged if it is an object)."""
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    if not attr or not module_name:
        raise ValueError(f"import path {target!r} must look like 'package.module:attr'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Register(Protocol):
    """The ``register`` callable every registration hook receives.

    ``component``: the component class, or ``"module:Class"`` naming it (imported only when
    the component is used; then ``name`` is required, so that listing plugins imports nothing).
    ``name`` defaults to the class's ``name``; when both are given they must agree.
    ``replace=True`` lets a plugin replace a *core baseline* of the same name, never another
    plugin's component.
    """

    def __call__(
        self, component: type | str, *, name: str | None = None, replace: bool = False
    ) -> ComponentSpec: ...


@dataclass
class ComponentSpec:
    """What the registry knows about one component: where its class is and who provides it."""

    kind: str
    name: str
    target: Any  # the class, or "module:Class"
    provider: str = CORE_PROVIDER
    version: str = ""
    replaces: str | None = None
    _cls: Any = field(default=None, repr=False, compare=False)

    def component_class(self) -> type:
        """The component's class, imported on first use and checked against the spec: it
        must be of this kind, carry this name and a pydantic ``Config``."""
        if self._cls is not None:
            return self._cls
        where = f"{self.kind} {self.name!r} ({self.provider} {self.version})".rstrip()
        try:
            cls = resolve(self.target)
        except (ImportError, AttributeError, ValueError) as exc:
            raise PluginError(
                f"{where}: cannot import {self.target!r}: {type(exc).__name__}: {exc}"
            ) from exc
        check_component_class(cls, self.kind, self.name, where=where)
        self._cls = cls
        return cls

    @property
    def summary(self) -> str:
        return str(getattr(self.component_class(), "summary", "") or "")

    @property
    def incompatible_with(self) -> dict[str, list[str]]:
        return dict(getattr(self.component_class(), "incompatible_with", None) or {})

    def config_model(self) -> type[BaseModel]:
        """The pydantic model class of this component's options."""
        return self.component_class().Config  # type: ignore[attr-defined,no-any-return]

    def validate_options(self, options: dict[str, Any] | None, *, where: str = "") -> Any:
        """Validate ``options`` into a config instance; errors point at the offending field,
        and an unknown option is answered with the nearest valid one and the full list."""
        from pydantic import ValidationError

        model = self.config_model()
        try:
            return model.model_validate(options or {})
        except ValidationError as exc:
            fields = sorted(model.model_fields)
            errors = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in (where, *err["loc"]) if p != "")
                msg = err["msg"]
                if err["type"] == "extra_forbidden" and err["loc"]:
                    msg = unknown_field_message(str(err["loc"][-1]), fields)
                errors.append((loc, msg))
            lines = "\n".join(f"  {loc}: {msg}" for loc, msg in errors)
            raise ConfigError(
                f"invalid options for {self.kind} {self.name!r}:\n{lines}", errors
            ) from None

    def create(self, options: Any = None) -> Any:
        """Build the component from a config instance, a dict of options, or nothing."""
        model = self.config_model()
        config = options if isinstance(options, model) else self.validate_options(options)
        return self.component_class()(config)

    def describe(self) -> dict[str, Any]:
        """JSON-able description used by ``apportion list --json``."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "provider": self.provider,
            "version": self.version,
            "summary": "",
            "config": {},
        }
        try:
            out["summary"] = self.summary
            out["config"] = {
                name: {
                    "default": _jsonable(f.get_default(call_default_factory=True)),
                    "type": _type_name(f.annotation),
                    "description": f.description or "",
                }
                for name, f in self.config_model().model_fields.items()
            }
        except Exception as exc:  # a broken component is reported, not fatal
            out["error"] = (
                str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
            )
        if self.replaces:
            out["replaces"] = self.replaces
        return out


def check_component_class(cls: Any, kind: str, name: str, *, where: str) -> None:
    """Refuse a class that is not a component of ``kind`` named ``name``."""
    from pydantic import BaseModel

    if not isinstance(cls, type):
        raise PluginError(f"{where}: {cls!r} is not a class")
    if getattr(cls, "kind", None) != kind:
        raise PluginError(
            f"{where}: {cls.__module__}.{cls.__qualname__} is a component of kind "
            f"{getattr(cls, 'kind', None)!r}, not {kind!r}; subclass the {kind} base class"
        )
    if getattr(cls, "name", None) != name:
        raise PluginError(
            f"{where}: registered as {name!r} but {cls.__qualname__}.name is "
            f"{getattr(cls, 'name', None)!r}; a component has one name"
        )
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise PluginError(f"{where}: {cls.__qualname__}.Config is not a pydantic model: {config!r}")


def unknown_field_message(field_name: str, fields: list[str], noun: str = "option") -> str:
    """'unknown option' with the nearest valid field and the list of valid ones."""
    close = nearest(field_name, fields)
    hint = f" Did you mean {close!r}?" if close else ""
    valid = ", ".join(fields) or "(none)"
    return f"unknown {noun} {field_name!r}.{hint} Valid {noun}s: {valid}"


def nearest(word: str, choices: list[str]) -> str | None:
    """The choice ``word`` most likely misspells (or abbreviates or extends), if any."""
    close = difflib.get_close_matches(word, choices, n=1)
    if close:
        return close[0]
    affixed = [c for c in choices if word.startswith(c) or c.startswith(word)]
    return max(affixed, key=len) if affixed else None


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return str(value)


class Registry:
    """kind -> name -> spec, with clear errors for duplicates and unknown names.

    ``broken``: ``(plugin, distribution, version, error)`` of plugins that failed to load;
    an unknown name is answered with them, since the component may be theirs.
    """

    def __init__(self) -> None:
        self._specs: dict[str, dict[str, ComponentSpec]] = {k: {} for k in KINDS}
        self.broken: list[tuple[str, str, str, str]] = []

    def add(self, spec: ComponentSpec) -> None:
        """Add ``spec``; a name already taken is a :class:`DuplicateComponentError` unless the
        spec replaces a core baseline. The spec already registered is never touched."""
        self._check_kind(spec.kind)
        existing = self._specs[spec.kind].get(spec.name)
        if existing is not None:
            if spec.replaces is not None and existing.provider == CORE_PROVIDER:
                spec.replaces = f"{existing.provider} {existing.version}".strip()
            else:
                raise DuplicateComponentError(
                    f"{spec.kind} {spec.name!r} is already registered by {existing.provider} "
                    f"{existing.version}; {spec.provider} {spec.version} registers it again "
                    f"and its {spec.name!r} is skipped. Uninstall one, or disable it with "
                    f"APPORTION_DISABLE_PLUGINS."
                )
        self._specs[spec.kind][spec.name] = spec

    def register_function(self, kind: str, provider: str, version: str) -> Register:
        """The ``register`` callable handed to one plugin's registration hook for ``kind``."""

        def register(
            component: type | str, *, name: str | None = None, replace: bool = False
        ) -> ComponentSpec:
            where = f"{provider} {version}: register({component!r})"
            if isinstance(component, str):
                if name is None:
                    raise PluginError(
                        f"{where}: a component registered by import path needs name=..., so "
                        "that listing plugins does not import it"
                    )
                cls = None
            elif isinstance(component, type):
                cls = component
                name = name or getattr(component, "name", "")
            else:
                raise PluginError(f"{where}: expected a component class or 'module:Class'")
            if not isinstance(name, str) or not name:
                raise PluginError(f"{where}: the component needs a non-empty name")
            if cls is not None:
                check_component_class(cls, kind, name, where=where)
            spec = ComponentSpec(
                kind=kind,
                name=name,
                target=component,
                provider=provider,
                version=version,
                replaces="" if replace else None,
                _cls=cls,
            )
            self.add(spec)
            return spec

        return register

    def kinds(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        return sorted(self._specs[kind])

    def specs(self, kind: str | None = None) -> Iterator[ComponentSpec]:
        for k in [kind] if kind else list(self._specs):
            self._check_kind(k)
            yield from (self._specs[k][n] for n in sorted(self._specs[k]))

    def remove(self, kind: str, name: str) -> None:
        self._specs[kind].pop(name, None)

    def get(self, kind: str, name: str) -> ComponentSpec:
        self._check_kind(kind)
        try:
            return self._specs[kind][name]
        except KeyError:
            known = sorted(self._specs[kind])
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownComponentError(
                f"unknown {kind} {name!r}.{hint} Known: {', '.join(known) or '(none installed)'}"
                + self._unknown_tail(kind)
            ) from None

    def _unknown_tail(self, kind: str) -> str:
        """Why a name may be missing: plugins that failed to load, and the family of ``kind``
        when it is not installed (a family that is installed but failed is among the former)."""
        tail = ""
        if self.broken:
            failed = "; ".join(f"{p} ({d} {v}): {e}" for p, d, v, e in self.broken)
            tail += f". Plugins that failed to load (it may be theirs): {failed}"
        family = FAMILY_OF_KIND.get(kind)
        if (
            family
            and not any(s.provider == family for s in self._specs[kind].values())
            and not any(d == family for _, d, _, _ in self.broken)
        ):
            tail += f". More {kind} components come with {family} (pip install {family})"
        return tail

    def create(self, kind: str, name: str, options: Any = None) -> Any:
        return self.get(kind, name).create(options)

    def _check_kind(self, kind: str) -> None:
        if kind not in self._specs:
            close = difflib.get_close_matches(kind, list(self._specs), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownComponentError(
                f"unknown kind {kind!r}.{hint} Kinds: {', '.join(self._specs)}"
            )
