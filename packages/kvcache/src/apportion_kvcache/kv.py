"""Per-layer KV tensors, the form the CacheGen codec and the KV store take and give back:
conversions to and from a transformers cache, and the check that a KV fits a model."""

from __future__ import annotations

from typing import Any

import torch

from apportion_kvcache.errors import KVMismatchError

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer ``(keys, values)``, each (batch, kv_heads, tokens, head_dim)."""


def kv_from_cache(cache: Any) -> KV:
    """The (keys, values) of every layer of a transformers cache."""
    out = []
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.dim() != 4:
            raise ValueError("the cache has an empty layer; run a prefill first")
        out.append((layer.keys, layer.values))
    return out


def cache_from_kv(kv: KV, model_config: Any = None) -> Any:
    """A ``DynamicCache`` holding ``kv``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model_config) if model_config is not None else DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def check_kv_shape(layers: int, heads: int, head_dim: int, model_config: Any) -> None:
    """Raise :class:`KVMismatchError` unless the KV fits ``model_config``'s attention layout."""
    want_layers = getattr(model_config, "num_hidden_layers", layers)
    want_heads = getattr(model_config, "num_key_value_heads", None) or getattr(
        model_config, "num_attention_heads", heads
    )
    want_dim = getattr(model_config, "head_dim", None) or (
        model_config.hidden_size // model_config.num_attention_heads
    )
    if (layers, heads, head_dim) != (want_layers, want_heads, want_dim):
        raise KVMismatchError(
            f"KV shape (layers={layers}, kv_heads={heads}, head_dim={head_dim}) does not fit "
            f"the model (layers={want_layers}, kv_heads={want_heads}, head_dim={want_dim})"
        )
