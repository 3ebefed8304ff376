"""The HF transformers host (``pip install apportion-core[hf]``) and the primitives every
family shares.

The host: model loading (:mod:`~apportion.host.model`), attention backends
(:mod:`~apportion.host.attention`), KV policies (:mod:`~apportion.host.kv`) and the measured
generation loop (:mod:`~apportion.host.generate`).

The shared primitives, each written once: RoPE helpers (:mod:`~apportion.host.rope`), exact
attention over shards (:mod:`~apportion.host.lse`), the sentence embedder
(:mod:`~apportion.host.embed`), atomic writes and bounded parsing of outside data
(:mod:`~apportion.host.io`), the rank launcher (:mod:`~apportion.host.launch`) and the KV-store
protocol (:mod:`~apportion.host.store`).

The names below are imported on first access, so ``apportion.host.io`` and
``apportion.host.store`` can be used without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AttentionBackend": "apportion.host.attention",
    "GenerationResult": "apportion.host.generate",
    "Host": "apportion.host.generate",
    "KVPolicy": "apportion.host.kv",
    "LayerInputs": "apportion.host.kv",
    "PrefillOutput": "apportion.host.kv",
    "cache_nbytes": "apportion.host.kv",
    "LoadedModel": "apportion.host.model",
    "fingerprint": "apportion.host.model",
    "load_model": "apportion.host.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'apportion.host' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
