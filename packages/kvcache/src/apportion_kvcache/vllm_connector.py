"""A vLLM v1 KV connector backed by the apportion KV store (``ApportionStoreConnector``).

vLLM discovers it through the ``vllm.general_plugins`` entry point (:func:`register`) and
uses it with::

    KVTransferConfig(kv_connector="ApportionStoreConnector", kv_role="kv_both",
                     kv_connector_extra_config={"store": "/path/or/redis://host:port/0"})

Scheduler side: a new request whose block-aligned prompt prefix (minus its last token, which
must be recomputed to produce logits) is in the store reports those tokens as externally
matched; otherwise its prompt is marked for saving. Worker side: ``save_kv_layer`` gathers the
request's slots from each paged layer and writes them as one store entry per (prefix, layer)
(safetensors, checksummed, atomic); ``start_load_kv`` scatters them back into the paged
buffer. Keys are ``sha256(model + layer name, token ids)`` — the store's usual key — so a
Redis store shares prefixes between vLLM instances and with the HF host.

Written against ``KVConnectorBase_V1`` (scheduler + worker roles, as vLLM's example
connector); vLLM is imported only here, never by the plugin's entry point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from apportion_kvcache.errors import CorruptKVError
from apportion_kvcache.store import open_store, prefix_key

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def register() -> None:
    """``vllm.general_plugins`` entry point: make the connector known to vLLM's factory."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    name = "ApportionStoreConnector"
    if name not in getattr(KVConnectorFactory, "_registry", {}):
        KVConnectorFactory.register_connector(name, "apportion_kvcache.vllm_connector", name)


def aligned(n: int, block: int) -> int:
    return (max(n, 0) // block) * block


@dataclass
class ReqMeta:
    token_ids: list[int]
    slots: torch.Tensor  # (n,) slot index = block_id * block_size + offset
    is_store: bool


@dataclass
class StoreConnectorMetadata(KVConnectorMetadata):
    requests: list[ReqMeta] = field(default_factory=list)

    def add(self, token_ids: list[int], block_ids: list[int], block_size: int, is_store: bool) -> None:
        n = aligned(len(token_ids), block_size)
        if n <= 0:
            return
        blocks = torch.tensor(block_ids, dtype=torch.long)
        slots = (blocks[:, None] * block_size + torch.arange(block_size)[None, :]).reshape(-1)[:n]
        self.requests.append(ReqMeta(list(token_ids[:n]), slots, is_store))


class ApportionStoreConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        extra = getattr(self._kv_transfer_config, "kv_connector_extra_config", None) or {}
        self._store = open_store(str(extra.get("store", "/tmp/apportion-kv")), extra.get("max_bytes"))
        self._model = f"vllm:{vllm_config.model_config.model}:{vllm_config.model_config.dtype}"
        self._need_load: dict[str, Any] = {}
        self.loaded_tokens = 0
        self.saved_entries = 0

    # ------------------------------------------------------------------ keys
    def _key(self, layer_name: str, token_ids: list[int]) -> str:
        return prefix_key(f"{self._model}|{layer_name}", token_ids)

    def _probe(self, token_ids: list[int]) -> int:
        """Block-aligned prefix length (excluding the last prompt token) found in the store."""
        n = aligned(len(token_ids) - 1, self._block_size)
        if n <= 0:
            return 0
        marker = prefix_key(f"{self._model}|__complete__", token_ids[:n])
        return n if self._store.get(marker) is not None else 0

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        hit = self._probe(list(request.prompt_token_ids or []))
        return (max(0, hit - num_computed_tokens), False)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            self._need_load[request.request_id] = request

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = StoreConnectorMetadata()
        for req in scheduler_output.scheduled_new_reqs:
            ids = list(req.prompt_token_ids or [])
            block_ids = req.block_ids[0]
            if req.req_id in self._need_load:
                hit = self._probe(ids)
                meta.add(ids[:hit], block_ids, self._block_size, is_store=False)
            elif not self._probe(ids):
                meta.add(ids[: aligned(len(ids) - 1, self._block_size)], block_ids, self._block_size, is_store=True)
        self._need_load.clear()
        return meta

    # ------------------------------------------------------------------ worker side
    def _split(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return slots // self._block_size, slots % self._block_size

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        from safetensors.torch import load

        meta = self._get_connector_metadata()
        for req in meta.requests:
            if req.is_store:
                continue
            for name, layer in forward_context.no_compile_layers.items():
                paged = getattr(layer, "kv_cache", None)
                if paged is None:
                    continue
                if isinstance(paged, (list, tuple)):
                    paged = paged[forward_context.virtual_engine] if paged else None
                if paged is None:
                    continue
                entry = self._store.get(self._key(name, req.token_ids))
                if entry is None:
                    raise CorruptKVError(f"store entry for layer {name} vanished between match and load")
                try:
                    kv = load(entry.payload)["kv"]
                except Exception as exc:
                    raise CorruptKVError(f"store entry for layer {name} is unreadable ({exc})") from None
                blocks, offsets = self._split(req.slots.to(paged.device))
                paged[blocks, :, offsets] = kv.to(paged.device, paged.dtype)
            self.loaded_tokens += len(req.token_ids)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        from safetensors.torch import save

        meta = self._get_connector_metadata()
        for req in meta.requests:
            if not req.is_store:
                continue
            blocks, offsets = self._split(req.slots.to(kv_layer.device))
            kv = kv_layer[blocks, :, offsets].detach().to("cpu").contiguous()
            self._store.put(self._key(layer_name, req.token_ids), "kv", save({"kv": kv}),
                            fingerprint=self._model, tokens=len(req.token_ids), meta={"layer": layer_name})
            self.saved_entries += 1

    def wait_for_save(self) -> None:
        """Saves are synchronous; once every layer is written, mark the prefix complete so the
        scheduler never matches a half-written prefix."""
        if not self.has_connector_metadata():
            return
        for req in self._get_connector_metadata().requests:
            if req.is_store:
                key = prefix_key(f"{self._model}|__complete__", req.token_ids)
                self._store.put(key, "kv", b"{}", fingerprint=self._model, tokens=len(req.token_ids))
