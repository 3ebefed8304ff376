"""``apportion kv ...``: compress a context once into a KV store, then ask it questions, from
any process (added through ``apportion_register_commands``). Heavy imports (torch, the model)
happen inside the commands, so listing commands stays torch-free."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional  # typer < 0.15 reads no `X | None` in options

import typer

app = typer.Typer(
    help="Compress a context once into a KV store and ask it questions later (apportion-kvcache).",
    no_args_is_help=True,
)


def _options(items: list[str] | None) -> dict[str, Any]:
    from apportion.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"option {item!r} must look like key=value")
        try:
            out[key.strip()] = json.loads(value)
        except RecursionError:
            raise ConfigError(f"option {key.strip()!r} nests too deeply") from None
        except ValueError:
            out[key.strip()] = value
    return out


def _read_context(path: Path) -> str:
    from apportion.errors import ConfigError

    if str(path) == "-":
        text = sys.stdin.read()
    else:
        if not path.exists():
            raise ConfigError(f"context file {str(path)!r} does not exist")
        if not path.is_file():
            raise ConfigError(f"context file {str(path)!r} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"context file {str(path)!r} is not UTF-8 text: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"context file {str(path)!r} cannot be read: {exc}") from None
    if not text.strip():
        raise ConfigError(f"context file {str(path)!r} is empty: give the model something to read")
    return text


def _load(model: str, device: str, dtype: str) -> Any:
    from apportion.config import ModelSpec
    from apportion.host import load_model

    return load_model(ModelSpec(name=model, device=device, dtype=dtype))


def _open_store(url: str) -> Any:
    from apportion.host.store import open_store

    return open_store(url)


StoreOption = Annotated[
    str, typer.Option("--store", help="a directory or redis://host:port/db URL")
]
ModelOption = Annotated[str, typer.Option(help="'smollm2', an HF id or a folder")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda")]
DtypeOption = Annotated[
    str,
    typer.Option(
        help="auto, float32, bfloat16 or float16 (a context is asked with the dtype it was "
        "compressed with)"
    ),
]


@app.command("compress")
def compress(
    context_file: Annotated[
        Path, typer.Argument(help="a text file holding the context ('-' reads standard input)")
    ],
    store: StoreOption,
    kv_policy: Annotated[
        str, typer.Option("--kv-policy", help="KV policy compressing the context")
    ] = "probe",
    option: Annotated[
        Optional[list[str]], typer.Option("--option", "-o", help="policy option key=value")
    ] = None,
    codec_level: Annotated[
        Optional[int],
        typer.Option("--codec-level", help="CacheGen-code the stored KV at this level"),
    ] = None,
    name: Annotated[
        Optional[str], typer.Option(help="store under this name (else the key is the handle)")
    ] = None,
    model: ModelOption = "smollm2",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Compress CONTEXT_FILE once (query-agnostic) and store its KV; prints the handle."""
    from apportion.plugins import get_registry

    text = _read_context(context_file)
    options = _options(option)
    spec = get_registry().get("kv-policy", kv_policy)  # an unknown name fails before torch loads
    from apportion_kvcache.reuse import _check_name, _codec, compress_context

    policy = spec.create(options)
    _codec(codec_level)
    if name is not None:
        _check_name(name)
    kv_store = _open_store(store)
    loaded = _load(model, device, dtype)
    handle = compress_context(loaded, text, policy, kv_store, codec_level=codec_level, name=name)
    meta, stats = handle.meta, handle.stats
    print(handle.handle)
    print(
        f"{meta['context_tokens']} context tokens -> {meta['kept_tokens']} kept "
        f"({meta['policy']['name']}, codec {meta['codec']['name']}), "
        f"{stats['stored_bytes']} bytes stored in {stats['compress_seconds']:.1f} s",
        file=sys.stderr,
    )


@app.command("ask")
def ask_command(
    handle: Annotated[str, typer.Argument(help="what `apportion kv compress` printed")],
    questions: Annotated[list[str], typer.Argument(help="one or more questions")],
    store: StoreOption,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 48,
    batch_size: Annotated[int, typer.Option(min=1, help="questions answered together as rows")] = 8,
    kv_policy: Annotated[
        Optional[str],
        typer.Option("--kv-policy", help="refuse an entry compressed with another policy"),
    ] = None,
    ratio: Annotated[
        Optional[float],
        typer.Option(help="refuse an entry compressed at another compression ratio"),
    ] = None,
    model: ModelOption = "smollm2",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Answer QUESTIONS from the compressed context HANDLE, without recomputing it."""
    from apportion.errors import ConfigError

    from apportion_kvcache.reuse import ask, load_context, read_entry

    if any(not q.strip() for q in questions):
        raise ConfigError("a question is empty: give the model something to answer")
    kv_store = _open_store(store)
    read_entry(kv_store, handle)  # an unknown handle fails before the model loads
    loaded = _load(model, device, dtype)
    stored = load_context(
        loaded, handle, store=kv_store, expect_policy=kv_policy, expect_ratio=ratio
    )
    results = ask(loaded, stored, questions, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if as_json:
        rows = [{"question": q, **r.as_dict()} for q, r in zip(questions, results, strict=True)]
        print(json.dumps(rows, indent=2))
        return
    if len(results) == 1:
        print(results[0].text)
        return
    for q, r in zip(questions, results, strict=True):
        print(f"> {q}\n{r.text}\n")
