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

Entries come in two forms:

- **raw** (the default): blocks copied whole. A paged block's interior layout belongs to the
  attention backend (vLLM's CPU backend stores keys transposed, or AMX-packed), so a raw entry
  is only valid for the same backend, block size, KV dtype and tensor/pipeline rank; all of
  those are in the key's model fingerprint, and the layer's block shape and backend are
  checked again on load.
- **CacheGen-coded** (``kv_connector_extra_config={"codec_level": 0..3}``, or per request
  ``kv_transfer_params={"apportion_codec_level": 0..3 or None}``): each layer's
  keys and values are read out of the blocks in plain ``(kv_heads, tokens, head_dim)`` order
  and coded with :class:`~apportion_kvcache.cachegen.CacheGenCodec` at that level (the bins
  of the layer's depth, as CacheGen spreads them), so the entry is lossy and several times
  smaller. Where a token sits inside a block is learned once per layer by a probe
  (:class:`TokenLayout`): the backend's own cache write (``impl.do_kv_cache_update``) puts
  numbered tokens into a scratch block, and the entry is coded only if that write turned out
  to be a pure permutation (a quantized, fp8, cache is not: such layers stay raw). Loading
  writes the decoded tokens back through the same map.

**Compressed contexts.** A context compressed once by
:func:`apportion_kvcache.reuse.compress_context` (any host, any uniform KV policy, raw or
CacheGen-coded) keeps fewer entries than it had tokens, and vLLM gives every prompt token
one slot and reads every slot. So a request asks such a context through
:func:`apportion_kvcache.reuse.vllm_request`: its prompt begins with one placeholder token
per kept entry, then the question, and its ``kv_transfer_params`` name the context. The
connector claims the placeholder slots as external, checks the entry against this model
(:func:`apportion.host.model.fingerprint_of_folder` of vLLM's weights, and the tokenizer:
another model or tokenizer is a load error naming both), and writes the kept entries there
through the token layout, keys moved by RoPE (:func:`apportion_kvcache.kv.rope_shift`) from
where the uncompressed context ended to where vLLM's next position is, so the question sees
every kept entry at the distance it had in the original. Placeholder prefixes are never
saved as prefixes. Single rank (no tensor parallelism), plain RoPE, entries without a
validity mask.

Keys are the store's usual :func:`apportion.host.store.prefix_key` of (fingerprint, token
ids), so a Redis store shares prefixes between vLLM instances of the same configuration.

vLLM and torch are imported by this module (it subclasses ``KVConnectorBase_V1``); only vLLM
imports it, through the entry point: ``import apportion`` and the apportion plugin never do.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from apportion_kvcache.errors import CorruptKVError
from apportion_kvcache.kv import rope_shift
from apportion_kvcache.store import Store, open_store, prefix_key
from apportion_kvcache.vllm_names import (
    CODEC_PARAM,
    CONNECTOR,
    CONTEXT_PARAM,
    CONTEXT_SLOTS_PARAM,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger("apportion_kvcache.vllm")

NAME = CONNECTOR


def register() -> None:
    """``vllm.general_plugins`` entry point: make the connector known to vLLM's factory.

    vLLM calls every general plugin once in each of its processes; a second call is a no-op."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(NAME, __name__, NAME)


def aligned(n: int, block: int) -> int:
    return (max(n, 0) // block) * block


def _codec_level(value: Any) -> int | None:
    """``codec_level`` of the connector's extra config: None (raw) or a CacheGen level."""
    if value is None:
        return None
    from apportion_kvcache.cachegen.codec import CodecConfig

    n = len(CodecConfig().levels)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise ValueError(
            f"kv_connector_extra_config codec_level is {value!r}; expected null (raw blocks) "
            f"or a CacheGen level 0..{n - 1}"
        )
    return value


# ---------------------------------------------------------------------------- token layout

#: the probe writes numbers in base 64, exact in every float dtype vLLM keeps KV in
_DIGIT = 64


class TokenLayout:
    """Where each key and value element of one paged block lives, for one attention layer.

    ``index[c, h, t, d]`` is the offset inside a flattened block of component ``c`` (0 keys,
    1 values), KV head ``h``, the block's ``t``-th token and channel ``d``. Blocks are
    indexed on the paged tensor's first dimension (as the CPU backend lays them out)."""

    def __init__(self, index: torch.Tensor):
        self.index = index
        self.kv_heads, self.block_size, self.head_dim = (int(x) for x in index.shape[1:])

    @classmethod
    def probe(cls, layer: Any, paged: torch.Tensor, block_size: int) -> TokenLayout | None:
        """Learn the layout through the layer's own cache write, or ``None`` when the write is
        not a pure permutation of its input (a quantized cache) or the layer has none."""
        impl = getattr(layer, "impl", None)
        write = getattr(impl, "do_kv_cache_update", None)
        heads, dim = getattr(layer, "num_kv_heads", None), getattr(layer, "head_size", None)
        if write is None or not isinstance(heads, int) or not isinstance(dim, int):
            return None
        if paged.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return None  # a quantized (fp8) cache: what it stores is not its input
        n = 2 * heads * block_size * dim
        plain = torch.arange(n, dtype=torch.long)
        slots = torch.arange(block_size, dtype=torch.long, device=paged.device)
        offset: torch.Tensor | None = None
        written: torch.Tensor | None = None
        digits, scale = 0, 1
        while scale < n or digits == 0:
            digit = (plain // scale) % _DIGIT
            # the write takes (tokens, kv_heads, head_dim) keys and values
            x = digit.view(2, heads, block_size, dim).permute(0, 2, 1, 3).to(paged.dtype)
            scratch = torch.full(
                (1, *paged.shape[1:]), -1.0, dtype=paged.dtype, device=paged.device
            )
            try:
                write(
                    layer,
                    x[0].contiguous().to(paged.device),
                    x[1].contiguous().to(paged.device),
                    scratch,
                    slots,
                )
            except Exception as exc:  # an op this backend lacks on this platform
                log.info("apportion store: no token layout for %s (%s)", type(impl).__name__, exc)
                return None
            got = scratch.reshape(-1).to("cpu", torch.float64)
            hit = got >= 0
            if written is None:
                written, offset = hit, torch.zeros(got.numel(), dtype=torch.long)
            elif not torch.equal(hit, written):
                return None
            assert offset is not None
            offset += got.clamp(min=0).round().long() * scale
            digits, scale = digits + 1, scale * _DIGIT
        assert offset is not None and written is not None
        where = written.nonzero().squeeze(1)
        if where.numel() != n:
            return None
        index = torch.full((n,), -1, dtype=torch.long)
        values = offset[where]
        if int(values.min()) < 0 or int(values.max()) >= n:
            return None
        index[values] = where
        if bool((index < 0).any()):
            return None  # two inputs landed on one element: not a permutation
        return cls(index.view(2, heads, block_size, dim))

    def read(self, paged: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
        """The blocks' keys and values in plain order: ``(2, kv_heads, tokens, head_dim)``."""
        src = torch.tensor(block_ids, dtype=torch.long, device=paged.device)
        flat = paged[src].reshape(len(block_ids), -1).to("cpu")
        x = flat[:, self.index.reshape(-1)].view(
            len(block_ids), 2, self.kv_heads, self.block_size, self.head_dim
        )
        return x.permute(1, 2, 0, 3, 4).reshape(
            2, self.kv_heads, len(block_ids) * self.block_size, self.head_dim
        )

    def write(self, paged: torch.Tensor, block_ids: list[int], kv: torch.Tensor) -> None:
        """Write ``(2, kv_heads, tokens, head_dim)`` into the blocks (one block per
        ``block_size`` tokens); elements the layout does not use are left as they are."""
        nb = len(block_ids)
        x = kv.reshape(2, self.kv_heads, nb, self.block_size, self.head_dim)
        x = x.permute(2, 0, 1, 3, 4).reshape(nb, -1)
        dst = torch.tensor(block_ids, dtype=torch.long, device=paged.device)
        flat = paged[dst].reshape(nb, -1).clone()
        flat[:, self.index.reshape(-1).to(paged.device)] = x.to(paged.device, paged.dtype)
        paged[dst] = flat.view(nb, *paged.shape[1:])

    def write_tokens(
        self, paged: torch.Tensor, block_ids: list[int], kv: torch.Tensor, start: int = 0
    ) -> None:
        """Write ``(2, kv_heads, tokens, head_dim)`` as the tokens ``start, start + 1, ...`` of
        the sequence held by ``block_ids``; a partly written block keeps its other tokens."""
        if kv.shape[2] == 0:
            return
        bs = self.block_size
        first, stop = start // bs, -(-(start + kv.shape[2]) // bs)
        ids = block_ids[first:stop]
        cur = self.read(paged, ids)
        at = start - first * bs
        cur[:, :, at : at + kv.shape[2]] = kv.to(cur.dtype)
        self.write(paged, ids, cur)


def _layer_index(name: str) -> int:
    """The decoder layer a vLLM attention layer belongs to (``model.layers.12.self_attn.attn``)."""
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else 0


# ---------------------------------------------------------------------------- metadata


@dataclass
class ReqMeta:
    """One transfer in one step: the prefix ``token_ids`` (a whole number of blocks, but for a
    compressed context) and the vLLM block ids that hold it. For a load, ``skip_blocks``
    leading blocks are already valid in vLLM's own prefix cache and are not written."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    is_store: bool
    skip_blocks: int = 0
    #: for a compressed context: its handle (``token_ids`` are then its placeholder slots)
    context: str | None = None
    #: for a save: the CacheGen level to code it at (None: raw blocks)
    codec_level: int | None = None


@dataclass
class StoreConnectorMetadata(KVConnectorMetadata):
    requests: list[ReqMeta] = field(default_factory=list)


@dataclass
class _PendingSave:
    token_ids: list[int]  # the block-aligned prefix to save
    block_ids: list[int]  # the request's blocks so far (grows as prefill proceeds)
    codec_level: int | None = None


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
        #: CacheGen level of saved entries, or None for raw blocks
        self._codec_level = _codec_level(extra.get("codec_level"))
        self._n_layers = int(vllm_config.model_config.hf_config.num_hidden_layers)
        self._layouts: dict[str, TokenLayout | None] = {}
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
        self._load_plan: dict[str, tuple[int, list[int], str | None]] = {}
        #: req id -> compressed-context handle, for requests that asked for one
        self._context_reqs: dict[str, str] = {}
        #: req id -> the CacheGen level (None: raw) a request asked its prefix saved at
        self._req_codec: dict[str, int | None] = {}
        #: handle -> its kept entries (the slots it fills), as the store said
        self._context_slots: dict[str, int] = {}
        self._model_path = str(mc.model)
        self._tokenizer_path = str(mc.tokenizer or mc.model)
        self._hf_config = mc.hf_config
        #: (model fingerprint, tokenizer fingerprint) of this vLLM model, computed on first use
        self._identity: tuple[str, str] | None = None
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
            #: payload bytes written, and what the same blocks take raw
            "saved_bytes": 0,
            "raw_bytes": 0,
            "coded_entries": 0,
            "context_loads": 0,
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
        params = getattr(request, "kv_transfer_params", None) or {}
        if isinstance(params, dict) and CODEC_PARAM in params:
            try:
                self._req_codec[request.request_id] = _codec_level(params[CODEC_PARAM])
            except ValueError as exc:
                log.error("apportion store: request %s: %s", request.request_id, exc)
        handle = params.get(CONTEXT_PARAM) if isinstance(params, dict) else None
        if handle is not None:
            slots = self._context_request(request, str(handle), params)
            return (max(0, slots - num_computed_tokens), False)
        hit = self._probe(list(request.prompt_token_ids or []), at_least=num_computed_tokens)
        return (max(0, hit - num_computed_tokens), False)

    def _context_request(self, request: Any, handle: str, params: dict[str, Any]) -> int:
        """The slots a compressed-context request's prompt begins with. They are always
        claimed as external, so a context that cannot be loaded fails the load (and the
        request, under ``kv_load_failure_policy="fail"``) instead of being computed from its
        placeholder tokens."""
        from apportion.errors import ApportionError

        from apportion_kvcache.reuse import read_entry

        self._context_reqs[request.request_id] = handle
        if handle not in self._context_slots:
            try:
                self._context_slots[handle] = int(read_entry(self._store, handle)[1]["kept_tokens"])
            except ApportionError as exc:
                log.error("apportion store: compressed context %r: %s", handle, exc)
                claimed = params.get(CONTEXT_SLOTS_PARAM)
                return int(claimed) if isinstance(claimed, int) and claimed > 0 else 0
        slots = self._context_slots[handle]
        n = len(request.prompt_token_ids or [])
        if slots >= n:
            log.error(
                "apportion store: request %s has %d prompt tokens; compressed context %r fills "
                "%d slots and needs at least one token after them",
                request.request_id,
                n,
                handle,
                slots,
            )
            return 0
        return slots

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            # the request's computed tokens, as the step's scheduler output will carry them, are
            # local prefix-cache hits + these external ones: the load covers the latter
            self._load_plan[request.request_id] = (
                num_external_tokens,
                list(request.prompt_token_ids or []),
                self._context_reqs.get(request.request_id),
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
                hit = req.num_computed_tokens  # local (block-aligned) + external
                meta.requests.append(
                    ReqMeta(
                        req.req_id,
                        ids[:hit],
                        block_ids[: -(-hit // bs)],
                        is_store=False,
                        skip_blocks=(hit - plan[0]) // bs,
                        context=plan[2],
                    )
                )
            if req.req_id in self._context_reqs:
                continue  # placeholder slots: never saved as a prefix of those tokens
            n = aligned(len(ids) - 1, bs)
            if n > hit and not (plan is None and self._complete(ids[:n])):
                level = self._req_codec.get(req.req_id, self._codec_level)
                self._pending[req.req_id] = _PendingSave(ids[:n], block_ids, level)
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
                            block_ids[: -(-hit // bs)],
                            is_store=False,
                            skip_blocks=(hit - plan[0]) // bs,
                            context=plan[2],
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
                    codec_level=pending.codec_level,
                )
            )
            del self._pending[req_id]

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._pending.pop(request.request_id, None)
        self._load_plan.pop(request.request_id, None)
        self._context_reqs.pop(request.request_id, None)
        self._req_codec.pop(request.request_id, None)
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

    def _token_layout(self, name: str, layer: Any, paged: torch.Tensor) -> TokenLayout | None:
        if name not in self._layouts:
            self._layouts[name] = TokenLayout.probe(layer, paged, self._block_size)
            if self._layouts[name] is None:
                log.info("apportion store: layer %s has no token layout (saved raw)", name)
        return self._layouts[name]

    def _codec(self, layer_name: str, level: int) -> Any:
        """The CacheGen codec of a layer: the bins of its depth at ``level``."""
        from apportion_kvcache.cachegen.codec import CacheGenCodec, CodecConfig, layer_bins

        levels = CodecConfig().levels[level]
        bins = layer_bins(levels, self._n_layers)
        i = min(_layer_index(layer_name), len(bins) - 1)
        return CacheGenCodec(CodecConfig(levels=[[bins[i]]]))

    def _read_entry(
        self, entry: Any, name: str, layer: Any, paged: torch.Tensor, n_blocks: int
    ) -> tuple[torch.Tensor, TokenLayout | None]:
        """(raw blocks, None) or (plain (2, heads, tokens, dim) KV, its layout) of an entry;
        :class:`CorruptKVError` when it cannot be used for this layer."""
        from safetensors.torch import load

        if entry.kind == "cachegen":
            from apportion_kvcache.cachegen.codec import CacheGenCodec

            layout = self._token_layout(name, layer, paged)
            if layout is None:
                raise CorruptKVError(
                    f"store entry of layer {name} is coded; the layer has no token layout"
                )
            try:
                k, v = CacheGenCodec().decode(entry.payload, fingerprint=self._model)[0]
            except (CorruptKVError, ValueError) as exc:
                raise CorruptKVError(f"store entry of layer {name}: {exc}") from None
            want = (1, layout.kv_heads, n_blocks * self._block_size, layout.head_dim)
            if tuple(k.shape) != want:
                raise CorruptKVError(
                    f"store entry of layer {name} holds KV of shape {tuple(k.shape)}, "
                    f"the prefix needs {want}"
                )
            return torch.stack([k[0], v[0]]), layout
        if entry.manifest.get("meta", {}).get("layout") != self._layout(layer, paged):
            raise CorruptKVError(
                f"store entry of layer {name} has layout "
                f"{entry.manifest.get('meta', {}).get('layout')}, the layer "
                f"{self._layout(layer, paged)}"
            )
        try:
            blocks = load(entry.payload)["blocks"]
        except Exception as exc:
            raise CorruptKVError(f"store entry of layer {name} is unreadable ({exc})") from None
        if blocks.shape[0] != n_blocks:
            raise CorruptKVError(
                f"store entry of layer {name} holds {blocks.shape[0]} blocks, "
                f"the prefix needs {n_blocks}"
            )
        return blocks, None

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, StoreConnectorMetadata)
        rank = self._worker_rank()
        for req in meta.requests:
            if req.is_store or len(req.block_ids) <= req.skip_blocks:
                continue
            if req.context is not None:
                self._load_context(req, forward_context)
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
                    got, layout = self._read_entry(entry, name, layer, paged, len(req.block_ids))
                    k = req.skip_blocks
                    if layout is None:
                        paged[dst[k:].to(paged.device)] = got[k:].to(paged.device, paged.dtype)
                    else:
                        bs = self._block_size
                        layout.write(paged, req.block_ids[k:], got[:, :, k * bs :])
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

    def _load_context(self, req: ReqMeta, forward_context: Any) -> None:
        """Write a compressed context's kept entries into the request's first slots, keys
        re-rotated so that the prompt's later tokens see them at the distances they had."""
        from apportion.errors import ApportionError

        assert req.context is not None
        start = req.skip_blocks * self._block_size
        try:
            kv, context_tokens = self._context_kv(req.context, len(req.token_ids))
            shift = len(req.token_ids) - context_tokens  # where vLLM puts the next token
            for name, layer in forward_context.no_compile_layers.items():
                paged = self._paged(layer)
                if paged is None:
                    continue
                i = _layer_index(name)
                if not 0 <= i < len(kv):
                    raise CorruptKVError(f"compressed context has no layer {i} for {name}")
                layout = self._token_layout(name, layer, paged)
                if layout is None:
                    raise CorruptKVError(f"layer {name} has no token layout to write into")
                k, v = kv[i]
                if (k.shape[1], k.shape[3]) != (layout.kv_heads, layout.head_dim):
                    raise CorruptKVError(
                        f"compressed context has {k.shape[1]} KV heads of {k.shape[3]} "
                        f"channels; layer {name} has {layout.kv_heads} of {layout.head_dim} "
                        "(another model, or tensor parallelism, which this path does not split)"
                    )
                x = torch.stack([rope_shift(k[0], shift, self._hf_config), v[0]])
                layout.write_tokens(paged, req.block_ids, x[:, :, start:], start)
                self.stats["loaded_entries"] += 1
        except (ApportionError, ValueError) as exc:
            log.warning(
                "apportion store: cannot load compressed context %r into request %s: %s",
                req.context,
                req.req_id,
                exc,
            )
            self._failed_blocks.update(req.block_ids[req.skip_blocks :])
            self.stats["load_errors"] += 1
            return
        self.stats["loaded_tokens"] += len(req.token_ids) - start
        self.stats["context_loads"] += 1

    def _context_kv(self, handle: str, slots: int) -> tuple[list[Any], int]:
        """A compressed context's per-layer (keys, values) and uncompressed length, checked
        against this vLLM model (weights and tokenizer) and the slots the request gave it."""
        from apportion_kvcache.reuse import load_context

        fp, tok_fp = self._model_identity()
        stored = load_context(
            None,
            handle,
            store=self._store,
            fingerprint=fp,
            tokenizer_fingerprint=tok_fp,
        )
        if stored.kv_mask is not None:
            raise CorruptKVError(
                "it keeps a validity mask over its entries, which vLLM's attention cannot apply"
            )
        if stored.meta["kept_tokens"] != slots:
            raise CorruptKVError(
                f"it holds {stored.meta['kept_tokens']} entries; the request gave it {slots} slots"
            )
        return stored.kv, int(stored.context_tokens)

    def _model_identity(self) -> tuple[str, str]:
        if self._identity is None:
            from apportion.host.model import fingerprint_of_folder
            from transformers import AutoTokenizer

            from apportion_kvcache.reuse import tokenizer_fingerprint

            self._identity = (
                fingerprint_of_folder(self._model_path),
                tokenizer_fingerprint(AutoTokenizer.from_pretrained(self._tokenizer_path)),
            )
        return self._identity

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
            meta = {
                "layer": layer_name,
                "layout": self._layout(layer, kv_layer),
                "block_size": self._block_size,
            }
            level = req.codec_level
            layout = None
            if level is not None and layer is not None:
                layout = self._token_layout(layer_name, layer, kv_layer)
            if layout is not None and level is not None:
                x = layout.read(kv_layer, req.block_ids)
                payload = self._codec(layer_name, level).encode(
                    [(x[0][None], x[1][None])],
                    fingerprint=self._model,
                    meta=meta | {"codec_level": level},
                )
                kind = "cachegen"
                self.stats["coded_entries"] += 1
            else:
                payload, kind = save({"blocks": blocks}), "kv"
            self._store.put(
                self._layer_key(rank, layer_name, req.token_ids),
                kind,
                payload,
                fingerprint=self._model,
                tokens=len(req.token_ids),
                meta=meta,
            )
            self.stats["saved_entries"] += 1
            self.stats["saved_bytes"] += len(payload)
            self.stats["raw_bytes"] += blocks.numel() * blocks.element_size()

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
