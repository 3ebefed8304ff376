"""The sweep harness behind ``apportion run`` (the ``apportion_run`` hook).

It builds on the core runner's pieces (:mod:`apportion.runner`: run-dir checks, atomic
JSONL appends, torn-tail repair, the per-sample generate-and-score step) and adds:

- **sweeps over what is installed** — ``[harness] sweep_installed = {kinds = ["kv-policy",
  "attention"], options = {compression_ratio = 0.5}}`` puts every installed component of
  those kinds beside the base config, each given only the options its config has;
- **benchmark labels** — two entries of the same benchmark (say niah single and niah
  multi-key) are told apart by the options that differ;
- **resume that notices change** — a record counts as done only if its sample's content
  hash and the model fingerprint still match, so rerunning a directory with another seed
  or model re-measures instead of silently reusing stale results;
- **sample-major, round-robin order and a time budget** — every config runs a sample before
  the next sample starts, and each (benchmark, length) gets its first sample before any gets
  a second, so a run stopped by ``time_budget_s`` (``apportion run --time-budget`` overrides
  it) or Ctrl-C leaves every config measured
  on the same samples at every length; rerunning the same command finishes the rest;
- **failures recorded, not fatal** — a component that raises on a sample gets an ``error``
  record (type and message) and the sweep goes on; the table shows error counts;
- the terminal table, grouping by diffusion/scope tags, and ``report.html``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apportion.config import ComponentRef, RunConfig, Variant, resolve_config
from apportion.errors import ApportionError, ConfigError, PromptTooLongError
from apportion.runner import (
    RECORDS,
    RunOptions,
    _progress,
    append_record,
    build_components,
    check_lengths,
    check_samples,
    prepare_run_dir,
    read_records,
    repair_tail,
    run_sample,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

FIELD_OF_KIND = {
    "attention": "attention",
    "kv-policy": "kv_policy",
    "prompt-strategy": "prompt",
    "allocator": "allocator",
}


class SweepInstalled(BaseModel):
    """Add every installed component of ``kinds`` as a variant beside the base config."""

    model_config = ConfigDict(extra="forbid")

    kinds: list[str] = Field(["kv-policy", "attention"], description="kinds to sweep")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="options passed to each component whose config has that field",
    )
    exclude: list[str] = Field(default_factory=list, description="component names to leave out")


class HarnessOptions(BaseModel):
    """``[harness]`` table of a run config, as read by apportion-eval."""

    model_config = ConfigDict(extra="forbid")

    sweep_installed: SweepInstalled | None = None
    time_budget_s: float | None = Field(
        None,
        gt=0,
        description="start no sample that would end after this many seconds from "
        "the start of the run (rerun resumes)",
    )
    report: bool = Field(True, description="write report.html into the run directory")


@dataclass
class RunResult:
    """What :func:`run` returns: the run's records (latest per sample) and where things are."""

    run_dir: Path
    records: list[dict[str, Any]]
    report: Path | None
    skipped: list[str] = field(default_factory=list)  # variants left out, with why
    pending: int = 0  # samples not run (time budget or interrupt)
    wall_seconds: float = 0.0


def harness_options(config: RunConfig) -> HarnessOptions:
    try:
        return HarnessOptions.model_validate(config.harness)
    except ValidationError as exc:
        errors = [(".".join(["harness", *map(str, e["loc"])]), e["msg"]) for e in exc.errors()]
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in errors)
        raise ConfigError(f"run config {config.name!r} is invalid:\n{lines}", errors) from None


def expand_installed(
    config: RunConfig, registry: Any, opts: SweepInstalled
) -> tuple[RunConfig, list[str]]:
    """Return ``config`` with one sweep variant per installed component of ``opts.kinds``
    (the base config first), and the components left out with the reason."""
    skipped: list[str] = []
    base = list(config.sweep) or [Variant(label=config.variants()[0].label)]
    variants = list(base)
    labels = {v.label for v in base}
    for kind in opts.kinds:
        if kind not in FIELD_OF_KIND:
            raise ConfigError(
                f"harness.sweep_installed.kinds: {kind!r} is not one of {sorted(FIELD_OF_KIND)}",
                [("harness.sweep_installed.kinds", kind)],
            )
        field_name = FIELD_OF_KIND[kind]
        base_name = getattr(config, field_name).name
        for spec in registry.specs(kind):
            if spec.name == base_name or spec.name in opts.exclude:
                continue
            try:
                fields = spec.config_model().model_fields
            except Exception as exc:  # a broken plugin config: leave it out, say why
                skipped.append(f"{kind} {spec.name}: config model failed to load ({exc})")
                continue
            options = {k: v for k, v in opts.options.items() if k in fields}
            try:  # e.g. a field of that name that takes tokens, not a fraction
                spec.validate_options(options)
            except ApportionError as exc:
                skipped.append(
                    f"{kind} {spec.name}: rejects {options} ({str(exc).splitlines()[-1].strip()})"
                )
                continue
            ref = ComponentRef(name=spec.name, **options)
            chosen = {
                FIELD_OF_KIND[k]: getattr(config, FIELD_OF_KIND[k]).name for k in FIELD_OF_KIND
            }
            clash = [
                f"{k} {chosen[FIELD_OF_KIND[k]]}"
                for k, names in spec.incompatible_with.items()
                if k in FIELD_OF_KIND and chosen[FIELD_OF_KIND[k]] in names
            ]
            if clash:
                skipped.append(f"{kind} {spec.name}: cannot be combined with {', '.join(clash)}")
                continue
            label = ref.label()
            if label in labels:
                continue
            labels.add(label)
            variants.append(Variant(label=label, **{field_name: ref}))
    return config.model_copy(update={"sweep": variants}), skipped


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
        out.append(
            f"{name}[{','.join(f'{k}={_short(cfg[k])}' for k in differ)}]" if differ else name
        )
    return [f"{label}#{i}" if out.count(label) > 1 else label for i, label in enumerate(out)]


def _short(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def sample_hash(sample: Any) -> str:
    h = hashlib.sha256()
    for part in (sample.id, sample.context, sample.question, json.dumps(sample.answers)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record per (variant, benchmark, sample): a re-measured sample supersedes."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in records:
        try:
            out[(r["variant"], r["benchmark"], r["sample_id"])] = r
        except KeyError:
            continue
    return list(out.values())


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def run(
    config: RunConfig,
    run_dir: str | Path,
    options: RunOptions | None = None,
    *,
    loaded: Any = None,
    console: Any = None,
) -> RunResult:
    """Run every variant over every benchmark sample; returns the run's records and report."""
    from apportion.plugins import get_plugin_host

    t_start = time.perf_counter()
    options = options or RunOptions()
    if console is None:
        from rich.console import Console

        console = Console()
    plugin_host = get_plugin_host()
    registry = plugin_host.registry
    if options.seed is not None:
        config = config.model_copy(update={"seed": options.seed})
    hopts = harness_options(config)
    skipped: list[str] = []
    given = {v.label for v in config.variants()}
    if hopts.sweep_installed is not None:
        config, skipped = expand_installed(config, registry, hopts.sweep_installed)
    variants = resolve_config(config, registry)  # every name, option and combination
    run_path = prepare_run_dir(run_dir)
    records_path = run_path / RECORDS
    repair_tail(records_path)

    components: dict[str, dict[str, Any]] = {}
    for v in variants:
        try:
            components[v.label] = build_components(v, registry)
        except Exception as exc:  # a plugin that fails to build is reported, not fatal
            if v.label in given:  # a component the user asked for by name must work
                raise
            skipped.append(f"{v.label}: failed to build ({type(exc).__name__}: {exc})")
    variants = [v for v in variants if v.label in components]
    for line in skipped:
        console.print(f"[yellow]skipped[/yellow] {line}")

    from apportion.host import Host, load_model

    if loaded is None:
        loaded = load_model(config.model)
    extends = {label: bool(c["attention"].extends_context) for label, c in components.items()}
    check_lengths(config, registry, loaded.max_context, extends)
    built = []
    for ref in config.benchmarks:
        opts = dict(ref.options)
        if "seed" in registry.get("benchmark", ref.name).config_model().model_fields:
            opts.setdefault("seed", config.seed)
        built.append(registry.create("benchmark", ref.name, opts))
    labels = benchmark_labels(
        [r.name for r in config.benchmarks], [b.config.model_dump(mode="json") for b in built]
    )
    benches = list(zip(labels, built, strict=True))
    _write_json(run_path / "config.json", config.model_dump(mode="json"))

    limit = options.limit or config.limit
    work = []  # (round, length, bench index, label, bench, sample, hash)
    for bi, (label, bench) in enumerate(benches):
        samples = list(bench.samples(loaded.tokenizer))
        if limit is not None and limit < len(samples):  # spread the limit over the cells
            step = len(samples) / limit
            samples = [samples[int(i * step)] for i in range(limit)]
        seen: dict[int, int] = {}
        for s in samples:
            rnd = seen[s.length] = seen.get(s.length, -1) + 1
            work.append((rnd, s.length, bi, label, bench, s, sample_hash(s)))
    check_samples(config, ((w[3], w[4], w[5]) for w in work), loaded.max_context, extends)
    # round-robin: one sample of every (benchmark, length) before the second of any, so a
    # run cut short by its time budget still covers every length for every config
    work.sort(key=lambda w: (w[0], w[1], w[2]))
    done = {
        (
            r["variant"],
            r["benchmark"],
            r["sample_id"],
            r.get("sample_hash"),
            r.get("model_fingerprint"),
        )
        for r in read_records(records_path)
        if "error" not in r or r.get("error_kind") == "prompt-too-long"
    }
    todo = [
        (v, w)
        for w in work
        for v in variants
        if (v.label, w[3], w[5].id, w[6], loaded.fingerprint) not in done
    ]
    hosts = {
        v.label: Host(loaded, components[v.label]["attention"], components[v.label]["kv_policy"])
        for v in variants
    }
    time_budget = (
        options.time_budget_s if options.time_budget_s is not None else hopts.time_budget_s
    )
    deadline = t_start + time_budget if time_budget else None
    pending = 0
    console.print(
        f"{len(variants)} configs x {len(work)} samples: {len(todo)} to run, "
        f"{len(variants) * len(work) - len(todo)} already recorded"
    )
    try:
        with _progress(options.progress, console) as progress:
            task = progress.add_task("samples", total=len(todo)) if progress else None
            cost: dict[int, float] = {}  # slowest wall seconds seen per length
            for i, (v, (_, _, _, label, bench, sample, shash)) in enumerate(todo):
                # do not start a sample the budget cannot hold (estimated from the slowest
                # sample so far, scaled by length)
                guess = max((w * sample.length / n for n, w in cost.items()), default=0.0)
                if deadline is not None and time.perf_counter() + guess > deadline:
                    pending = len(todo) - i
                    console.print(
                        f"[yellow]time budget of {time_budget:g} s spent: "
                        f"{pending} samples left; rerun the same command to finish[/yellow]"
                    )
                    break
                t_sample = time.perf_counter()
                rec = _measure(
                    config,
                    v,
                    label,
                    bench,
                    sample,
                    shash,
                    loaded,
                    hosts[v.label],
                    components[v.label],
                )
                took = time.perf_counter() - t_sample
                cost[sample.length] = max(cost.get(sample.length, 0.0), took)
                append_record(records_path, rec)
                if progress is not None:
                    progress.update(
                        task, advance=1, description=f"{v.label[:28]} {label[:20]} {sample.length}"
                    )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: finished samples are saved; rerun to resume[/yellow]")
        raise

    current = {(v.label, w[3], w[5].id) for v in variants for w in work}
    records = [
        r
        for r in latest(read_records(records_path))
        if (r["variant"], r["benchmark"], r["sample_id"]) in current
    ]
    report_path = None
    from apportion_eval.report import render_terminal, write_report

    render_terminal(records, console, title=f"{config.name}: {len(records)} records")
    if hopts.report:
        report_path = write_report(
            records,
            run_path,
            title=config.name,
            notes=skipped + ([f"{pending} samples not run (time budget)"] if pending else []),
        )
        console.print(f"[bold]report:[/bold] {report_path}")
    plugin_host.hook.apportion_run_finished(config=config, run_dir=run_path, records=records)
    return RunResult(
        run_path, records, report_path, skipped, pending, time.perf_counter() - t_start
    )


def _measure(
    config: RunConfig,
    v: Any,
    label: str,
    bench: Any,
    sample: Any,
    shash: str,
    loaded: Any,
    host: Any,
    comp: dict[str, Any],
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "variant": v.label,
        "benchmark": label,
        "benchmark_name": getattr(bench, "name", label),
        "sample_id": sample.id,
        "sample_hash": shash,
        **sample.as_dict(),
        "components": {k: r.label() for k, r in v.refs.items()},
        "model": loaded.name,
        "model_fingerprint": loaded.fingerprint,
        "seed": config.seed,
        "context_chars": len(sample.context),
        "time": time.time(),
    }
    try:
        rec.update(
            run_sample(
                host,
                comp["prompt"],
                bench,
                sample,
                config.generation.max_new_tokens,
                budget=config.generation.prompt_budget,
            )
        )
        metrics = getattr(bench, "metrics", None)
        if metrics is not None:
            rec["metrics"] = metrics(sample, rec["prediction"])
    except PromptTooLongError as exc:
        rec.update({"error": str(exc), "error_kind": "prompt-too-long", "score": 0.0})
    except (
        ApportionError,
        RuntimeError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        NotImplementedError,
        AssertionError,
    ) as exc:
        # another family's component failing on this sample must not sink the sweep
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        rec.update(
            {
                "error": f"{type(exc).__name__}: {exc}",
                "error_kind": "exception",
                "error_at": f"{tb.filename}:{tb.lineno}",
                "score": 0.0,
            }
        )
    return rec
