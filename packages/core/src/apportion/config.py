"""The run config: one validated pydantic document, from a TOML file or CLI flags.

::

    [model]
    name = "smollm2"            # the embedded default; or an HF id / local folder

    [attention]
    name = "dense"

    [kv_policy]
    name = "snapkv"
    compression_ratio = 0.5     # any other key is an option of the chosen component

    [[benchmarks]]
    name = "niah"
    lengths = [1024, 2048]

    [[sweep]]                   # optional: more configs to run side by side
    label = "streaming-50"
    kv_policy = { name = "streaming", compression_ratio = 0.5 }

Validation resolves every component against the registry and validates its options with
the component's own config model, so a typo fails before a model loads and the error
names the field (``kv_policy.compression_ratio: ...``).
"""

from __future__ import annotations

import itertools
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from apportion.errors import ApportionError, ConfigError


class EmptyConfig(BaseModel):
    """Config of a component that takes no options."""

    model_config = ConfigDict(extra="forbid")


class ComponentConfig(BaseModel):
    """Base class for component configs: unknown options are errors, every field has a default."""

    model_config = ConfigDict(extra="forbid")


class ComponentRef(BaseModel):
    """A component chosen by name; every other key is one of its options."""

    model_config = ConfigDict(extra="allow")

    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.name}({opts})" if opts else self.name


class ModelSpec(BaseModel):
    """Which model to load and where."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("smollm2", description="'smollm2' (embedded), an HF id, or a local folder")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1'")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_context: int | None = Field(None, ge=16, description="override the model's window")


class GenerationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(
        None, ge=1, le=8192, description="None: each benchmark's own default"
    )
    batch_size: int = Field(1, ge=1, le=256)
    prompt_budget: int | None = Field(
        None,
        ge=1,
        description="tokens the prompt strategy may fill (demonstrations included); None: when a "
        "benchmark offers demonstrations, the model's context less max_new_tokens",
    )


_COMPONENT_FIELDS = {
    "attention": "attention",
    "kv_policy": "kv-policy",
    "prompt": "prompt-strategy",
    "allocator": "allocator",
}


class Variant(BaseModel):
    """One side of a sweep: overrides of the base config's components."""

    model_config = ConfigDict(extra="forbid")

    label: str | None = None
    attention: ComponentRef | None = None
    kv_policy: ComponentRef | None = None
    prompt: ComponentRef | None = None
    allocator: ComponentRef | None = None


class RunConfig(BaseModel):
    """A complete run: one model, one component per kind, benchmarks, and optional sweep."""

    model_config = ConfigDict(extra="forbid")

    name: str = "run"
    model: ModelSpec = ModelSpec()
    attention: ComponentRef = ComponentRef(name="dense")
    kv_policy: ComponentRef = ComponentRef(name="full")
    prompt: ComponentRef = ComponentRef(name="zero-shot")
    allocator: ComponentRef = ComponentRef(name="pageable")
    benchmarks: list[ComponentRef] = Field(default_factory=lambda: [ComponentRef(name="niah")])
    generation: GenerationSpec = GenerationSpec()
    seed: int = 0
    limit: int | None = Field(None, ge=1, description="at most this many samples per benchmark")
    output_dir: str = "runs"
    sweep: list[Variant] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="'kv_policy.compression_ratio' = [0.25, 0.5]: expands into sweep variants",
    )
    harness: dict[str, Any] = Field(
        default_factory=dict,
        description="options for the harness plugin that runs this config (see its docs)",
    )

    @field_validator("benchmarks")
    @classmethod
    def _some_benchmark(cls, v: list[ComponentRef]) -> list[ComponentRef]:
        if not v:
            raise ValueError("at least one benchmark is required")
        return v

    def variants(self) -> list[Variant]:
        """The configs to run side by side: the sweep list (or the base alone) times the grid."""
        base = self.sweep or [Variant(label=None)]
        if not self.grid:
            return [self._fill(v) for v in base]
        keys = sorted(self.grid)
        out = []
        for v in base:
            for values in itertools.product(*(self.grid[k] for k in keys)):
                data = self._fill(v).model_dump()
                for key, value in zip(keys, values, strict=True):
                    field, _, option = key.partition(".")
                    if field not in _COMPONENT_FIELDS or not option:
                        raise ConfigError(
                            f"grid key {key!r} must look like 'kv_policy.compression_ratio' "
                            f"with one of {', '.join(_COMPONENT_FIELDS)}",
                            [(f"grid.{key}", "bad key")],
                        )
                    data[field][option] = value
                suffix = ",".join(f"{k}={val}" for k, val in zip(keys, values, strict=True))
                data["label"] = f"{data['label']}[{suffix}]"
                out.append(Variant.model_validate(data))
        return out

    def _fill(self, v: Variant) -> Variant:
        data: dict[str, Any] = {}
        for field in _COMPONENT_FIELDS:
            ref = getattr(v, field) or getattr(self, field)
            data[field] = ref.model_dump()
        variant = Variant.model_validate(data)
        variant.label = (
            v.label
            or "+".join(
                getattr(variant, f).label()
                for f in _COMPONENT_FIELDS
                if getattr(variant, f).model_dump() != getattr(RunConfig(), f).model_dump()
            )
            or "baseline"
        )
        return variant


def _pydantic_errors(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        out.append((f"{prefix}{loc}" if loc else prefix.rstrip(".") or "(root)", err["msg"]))
    return out


def parse_config(data: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Validate a config mapping; errors name each offending field."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        errors = _pydantic_errors(exc)
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in errors)
        raise ConfigError(f"{source} is invalid:\n{lines}", errors) from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML run config (structure only; see :func:`resolve_config`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist", [("(file)", str(path))])
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", [("(file)", str(exc))]) from None
    return parse_config(data, source=str(path))


class ResolvedVariant(BaseModel):
    """A variant whose components exist and whose options are validated config instances."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    label: str
    refs: dict[str, ComponentRef]
    configs: dict[str, Any]


def resolve_config(config: RunConfig, registry: Any = None) -> list[ResolvedVariant]:
    """Check every component and option of every variant against the registry.

    Raises :class:`ConfigError` listing every problem (unknown names with did-you-mean,
    bad options by field, incompatible combinations) before any model is loaded.
    """
    from apportion.errors import UnknownComponentError

    if registry is None:
        from apportion.plugins import get_registry

        registry = get_registry()
    errors: list[tuple[str, str]] = []
    resolved: list[ResolvedVariant] = []
    variants = config.variants()
    for i, variant in enumerate(variants):
        where = f"sweep[{i}]." if config.sweep or config.grid else ""
        refs: dict[str, ComponentRef] = {}
        configs: dict[str, Any] = {}
        for field, kind in _COMPONENT_FIELDS.items():
            ref = getattr(variant, field)
            refs[field] = ref
            try:
                spec = registry.get(kind, ref.name)
                configs[field] = spec.validate_options(ref.options, where=f"{where}{field}")
            except UnknownComponentError as exc:
                errors.append((f"{where}{field}.name", str(exc)))
            except ConfigError as exc:
                errors.extend(exc.errors)
            except ApportionError as exc:
                errors.append((f"{where}{field}", str(exc)))
        errors.extend(_incompatibilities(registry, refs, where))
        resolved.append(
            ResolvedVariant(label=variant.label or f"variant{i}", refs=refs, configs=configs)
        )
    for j, bench in enumerate(config.benchmarks):
        try:
            registry.get("benchmark", bench.name).validate_options(
                bench.options, where=f"benchmarks[{j}]"
            )
        except UnknownComponentError as exc:
            errors.append((f"benchmarks[{j}].name", str(exc)))
        except ConfigError as exc:
            errors.extend(exc.errors)
    labels = [v.label for v in resolved]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        errors.append(("sweep", f"duplicate variant labels {dupes}; give each a distinct label"))
    if not errors:
        from apportion.plugins import get_plugin_host

        for problems in get_plugin_host().hook.apportion_check_run(config=config):
            errors.extend(("(combination)", p) for p in problems or [])
    if errors:
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in errors)
        raise ConfigError(f"run config {config.name!r} is invalid:\n{lines}", errors)
    return resolved


def _incompatibilities(
    registry: Any, refs: dict[str, ComponentRef], where: str
) -> list[tuple[str, str]]:
    out = []
    chosen = {_COMPONENT_FIELDS[f]: r.name for f, r in refs.items()}
    for field, ref in refs.items():
        kind = _COMPONENT_FIELDS[field]
        try:
            spec = registry.get(kind, ref.name)
        except ApportionError:
            continue
        for other_kind, names in spec.incompatible_with.items():
            if chosen.get(other_kind) in names:
                out.append(
                    (
                        f"{where}{field}",
                        f"{kind} {ref.name!r} cannot be combined with {other_kind} "
                        f"{chosen[other_kind]!r}",
                    )
                )
    return out
