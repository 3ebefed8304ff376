"""``apportion report RUN_DIR``: re-render the table and report.html of a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any


def report_command(
    run_dir: Annotated[
        Path, __import__("typer").Argument(help="a run directory holding records.jsonl")
    ],
) -> None:
    """Re-render the terminal table and RUN_DIR/report.html from the run's records."""
    from apportion.errors import ConfigError
    from apportion.records import RECORDS, latest, load_records
    from rich.console import Console

    from apportion_eval.report import render_terminal, write_report

    path = run_dir / RECORDS
    if not path.is_file():
        raise ConfigError(
            f"{str(run_dir)!r} is not a run directory: {RECORDS} is missing",
            [("run_dir", str(run_dir))],
        )
    loaded = load_records(path)
    records = latest(loaded.records)
    if not records:
        raise ConfigError(f"{path} holds no complete records", [("run_dir", str(run_dir))])
    notes = []
    if loaded.problems:
        notes.append(
            f"{len(loaded.problems)} line(s) of {RECORDS} are not records and were left out "
            f"({'; '.join(loaded.problems[:3])})"
        )
    console = Console()
    render_terminal(records, console, title=f"{run_dir.name}: {len(records)} records")
    try:
        out = write_report(records, run_dir, title=run_dir.name, notes=notes)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the report into {str(run_dir)!r}: {exc.strerror or exc}",
            [("run_dir", str(exc))],
        ) from None
    console.print(f"[bold]report:[/bold] {out}")


def register_commands(app: Any) -> None:
    app.command("report")(report_command)
