"""KV policies for the HF host: the base class (which *is* the ``full`` policy) and helpers.

A policy owns the prefill: it builds the cache, runs the prompt through the model and may
evict context entries while doing so (kvpress-style forward hooks, or after the fact).
The host then decodes greedily. Two rules every policy keeps:

- ``compression_ratio`` is the fraction of the *context's* KV entries removed; the last
  ``question_len`` prompt tokens (the question and chat suffix) are never evicted.
- After eviction later tokens keep their original positions: the host feeds
  ``PrefillOutput.next_position`` onwards as ``position_ids``, so RoPE stays right.

Memory must really be freed (tensors shrunk, not masked): the host measures the cache's
bytes with :func:`cache_nbytes` after prefill and after every decode step.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field

from apportion.base import Component
from apportion.config import ComponentConfig


class CompressionConfig(ComponentConfig):
    """Config shared by eviction policies."""

    compression_ratio: float = Field(
        0.5, ge=0.0, lt=1.0, description="fraction of the context's KV entries removed"
    )


@dataclass
class PrefillOutput:
    """What a prefill hands to the decode loop.

    ``logits``: (batch, vocab) logits of the last prompt position.
    ``kv_mask``: (batch, kv_len) bool, True where a cached entry is a real token (False for
    left padding that survived); ``None`` if every entry is valid.
    ``next_position``: (batch,) position id of the first generated token.
    """

    logits: torch.Tensor
    kv_mask: torch.Tensor | None
    next_position: torch.Tensor
    info: dict[str, Any] | None = None


@functools.lru_cache(maxsize=32)
def _cache_param(forward: Any) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever this transformers
    version's ``forward`` takes (it was renamed in 5.x)."""
    return {_cache_param(type(model).forward): cache}


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at each row's first real token."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def cache_nbytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of a transformers ``Cache`` (or any object with
    ``layers`` holding ``keys``/``values``, or a legacy tuple)."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    if isinstance(cache, (tuple, list)):
        for item in cache:
            if isinstance(item, torch.Tensor):
                total += item.numel() * item.element_size()
            else:
                total += cache_nbytes(item)
    return total


def cache_seq_lengths(cache: Any) -> list[int]:
    """Cached sequence length of each layer."""
    return [
        int(layer.keys.shape[-2])
        if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4
        else 0
        for layer in getattr(cache, "layers", [])
    ]


class KVPolicy(Component):
    """The ``full`` policy: keep every entry. Subclasses override :meth:`prefill` (or
    :meth:`compress`) to evict."""

    name: ClassVar[str] = "full"

    def make_cache(self, model: Any) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def forward_prompt(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt through the model into ``cache``; returns (last logits, position ids)."""
        position_ids = positions_from_mask(attention_mask)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
        )
        return out.logits[:, -1, :], position_ids

    def prefill(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
        *,
        question_len: int = 0,
    ) -> PrefillOutput:
        logits, position_ids = self.forward_prompt(model, input_ids, attention_mask, cache)
        kv_mask = None if bool(attention_mask.all()) else attention_mask.bool()
        return PrefillOutput(logits=logits, kv_mask=kv_mask, next_position=position_ids[:, -1] + 1)

    def kv_bytes(self, cache: Any) -> int:
        """Bytes this policy's cache holds (override if it keeps KV outside ``cache.layers``)."""
        return cache_nbytes(cache)
