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

from apportion import FIELD_KINDS
from apportion.base import ComponentConfig, EmptyConfig
from apportion.errors import ApportionError, ConfigError
from apportion.registry import unknown_field_message

__all__ = [
    "ComponentConfig",
    "ComponentRef",
    "EmptyConfig",
    "GenerationSpec",
    "HarnessSpec",
    "ModelSpec",
    "ResolvedVariant",
    "RunConfig",
    "SweepInstalled",
    "Variant",
    "load_config",
    "parse_config",
    "resolve_config",
]


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
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|(cuda|xpu)(:[0-9]+)?)$",
        description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', 'mps' or 'xpu'",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_context: int | None = Field(None, ge=16, description="override the model's window")


class GenerationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(
        None, ge=1, le=8192, description="None: each benchmark's own default"
    )
    batch_size: int = Field(
        8,
        ge=1,
        le=256,
        description="decode at most this many configs of a shared prefill together",
    )
    sample_batch_size: int = Field(
        1,
        ge=1,
        le=256,
        description="configs that cannot share a prefill run this many samples of one "
        "benchmark and length as one left-padded batch",
    )
    share_prefill: bool = Field(
        True,
        description="configs that differ only in a layer-wise KV policy share one prefill per "
        "sample and decode together (answers as when run alone)",
    )
    question_in_prefill: bool = Field(
        True,
        description="False: query-agnostic; the context is prefilled and compressed before "
        "the question is fed (positions continue from the uncompressed length), as when a "
        "stored context is asked later (kvpress's query_aware=False)",
    )
    prompt_budget: int | None = Field(
        None,
        ge=1,
        description="tokens the prompt strategy may fill (demonstrations included); None: when a "
        "benchmark offers demonstrations, the model's context less max_new_tokens",
    )
    chat_template: bool = Field(
        True,
        description="render prompts with the tokenizer's chat template (a model without one "
        "reads the plain text anyway); False: the messages' contents as plain text, as a base "
        "model reads them (context-awareness studies compare both)",
    )


class SweepInstalled(BaseModel):
    """Add every installed component of ``kinds`` as a variant beside the base config.

    ``options`` go to each component whose config has that field; ``grid`` gives a field
    several values, one variant each (``compression_ratio = [0.5, 0.75]``); ``only_with``
    keeps only the components whose config has at least one of these fields (a study of
    budgets leaves out components without one).
    """

    model_config = ConfigDict(extra="forbid")

    kinds: list[str] = Field(["kv-policy", "attention"], description="kinds to sweep")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="options passed to each component whose config has that field",
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="a field -> its values: one variant per value, for components with the field",
    )
    only_with: list[str] = Field(
        default_factory=list,
        description="sweep only components whose config has one of these fields (empty: all)",
    )
    exclude: list[str] = Field(default_factory=list, description="component names to leave out")

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        kinds = sorted(set(FIELD_KINDS.values()))
        bad = [k for k in v if k not in kinds]
        if bad:
            raise ValueError(f"{bad} are not kinds a run config names; use some of {kinds}")
        return v


class HarnessSpec(BaseModel):
    """``[harness]``: how the run loop runs the study (time budget, automatic sweep, report)."""

    model_config = ConfigDict(extra="forbid")

    sweep_installed: SweepInstalled | None = None
    time_budget_s: float | None = Field(
        None,
        gt=0,
        description="start no sample that would end after this many seconds from the start "
        "of the run (a rerun in the same directory resumes)",
    )
    report: bool = Field(True, description="render the report after the run (apportion-eval)")


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
    harness: HarnessSpec = HarnessSpec()

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
                    if field not in FIELD_KINDS or not option:
                        raise ConfigError(
                            f"grid key {key!r} must look like 'kv_policy.compression_ratio' "
                            f"with one of {', '.join(FIELD_KINDS)}",
                            [(f"grid.{key}", "bad key")],
                        )
                    data[field][option] = value
                suffix = ",".join(f"{k}={val}" for k, val in zip(keys, values, strict=True))
                data["label"] = f"{data['label']}[{suffix}]"
                out.append(Variant.model_validate(data))
        return out

    def _fill(self, v: Variant) -> Variant:
        data: dict[str, Any] = {}
        for field in FIELD_KINDS:
            ref = getattr(v, field) or getattr(self, field)
            data[field] = ref.model_dump()
        variant = Variant.model_validate(data)
        variant.label = (
            v.label
            or "+".join(
                getattr(variant, f).label()
                for f in FIELD_KINDS
                if getattr(variant, f).model_dump() != getattr(RunConfig(), f).model_dump()
            )
            or "baseline"
        )
        return variant


#: the deepest nesting a run config may have (the deepest real one has 4)
MAX_DEPTH = 32


def _pydantic_errors(exc: ValidationError, model: type[BaseModel]) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden" and err["loc"]:
            fields = _fields_at(model, err["loc"][:-1])
            msg = unknown_field_message(str(err["loc"][-1]), fields, noun="field")
        out.append((loc or "(root)", msg))
    return out


def _fields_at(model: Any, path: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) model at ``path`` of ``model``; [] if not a model."""
    for part in path:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _model_of(field.annotation)
    return sorted(getattr(model, "model_fields", {}))


def _model_of(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def parse_config(data: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Validate a config mapping; errors name each offending field (unknown ones with the
    nearest valid name and the list of valid ones)."""
    from apportion.host.io import depth

    if depth(data) > MAX_DEPTH:
        raise ConfigError(
            f"{source} is nested too deeply to be a run config (more than {MAX_DEPTH} levels)",
            [("(root)", "nesting")],
        )
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        errors = _pydantic_errors(exc, RunConfig)
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in errors)
        raise ConfigError(f"{source} is invalid:\n{lines}", errors) from None
    except RecursionError:
        raise ConfigError(
            f"{source} is nested too deeply to be a run config", [("(root)", "nesting")]
        ) from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML run config (structure only; see :func:`resolve_config`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist", [("(file)", str(path))])
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", [("(file)", str(exc))]) from None
    except RecursionError:
        raise ConfigError(
            f"{path} is nested too deeply to be a run config", [("(file)", "nesting")]
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read {str(path)!r}: {exc.strerror or exc}", [("(file)", str(exc))]
        ) from None
    return parse_config(data, source=str(path))


class ResolvedVariant(BaseModel):
    """A variant whose components exist and whose options are validated config instances."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    label: str
    refs: dict[str, ComponentRef]
    configs: dict[str, Any]


def resolve_config(
    config: RunConfig, registry: Any, check_run: Any = None
) -> list[ResolvedVariant]:
    """Check every component and option of every variant against ``registry``.

    Raises :class:`ConfigError` listing every problem (unknown names with did-you-mean,
    bad options by field, incompatible combinations) before any model is loaded.
    ``check_run``: the ``apportion_check_run`` hook caller, asked once everything else holds.
    """
    from apportion.errors import UnknownComponentError

    errors: list[tuple[str, str]] = []
    resolved: list[ResolvedVariant] = []
    variants = config.variants()
    for i, variant in enumerate(variants):
        where = f"sweep[{i}]." if config.sweep or config.grid else ""
        refs: dict[str, ComponentRef] = {}
        configs: dict[str, Any] = {}
        for field, kind in FIELD_KINDS.items():
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
    if not errors and check_run is not None:
        for problems in check_run(config=config):
            errors.extend(("(combination)", p) for p in problems or [])
    if errors:
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in errors)
        raise ConfigError(f"run config {config.name!r} is invalid:\n{lines}", errors)
    return resolved


def _incompatibilities(
    registry: Any, refs: dict[str, ComponentRef], where: str
) -> list[tuple[str, str]]:
    out = []
    chosen = {FIELD_KINDS[f]: r.name for f, r in refs.items()}
    for field, ref in refs.items():
        kind = FIELD_KINDS[field]
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
