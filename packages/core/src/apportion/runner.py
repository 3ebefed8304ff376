"""The core's minimal runner behind ``apportion run`` (the eval package replaces it with the
full harness through the ``apportion_run`` hook, and reuses the pieces here).

Each sample's record is appended to ``RUN_DIR/records.jsonl`` as one ``write`` of one line,
then fsynced, so an interrupted run loses at most the sample in flight; a rerun in the same
directory skips every (variant, benchmark, sample) already recorded.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apportion.config import ResolvedVariant, RunConfig, resolve_config
from apportion.errors import ConfigError, PromptTooLongError

RECORDS = "records.jsonl"


@dataclass
class RunOptions:
    """What ``apportion run`` passes to the runner besides the config.

    ``time_budget_s``: start no sample once this many seconds have passed since the run
    started (a rerun in the same directory finishes the rest). ``None`` keeps the config's
    own budget (apportion-eval's ``[harness] time_budget_s``), else runs everything.
    """

    limit: int | None = None
    seed: int | None = None
    progress: bool = True
    time_budget_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(
                f"the time budget must be a positive number of seconds, got {self.time_budget_s}",
                [("time_budget_s", str(self.time_budget_s))],
            )


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


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line atomically (single write, O_APPEND, fsync)."""
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_tail(path: Path) -> None:
    """End a torn last line (a crash mid-write) so the next record starts on its own line."""
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record; a torn last line (a crash mid-write) is ignored."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def record_key(rec: dict[str, Any]) -> tuple[str, str, str]:
    return (rec["variant"], rec["benchmark"], rec["sample_id"])


def benchmark_answer_tokens(config: RunConfig, spec: Any, cfg: Any) -> int:
    """New tokens a benchmark's samples get by default: ``generation.max_new_tokens``, else the
    benchmark's own ``max_new_tokens`` (a sample may ask for more: see :func:`check_samples`)."""
    if config.generation.max_new_tokens:
        return int(config.generation.max_new_tokens)
    from apportion.registry import resolve

    new = getattr(resolve(spec.factory), "max_new_tokens", None)
    if not isinstance(new, int):  # a factory function: ask the instance
        new = getattr(spec.create(cfg), "max_new_tokens", 0)
    return int(new or 0)


def answer_tokens(sample: Any, bench: Any, max_new_tokens: int | None) -> int:
    """New tokens generated for ``sample``: the run's setting, else the sample's, else the benchmark's."""
    return int(max_new_tokens or sample.max_new_tokens or bench.max_new_tokens)


def _overflow(n: int, new: int, max_context: int, short: list[str]) -> str:
    """What an overflowing length is told: the sum, why it counts, and the two ways out."""
    return (
        f"the model's context of {max_context} tokens ({n + new} > {max_context}; variants {short} use "
        f"attention that does not extend it): use lengths up to {max_context - new} or "
        f"generation.max_new_tokens up to {max_context - n}"
    )


def _raise(config: RunConfig, errors: list[tuple[str, str]]) -> None:
    if errors:
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in errors)
        raise ConfigError(f"run config {config.name!r} is invalid:\n{lines}", errors)


def check_lengths(
    config: RunConfig, registry: Any, max_context: int, extends: dict[str, bool]
) -> None:
    """Refuse benchmark lengths that, with the tokens generated after them, overflow the model's
    window, before any sample is generated.

    A prompt of ``length`` tokens followed by ``max_new_tokens`` answer tokens needs
    ``length + max_new_tokens`` positions; the error names both numbers and the context.
    Nothing is shortened silently: lower the length or ``generation.max_new_tokens``. Variants
    whose attention extends the context (``extends_context``) are not limited; a run that mixes
    them with others is checked for the others.
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
                errors.append(
                    (
                        f"benchmarks[{j}].lengths",
                        f"{ref.name}: length {n} + {new} answer tokens exceeds "
                        + _overflow(n, new, max_context, short),
                    )
                )
    _raise(config, errors)


def check_samples(
    config: RunConfig,
    samples: Iterable[tuple[str, Any, Any]],
    max_context: int,
    extends: dict[str, bool],
) -> None:
    """Per-sample form of :func:`check_lengths`, for the built ``(label, bench, sample)``
    triples: a sample may ask for more new tokens than its benchmark's default (more keys,
    more items). Refuses, before any sample is generated, every length whose samples'
    ``length + new tokens`` overflows the window. Samples without a length are left to the
    host's check of the encoded prompt."""
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


def iter_samples(bench: Any, tokenizer: Any, limit: int | None) -> Iterator[Any]:
    for i, sample in enumerate(bench.samples(tokenizer)):
        if limit is not None and i >= limit:
            return
        yield sample


def benchmark_demos(bench: Any, sample: Any) -> list[Any]:
    """The demonstration pool ``bench`` offers for ``sample`` (``Benchmark.demos``; none if
    the benchmark does not define it)."""
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


def run_sample(
    host: Any,
    strategy: Any,
    bench: Any,
    sample: Any,
    max_new_tokens: int | None,
    *,
    budget: int | None = None,
) -> dict[str, Any]:
    """Generate and score one sample; returns the record's measured fields.

    When the benchmark offers demonstrations for the sample (``bench.demos(sample)``), or a
    prompt ``budget`` is configured, the prompt strategy gets the pool and a token budget
    (:func:`prompt_budget`) as ``build(..., demos=, budget=)``; otherwise it is called as a
    zero-shot strategy with neither.
    """
    new = answer_tokens(sample, bench, max_new_tokens)
    demos = benchmark_demos(bench, sample)
    extra: dict[str, Any] = {}
    if demos or budget is not None:
        extra = {"demos": demos, "budget": prompt_budget(host, new, budget)}
    prompt = strategy.build(
        sample.question, context=sample.context, tokenizer=host.tokenizer, **extra
    )
    t0 = time.perf_counter()
    result = host.generate(prompt, max_new_tokens=new)[0]
    out = {
        "prediction": result.text,
        "score": float(bench.score(sample, result.text)),
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens,
        "kv_tokens": result.kv_tokens,
        "peak_kv_bytes": result.peak_kv_bytes,
        "prefill_seconds": round(result.prefill_seconds, 5),
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 3),
        "wall_seconds": round(time.perf_counter() - t0, 4),
        "prompt_accounting": prompt.accounting,
    }
    if extra:
        out["prompt_budget"] = extra["budget"]
        out["demos_offered"] = len(demos)
    return out


def build_components(variant: ResolvedVariant, registry: Any) -> dict[str, Any]:
    kinds = {
        "attention": "attention",
        "kv_policy": "kv-policy",
        "prompt": "prompt-strategy",
        "allocator": "allocator",
    }
    return {
        field: registry.get(kind, variant.refs[field].name).create(variant.configs[field])
        for field, kind in kinds.items()
    }


def execute(
    config: RunConfig,
    run_dir: str | Path,
    options: RunOptions | None = None,
    *,
    loaded: Any = None,
    console: Any = None,
) -> list[dict[str, Any]]:
    """Run every variant over every benchmark sample, appending records; returns all records
    of the run directory (old and new)."""
    from apportion.plugins import get_plugin_host

    t_start = time.perf_counter()
    options = options or RunOptions()
    host_plugins = get_plugin_host()
    registry = host_plugins.registry
    if options.seed is not None:
        config = config.model_copy(update={"seed": options.seed})
    variants = resolve_config(config, registry)
    run_path = prepare_run_dir(run_dir)
    (run_path / "config.json").write_text(config.model_dump_json(indent=2))
    records_path = run_path / RECORDS
    repair_tail(records_path)
    done = {record_key(r) for r in read_records(records_path)}

    from apportion.host import Host, load_model

    components = {v.label: build_components(v, registry) for v in variants}
    if loaded is None:
        loaded = load_model(config.model)
    extends = {label: bool(c["attention"].extends_context) for label, c in components.items()}
    check_lengths(config, registry, loaded.max_context, extends)
    limit = options.limit or config.limit
    benches = []
    for ref in config.benchmarks:
        opts = dict(ref.options)
        if "seed" in registry.get("benchmark", ref.name).config_model().model_fields:
            opts.setdefault("seed", config.seed)
        benches.append((ref.name, registry.create("benchmark", ref.name, opts)))
    samples = {name: list(iter_samples(b, loaded.tokenizer, limit)) for name, b in benches}
    check_samples(
        config,
        ((name, b, s) for name, b in benches for s in samples[name]),
        loaded.max_context,
        extends,
    )
    todo = [
        (v, name, b, s)
        for v in variants
        for name, b in benches
        for s in samples[name]
        if (v.label, name, s.id) not in done
    ]
    with _progress(options.progress, console) as progress:
        task = progress.add_task("samples", total=len(todo)) if progress else None
        hosts: dict[str, Any] = {}
        deadline = t_start + options.time_budget_s if options.time_budget_s else None
        for i, (v, name, bench, sample) in enumerate(todo):
            if deadline is not None and time.perf_counter() >= deadline:
                if console is not None:
                    console.print(
                        f"[yellow]time budget of {options.time_budget_s:g} s spent: {len(todo) - i} "
                        "samples left; rerun the same command to finish[/yellow]"
                    )
                break
            comp = components[v.label]
            host = hosts.get(v.label) or Host(loaded, comp["attention"], comp["kv_policy"])
            hosts[v.label] = host
            base = {
                "variant": v.label,
                "benchmark": name,
                "sample_id": sample.id,
                **sample.as_dict(),
                "components": {k: r.label() for k, r in v.refs.items()},
                "model": loaded.name,
            }
            try:
                base.update(
                    run_sample(
                        host,
                        comp["prompt"],
                        bench,
                        sample,
                        config.generation.max_new_tokens,
                        budget=config.generation.prompt_budget,
                    )
                )
            except PromptTooLongError as exc:
                base.update({"error": str(exc), "score": 0.0})
            append_record(records_path, base)
            if progress is not None:
                progress.advance(task)
    records = read_records(records_path)
    host_plugins.hook.apportion_run_finished(config=config, run_dir=run_path, records=records)
    return records


class _NoProgress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(enabled: bool, console: Any) -> Any:
    if not enabled:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


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
                "peak_kv_bytes": mean("peak_kv_bytes"),
                "prefill_seconds": mean("prefill_seconds"),
                "decode_tokens_per_s": mean("decode_tokens_per_s"),
                "prompt_tokens": mean("prompt_tokens"),
            }
        )
    return rows


def render_table(rows: list[dict[str, Any]], console: Any, title: str = "apportion run") -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in (
        "variant",
        "benchmark",
        "length",
        "n",
        "accuracy",
        "peak KV MiB",
        "prefill s",
        "decode tok/s",
    ):
        table.add_column(col, justify="left" if col in {"variant", "benchmark"} else "right")
    for r in rows:
        table.add_row(
            r["variant"],
            r["benchmark"],
            str(r["length"]),
            str(r["n"]),
            f"{100 * r['accuracy']:.1f}%",
            f"{r['peak_kv_bytes'] / 2**20:.2f}",
            f"{r['prefill_seconds']:.3f}",
            f"{r['decode_tokens_per_s']:.1f}",
        )
    console.print(table)
