"""Entry point of apportion-eval: registers its components by import path (nothing heavy here)."""

from apportion import hookimpl

APPORTION_API = ">=1.0,<2"

_BENCHMARKS = (
    (
        "niah",
        "niah:Niah",
        "niah:NiahConfig",
        "RULER needle in a haystack: single/multi-key/multi-value/multi-query; numbers, words, UUIDs",
    ),
    (
        "variable-tracking",
        "variable_tracking:VariableTracking",
        "variable_tracking:VariableTrackingConfig",
        "RULER variable tracking: find every variable a chain of VAR X = VAR Y assigns a value",
    ),
    (
        "needle-threading",
        "needle_threading:NeedleThreading",
        "needle_threading:ThreadingConfig",
        "follow key -> key pointers through the context (single/multi-thread, forward/backward)",
    ),
    (
        "holobench",
        "holobench:HoloBench",
        "holobench:HoloConfig",
        "database queries over rows written as sentences; gold answers by DuckDB on the same rows",
    ),
    (
        "longgen",
        "longgen:LongGen",
        "longgen:LongGenConfig",
        "many small questions in one long response: completion rate and per-item accuracy",
    ),
)


@hookimpl
def apportion_register_benchmarks(register):
    for name, factory, config, summary in _BENCHMARKS:
        register(
            name,
            f"apportion_eval.{factory}",
            config=f"apportion_eval.{config}",
            summary=summary,
            replace=name == "niah",
        )


@hookimpl
def apportion_run(config, run_dir, options):
    from apportion_eval.harness import run

    return run(config, run_dir, options)


@hookimpl
def apportion_register_commands(app):
    from apportion_eval.cli import register_commands

    register_commands(app)
