"""``apportion icl ...``: the package's commands (added through ``apportion_register_commands``).
Heavy imports happen inside the commands, so listing commands stays torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="In-context learning under a token budget (apportion-icl).", no_args_is_help=True
)


@app.command("train-controller")
def train_controller(
    out: Annotated[
        Path | None, typer.Option(help="artifact path (.json; weights beside it)")
    ] = None,
    k: Annotated[str, typer.Option(help="comma-separated demo counts to measure")] = "0,1,2,4",
    limit: Annotated[
        int | None, typer.Option(min=1, help="at most this many training queries")
    ] = None,
    model: Annotated[str, typer.Option(help="the model whose correctness is measured")] = "smollm2",
) -> None:
    """Train the DynaICL meta-controller on the model's own correctness with k demos."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from apportion_icl.controller import train

    try:
        ks = [int(x) for x in k.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--k must be comma-separated integers, got {k!r}") from None
    console = Console()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("measuring answers", total=None)
        ctl, path = train(
            out,
            k_values=ks,
            limit=limit,
            model=model,
            on_start=lambda n: progress.update(task, total=n),
            on_batch=lambda n: progress.advance(task, n),
        )
    acc = ", ".join(f"k={k}: {v:.2f}" for k, v in ctl.meta["accuracy_by_k"].items())
    console.print(
        f"controller written to [bold]{path}[/bold] ({ctl.meta['n_train']} queries; accuracy {acc})"
    )
