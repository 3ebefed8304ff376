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


@app.command("compressor-train")
def compressor_train(
    out: Annotated[
        Path | None,
        typer.Option(help="artifact path (.safetensors; default the user cache's)"),
    ] = None,
    k: Annotated[str, typer.Option(help="comma-separated pooling factors to train")] = "4,8",
    encoder_layers: Annotated[
        int, typer.Option(min=0, max=64, help="decoder layers the encoder runs (0: embeddings)")
    ] = 0,
    steps: Annotated[int, typer.Option(min=1, help="training steps (one passage each)")] = 650,
    minutes: Annotated[
        float | None, typer.Option(min=0.1, help="stop after this many minutes")
    ] = 24.0,
    lr: Annotated[float, typer.Option(min=1e-6, help="Adam's peak learning rate")] = 3e-3,
    seed: Annotated[int, typer.Option()] = 0,
    eval_examples: Annotated[
        int, typer.Option("--eval", min=1, help="held-out passages measured before and after")
    ] = 12,
    model: Annotated[str, typer.Option(help="the frozen decoder")] = "smollm2",
) -> None:
    """Train the arc-compress projector (ARC-Encoder-style) against the frozen decoder.

    Reconstruction + question answering on generated passages (the shipped QA set stays
    held out); about 25 minutes on one CPU core with the defaults."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from apportion_icl.compressor.train import train

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
        task = progress.add_task("training", total=steps)

        def stepped(step: int, loss: float) -> None:
            progress.update(task, completed=step, description=f"training (loss {loss:.3f})")

        result = train(
            out,
            k_values=ks,
            encoder_layers=encoder_layers,
            steps=steps,
            max_seconds=None if minutes is None else minutes * 60,
            lr=lr,
            seed=seed,
            eval_examples=eval_examples,
            model=model,
            on_step=stepped,
        )
    meta = result.artifact.meta
    console.print(
        f"compressor written to [bold]{result.path}[/bold] ({meta['steps']} steps, "
        f"{meta['train_seconds']} s); held-out loss {meta['eval_before']['all']} -> "
        f"{meta['eval_after']['all']}; the arc-compress prompt strategy reads it"
    )


@app.command("sitemb-train")
def sitemb_train(
    out: Annotated[
        Path | None, typer.Option(help="artifact path (.json; weights beside it)")
    ] = None,
    window: Annotated[
        int, typer.Option(min=1, max=16, help="neighbouring sentences either side")
    ] = 2,
    mix: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="weight of the situated similarity")
    ] = 0.5,
    layers: Annotated[int, typer.Option(min=1, max=6, help="top MiniLM layers trained")] = 2,
    epochs: Annotated[int, typer.Option(min=1)] = 2,
    synthetic: Annotated[int, typer.Option(min=2, help="synthetic training pairs")] = 48,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Fine-tune a situated MiniLM (SitEmb) for `embed_window`/`sitemb_weights` retrieval.

    Trains on entities built from the shipped QA set's vocabulary, none of which a test
    question asks about; records recall on the held-out two-hop test questions."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from apportion_icl.sitemb import train

    console = Console()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("preparing examples", total=None)

        def started(n: int) -> None:
            progress.update(task, total=n, description="training")

        def stepped(step: int, loss: float) -> None:
            progress.update(task, completed=step, description=f"training (loss {loss:.3f})")

        emb, path = train(
            out,
            window=window,
            mix=mix,
            layers=layers,
            epochs=epochs,
            synthetic=synthetic,
            seed=seed,
            on_start=started,
            on_step=stepped,
        )
    after = emb.meta.get("eval_recall_at_1_after", {})
    console.print(
        f"SitEmb embedder written to [bold]{path}[/bold] ({emb.meta['n_train']} examples, "
        f"{emb.meta['steps']} steps; held-out recall@1 {after}); use it with "
        f'`sitemb_weights = "{path}"` (prune, or drag/iterdrag with retriever = "embedding")'
    )
