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


def rope_shift(keys: torch.Tensor, shift: int, config: Any) -> torch.Tensor:
    """``keys`` (..., tokens, head_dim), rotated with rotary embeddings (the rotate-half, NeoX
    form transformers and vLLM use for Llama-style models), moved ``shift`` positions.
    Attention under RoPE depends only on the distance between a query and a key, so moving
    every cached key by the same amount keeps what later tokens see when they too stand
    ``shift`` positions off. Plain RoPE only: a scaled variant raises :class:`ValueError`."""
    scaling = getattr(config, "rope_scaling", None) or {}
    params = getattr(config, "rope_parameters", None) or {}
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type") or "default"
    if kind != "default":
        raise ValueError(f"rope type {kind!r}: only plain RoPE keys can be moved")
    theta = getattr(config, "rope_theta", None) or params.get("rope_theta")
    if not theta:
        raise ValueError("the model config names no rope_theta")
    dim = keys.shape[-1]
    rotary = int(dim * float(getattr(config, "partial_rotary_factor", 1.0) or 1.0))
    inv_freq = 1.0 / (float(theta) ** (torch.arange(0, rotary, 2, dtype=torch.float64) / rotary))
    angle = torch.cat([inv_freq, inv_freq]) * float(shift)
    cos, sin = angle.cos(), angle.sin()
    x = keys[..., :rotary].to(torch.float64)
    half = rotary // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    out = keys.clone()
    out[..., :rotary] = (x * cos + rotated * sin).to(keys.dtype)
    return out
