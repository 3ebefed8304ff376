"""Options every offload allocator takes for placing the KV cache of generation."""

from __future__ import annotations

from typing import Any, Literal

from apportion.base import ComponentConfig
from pydantic import Field


class KVOffloadConfig(ComponentConfig):
    """How an allocator places the KV cache (see :mod:`apportion_offload.kv`).

    ``resident_kv_bytes``: KV bytes kept on the model's device; the layers beyond it live in
    this allocator's tier and are fetched ahead of use. ``None`` (the default) keeps every
    layer resident and offloads nothing.
    """

    resident_kv_bytes: int | None = Field(
        None,
        ge=1,
        description="KV bytes kept on the model's device during generation; the rest lives "
        "in this allocator's tier (None: every layer resident)",
    )
    kv_on_full: Literal["spill", "wait"] = Field(
        "spill",
        description="when the tier is full: spill layers to the next tier (NVMe swap files), "
        "or wait kv_wait_seconds for room, then fail with a typed error",
    )
    kv_wait_seconds: float = Field(
        10.0, ge=0.0, le=3600.0, description="how long kv_on_full='wait' waits for room"
    )
    kv_spill_directory: str | None = Field(
        None, description="where spilled layers' swap files go (default: a fresh temp dir)"
    )
    kv_prefetch: bool = Field(
        True, description="fetch the next offloaded layer while the current one computes"
    )
    kv_segment_tokens: int = Field(
        64,
        ge=1,
        le=1 << 20,
        description="nvme: decode tokens gathered in host memory before they are written to "
        "disk as one more swap file of the layer",
    )


class OffloadsKV:
    """Mixin of the offload allocators: :meth:`kv_budget` and :meth:`kv_cache` (the core's
    :class:`apportion.base.Allocator` protocol) from :class:`KVOffloadConfig`. A subclass
    gives :meth:`kv_tier`, the tier the offloaded layers live in."""

    config: Any

    def kv_budget(self) -> int | None:
        return self.config.resident_kv_bytes

    def kv_cache(self, model: Any, cache: Any) -> Any | None:
        if self.config.resident_kv_bytes is None:
            return None
        from apportion_offload.kv.cache import offloaded_cache

        return offloaded_cache(self, model, cache)

    def kv_tier(self) -> Any:
        raise NotImplementedError
