"""The component registry: kind -> name -> :class:`ComponentSpec`.

Specs hold import paths, so building the registry imports no plugin code beyond the
entry-point modules. Factories and config models are resolved on first use.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from apportion import KINDS
from apportion.errors import ConfigError, DuplicateComponentError, UnknownComponentError

if TYPE_CHECKING:
    from pydantic import BaseModel

CORE_PROVIDER = "apportion-core"


def resolve(target: Any) -> Any:
    """Import ``"package.module:attr"`` (or return ``target`` unchanged if it is an object)."""
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"import path {target!r} must look like 'package.module:attr'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class ComponentSpec:
    """Everything the registry knows about one component."""

    kind: str
    name: str
    factory: Any
    config: Any = None
    summary: str = ""
    provider: str = CORE_PROVIDER
    version: str = ""
    replaces: str | None = None
    incompatible_with: dict[str, list[str]] = field(default_factory=dict)

    def config_model(self) -> type[BaseModel]:
        """The pydantic model class of this component's options."""
        from pydantic import BaseModel

        from apportion.config import EmptyConfig

        model = resolve(self.config) if self.config is not None else EmptyConfig
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(
                f"config of {self.kind} {self.name!r} is not a pydantic model: {model!r}"
            )
        return model

    def validate_options(self, options: dict[str, Any] | None, *, where: str = "") -> Any:
        """Validate ``options`` into a config instance; errors point at the offending field."""
        from pydantic import ValidationError

        model = self.config_model()
        try:
            return model.model_validate(options or {})
        except ValidationError as exc:
            errors = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in (where, *err["loc"]) if p != "")
                errors.append((loc, err["msg"]))
            lines = "\n".join(f"  {loc}: {msg}" for loc, msg in errors)
            raise ConfigError(
                f"invalid options for {self.kind} {self.name!r}:\n{lines}", errors
            ) from None

    def create(self, options: Any = None) -> Any:
        """Build the component from a config instance, a dict of options, or nothing."""
        model = self.config_model()
        config = options if isinstance(options, model) else self.validate_options(options)
        return resolve(self.factory)(config)

    def describe(self) -> dict[str, Any]:
        """JSON-able description used by ``apportion list --json``."""
        try:
            fields = {
                name: {
                    "default": _jsonable(f.get_default(call_default_factory=True)),
                    "type": _type_name(f.annotation),
                    "description": f.description or "",
                }
                for name, f in self.config_model().model_fields.items()
            }
            error = None
        except Exception as exc:  # a broken config model is reported, not fatal
            fields, error = {}, f"{type(exc).__name__}: {exc}"
        out = {
            "kind": self.kind,
            "name": self.name,
            "provider": self.provider,
            "version": self.version,
            "summary": self.summary,
            "config": fields,
        }
        if self.replaces:
            out["replaces"] = self.replaces
        if error:
            out["error"] = error
        return out


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
    """kind -> name -> spec, with clear errors for duplicates and unknown names."""

    def __init__(self) -> None:
        self._specs: dict[str, dict[str, ComponentSpec]] = {k: {} for k in KINDS}

    def add(self, spec: ComponentSpec) -> None:
        if spec.kind not in self._specs:
            raise ValueError(f"unknown kind {spec.kind!r}; kinds are {', '.join(KINDS)}")
        existing = self._specs[spec.kind].get(spec.name)
        if existing is not None:
            if spec.replaces is not None and existing.provider == CORE_PROVIDER:
                spec.replaces = f"{existing.provider} {existing.version}".strip()
            else:
                raise DuplicateComponentError(
                    f"{spec.kind} {spec.name!r} is registered twice: by "
                    f"{existing.provider} {existing.version} and by "
                    f"{spec.provider} {spec.version}. Uninstall one, or disable it with "
                    f"APPORTION_DISABLE_PLUGINS."
                )
        self._specs[spec.kind][spec.name] = spec

    def register_function(
        self, kind: str, provider: str, version: str
    ) -> Callable[..., ComponentSpec]:
        """The ``register`` callable handed to one plugin's registration hook."""

        def register(
            name: str,
            factory: Any,
            *,
            config: Any = None,
            summary: str = "",
            replace: bool = False,
            incompatible_with: dict[str, list[str]] | None = None,
        ) -> ComponentSpec:
            if not isinstance(name, str) or not name:
                raise ValueError(f"component name must be a non-empty string, got {name!r}")
            spec = ComponentSpec(
                kind=kind,
                name=name,
                factory=factory,
                config=config,
                summary=summary,
                provider=provider,
                version=version,
                replaces="" if replace else None,
                incompatible_with=dict(incompatible_with or {}),
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
            ) from None

    def create(self, kind: str, name: str, options: Any = None) -> Any:
        return self.get(kind, name).create(options)

    def _check_kind(self, kind: str) -> None:
        if kind not in self._specs:
            close = difflib.get_close_matches(kind, list(self._specs), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownComponentError(
                f"unknown kind {kind!r}.{hint} Kinds: {', '.join(self._specs)}"
            )
