"""The ``apportion`` command line (typer + rich).

``plugins`` and ``list`` never import torch; commands that run a model import the HF host
lazily. Every :class:`~apportion.errors.ApportionError` is printed as one clear message with
exit status 2, never as a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional  # typer < 0.15 reads no `X | None` in options

import typer

from apportion import KINDS, __version__
from apportion.errors import ApportionError, ConfigError

app = typer.Typer(
    name="apportion",
    help="Long-context LLM techniques as plugins: list them, combine them, measure them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _LazyConsole:
    """A rich Console created on first use (commands that print nothing never import rich)."""

    def __init__(self, **kwargs: Any):
        self._kwargs: dict[str, Any] = kwargs
        self._console: Any = None

    def real(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)


console: Any = _LazyConsole()
err_console: Any = _LazyConsole(stderr=True)


def _host() -> Any:
    from apportion.plugins import get_plugin_host

    return get_plugin_host()


@app.command()
def plugins(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Installed plugins: distribution, version, kinds and components; broken ones with errors."""
    report = [p.as_dict() for p in _host().plugins]
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"apportion-core {__version__} plugins")
    for col in ("plugin", "distribution", "version", "components", "status"):
        table.add_column(col)
    for p in report:
        comps = "\n".join(f"{k}: {', '.join(v)}" for k, v in p["components"].items())
        status = (
            f"[red]error: {p['error']}[/red]"
            if p["error"]
            else f"[yellow]skipped: {p['skipped']}[/yellow]"
            if p["skipped"]
            else "[green]ok[/green]"
        )
        for clash in p.get("clashes", []):
            status += f"\n[yellow]clash: {clash}[/yellow]"
        table.add_row(p["name"], p["distribution"], p["version"], comps, status)
    console.print(table)


@app.command("list")
def list_components(
    kind: Annotated[str, typer.Argument(help=f"one of: {', '.join(KINDS)}")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Components of one KIND with provider, summary and config fields with defaults."""
    registry = _host().registry
    items = [spec.describe() for spec in registry.specs(kind)]
    if as_json:
        print(json.dumps(items, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{kind} components")
    for col in ("name", "provider", "summary", "config (defaults)"):
        table.add_column(col)
    for it in items:
        cfg = "\n".join(f"{k} = {v['default']!r}" for k, v in it["config"].items()) or "-"
        if it.get("error"):
            cfg = f"[red]{it['error']}[/red]"
        table.add_row(it["name"], f"{it['provider']} {it['version']}", it["summary"], cfg)
    console.print(table)


def default_config_path() -> Path | None:
    """``examples/default.toml`` in the working directory, else the config a plugin ships
    (hook ``apportion_default_config``)."""
    local = Path("examples/default.toml")
    if local.is_file():
        return local
    from apportion.plugins import get_plugin_host

    shipped = get_plugin_host().hook.apportion_default_config()
    return Path(shipped) if shipped is not None else None


@app.command()
def run(
    config: Annotated[
        Optional[Path],
        typer.Argument(help="TOML run config (default: examples/default.toml)"),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(help="run directory (default: OUTPUT_DIR/NAME)"),
    ] = None,
    limit: Annotated[
        Optional[int],
        typer.Option(min=1, help="at most N samples per benchmark"),
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="override the config's seed")] = None,
    progress: Annotated[
        Optional[bool],
        typer.Option(
            help="a progress bar (default: on a terminal; else a log line per 10 samples)"
        ),
    ] = None,
    time_budget: Annotated[
        Optional[float],
        typer.Option(
            "--time-budget",
            metavar="SECONDS",
            help="start no sample after SECONDS from the start of the run; rerun the same "
            "command to finish the rest (default: the config's [harness] time_budget_s, "
            "else no limit)",
        ),
    ] = None,
) -> None:
    """Run a config (benchmarks x variants) and write records and a report to the run directory."""
    import time

    from apportion.config import RunConfig, load_config
    from apportion.runner import RunOptions, execute

    path = config or default_config_path()
    cfg = load_config(path) if path is not None else RunConfig(name="default")
    run_dir = out or Path(cfg.output_dir) / cfg.name
    options = RunOptions(limit=limit, seed=seed, progress=progress, time_budget_s=time_budget)
    console.print(f"[bold]apportion run[/bold] {path or '(built-in default)'} -> {run_dir}")
    t0 = time.perf_counter()
    try:
        result = execute(cfg, run_dir, options, console=console.real())
    except KeyboardInterrupt:  # the runner said what was kept
        sys.exit(130)
    console.print(
        f"wall time {time.perf_counter() - t0:.1f} s; {len(result.records)} records in "
        f"{run_dir / 'records.jsonl'}"
    )


#: how deeply a ``key=value`` option's JSON value may nest
OPTION_DEPTH = 16


def _parse_options(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; a value is JSON where it parses as JSON, else the plain string. A
    value nested more than :data:`OPTION_DEPTH` levels is a :class:`ConfigError`."""
    from apportion.host.io import depth

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"option {item!r} must look like key=value")
        try:
            parsed = json.loads(value)
            too_deep = depth(parsed) > OPTION_DEPTH
        except RecursionError:
            parsed, too_deep = None, True
        except ValueError:
            parsed, too_deep = value, False
        if too_deep:
            raise ConfigError(
                f"option {key!r}: its value is nested more than {OPTION_DEPTH} levels deep",
                [(key, "nested too deeply")],
            )
        out[key] = parsed
    return out


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt ('-' reads standard input)")],
    model: Annotated[str, typer.Option(help="'smollm2', an HF id or a folder")] = "smollm2",
    attention: Annotated[str, typer.Option(help="attention backend")] = "dense",
    kv_policy: Annotated[str, typer.Option("--kv-policy", help="KV policy")] = "full",
    attention_option: Annotated[
        Optional[list[str]], typer.Option("--attention-option", "-a", help="key=value")
    ] = None,
    kv_option: Annotated[
        Optional[list[str]], typer.Option("--kv-option", "-k", help="key=value")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Generate for one prompt with a chosen model, attention and KV policy; print the stats."""
    from apportion.config import ModelSpec

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise ConfigError("the prompt is empty: give the model something to answer")
    registry = _host().registry
    backend = registry.create("attention", attention, _parse_options(attention_option))
    policy = registry.create("kv-policy", kv_policy, _parse_options(kv_option))
    from apportion.host import Host, load_model
    from apportion.host.model import model_window, pick_device

    spec = ModelSpec(name=model, device=device)
    pick_device(spec)
    window = model_window(spec)
    if max_new_tokens >= window:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} does not fit {model!r}'s context of {window} "
            "tokens with any prompt; use fewer"
        )
    loaded = load_model(spec)
    result = Host(loaded, backend, policy).generate(prompt, max_new_tokens=max_new_tokens)[0]
    stats = result.as_dict() | {
        "model": loaded.name,
        "device": str(loaded.device),
        "load_seconds": round(loaded.load_seconds, 3),
    }
    if as_json:
        print(json.dumps(stats, indent=2))
        return
    console.print(result.text)
    console.rule()
    for key in (
        "prompt_tokens",
        "new_tokens",
        "kv_tokens",
        "peak_kv_bytes",
        "prefill_seconds",
        "decode_tokens_per_s",
        "model",
        "device",
        "load_seconds",
    ):
        value = stats[key]
        console.print(
            f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}"
        )


@app.command()
def plan(
    model: Annotated[
        str,
        typer.Option(
            help="preset (yi-34b, llama-3-8b, ...), 'smollm2', or a folder with config.json"
        ),
    ] = "yi-34b",
    hardware: Annotated[str, typer.Option(help="preset: a100-80gb, h100-sxm, h200")] = "a100-80gb",
    context: Annotated[
        Optional[list[int]], typer.Option(min=1, help="context length(s) in tokens")
    ] = None,
    new_tokens: Annotated[int, typer.Option(min=1, help="tokens decoded per request")] = 250,
    offload: Annotated[
        Optional[str],
        typer.Option(
            help="placement for the offload plugin's step-time model; with a resident KV "
            "budget, the tier of the KV cache (pinned-pool, tiered, nvme)"
        ),
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(help="dtype of the weights and the KV cache (default: the preset's bf16)"),
    ] = None,
    resident_kv_fraction: Annotated[
        Optional[float],
        typer.Option(
            "--resident-kv-fraction",
            min=0.0,
            max=1.0,
            help="share of the full KV (context + new tokens) kept resident; with --offload "
            "TIER, predict the decode speed of that placement",
        ),
    ] = None,
    resident_kv_bytes: Annotated[
        Optional[int],
        typer.Option("--resident-kv-bytes", min=1, help="the same, as bytes"),
    ] = None,
    step_ms: Annotated[
        Optional[float],
        typer.Option(
            "--step-ms",
            min=0.0,
            help="the all-resident decode step measured at this context, in ms (default: "
            "the compute model)",
        ),
    ] = None,
    calibrate: Annotated[
        bool,
        typer.Option(
            help="measure this machine's copy and disk figures for the KV decode model "
            "(instead of the hardware preset's)"
        ),
    ] = False,
    swap_dir: Annotated[
        Optional[Path],
        typer.Option("--swap-dir", help="where --calibrate measures the disk (default: temp)"),
    ] = None,
    paper: Annotated[
        bool, typer.Option(help="print the paper's running example beside ours")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The long-context cost model (Fu 2024): KV bytes, concurrency, prefill, decode and
    context-switch time. With --offload TIER and a resident KV budget: the decode speed of
    the KV cache kept partly in TIER, one line per context."""
    from apportion.plan import (
        KVOffloadQuery,
        Plan,
        compare_with_paper,
        resolve_hardware,
        resolve_model,
    )

    shape, hw = resolve_model(model), resolve_hardware(hardware)
    if dtype is not None:
        shape = shape.with_dtype(dtype)
    kv_mode = resident_kv_fraction is not None or resident_kv_bytes is not None
    for flag, value in (("--resident-kv-fraction", resident_kv_fraction), ("--step-ms", step_ms)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} must be positive, got {value:g}")
    if resident_kv_fraction is not None and resident_kv_bytes is not None:
        raise ConfigError("give --resident-kv-fraction or --resident-kv-bytes, not both")
    if kv_mode and not offload:
        raise ConfigError("a resident KV budget needs --offload TIER (pinned-pool, tiered, nvme)")
    if not kv_mode and (step_ms is not None or calibrate or swap_dir is not None):
        raise ConfigError(
            "--step-ms, --calibrate and --swap-dir belong to the KV decode model: give "
            "--resident-kv-fraction or --resident-kv-bytes"
        )
    plans = [Plan(shape, hw, c, new_tokens) for c in (context or [4_000, 50_000])]
    for p in plans if kv_mode else []:
        p.kv_offload = KVOffloadQuery(
            resident_bytes=float(resident_kv_bytes)
            if resident_kv_bytes is not None
            else float(resident_kv_fraction or 0.0) * p.full_kv_bytes,
            step_seconds=None if step_ms is None else step_ms / 1e3,
            calibrate=calibrate,
            directory=None if swap_dir is None else str(swap_dir),
        )
    rows = [p.figures() for p in plans]
    if offload:
        for p, row in zip(plans, rows, strict=True):
            extra = _host().hook.apportion_plan_offload(plan=p, placement=offload, hardware=hw)
            if extra is None:
                raise ApportionError(
                    f"no installed plugin models placement {offload!r} (install apportion-offload)"
                )
            row["offload"] = dict(extra)
    comparison = compare_with_paper(new_tokens) if paper else None
    if as_json:
        print(json.dumps({"plans": rows, "paper": comparison}, indent=2))
        return
    if kv_mode:
        for r in rows:
            print(_kv_decode_line(shape.name, r))
        if not comparison:
            return
    from rich.table import Table

    table = Table(title=f"{shape.name} on {hw.name} (theoretical peak)")
    for col in (
        "context",
        "KV/token",
        "KV/user",
        "max users",
        "prefill s",
        "decode s",
        "ms/token",
        "switch s",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['context']:,}",
            f"{r['kv_bytes_per_token'] / 2**20:.3f} MiB",
            f"{r['kv_bytes_per_user'] / 1e9:.2f} GB",
            str(r["max_concurrent_users"]),
            f"{r['prefill_seconds']:.2f}",
            f"{r['decode_seconds']:.2f}",
            f"{r['decode_ms_per_token']:.1f}",
            f"{r['context_switch_seconds']:.3f}",
        )
    if not kv_mode:
        console.print(table)
    for r in rows if not kv_mode else []:
        for key, value in (r.get("offload") or {}).items():
            console.print(f"  [{r['context']:,}] {key}: {value}")
    if comparison:
        cmp = Table(title="yi-34b on a100-80gb: ours vs the paper")
        for col in ("context", "figure", "ours", "paper", "error"):
            cmp.add_column(col, justify="right")
        for c in comparison:
            cmp.add_row(
                f"{c['context']:,}",
                c["figure"],
                str(c["ours"]),
                str(c["paper"]),
                f"{100 * c['rel_error']:+.1f}%",
            )
        console.print(cmp)


def _kv_decode_line(model: str, row: dict[str, Any]) -> str:
    """One line: the predicted decode of a KV placement (``plan --offload TIER`` with a
    resident KV budget)."""
    kv = row.get("offload") or {}
    try:
        return (
            f"{model}, context {row['context']:,} + {row['new_tokens']:,} new, KV on "
            f"{kv['tier']}: {kv['resident_kv_bytes'] / kv['full_kv_bytes']:.0%} resident "
            f"({kv['pinned_layers']} of {kv['pinned_layers'] + kv['offloaded_layers']} layers "
            f"pinned): decode {kv['decode_tokens_per_s']:.2f} tokens/s, "
            f"{kv['decode_ms_per_step']:.2f} ms/step (all resident "
            f"{kv['resident_ms_per_step']:.2f} ms/step: {kv['vs_resident']:.2f}x), "
            f"{kv['fetch_hidden_share']:.0%} of the fetch hidden "
            f"[{kv['figures']['hardware']}; step: {kv['step_from']}]"
        )
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        raise ApportionError(
            f"the offload plugin's KV decode figures lack {exc}; update apportion-offload"
        ) from None


@app.command()
def doctor() -> None:
    """Versions of torch, CUDA and Triton, the device, and plugin health."""
    import importlib.metadata as md
    import platform

    console.print(
        f"apportion-core {__version__} on Python {platform.python_version()} ({platform.machine()})"
    )
    for dist in ("torch", "transformers", "triton", "pluggy", "pydantic"):
        try:
            console.print(f"  {dist:<13} {md.version(dist)}")
        except md.PackageNotFoundError:
            console.print(f"  {dist:<13} [yellow]not installed[/yellow]")
    try:
        import torch

        cuda = torch.cuda.is_available()
        console.print(f"  CUDA          {torch.version.cuda or 'none'} (available: {cuda})")
        console.print(f"  device        {torch.cuda.get_device_name(0) if cuda else 'cpu'}")
    except ImportError:
        console.print(
            "  device        unknown (torch not installed: pip install 'apportion-core[hf]')"
        )
    from apportion.host.model import embedded_gguf

    try:
        console.print(f"  embedded model {embedded_gguf()}")
    except ApportionError as exc:
        console.print(f"  embedded model [yellow]{exc}[/yellow]")
    host = _host()
    bad = [p for p in host.plugins if p.error]
    console.print(f"  plugins       {len(host.plugins) - len(bad)} ok, {len(bad)} broken")
    for p in bad:
        console.print(f"    [red]{p.name} ({p.distribution} {p.version}): {p.error}[/red]")


def _given(value: Any) -> str:
    """`` (got 'tpu0')`` for a short scalar a config model refused, else nothing."""
    if isinstance(value, (str, int, float)) and len(repr(value)) <= 60:
        return f" (got {value!r})"
    return ""


def main() -> None:
    """Entry point: load plugins (letting them add commands), then dispatch."""
    argv = sys.argv[1:]
    try:
        if argv in (["plugins"], ["plugins", "--json"]):
            # Fast path: typer's parameter coercion imports pydantic; listing plugins needs
            # neither, and must stay well under 0.5 s.
            plugins(as_json=argv == ["plugins", "--json"])
            return
        _host().hook.apportion_register_commands(app=app)
        app(standalone_mode=True)
    except ApportionError as exc:
        # soft_wrap: the message stays on its lines, never folded at the terminal's width
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:
        if type(exc).__name__ != "ValidationError" or "pydantic" not in type(exc).__module__:
            raise
        # an option that a config model refuses (e.g. --device tpu0): one line per field
        refused: Any = exc
        lines = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(value)'}: {e['msg']}{_given(e.get('input'))}"
            for e in refused.errors()
        )
        err_console.print(f"[bold red]error:[/bold red] {lines}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
