"""The one run loop behind ``apportion run``.

:func:`execute` takes a validated :class:`~apportion.config.RunConfig` through these steps:

1. **resolve**: expand ``[harness] sweep_installed`` into variants, check every component,
   option and combination against the registry, and build the components;
2. **check before loading**: the device exists, and every benchmark length plus its answer
   tokens fits the model's window (read from its ``config.json``, not its weights);
3. **load and bind**: load the model once and hand it to every component (``bind``);
4. **plan the work**: build each benchmark's samples (``limit`` spread over its cells), order
   them round-robin (one sample of every benchmark and length before the second of any), and
   drop what ``records.jsonl`` already holds for this sample text and model fingerprint;
5. **run**: measure each (sample, variant), appending one record per measurement; a sample
   that raises becomes an error record and the run goes on; the time budget starts no sample
   it cannot hold (a rerun in the same directory resumes); Ctrl-C keeps every finished record;
6. **finish**: the ``apportion_report`` hook renders the records (apportion-eval writes
   ``report.html``; without a renderer the core prints a plain table), then
   ``apportion_run_finished`` is called.

Families extend the loop through hooks with one job each (``apportion_check_run``,
``apportion_report``, ``apportion_run_finished``); none replaces it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apportion import FIELD_KINDS
from apportion.config import (
    ComponentRef,
    ResolvedVariant,
    RunConfig,
    SweepInstalled,
    Variant,
    resolve_config,
)
from apportion.errors import ApportionError, ConfigError, PromptTooLongError
from apportion.host.io import atomic_write_json
from apportion.records import RECORDS, append_record, latest, load_records, read_records
from apportion.stats import wilson

__all__ = [
    "RECORDS",
    "RunOptions",
    "RunResult",
    "append_record",
    "execute",
    "read_records",
]


@dataclass
class RunOptions:
    """What ``apportion run`` passes to the runner besides the config.

    ``time_budget_s``: start no sample once this many seconds have passed since the run
    started (a rerun in the same directory finishes the rest); ``None`` keeps the config's
    ``[harness] time_budget_s``. ``progress``: a progress bar on a terminal (``None``: when
    the console is one), else a log line every ``log_every`` samples.
    """

    limit: int | None = None
    seed: int | None = None
    progress: bool | None = None
    time_budget_s: float | None = None
    log_every: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(
                f"the time budget must be a positive number of seconds, got {self.time_budget_s}",
                [("time_budget_s", str(self.time_budget_s))],
            )


@dataclass
class RunResult:
    """What :func:`execute` returns: the run's current records (the latest per sample) and
    what a reader should know about them."""

    config: RunConfig
    run_dir: Path
    records: list[dict[str, Any]]
    report: Path | None = None
    skipped: list[str] = field(default_factory=list)  # variants left out, with why
    notes: list[str] = field(default_factory=list)  # e.g. bad record lines skipped
    pending: int = 0  # samples not run (time budget)
    wall_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.records[i]


# ------------------------------------------------------------------------------ run dir


def prepare_run_dir(run_dir: str | Path) -> Path:
    """Create the run directory and prove it is writable, with a clear error if not."""
    path = Path(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"run directory {str(path)!r} is not writable: {exc.strerror or exc}",
            [("output_dir", str(exc))],
        ) from None
    return path


# ------------------------------------------------------------------------------ variants


def expand_installed(
    config: RunConfig, registry: Any, opts: SweepInstalled
) -> tuple[RunConfig, list[str]]:
    """Return ``config`` with one sweep variant per installed component of ``opts.kinds``
    (per value of ``opts.grid`` it has), the base config first, and the components left out
    with the reason."""
    skipped: list[str] = []
    base = list(config.sweep) or [Variant(label=config.variants()[0].label)]
    variants = list(base)
    labels = {v.label for v in base}
    field_of = {kind: f for f, kind in FIELD_KINDS.items()}
    chosen = {kind: getattr(config, f).name for f, kind in FIELD_KINDS.items()}
    for kind in opts.kinds:
        field_name = field_of[kind]
        for spec in registry.specs(kind):
            if spec.name == chosen[kind] or spec.name in opts.exclude:
                continue
            refs, why = _installed_refs(spec, opts, chosen)
            if why:
                skipped.append(f"{kind} {spec.name}: {why}")
            for ref in refs:
                if ref.label() not in labels:
                    labels.add(ref.label())
                    variants.append(Variant(label=ref.label(), **{field_name: ref}))
    return config.model_copy(update={"sweep": variants}), skipped


def _installed_refs(
    spec: Any, opts: SweepInstalled, chosen: dict[str, str]
) -> tuple[list[ComponentRef], str]:
    """The variants a swept component gets (only the options its config has, one per grid
    value), or why it gets none."""
    try:
        fields = spec.config_model().model_fields
        clash = [
            f"{k} {chosen[k]}"
            for k, names in spec.incompatible_with.items()
            if k in chosen and chosen[k] in names
        ]
    except Exception as exc:  # a broken plugin component: leave it out, say why
        return [], f"failed to load ({exc})"
    if opts.only_with and not any(f in fields for f in opts.only_with):
        return [], ""  # not part of this study: left out silently, as asked
    if clash:
        return [], f"cannot be combined with {', '.join(clash)}"
    options = {k: v for k, v in opts.options.items() if k in fields}
    grid = {k: v for k, v in opts.grid.items() if k in fields}
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    refs = []
    for combo in combos or [{}]:
        chosen_options = {**options, **combo}
        try:  # e.g. a field of that name that takes tokens, not a fraction
            spec.validate_options(chosen_options)
        except ApportionError as exc:
            return [], f"rejects {chosen_options} ({str(exc).splitlines()[-1].strip()})"
        refs.append(ComponentRef(name=spec.name, **chosen_options))
    return refs, ""


def build_components(variant: ResolvedVariant, registry: Any) -> dict[str, Any]:
    """The variant's components, one per run-config field."""
    return {
        f: registry.get(kind, variant.refs[f].name).create(variant.configs[f])
        for f, kind in FIELD_KINDS.items()
    }


def _build_all(
    variants: list[ResolvedVariant], registry: Any, given: set[str], skipped: list[str]
) -> tuple[list[ResolvedVariant], dict[str, dict[str, Any]]]:
    components: dict[str, dict[str, Any]] = {}
    for v in variants:
        try:
            components[v.label] = build_components(v, registry)
        except Exception as exc:  # a swept plugin that fails to build is reported, not fatal
            if v.label in given:  # a component the user asked for by name must work
                raise
            skipped.append(f"{v.label}: failed to build ({type(exc).__name__}: {exc})")
    return [v for v in variants if v.label in components], components


# ---------------------------------------------------------------------------- benchmarks

_SHAPE = ("lengths", "depths", "samples", "seed")


def benchmark_labels(names: list[str], configs: list[dict[str, Any]]) -> list[str]:
    """``niah`` alone; ``niah[variant=multi-key]`` when several entries share a name: the
    options that tell them apart (lengths, depths, samples and seed only if nothing else)."""
    out = []
    for name, cfg in zip(names, configs, strict=True):
        peers = [c for n, c in zip(names, configs, strict=True) if n == name]
        if len(peers) == 1:
            out.append(name)
            continue
        differ = [k for k in cfg if len({json.dumps(p.get(k), sort_keys=True) for p in peers}) > 1]
        differ = [k for k in differ if k not in _SHAPE] or differ
        tail = ",".join(f"{k}={_short(cfg[k])}" for k in differ)
        out.append(f"{name}[{tail}]" if differ else name)
    return [f"{label}#{i}" if out.count(label) > 1 else label for i, label in enumerate(out)]


def _short(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def build_benchmarks(config: RunConfig, registry: Any) -> list[tuple[str, Any]]:
    """(label, benchmark) for every ``[[benchmarks]]`` entry, seeded by the run's seed."""
    built = []
    for ref in config.benchmarks:
        opts = dict(ref.options)
        if "seed" in registry.get("benchmark", ref.name).config_model().model_fields:
            opts.setdefault("seed", config.seed)
        built.append(registry.create("benchmark", ref.name, opts))
    labels = benchmark_labels(
        [r.name for r in config.benchmarks], [b.config.model_dump(mode="json") for b in built]
    )
    return list(zip(labels, built, strict=True))


def sample_hash(sample: Any) -> str:
    """A short hash of what a sample asks: a record is reused only for the same text."""
    h = hashlib.sha256()
    for part in (sample.id, sample.context, sample.question, json.dumps(sample.answers)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass
class WorkItem:
    """One sample of one benchmark, to be measured under some variants."""

    round: int
    length: int
    bench_index: int
    label: str
    bench: Any
    sample: Any
    hash: str


def plan_work(benches: list[tuple[str, Any]], tokenizer: Any, limit: int | None) -> list[WorkItem]:
    """Every benchmark's samples (``limit`` spread over its cells), round-robin: one sample of
    every (benchmark, length) before the second of any, so a run cut short still covers
    every length for every config."""
    work = []
    for bi, (label, bench) in enumerate(benches):
        samples = list(bench.samples(tokenizer))
        if limit is not None and limit < len(samples):
            step = len(samples) / limit
            samples = [samples[int(i * step)] for i in range(limit)]
        seen: dict[int, int] = {}
        for s in samples:
            rnd = seen[s.length] = seen.get(s.length, -1) + 1
            work.append(WorkItem(rnd, s.length, bi, label, bench, s, sample_hash(s)))
    work.sort(key=lambda w: (w.round, w.length, w.bench_index))
    return work


# ------------------------------------------------------------------------- length checks


def benchmark_answer_tokens(config: RunConfig, spec: Any, cfg: Any) -> int:
    """New tokens a benchmark's samples get by default: ``generation.max_new_tokens``, else the
    benchmark's own ``max_new_tokens`` (a sample may ask for more: see :func:`check_samples`)."""
    if config.generation.max_new_tokens:
        return int(config.generation.max_new_tokens)
    return int(getattr(spec.component_class(), "max_new_tokens", 0) or 0)


def answer_tokens(sample: Any, bench: Any, max_new_tokens: int | None) -> int:
    """New tokens generated for ``sample``: the run's setting, else the sample's, else the
    benchmark's."""
    return int(max_new_tokens or sample.max_new_tokens or bench.max_new_tokens)


def _overflow(n: int, new: int, max_context: int, short: list[str]) -> str:
    """What an overflowing length is told: the sum, why it counts, and the two ways out."""
    return (
        f"the model's context of {max_context} tokens ({n + new} > {max_context}; variants "
        f"{short} use attention that does not extend it): use lengths up to "
        f"{max_context - new} or generation.max_new_tokens up to {max_context - n}"
    )


def _raise(config: RunConfig, errors: list[tuple[str, str]]) -> None:
    if errors:
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in errors)
        raise ConfigError(f"run config {config.name!r} is invalid:\n{lines}", errors)


def check_lengths(
    config: RunConfig, registry: Any, max_context: int, extends: dict[str, bool]
) -> None:
    """Refuse benchmark lengths that, with the tokens generated after them, overflow the
    model's window, before any sample is generated (and before the model loads).

    A prompt of ``length`` tokens followed by ``max_new_tokens`` answer tokens needs
    ``length + max_new_tokens`` positions; the error names both numbers and the context.
    Nothing is shortened silently. Variants whose attention extends the context
    (``extends_context``) are not limited; a run that mixes them is checked for the others.
    """
    short = [label for label, ok in extends.items() if not ok]
    if not short:
        return
    errors = []
    for j, ref in enumerate(config.benchmarks):
        spec = registry.get("benchmark", ref.name)
        cfg = spec.validate_options(ref.options, where=f"benchmarks[{j}]")
        lengths = getattr(cfg, "lengths", None) or []
        too_long = [n for n in lengths if n > max_context]
        if too_long:
            errors.append(
                (
                    f"benchmarks[{j}].lengths",
                    f"{too_long} exceed the model's context of {max_context} tokens "
                    f"(variants {short} use attention that does not extend it)",
                )
            )
            continue
        new = benchmark_answer_tokens(config, spec, cfg)
        for n in lengths:
            if n + new > max_context:
                msg = f"{ref.name}: length {n} + {new} answer tokens exceeds "
                errors.append(
                    (f"benchmarks[{j}].lengths", msg + _overflow(n, new, max_context, short))
                )
    _raise(config, errors)


def check_samples(
    config: RunConfig,
    samples: Iterable[tuple[str, Any, Any]],
    max_context: int,
    extends: dict[str, bool],
) -> None:
    """Per-sample form of :func:`check_lengths` for the built ``(label, bench, sample)``
    triples: a sample may ask for more new tokens than its benchmark's default. Samples
    without a length are left to the host's check of the encoded prompt."""
    short = [label for label, ok in extends.items() if not ok]
    if not short:
        return
    worst: dict[tuple[str, int], int] = {}  # (benchmark, length) -> most new tokens asked
    for label, bench, sample in samples:
        n = int(sample.length or 0)
        new = answer_tokens(sample, bench, config.generation.max_new_tokens)
        if n and n + new > max_context:
            worst[(label, n)] = max(worst.get((label, n), 0), new)
    errors = [
        (
            f"{label} length {n}",
            f"samples of length {n} + up to {new} answer tokens exceed "
            + _overflow(n, new, max_context, short),
        )
        for (label, n), new in sorted(worst.items())
    ]
    _raise(config, errors)


# ------------------------------------------------------------------------------ a sample


def benchmark_demos(bench: Any, sample: Any) -> list[Any]:
    """The demonstration pool ``bench`` offers for ``sample`` (``Benchmark.demos``)."""
    demos = getattr(bench, "demos", None)
    return list(demos(sample) or ()) if callable(demos) else []


def prompt_budget(host: Any, new_tokens: int, configured: int | None = None) -> int | None:
    """Tokens the prompt may take: ``configured`` (``generation.prompt_budget``) when set, else
    the model's context less the new tokens; ``None`` (no limit) when the attention backend
    extends the context and nothing is configured."""
    if configured is not None:
        return int(configured)
    if getattr(host.attention, "extends_context", False):
        return None
    return int(host.loaded.max_context) - int(new_tokens)


@dataclass
class BuiltPrompt:
    """A sample's prompt as the strategy built it, and how many tokens it may generate."""

    prompt: Any
    new_tokens: int
    demos: list[Any]
    budget: int | None
    offered: bool  # demonstrations or a budget were handed to the strategy


def build_prompt(
    host: Any,
    strategy: Any,
    bench: Any,
    sample: Any,
    max_new_tokens: int | None,
    budget: int | None = None,
) -> BuiltPrompt:
    """The prompt ``strategy`` builds for ``sample``. When the benchmark offers
    demonstrations for the sample, or a prompt ``budget`` is configured, the strategy gets the
    pool and a token budget (:func:`prompt_budget`) as ``build(..., demos=, budget=)``;
    otherwise it is called as a zero-shot strategy."""
    new = answer_tokens(sample, bench, max_new_tokens)
    demos = benchmark_demos(bench, sample)
    extra: dict[str, Any] = {}
    if demos or budget is not None:
        extra = {"demos": demos, "budget": prompt_budget(host, new, budget)}
    prompt = strategy.build(
        sample.question, context=sample.context, tokenizer=host.tokenizer, **extra
    )
    return BuiltPrompt(prompt, new, demos, extra.get("budget"), bool(extra))


def result_fields(
    result: Any, bench: Any, sample: Any, built: BuiltPrompt, wall: float
) -> dict[str, Any]:
    """The measured fields of a record: the prediction, its score and what it cost."""
    out = {
        "prediction": result.text,
        "score": float(bench.score(sample, result.text)),
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens,
        "kv_tokens": result.kv_tokens,
        "peak_kv_bytes": result.peak_kv_bytes,
        "peak_resident_kv_bytes": int(
            getattr(result, "peak_resident_kv_bytes", None) or result.peak_kv_bytes
        ),
        "prefill_seconds": round(result.prefill_seconds, 5),
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 3),
        "wall_seconds": round(wall, 4),
        "batch_size": int(getattr(result, "batch_size", 1)),
        "prompt_accounting": built.prompt.accounting,
    }
    metrics = bench.metrics(sample, result.text) if hasattr(bench, "metrics") else None
    if metrics is not None:
        out["metrics"] = metrics
    if built.offered:
        out["prompt_budget"] = built.budget
        out["demos_offered"] = len(built.demos)
    return out


def run_sample(
    host: Any,
    strategy: Any,
    bench: Any,
    sample: Any,
    max_new_tokens: int | None,
    *,
    budget: int | None = None,
) -> dict[str, Any]:
    """Generate and score one sample (see :func:`build_prompt`); returns the record's
    measured fields."""
    built = build_prompt(host, strategy, bench, sample, max_new_tokens, budget)
    t0 = time.perf_counter()
    result = host.generate(built.prompt, max_new_tokens=built.new_tokens)[0]
    return result_fields(result, bench, sample, built, time.perf_counter() - t0)


#: what a component failing on one sample may raise without sinking the sweep
SAMPLE_ERRORS = (
    ApportionError,
    RuntimeError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    NotImplementedError,
    AssertionError,
    OSError,
    MemoryError,
)


def record_base(
    config: RunConfig, variant: ResolvedVariant, item: WorkItem, loaded: Any
) -> dict[str, Any]:
    """What every record of ``item`` under ``variant`` says about what it measured."""
    sample = item.sample
    return {
        "variant": variant.label,
        "benchmark": item.label,
        "benchmark_name": getattr(item.bench, "name", item.label),
        "sample_id": sample.id,
        "sample_hash": item.hash,
        **sample.as_dict(),
        "components": {k: r.label() for k, r in variant.refs.items()},
        "model": loaded.name,
        "model_fingerprint": loaded.fingerprint,
        "seed": config.seed,
        "question_in_prefill": config.generation.question_in_prefill,
        "chat_template": config.generation.chat_template,
        "context_chars": len(sample.context),
        "time": time.time(),
    }


def error_fields(exc: BaseException) -> dict[str, Any]:
    """The fields of a record whose sample raised (``error_kind``: ``prompt-too-long`` or
    ``exception``, with where it was raised)."""
    if isinstance(exc, PromptTooLongError):
        return {"error": str(exc), "error_kind": "prompt-too-long", "score": 0.0}
    tb = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    return {
        "error": f"{type(exc).__name__}: {exc}",
        "error_kind": "exception",
        "error_at": f"{tb.filename}:{tb.lineno}" if tb else "",
        "score": 0.0,
    }


def measure(
    config: RunConfig,
    variant: ResolvedVariant,
    item: WorkItem,
    loaded: Any,
    host: Any,
    strategy: Any,
) -> dict[str, Any]:
    """One record: the sample and config it measured, and what :func:`run_sample` measured,
    or the error it raised."""
    rec = record_base(config, variant, item, loaded)
    try:
        rec.update(
            run_sample(
                host,
                strategy,
                item.bench,
                item.sample,
                config.generation.max_new_tokens,
                budget=config.generation.prompt_budget,
            )
        )
    except SAMPLE_ERRORS as exc:
        rec.update(error_fields(exc))
    return rec


def measure_shared(
    config: RunConfig,
    variants: list[ResolvedVariant],
    item: WorkItem,
    loaded: Any,
    hosts: dict[str, Any],
    components: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Records of ``item`` under ``variants`` that differ only in a layer-wise KV policy:
    one shared prefill, their caches decoded together (``generation.batch_size`` at a time;
    :func:`apportion.host.shared.generate_shared`). Predictions, cache sizes and peak KV are
    each variant's own; if the shared run raises, every variant is measured alone."""
    from apportion.host.shared import generate_shared

    first = hosts[variants[0].label]
    strategy = components[variants[0].label]["prompt"]
    try:
        built = build_prompt(
            first,
            strategy,
            item.bench,
            item.sample,
            config.generation.max_new_tokens,
            config.generation.prompt_budget,
        )
        t0 = time.perf_counter()
        results = generate_shared(
            first,
            [components[v.label]["kv_policy"] for v in variants],
            built.prompt,
            built.new_tokens,
            batch_size=config.generation.batch_size,
            question_in_prefill=config.generation.question_in_prefill,
        )
        wall = (time.perf_counter() - t0) / len(variants)
    except SAMPLE_ERRORS:
        return [
            measure(config, v, item, loaded, hosts[v.label], components[v.label]["prompt"])
            for v in variants
        ]
    records = []
    for v, result in zip(variants, results, strict=True):
        rec = record_base(config, v, item, loaded)
        rec.update(result_fields(result, item.bench, item.sample, built, wall))
        rec["shared_prefill"] = len(variants)
        records.append(rec)
    return records


def measure_batch(
    config: RunConfig,
    variant: ResolvedVariant,
    items: list[WorkItem],
    loaded: Any,
    host: Any,
    strategy: Any,
) -> list[dict[str, Any]]:
    """Records of several samples under one variant, generated as one left-padded batch
    (``generation.batch_size > 1``); a batch that raises is measured sample by sample."""
    try:
        built = [
            build_prompt(
                host,
                strategy,
                w.bench,
                w.sample,
                config.generation.max_new_tokens,
                config.generation.prompt_budget,
            )
            for w in items
        ]
        new = max(b.new_tokens for b in built)
        t0 = time.perf_counter()
        results = host.generate([b.prompt for b in built], max_new_tokens=new)
        wall = (time.perf_counter() - t0) / len(items)
    except SAMPLE_ERRORS:
        return [measure(config, variant, w, loaded, host, strategy) for w in items]
    records = []
    for w, b, result in zip(items, built, results, strict=True):
        if result.new_tokens > b.new_tokens:  # the batch decoded for its longest answer
            return [measure(config, variant, w, loaded, host, strategy) for w in items]
        rec = record_base(config, variant, w, loaded)
        rec.update(result_fields(result, w.bench, w.sample, b, wall))
        records.append(rec)
    return records


# ------------------------------------------------------------------------------ the loop


@dataclass
class _Study:
    """Everything :func:`execute` resolved before the first sample."""

    config: RunConfig
    run_path: Path
    variants: list[ResolvedVariant]
    components: dict[str, dict[str, Any]]
    skipped: list[str]
    notes: list[str]


def _resolve(config: RunConfig, options: RunOptions, plugin_host: Any, run_dir: Any) -> _Study:
    registry = plugin_host.registry
    if options.seed is not None:
        config = config.model_copy(update={"seed": options.seed})
    skipped: list[str] = []
    given = {str(v.label) for v in config.variants()}
    if config.harness.sweep_installed is not None:
        config, skipped = expand_installed(config, registry, config.harness.sweep_installed)
    variants = resolve_config(config, registry, plugin_host.hook.apportion_check_run)
    run_path = prepare_run_dir(run_dir)
    loaded_records = load_records(run_path / RECORDS, repair=True)
    notes = []
    if loaded_records.problems:
        notes.append(
            f"{len(loaded_records.problems)} line(s) of {RECORDS} were not records and were "
            f"moved to records.rejected.jsonl ({'; '.join(loaded_records.problems[:3])})"
        )
    notes += [f"plugin problem: {p}" for p in plugin_host.problems()]
    variants, components = _build_all(variants, registry, given, skipped)
    return _Study(config, run_path, variants, components, skipped, notes)


def _check_before_loading(study: _Study, registry: Any, loaded: Any) -> None:
    from apportion.host.model import model_window, pick_device

    extends = {label: bool(c["attention"].extends_context) for label, c in study.components.items()}
    if loaded is None:
        pick_device(study.config.model)
        window = model_window(study.config.model)
    else:
        window = loaded.max_context
    check_lengths(study.config, registry, window, extends)
    check_kv_budgets(study, registry, loaded)


def longest_sequence(config: RunConfig, registry: Any) -> int:
    """The most tokens one row of the run's cache holds: the longest benchmark length plus
    its answer tokens (0 when no benchmark states its lengths)."""
    most = 0
    for j, ref in enumerate(config.benchmarks):
        spec = registry.get("benchmark", ref.name)
        cfg = spec.validate_options(ref.options, where=f"benchmarks[{j}]")
        lengths = getattr(cfg, "lengths", None) or []
        if lengths:
            most = max(most, max(lengths) + benchmark_answer_tokens(config, spec, cfg))
    return most


def check_kv_budgets(study: _Study, registry: Any, loaded: Any = None) -> None:
    """Refuse, before the model loads, an allocator whose resident KV budget
    (:meth:`~apportion.base.Allocator.kv_budget`) is smaller than one layer's KV at the run's
    longest sequence: the layer being computed is always resident. The error names the
    minimum."""
    budgets = {
        label: c["allocator"].kv_budget()
        for label, c in study.components.items()
        if c["allocator"].kv_budget() is not None
    }
    if not budgets:
        return
    tokens = longest_sequence(study.config, registry)
    if not tokens:
        return
    if loaded is not None:
        cfg = loaded.model.config.get_text_config(decoder=True)
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        per_token = 2 * kv_heads * head_dim * loaded.model.dtype.itemsize
    else:
        from apportion.host.model import kv_bytes_per_token

        per_token = kv_bytes_per_token(study.config.model)["layer_bytes_per_token"]
    batch = max(1, int(study.config.generation.sample_batch_size))
    minimum = per_token * tokens * batch
    errors = [
        (
            f"{label}: allocator.resident_kv_bytes",
            f"{budget} bytes is smaller than one layer's KV at the run's longest sequence "
            f"({tokens} tokens x {batch} row(s) x {per_token} bytes a token = {minimum} "
            f"bytes); the minimum is {minimum}",
        )
        for label, budget in budgets.items()
        if budget < minimum
    ]
    _raise(study.config, errors)


def _todo(
    study: _Study, work: list[WorkItem], fingerprint: str
) -> list[tuple[ResolvedVariant, WorkItem]]:
    done = {
        (
            r["variant"],
            r["benchmark"],
            r["sample_id"],
            r.get("sample_hash"),
            r.get("model_fingerprint"),
            r.get("question_in_prefill", True),
            r.get("chat_template", True),
        )
        for r in read_records(study.run_path / RECORDS)
        if "error" not in r or r.get("error_kind") == "prompt-too-long"
    }
    gen = study.config.generation
    mode = (gen.question_in_prefill, gen.chat_template)
    return [
        (v, w)
        for w in work
        for v in study.variants
        if (v.label, w.label, w.sample.id, w.hash, fingerprint, *mode) not in done
    ]


def execute(
    config: RunConfig,
    run_dir: str | Path,
    options: RunOptions | None = None,
    *,
    loaded: Any = None,
    console: Any = None,
) -> RunResult:
    """Run every variant over every benchmark sample (see the module docstring)."""
    from apportion.plugins import get_plugin_host

    t_start = time.perf_counter()
    options = options or RunOptions()
    console = console or _console()
    plugin_host = get_plugin_host()
    study = _resolve(config, options, plugin_host, run_dir)
    for line in study.skipped:
        console.print(f"[yellow]skipped[/yellow] {line}")
    for line in study.notes:
        console.print(f"[yellow]note[/yellow] {line}")
    _check_before_loading(study, plugin_host.registry, loaded)
    loaded = _load_and_bind(study, loaded)
    work, todo, hosts = _plan(study, plugin_host.registry, loaded, options)
    gen = study.config.generation
    units = plan_units(study, todo, gen.share_prefill, gen.sample_batch_size)
    budget = options.time_budget_s or study.config.harness.time_budget_s
    total = len(study.variants) * len(work)
    console.print(
        f"{len(study.variants)} configs x {len(work)} samples: {len(todo)} to run, "
        f"{total - len(todo)} already recorded"
    )
    if budget and units:
        estimate = estimate_seconds(units, calibrate(loaded))
        left = budget - (time.perf_counter() - t_start)
        for line in budget_advice(study, units, estimate, left):
            console.print(f"[yellow]{line}[/yellow]")
    deadline = t_start + budget if budget else None
    try:
        pending = _loop(study, units, len(todo), loaded, hosts, deadline, budget, options, console)
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted: every finished sample is saved; run the same config "
            "again to resume[/yellow]"
        )
        raise
    return _finish(study, work, pending, plugin_host, console, time.perf_counter() - t_start)


def _load_and_bind(study: _Study, loaded: Any) -> Any:
    from apportion.host import load_model

    if loaded is None:
        loaded = load_model(study.config.model)
    for comps in study.components.values():
        comps["prompt"].bind(loaded)
        comps["allocator"].bind(loaded)
    return loaded


def _plan(
    study: _Study, registry: Any, loaded: Any, options: RunOptions
) -> tuple[list[WorkItem], list[tuple[ResolvedVariant, WorkItem]], dict[str, Any]]:
    from apportion.host import Host

    config = study.config
    benches = build_benchmarks(config, registry)
    atomic_write_json(study.run_path / "config.json", config.model_dump(mode="json"))
    work = plan_work(benches, loaded.tokenizer, options.limit or config.limit)
    extends = {label: bool(c["attention"].extends_context) for label, c in study.components.items()}
    check_samples(config, ((w.label, w.bench, w.sample) for w in work), loaded.max_context, extends)
    todo = _todo(study, work, loaded.fingerprint)
    hosts = {
        v.label: Host(
            loaded,
            study.components[v.label]["attention"],
            study.components[v.label]["kv_policy"],
            study.components[v.label]["allocator"],
            question_in_prefill=config.generation.question_in_prefill,
            chat_template=config.generation.chat_template,
        )
        for v in study.variants
    }
    return work, todo, hosts


# ------------------------------------------------------------------------- cost estimate


@dataclass
class Calibration:
    """What this machine takes for the loaded model: seconds per prompt token of a prefill
    and seconds per decode step."""

    prefill_per_token: float
    decode_step: float


def calibrate(loaded: Any, tokens: int = 256, steps: int = 4) -> Calibration:
    """Time one short prefill and a few decode steps of the loaded model (about a second)."""
    import torch

    from apportion.host.generate import greedy_decode
    from apportion.host.kv import KVPolicy

    ids = torch.full((1, tokens), int(loaded.tokenizer.pad_token_id or 0), device=loaded.device)
    ids[0, ::7] = 100  # not one repeated token
    mask = torch.ones_like(ids)
    policy = KVPolicy()
    with torch.inference_mode():
        cache = policy.make_cache(loaded.model)
        t0 = time.perf_counter()
        pre = policy.prefill(loaded.model, ids, mask, cache)
        t1 = time.perf_counter()
        decoded = greedy_decode(loaded.model, cache, pre, steps + 1, eos=set(), pad_id=0)
    return Calibration((t1 - t0) / tokens, decoded.seconds / max(decoded.forwards, 1))


def unit_seconds(unit: Unit, calib: Calibration) -> float:
    """Expected wall seconds of a unit: its prefills and its decode steps (a shared prefill
    is one prefill; its configs, and a batch's samples, decode together)."""
    length = max(w.length or 256 for w in unit.items)
    new = max(int(w.sample.max_new_tokens or w.bench.max_new_tokens or 32) for w in unit.items)
    prefills = len(unit.items) * (1 if len(unit.variants) > 1 else len(unit.variants))
    return prefills * calib.prefill_per_token * length + new * calib.decode_step


def estimate_seconds(units: list[Unit], calib: Calibration) -> float:
    return sum(unit_seconds(u, calib) for u in units)


def budget_advice(study: _Study, units: list[Unit], estimate: float, left: float) -> list[str]:
    """What to tell a user whose study will not fit the time left: the estimate, what fits,
    and what to cut."""
    if estimate <= left:
        return []
    records = sum(u.size for u in units)
    fits = int(records * max(left, 0.0) / estimate)
    by_length: dict[int, int] = {}
    for u in units:
        for w in u.items:
            by_length[w.length] = by_length.get(w.length, 0) + len(u.variants)
    longest = max(by_length)
    lines = [
        f"this study needs about {estimate:.0f} s but {left:.0f} s of the time budget are "
        f"left: about {fits} of {records} records will be measured now (a rerun resumes)",
        f"to fit, cut: fewer configs ({len(study.variants)} now), fewer samples per cell, or "
        f"shorter lengths (length {longest} takes about "
        f"{100 * _share_of_length(units, longest, estimate):.0f}% of the time)",
    ]
    return lines


def _share_of_length(units: list[Unit], length: int, estimate: float) -> float:
    calib_free = [u for u in units if max(w.length for w in u.items) == length]
    total = sum(u.size * length for u in calib_free)
    overall = sum(u.size * max(w.length for w in u.items) for u in units)
    return total / overall if overall else 0.0


@dataclass
class Unit:
    """Records measured together: one sample under several variants (a shared prefill), or
    several samples under one variant (a batch), or one of each."""

    variants: list[ResolvedVariant]
    items: list[WorkItem]

    @property
    def size(self) -> int:
        return len(self.variants) * len(self.items)


def can_share(components: dict[str, Any]) -> bool:
    """Whether a variant's sample can join a shared prefill: dense attention, a layer-wise
    KV policy that does not compress while decoding (its decode must run alone) and an
    allocator that keeps the KV resident (the prompt must also match; :func:`plan_units`
    checks that)."""
    from apportion.host.attention import AttentionBackend

    allocator = components.get("allocator")
    policy = components["kv_policy"]
    return (
        type(components["attention"]) is AttentionBackend
        and bool(getattr(policy, "layerwise", False))
        and not bool(getattr(policy, "compresses_decode", False))
        and (allocator is None or allocator.kv_budget() is None)
    )


def plan_units(
    study: _Study,
    todo: list[tuple[ResolvedVariant, WorkItem]],
    share: bool,
    sample_batch: int = 1,
) -> list[Unit]:
    """Group ``todo`` (in its order) into units: per sample, the variants that differ only in
    a layer-wise KV policy share one prefill; each other variant runs alone, or, with
    ``sample_batch > 1``, with the next samples of the same benchmark and length (a unit
    stands where its first sample stood)."""
    agnostic = not study.config.generation.question_in_prefill
    by_item: dict[int, list[ResolvedVariant]] = {}
    items: dict[int, WorkItem] = {}
    for v, w in todo:
        by_item.setdefault(id(w), []).append(v)
        items[id(w)] = w
    units: list[Unit] = []
    open_batch: dict[tuple[str, str, int], Unit] = {}
    for key, variants in by_item.items():
        item = items[key]
        groups: dict[tuple[str, str | None], list[ResolvedVariant]] = {}
        singles = []
        for v in variants:
            comps = study.components[v.label]
            if share and can_share(comps):
                # a probe stands in for the question only when the question is not prefilled
                probe = comps["kv_policy"].probe() if agnostic else None
                group_key = (v.refs["prompt"].label(), probe)
                groups.setdefault(group_key, []).append(v)
            else:
                singles.append(v)
        for group in groups.values():
            if len(group) > 1:
                units.append(Unit(group, [item]))
            else:
                singles += group
        for v in singles:
            cell = (v.label, item.label, item.length)
            unit = open_batch.get(cell)
            if unit is None or len(unit.items) >= sample_batch:
                unit = open_batch[cell] = Unit([v], [])
                units.append(unit)
            unit.items.append(item)
    return units


def _measure_unit(study: _Study, unit: Unit, loaded: Any, hosts: dict[str, Any]) -> list[dict]:
    config, comps = study.config, study.components
    if len(unit.variants) > 1:
        return measure_shared(config, unit.variants, unit.items[0], loaded, hosts, comps)
    v = unit.variants[0]
    if len(unit.items) > 1:
        return measure_batch(
            config, v, unit.items, loaded, hosts[v.label], comps[v.label]["prompt"]
        )
    return [measure(config, v, unit.items[0], loaded, hosts[v.label], comps[v.label]["prompt"])]


def _loop(
    study: _Study,
    units: list[Unit],
    total: int,
    loaded: Any,
    hosts: dict[str, Any],
    deadline: float | None,
    budget: float | None,
    options: RunOptions,
    console: Any,
) -> int:
    """Measure ``units`` in order; returns how many records were left for the time budget."""
    records_path = study.run_path / RECORDS
    cost: dict[tuple[tuple[str, ...], int], float] = {}  # unit kind, length -> wall seconds
    left = total
    with Progress(console, total, options) as progress:
        for unit in units:
            # start no unit the budget cannot hold: the slowest unit of the same configs so
            # far, scaled by length
            length = max(w.length for w in unit.items)
            kind = tuple(v.label for v in unit.variants)
            seen = [(n, c) for (k, n), c in cost.items() if k == kind]
            per_sample = max((c * length / max(n, 1) for n, c in seen), default=0.0)
            guess = per_sample * len(unit.items)
            if deadline is not None and time.perf_counter() + guess > deadline:
                console.print(
                    f"[yellow]time budget of {budget:g} s spent: {left} samples left; "
                    "rerun the same command to finish[/yellow]"
                )
                return left
            t0 = time.perf_counter()
            records = _measure_unit(study, unit, loaded, hosts)
            took = (time.perf_counter() - t0) / len(unit.items)  # per sample
            cost[(kind, length)] = max(cost.get((kind, length), 0.0), took)
            for rec in records:
                append_record(records_path, rec)
                left -= 1
                progress.advance(f"{rec['variant'][:28]} {rec['benchmark'][:20]} {length}")
    return 0


def _finish(
    study: _Study,
    work: list[WorkItem],
    pending: int,
    plugin_host: Any,
    console: Any,
    wall: float,
) -> RunResult:
    current = {(v.label, w.label, w.sample.id) for v in study.variants for w in work}
    records = [
        r
        for r in latest(read_records(study.run_path / RECORDS))
        if (r["variant"], r["benchmark"], r["sample_id"]) in current
    ]
    notes = study.skipped + study.notes
    if pending:
        notes.append(f"{pending} samples not run (time budget)")
    run = RunResult(
        study.config, study.run_path, records, None, study.skipped, notes, pending, wall
    )
    rendered = plugin_host.hook.apportion_report(run=run, console=console)
    if isinstance(rendered, Path):
        run.report = rendered
        console.print(f"[bold]report:[/bold] {run.report}")
    elif not plugin_host.hook.apportion_report.get_hookimpls():
        render_table(
            summarize(records), console, title=f"{study.config.name}: {len(records)} records"
        )
        if study.config.harness.report:
            console.print("[dim]no report renderer installed (pip install apportion-eval)[/dim]")
    plugin_host.hook.apportion_run_finished(
        config=study.config, run_dir=study.run_path, records=records
    )
    return run


# ------------------------------------------------------------------------------ console


def _console() -> Any:
    from rich.console import Console

    return Console()


class Progress:
    """A progress bar with samples done, ETA and the current config on a terminal; one log
    line every ``options.log_every`` samples otherwise."""

    def __init__(self, console: Any, total: int, options: RunOptions):
        self.console, self.total, self.done = console, total, 0
        interactive = bool(getattr(console, "is_terminal", False))
        self.bar = options.progress if options.progress is not None else interactive
        self.every = max(1, options.log_every)
        self.t0 = time.perf_counter()
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.bar and self.total:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("samples", total=self.total)
        return self

    def advance(self, description: str) -> None:
        self.done += 1
        if self._progress is not None:
            self._progress.update(self._task, advance=1, description=description)
        elif self.done % self.every == 0 or self.done == self.total:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / self.done * (self.total - self.done)
            self.console.print(
                f"{self.done}/{self.total} samples, {elapsed:.0f} s, "
                f"ETA {eta:.0f} s ({description})",
                highlight=False,
            )

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def summarize(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean score and costs per (variant, benchmark, length)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["benchmark"], int(r.get("length") or 0)), []).append(r)
    rows = []
    for (variant, bench, length), rs in sorted(groups.items()):
        ok = [r for r in rs if "error" not in r]

        def mean(key: str, ok: list[dict[str, Any]] = ok) -> float:
            return sum(float(r.get(key, 0) or 0) for r in ok) / max(len(ok), 1)

        rows.append(
            {
                "variant": variant,
                "benchmark": bench,
                "length": length,
                "n": len(rs),
                "errors": len(rs) - len(ok),
                "accuracy": sum(float(r.get("score", 0)) for r in rs) / len(rs),
                "interval": wilson(sum(float(r.get("score", 0)) for r in rs), len(rs)),
                "peak_kv_bytes": mean("peak_kv_bytes"),
                "peak_resident_kv_bytes": mean("peak_resident_kv_bytes")
                if any("peak_resident_kv_bytes" in r for r in ok)
                else mean("peak_kv_bytes"),
                "prefill_seconds": mean("prefill_seconds"),
                "decode_tokens_per_s": mean("decode_tokens_per_s"),
                "prompt_tokens": mean("prompt_tokens"),
            }
        )
    return rows


def render_table(rows: list[dict[str, Any]], console: Any, title: str = "apportion run") -> None:
    """The core's plain summary table (apportion-eval's report replaces it)."""
    from rich.table import Table

    table = Table(title=title)
    cols = (
        "variant",
        "benchmark",
        "length",
        "n",
        "errors",
        "accuracy",
        "95% interval",
        "peak KV MiB",
        "resident KV MiB",
        "prefill s",
        "decode tok/s",
    )
    for col in cols:
        table.add_column(col, justify="left" if col in {"variant", "benchmark"} else "right")
    for r in rows:
        table.add_row(
            r["variant"],
            r["benchmark"],
            str(r["length"]),
            str(r["n"]),
            str(r["errors"]),
            f"{100 * r['accuracy']:.1f}%",
            f"{100 * r['interval'][0]:.0f}-{100 * r['interval'][1]:.0f}%",
            f"{r['peak_kv_bytes'] / 2**20:.2f}",
            f"{r.get('peak_resident_kv_bytes', r['peak_kv_bytes']) / 2**20:.2f}",
            f"{r['prefill_seconds']:.3f}",
            f"{r['decode_tokens_per_s']:.1f}",
        )
    console.print(table)
