"""A vLLM v1 KV connector backed by the apportion KV store (``ApportionStoreConnector``).

vLLM discovers it through the ``vllm.general_plugins`` entry point (:func:`register`) and
uses it with::

    LLM(model, kv_transfer_config=KVTransferConfig(
        kv_connector="ApportionStoreConnector", kv_role="kv_both",
        kv_connector_extra_config={"store": "/path/or/redis://host:port/0", "max_bytes": None}))

Scheduler side (``get_num_new_matched_tokens``, ``update_state_after_alloc``,
``build_connector_meta``, ``request_finished``): a new request asks the store for the longest
block-aligned prefix of its prompt (never the last prompt token, which must be recomputed to
produce logits) whose KV is complete in the store, and reports those tokens as externally
matched. A prompt whose full block-aligned prefix is not stored yet is marked for saving; the
save is emitted in the step where prefill has computed that whole prefix (chunked prefill
included).

Worker side (``start_load_kv``, ``wait_for_layer_load``, ``save_kv_layer``,
``wait_for_save``): ``save_kv_layer`` copies the request's prefix blocks out of each paged
layer and writes one store entry per (prefix, layer) (safetensors, checksummed, atomic);
``wait_for_save`` then writes a per-rank completion marker, so the scheduler never matches a
half-written prefix. ``start_load_kv`` copies stored blocks back into the blocks vLLM allocated.
An entry that vanished, is corrupt, or does not fit the live layer is reported through
``get_block_ids_with_load_errors`` (vLLM then fails or recomputes the request, per
``kv_load_failure_policy``), never silently used.

Blocks are copied whole. A paged block's interior layout belongs to the attention backend
(vLLM's CPU backend stores keys transposed, or AMX-packed), so an entry is only valid for the
same backend, block size, KV dtype and tensor/pipeline rank; all of those are in the key's
model fingerprint, and the layer's block shape and backend are checked again on load.

Keys are the store's usual :func:`apportion.host.store.prefix_key` of (fingerprint, token
ids), so a Redis store shares prefixes between vLLM instances of the same configuration.

vLLM and torch are imported by this module (it subclasses ``KVConnectorBase_V1``); only vLLM
imports it, through the entry point: ``import apportion`` and the apportion plugin never do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from apportion_kvcache.errors import CorruptKVError
from apportion_kvcache.store import Store, open_store, prefix_key

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger("apportion_kvcache.vllm")

NAME = "ApportionStoreConnector"


def register() -> None:
    """``vllm.general_plugins`` entry point: make the connector known to vLLM's factory.

    vLLM calls every general plugin once in each of its processes; a second call is a no-op."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(NAME, __name__, NAME)


def aligned(n: int, block: int) -> int:
    return (max(n, 0) // block) * block


# ---------------------------------------------------------------------------- metadata


@dataclass
class ReqMeta:
    """One transfer in one step: the prefix ``token_ids`` (a whole number of blocks) and the
    vLLM block ids that hold it. For a load, ``skip_blocks`` leading blocks are already valid
    in vLLM's own prefix cache and are not written."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    is_store: bool
    skip_blocks: int = 0


@dataclass
class StoreConnectorMetadata(KVConnectorMetadata):
    requests: list[ReqMeta] = field(default_factory=list)


@dataclass
class _PendingSave:
    token_ids: list[int]  # the block-aligned prefix to save
    block_ids: list[int]  # the request's blocks so far (grows as prefill proceeds)


# ---------------------------------------------------------------------------- the connector


class ApportionStoreConnector(KVConnectorBase_V1):
    """KV connector whose external cache is an apportion KV store
    (:class:`~apportion_kvcache.store.Store`)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = int(vllm_config.cache_config.block_size)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._store: Store = open_store(
            str(extra.get("store", "/tmp/apportion-kv")), extra.get("max_bytes")
        )
        #: longest prefix probed, in blocks (bounds the store look-ups per new request)
        self._max_probe_blocks = int(extra.get("max_probe_blocks", 64))
        par = vllm_config.parallel_config
        self._ranks = [
            (pp, tp)
            for pp in range(par.pipeline_parallel_size)
            for tp in range(par.tensor_parallel_size)
        ]
        from vllm.platforms import current_platform

        mc, cc = vllm_config.model_config, vllm_config.cache_config
        self._model = (
            f"vllm|{mc.model}|{mc.revision or ''}|{mc.dtype}|kv={cc.cache_dtype}"
            f"|block={self._block_size}|{current_platform.device_type}"
        )
        # scheduler state
        #: req id -> (external tokens to load this step, prompt token ids)
        self._load_plan: dict[str, tuple[int, list[int]]] = {}
        self._pending: dict[str, _PendingSave] = {}
        # worker state
        self._rank: tuple[int, int] | None = None
        self._failed_blocks: set[int] = set()
        #: worker-side counters (read them with ``LLM.collective_rpc``; see tests_vllm)
        self.stats = {
            "loaded_tokens": 0,
            "loaded_entries": 0,
            "saved_tokens": 0,
            "saved_entries": 0,
            "load_errors": 0,
        }

    # ------------------------------------------------------------------ keys
    def _layer_key(self, rank: tuple[int, int], layer_name: str, token_ids: list[int]) -> str:
        return prefix_key(f"{self._model}|rank={rank[0]}.{rank[1]}|{layer_name}", token_ids)

    def _marker_key(self, rank: tuple[int, int], token_ids: list[int]) -> str:
        return prefix_key(f"{self._model}|rank={rank[0]}.{rank[1]}|complete", token_ids)

    def _complete(self, token_ids: list[int]) -> bool:
        return all(self._store.get(self._marker_key(r, token_ids)) is not None for r in self._ranks)

    def _probe(self, token_ids: list[int], at_least: int = 0) -> int:
        """Longest block-aligned prefix (never the last prompt token) complete in the store, or
        0 when none is longer than ``at_least`` tokens."""
        n = aligned(len(token_ids) - 1, self._block_size)
        n = min(n, self._max_probe_blocks * self._block_size)
        while n > at_least:
            if self._complete(token_ids[:n]):
                return n
            n -= self._block_size
        return 0

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        hit = self._probe(list(request.prompt_token_ids or []), at_least=num_computed_tokens)
        return (max(0, hit - num_computed_tokens), False)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            # the request's computed tokens, as the step's scheduler output will carry them, are
            # local prefix-cache hits + these external ones: the load covers the latter
            self._load_plan[request.request_id] = (
                num_external_tokens,
                list(request.prompt_token_ids or []),
            )

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = StoreConnectorMetadata()
        bs = self._block_size
        for req in scheduler_output.scheduled_new_reqs:
            ids = list(req.prompt_token_ids or [])
            block_ids = list(req.block_ids[0])
            hit = 0
            plan = self._load_plan.pop(req.req_id, None)
            if plan is not None:
                hit = req.num_computed_tokens  # local + external, block-aligned
                meta.requests.append(
                    ReqMeta(
                        req.req_id,
                        ids[:hit],
                        block_ids[: hit // bs],
                        is_store=False,
                        skip_blocks=(hit - plan[0]) // bs,
                    )
                )
            n = aligned(len(ids) - 1, bs)
            if n > hit and not (plan is None and self._complete(ids[:n])):
                self._pending[req.req_id] = _PendingSave(ids[:n], block_ids)
                self._maybe_emit_save(
                    meta,
                    req.req_id,
                    req.num_computed_tokens,
                    scheduler_output.num_scheduled_tokens.get(req.req_id, 0),
                )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            resumed = req_id in cached.resumed_req_ids
            plan = self._load_plan.pop(req_id, None)
            pending = self._pending.get(req_id)
            if resumed:
                # preempted and resumed: every block is new and the cached KV was lost
                block_ids = list(new_blocks[0]) if new_blocks is not None else []
                if pending is not None:
                    pending.block_ids = block_ids
                if plan is not None:
                    hit = cached.num_computed_tokens[i]
                    meta.requests.append(
                        ReqMeta(
                            req_id,
                            plan[1][:hit],
                            block_ids[: hit // bs],
                            is_store=False,
                            skip_blocks=(hit - plan[0]) // bs,
                        )
                    )
            elif pending is not None and new_blocks is not None:
                pending.block_ids.extend(new_blocks[0])
            if pending is not None:
                self._maybe_emit_save(
                    meta,
                    req_id,
                    cached.num_computed_tokens[i],
                    scheduler_output.num_scheduled_tokens.get(req_id, 0),
                )
        self._load_plan.clear()
        return meta

    def _maybe_emit_save(
        self, meta: StoreConnectorMetadata, req_id: str, computed: int, scheduled: int
    ) -> None:
        """Emit the save in the step after which the whole prefix has been computed."""
        pending = self._pending[req_id]
        n = len(pending.token_ids)
        if computed + scheduled >= n and len(pending.block_ids) * self._block_size >= n:
            meta.requests.append(
                ReqMeta(
                    req_id,
                    pending.token_ids,
                    pending.block_ids[: n // self._block_size],
                    is_store=True,
                )
            )
            del self._pending[req_id]

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._pending.pop(request.request_id, None)
        self._load_plan.pop(request.request_id, None)
        return False, None  # saves are synchronous: vLLM may free the blocks now

    # ------------------------------------------------------------------ worker side
    def _worker_rank(self) -> tuple[int, int]:
        if self._rank is None:
            from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

            self._rank = (get_pp_group().rank_in_group, get_tensor_model_parallel_rank())
        return self._rank

    @staticmethod
    def _paged(layer: Any) -> torch.Tensor | None:
        kv = getattr(layer, "kv_cache", None)
        if isinstance(kv, (list, tuple)):
            kv = kv[0] if kv else None
        return kv if isinstance(kv, torch.Tensor) and kv.numel() else None

    @staticmethod
    def _layout(layer: Any, paged: torch.Tensor) -> str:
        backend = getattr(getattr(layer, "attn_backend", None), "get_name", lambda: "?")()
        return f"{backend}:{tuple(paged.shape[1:])}:{paged.dtype}"

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        from safetensors.torch import load

        meta = self._get_connector_metadata()
        assert isinstance(meta, StoreConnectorMetadata)
        rank = self._worker_rank()
        for req in meta.requests:
            if req.is_store or len(req.block_ids) <= req.skip_blocks:
                continue
            dst = torch.tensor(req.block_ids, dtype=torch.long)
            try:
                for name, layer in forward_context.no_compile_layers.items():
                    paged = self._paged(layer)
                    if paged is None:
                        continue
                    entry = self._store.get(self._layer_key(rank, name, req.token_ids))
                    if entry is None:
                        raise CorruptKVError(
                            f"store entry of layer {name} vanished after the match"
                        )
                    if entry.manifest.get("meta", {}).get("layout") != self._layout(layer, paged):
                        raise CorruptKVError(
                            f"store entry of layer {name} has layout "
                            f"{entry.manifest.get('meta', {}).get('layout')}, the layer "
                            f"{self._layout(layer, paged)}"
                        )
                    try:
                        blocks = load(entry.payload)["blocks"]
                    except Exception as exc:
                        raise CorruptKVError(
                            f"store entry of layer {name} is unreadable ({exc})"
                        ) from None
                    if blocks.shape[0] != len(req.block_ids):
                        raise CorruptKVError(
                            f"store entry of layer {name} holds {blocks.shape[0]} blocks, "
                            f"the prefix needs {len(req.block_ids)}"
                        )
                    k = req.skip_blocks
                    paged[dst[k:].to(paged.device)] = blocks[k:].to(paged.device, paged.dtype)
                    self.stats["loaded_entries"] += 1
            except CorruptKVError as exc:
                log.warning(
                    "apportion store: cannot load %d tokens of request %s: %s",
                    len(req.token_ids),
                    req.req_id,
                    exc,
                )
                self._failed_blocks.update(req.block_ids[req.skip_blocks :])
                self.stats["load_errors"] += 1
                continue
            self.stats["loaded_tokens"] += len(req.token_ids) - req.skip_blocks * self._block_size

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv loads synchronously

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        from safetensors.torch import save

        meta = self._get_connector_metadata()
        assert isinstance(meta, StoreConnectorMetadata)
        rank = self._worker_rank()
        layer = None
        for req in meta.requests:
            if not req.is_store:
                continue
            if layer is None:
                from vllm.forward_context import get_forward_context

                layer = get_forward_context().no_compile_layers.get(layer_name)
            src = torch.tensor(req.block_ids, dtype=torch.long, device=kv_layer.device)
            blocks = kv_layer[src].detach().to("cpu").contiguous()
            self._store.put(
                self._layer_key(rank, layer_name, req.token_ids),
                "kv",
                save({"blocks": blocks}),
                fingerprint=self._model,
                tokens=len(req.token_ids),
                meta={
                    "layer": layer_name,
                    "layout": self._layout(layer, kv_layer),
                    "block_size": self._block_size,
                },
            )
            self.stats["saved_entries"] += 1

    def wait_for_save(self) -> None:
        """Saves are synchronous; once every layer is written, mark this rank's part of the
        prefix complete."""
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, StoreConnectorMetadata)
        for req in meta.requests:
            if req.is_store:
                self._store.put(
                    self._marker_key(self._worker_rank(), req.token_ids),
                    "kv",
                    b"{}",
                    fingerprint=self._model,
                    tokens=len(req.token_ids),
                )
                self.stats["saved_tokens"] += len(req.token_ids)
