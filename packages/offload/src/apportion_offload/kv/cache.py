"""The offloaded KV cache: a transformers ``Cache`` whose layers beyond a resident budget
live in an allocator's tier, fetched ahead of use and written back after.

:class:`OffloadedKVCache` is a :class:`transformers.DynamicCache` whose full-attention
layers are :class:`OffloadedLayer`. It works under the host (``apportion run`` with an
allocator that has ``resident_kv_bytes``) and under plain ``model.generate``::

    cache = allocator.kv_cache(model, DynamicCache(config=model.config))
    with cache:
        model.generate(**inputs, past_key_values=cache)

**Placement.** A layer is *pinned* (stays resident, grows as a ``DynamicLayer`` does) while
the pinned layers, plus the room the offloaded layers stream through (the largest layer and
both slots' headroom), fit ``resident_kv_bytes``; it is decided once the layer's entries are
final for the first time (after the KV policy evicted: eviction first, then offload of what
was kept), in layer order, so the first layers are pinned and the rest offloaded. When the
layers grow (the decode, a prompt read in chunks), pinned layers that no longer fit beside
that room are moved to the tier, the last one first.

**Streaming.** Offloaded layers pass through two resident *slots*: while layer ``i``
computes in one, a copy thread (on CUDA: the same thread on a side stream) writes back the
entries layer ``i - 1`` added and then fetches the next offloaded layer into the other
(circling to the first offloaded layer at the end of a forward, so the next step finds it
ready). During the prefill, a layer that is done (the model moved on to another layer, or
the policy handed it over) is written to the tier whole while the next one computes, at
most one such write in flight.

**Budget.** The resident KV (pinned layers, slots, a prefill layer being written) stays
within ``resident_kv_bytes`` plus one layer: the slots hold at most one layer more than
the budget leaves them. A budget smaller than one layer is refused with a
:class:`~apportion.errors.ConfigError` naming the minimum.

**Faults.** A tier that fails (a swap file missing, corrupted, or a full disk) raises a
:class:`~apportion_offload.errors.KVOffloadError` naming the layer and the file in the
forward that needs the layer (a failed write-back in the next one): generation stops, no
answer is made from partial KV.

Reading ``keys``/``values`` of an offloaded layer that is not resident (code outside the
forward, ``DynamicCache.__iter__``) reads it back as a copy; nothing stays resident. The
host and :func:`apportion.host.kv.cache_nbytes` use :meth:`OffloadedKVCache.kv_nbytes` and
:meth:`OffloadedKVCache.resident_kv_bytes` instead, which read nothing back.
"""

from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from apportion.errors import ConfigError
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from apportion_offload.errors import KVOffloadError

SLOT_HEADROOM = 16  # tokens a slot holds beyond the layer it was filled with


def _nbytes(*tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class _Slot:
    """A resident buffer pair an offloaded layer is fetched into."""

    __slots__ = ("k", "v", "owner")

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.owner: OffloadedLayer | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else int(self.k.shape[-2])

    def nbytes(self) -> int:
        return _nbytes(self.k, self.v)


class OffloadedLayer(DynamicLayer):
    """One full-attention layer of an :class:`OffloadedKVCache` (see the module docstring).

    ``pinned``: ``None`` until placed, then ``True`` (resident) or ``False`` (in the tier).
    """

    # class-level defaults: CacheLayerMixin.__init__ assigns keys/values (through the
    # properties) before __init__ below has run
    _cache: Any = None
    _k: torch.Tensor | None = None
    _v: torch.Tensor | None = None
    _n = 0
    _stored = 0  # tokens the tier holds up to date (-1: the tier's copy is stale)
    _tok = 0  # bytes of one token (keys and values, every row and KV head)
    _slot: _Slot | None = None
    _fetch: Future | None = None
    _shape: tuple[int, int, int] | None = None
    pinned: bool | None = None

    def __init__(self, cache: OffloadedKVCache, idx: int):
        super().__init__()
        self._cache, self.idx = cache, idx

    @property
    def offloaded(self) -> bool:
        """Whether the layer lives in the tier (its length is known without reading it)."""
        return self.pinned is False

    # ------------------------------------------------------------------ keys / values
    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._read("k")

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k = value

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._read("v")

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = value
        if self._cache is not None:
            self._cache._assigned(self)

    def _read(self, which: str) -> torch.Tensor | None:
        if self._fetch is not None:
            self._cache._resident(self)
        own = self._k if which == "k" else self._v
        if own is not None or not self._n or self._cache is None:
            return own
        k, v = self._cache._read_back(self)
        return k if which == "k" else v

    # ------------------------------------------------------------------ DynamicLayer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._cache._update(self, key_states, value_states)

    def get_seq_length(self) -> int:
        return int(self._n)

    def reset(self) -> None:
        if self._cache is not None:
            self._cache._forget(self)
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove:
            self._cache._rewrite(
                self, lambda t: t[..., : max(self._n - abs(tokens_to_remove), 0), :]
            )

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._cache._rewrite(self, lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._cache._rewrite(self, lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._cache._rewrite(self, lambda t: t.index_select(0, beam_idx.to(t.device)))


class OffloadedKVCache(DynamicCache):
    """A ``DynamicCache`` that keeps at most ``resident_kv_bytes`` of KV (plus one layer) on
    the model's device and the rest in ``tier`` (see the module docstring).

    ``model_config``: the model's config (its layer types); ``tier``: a
    :mod:`~apportion_offload.kv.tiers` tier; ``prefetch``: fetch the next offloaded layer
    while the current one computes (off: fetch each when it is needed). Close it (or use it
    as a context manager) to give the tier's memory and files back.
    """

    def __init__(
        self,
        model_config: Any,
        tier: Any,
        resident_kv_bytes: int,
        *,
        prefetch: bool = True,
        name: str = "offload",
    ):
        super().__init__(config=model_config)
        if not self.layers:
            raise ConfigError(
                f"{name}: the model's config names no layers; the KV cache cannot be offloaded"
            )
        self.layers = [
            OffloadedLayer(self, i) if type(layer) is DynamicLayer else layer
            for i, layer in enumerate(self.layers)
        ]
        self.tier, self.budget, self.prefetch, self.name = (
            tier,
            int(resident_kv_bytes),
            bool(prefetch),
            name,
        )
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="apportion-kv-copy")
        self._stream: Any = None  # the side stream of a CUDA device
        self._jobs: list[Future] = []
        self._detached_job: Future | None = None
        self._slots: list[_Slot] = []
        self._current: int | None = None
        self._inflight = 0  # bytes of prefill layers being written to the tier
        self._pinned_bytes = 0
        self._max_layer = 0
        self._peak = 0
        self._lock = threading.Lock()
        self._closed = False
        self.counters: dict[str, float] = {
            "fetches": 0,
            "prefetch_hits": 0,
            "demand_fetches": 0,
            "fetch_wait_seconds": 0.0,
            "copy_seconds": 0.0,
            "writebacks": 0,
            "bytes_fetched": 0,
            "bytes_written": 0,
            "demoted": 0,
            "read_backs": 0,
        }
        self._finalizer = weakref.finalize(self, _shutdown, self._copier, tier)

    # ------------------------------------------------------------------ measuring
    def kv_nbytes(self) -> int:
        """Bytes of every layer's KV, resident or in the tier (reads nothing back)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, OffloadedLayer):
                total += layer._n * layer._tok
            else:
                total += _nbytes(getattr(layer, "keys", None), getattr(layer, "values", None))
        return total

    def resident_kv_bytes(self) -> int:
        """Bytes of KV on the model's device now: pinned layers, the slots, prefill layers
        still resident or being written."""
        total = self._inflight + sum(s.nbytes() for s in self._slots)
        for layer in self.layers:
            if isinstance(layer, OffloadedLayer):
                if layer._slot is None:
                    total += _nbytes(layer._k, layer._v)
            else:
                total += _nbytes(getattr(layer, "keys", None), getattr(layer, "values", None))
        return total

    def peak_resident_kv_bytes(self) -> int:
        """The most :meth:`resident_kv_bytes` was when the cache took memory between the
        layers' attention (a slot filled, a prefill layer set off to the tier); the host
        measures after every attention layer besides."""
        return max(self._peak, self.resident_kv_bytes())

    def placement(self) -> dict[str, Any]:
        """Which layers are pinned, which in the tier, and the copy counters."""
        off = [i for i, x in enumerate(self.layers) if getattr(x, "pinned", None) is False]
        pinned = [i for i, x in enumerate(self.layers) if getattr(x, "pinned", None) is True]
        out: dict[str, Any] = {
            "budget_bytes": self.budget,
            "pinned_layers": pinned,
            "offloaded_layers": off,
            "tier": getattr(self.tier, "name", type(self.tier).__name__),
            "tier_bytes": self.tier.nbytes(),
            "peak_resident_kv_bytes": self.peak_resident_kv_bytes(),
            **self.counters,
        }
        spilled = getattr(self.tier, "spilled", None)
        if spilled is not None:
            out["spilled_layers"] = sorted(spilled)
        return out

    def _note(self) -> None:
        resident = self.resident_kv_bytes()
        if resident > self._peak:
            self._peak = resident

    # ------------------------------------------------------------------ the copy thread
    def _submit(self, fn: Any, *args: Any) -> Future:
        if self._closed:
            raise RuntimeError(f"{self.name}: the offloaded KV cache is closed")
        mode = torch.is_inference_mode_enabled()
        ready = None
        if self._stream is not None:  # the copy waits for what the compute stream queued
            ready = torch.cuda.Event()
            ready.record()

        def job() -> Any:
            t0 = time.perf_counter()
            try:
                with torch.inference_mode(mode):
                    if self._stream is None:
                        return fn(*args)
                    with torch.cuda.stream(self._stream):
                        self._stream.wait_event(ready)
                        out = fn(*args)
                        self._stream.synchronize()
                        return out
            finally:
                self.counters["copy_seconds"] += time.perf_counter() - t0

        return self._copier.submit(job)

    def _check_jobs(self) -> None:
        """Raise the error of a write-back that failed; forget the finished ones."""
        keep = []
        for fut in self._jobs:
            if fut.done():
                exc = fut.exception()
                if exc is not None:
                    self._jobs = []
                    raise exc
            else:
                keep.append(fut)
        self._jobs = keep

    def _drain(self) -> None:
        for fut in list(self._jobs):
            fut.result()
        self._jobs = []

    # ------------------------------------------------------------------ the forward
    def _update(
        self, layer: OffloadedLayer, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stream is None and keys.is_cuda:
            self._stream = torch.cuda.Stream(device=keys.device)
        self._touch(layer.idx)
        m = keys.shape[-2]
        if not layer._n:  # the layer's first entries (a prefill)
            layer._tok = _nbytes(keys, values) // max(m, 1)
            layer._shape = (int(keys.shape[0]), int(keys.shape[1]), int(keys.shape[-1]))
            layer._k, layer._v, layer._n, layer._stored = keys, values, m, 0
        elif layer._slot is not None:  # an offloaded layer, in its slot
            slot, n = layer._slot, layer._n
            if slot.capacity < n + m:
                self._grow(slot, n + m)
            slot.k[:, :, n : n + m].copy_(keys)
            slot.v[:, :, n : n + m].copy_(values)
            layer._n = n + m
            layer._k, layer._v = slot.k[:, :, : n + m], slot.v[:, :, : n + m]
        else:  # pinned, not yet placed, or handed over by a policy: grow as DynamicLayer
            before = _nbytes(layer._k, layer._v)
            layer._k = torch.cat([layer._k, keys], dim=-2)
            layer._v = torch.cat([layer._v, values], dim=-2)
            layer._n += m
            if layer.pinned:
                self._pinned_bytes += _nbytes(layer._k, layer._v) - before
                self._rebalance()
        if layer.pinned is not None and layer._n * layer._tok > self._max_layer:
            # a placed layer outgrew the room the slots were given (a later prefill chunk,
            # the decode): the slots now stream layers this large, so pinned layers make room
            self._max_layer = layer._n * layer._tok
            self._rebalance()
        self._check_one_layer(layer)
        return layer._k, layer._v  # the host measures right after the layer's attention

    def _assigned(self, layer: OffloadedLayer) -> None:
        """A policy (or transformers) set the layer's keys and values from outside: they
        replace what the layer held, in its slot or in the tier."""
        k, v = layer._k, layer._v
        if layer._fetch is not None:
            layer._fetch.result()
            layer._fetch = None
        if layer._slot is not None:
            slot = layer._slot
            if k is not None and _is_view_of(k, slot.k):
                k = layer._k = k.clone()
            if v is not None and _is_view_of(v, slot.v):
                v = layer._v = v.clone()
            slot.owner, layer._slot = None, None
        if k is None or v is None or k.dim() != 4 or k.shape[-2] == 0:
            layer._k = layer._v = None
            layer._n = layer._stored = 0
            self._recount_pinned()
            return
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        layer._shape = (int(k.shape[0]), int(k.shape[1]), int(k.shape[-1]))
        layer._tok = _nbytes(k, v) // max(k.shape[-2], 1)
        layer._n, layer._stored = int(k.shape[-2]), -1
        self._recount_pinned()
        self._touch(layer.idx)
        self._check_one_layer(layer)
        self._note()

    def _touch(self, idx: int) -> None:
        """Layer ``idx`` is about to be used: the one used before it is retired (written
        back, or placed), ``idx`` is made resident, and the next offloaded layer fetched."""
        self._check_jobs()
        prev, self._current = self._current, idx
        if prev is not None and prev != idx:
            self._retire(self.layers[prev])
        layer = self.layers[idx]
        if isinstance(layer, OffloadedLayer) and layer._n and layer._k is None:
            self._resident(layer)
        if self.prefetch:
            self._prefetch_after(idx)

    def _retire(self, layer: Any) -> None:
        if not isinstance(layer, OffloadedLayer) or not layer._n:
            return
        if layer.pinned is None:
            self._place(layer)
        if layer.pinned:
            return
        self._write_back(layer)

    def _place(self, layer: OffloadedLayer) -> None:
        nbytes = layer._n * layer._tok
        self._max_layer = max(self._max_layer, nbytes)
        self._check_one_layer(layer)
        if self._pinned_bytes + nbytes + self._stream_room() <= self.budget:
            layer.pinned = True
            self._pinned_bytes += _nbytes(layer._k, layer._v)
        else:
            layer.pinned = False

    def _headroom(self) -> int:
        """Tokens a slot holds beyond its layer: up to SLOT_HEADROOM, fewer when the budget
        is tight, so that the slots stay within the budget plus one layer."""
        tok = max((x._tok for x in self.layers if isinstance(x, OffloadedLayer)), default=0)
        if not tok:
            return SLOT_HEADROOM
        spare = (self.budget - self._max_layer) // (2 * tok)
        return int(max(1, min(SLOT_HEADROOM, spare)))

    def _stream_room(self) -> int:
        """Budget the offloaded layers stream through beyond the one layer allowed over it:
        one layer, and both slots' headroom."""
        tok = max((x._tok for x in self.layers if isinstance(x, OffloadedLayer)), default=0)
        return self._max_layer + 2 * self._headroom() * tok

    def _check_one_layer(self, layer: OffloadedLayer) -> None:
        nbytes = layer._n * layer._tok
        if nbytes > self.budget:
            raise ConfigError(
                f"{self.name}: resident_kv_bytes={self.budget} is smaller than one layer's "
                f"KV (layer {layer.idx} holds {layer._n} tokens, {nbytes} bytes): the layer "
                f"being computed is always resident; the minimum is {nbytes}",
                [("resident_kv_bytes", str(self.budget))],
            )

    def _recount_pinned(self) -> None:
        self._pinned_bytes = sum(
            _nbytes(x._k, x._v)
            for x in self.layers
            if isinstance(x, OffloadedLayer) and x.pinned and x._slot is None
        )

    def _rebalance(self) -> None:
        """Move pinned layers to the tier, the last first, while they crowd the budget."""
        while self._pinned_bytes + self._stream_room() > self.budget:
            pinned = [x for x in self.layers if isinstance(x, OffloadedLayer) and x.pinned]
            if not pinned:
                return
            victim = pinned[-1]
            victim.pinned = False
            self._pinned_bytes -= _nbytes(victim._k, victim._v)
            victim._stored = 0
            self.counters["demoted"] += 1
            if victim.idx != self._current:
                self._write_back(victim)

    def _write_back(self, layer: OffloadedLayer) -> None:
        """Queue the entries the tier lacks; a layer outside a slot then leaves the device."""
        start = max(layer._stored, 0)
        detached = layer._slot is None
        if start >= layer._n and not (detached and layer._k is not None):
            return
        k, v = layer._k, layer._v
        if k is None:
            return
        nbytes = _nbytes(k, v) if detached else 0
        if detached:  # at most one prefill layer in flight to the tier
            if self._detached_job is not None:
                self._detached_job.result()
            with self._lock:
                self._inflight += nbytes
            layer._k = layer._v = None
            self._note()
        if start < layer._n:
            fut = self._submit(
                self._store_job, layer, k[:, :, start:], v[:, :, start:], start, nbytes
            )
        else:
            fut = self._submit(self._landed, nbytes)
        del k, v  # the job holds the only references: the memory goes when it lands
        if nbytes:
            self._detached_job = fut
        layer._stored = layer._n
        self._jobs.append(fut)
        self.counters["writebacks"] += 1

    def _landed(self, nbytes: int) -> None:
        with self._lock:
            self._inflight -= nbytes

    def _store_job(
        self, layer: OffloadedLayer, k: Any, v: Any, start: int, detached: int = 0
    ) -> None:
        try:
            self.tier.store(layer.idx, k, v, start)
            self.counters["bytes_written"] += _nbytes(k, v)
        except KVOffloadError:
            raise
        except Exception as exc:
            raise KVOffloadError(
                f"layer {layer.idx}: writing its KV to the {self.tier.where(layer.idx)} "
                f"failed ({type(exc).__name__}: {exc})",
                layer=layer.idx,
            ) from exc
        finally:
            if detached:
                self._landed(detached)

    # ------------------------------------------------------------------ fetching
    def _next_offloaded(self, idx: int) -> OffloadedLayer | None:
        n = len(self.layers)
        for step in range(1, n + 1):
            x = self.layers[(idx + step) % n]
            if not isinstance(x, OffloadedLayer):
                continue
            if x.pinned is False and x._n:
                return x
            if x.pinned is None and idx + step < n:
                return None  # a prefill in progress: the next forward's layers can wait
        return None

    def _prefetch_after(self, idx: int) -> None:
        target = self._next_offloaded(idx)
        if target is None or target.idx == idx or target._k is not None or target._fetch:
            return
        slot = self._free_slot()
        if slot is not None:
            self._fetch_into(target, slot)

    def _free_slot(self) -> _Slot | None:
        """A slot the current layer does not hold (a new one while there are fewer than
        two; a prefill layer still on its way to the tier lands first)."""
        current = self.layers[self._current] if self._current is not None else None
        for slot in self._slots:
            if slot.owner is None:
                return slot
        if len(self._slots) < 2:
            if self._detached_job is not None:
                self._detached_job.result()
            self._slots.append(_Slot())
            return self._slots[-1]
        for slot in self._slots:
            if slot.owner is not current:
                self._release(slot)
                return slot
        return None

    def _release(self, slot: _Slot) -> None:
        owner = slot.owner
        if owner is None:
            return
        if owner._fetch is not None:
            owner._fetch.result()
            owner._fetch = None
        if owner._stored < owner._n:
            self._write_back(owner)
        owner._k = owner._v = None
        owner._slot = None
        slot.owner = None

    def _fetch_into(self, layer: OffloadedLayer, slot: _Slot) -> None:
        b, h, d = _shape_of(layer)
        need = layer._n + 1
        if (
            slot.k is None
            or slot.capacity < need
            or tuple(slot.k.shape[:2]) != (b, h)
            or slot.k.shape[-1] != d
            or slot.k.dtype != layer.dtype
            or slot.k.device != layer.device
        ):
            self._drain()  # no queued copy may still read the old buffers
            slot.k = slot.v = None
            cap = max(layer._n + self._headroom(), need)
            slot.k = torch.empty((b, h, cap, d), dtype=layer.dtype, device=layer.device)
            slot.v = torch.empty_like(slot.k)
        slot.owner, layer._slot = layer, slot
        layer._fetch = self._submit(self._load_job, layer, slot.k, slot.v, layer._n)
        self.counters["fetches"] += 1
        self._note()

    def _load_job(self, layer: OffloadedLayer, k: Any, v: Any, n: int) -> None:
        try:
            got = self.tier.load(layer.idx, k, v)
        except KVOffloadError:
            raise
        except Exception as exc:
            raise KVOffloadError(
                f"layer {layer.idx}: reading its KV back from the "
                f"{self.tier.where(layer.idx)} failed ({type(exc).__name__}: {exc})",
                layer=layer.idx,
            ) from exc
        if got != n:
            raise KVOffloadError(
                f"layer {layer.idx}: the {self.tier.where(layer.idx)} returned {got} tokens, "
                f"{n} were stored",
                layer=layer.idx,
            )
        self.counters["bytes_fetched"] += n * layer._tok

    def _resident(self, layer: OffloadedLayer) -> None:
        """Make an offloaded layer resident: wait for its prefetch, or fetch it now."""
        if layer._fetch is None:
            if layer._k is not None:
                return
            slot = self._free_slot()
            if slot is None:  # both slots busy with layers in use: take the other one
                slot = next(s for s in self._slots if s.owner is not layer)
                self._release(slot)
            self._fetch_into(layer, slot)
            self.counters["demand_fetches"] += 1
        else:
            self.counters["prefetch_hits"] += 1
        t0 = time.perf_counter()
        fut, layer._fetch = layer._fetch, None
        try:
            fut.result()
        except BaseException:
            if layer._slot is not None:
                layer._slot.owner, layer._slot = None, None
            raise
        self.counters["fetch_wait_seconds"] += time.perf_counter() - t0
        slot, n = layer._slot, layer._n
        layer._k, layer._v = slot.k[:, :, :n], slot.v[:, :, :n]

    def _grow(self, slot: _Slot, need: int) -> None:
        cap = need + self._headroom()
        k = slot.k.new_empty((*slot.k.shape[:2], cap, slot.k.shape[-1]))
        v = torch.empty_like(k)
        n = slot.owner._n if slot.owner is not None else 0
        k[:, :, :n].copy_(slot.k[:, :, :n])
        v[:, :, :n].copy_(slot.v[:, :, :n])
        slot.k, slot.v = k, v

    def _read_back(self, layer: OffloadedLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of a layer in the tier (for readers outside the forward)."""
        self._drain()
        b, h, d = _shape_of(layer)
        k = torch.empty((b, h, layer._n, d), dtype=layer.dtype, device=layer.device)
        v = torch.empty_like(k)
        self._submit(self._load_job, layer, k, v, layer._n).result()
        self.counters["read_backs"] += 1
        return k, v

    # ------------------------------------------------------------------ whole-cache edits
    def _rewrite(self, layer: OffloadedLayer, fn: Any) -> None:
        """Apply ``fn`` to the layer's keys and values (crop, beam reorder, batch select):
        a layer in the tier is read back, edited and stored again."""
        if not layer._n:
            return
        k, v = fn(layer.keys), fn(layer.values)
        if layer._slot is not None:
            slot = layer._slot
            self._drain()
            slot.owner, layer._slot = None, None
        layer._k, layer._v = k.contiguous(), v.contiguous()
        layer._shape = (int(k.shape[0]), int(k.shape[1]), int(k.shape[-1]))
        layer._n, layer._stored = int(k.shape[-2]), -1
        if layer.pinned is False:
            self._write_back(layer)
            self._drain()
        self._recount_pinned()

    def _forget(self, layer: OffloadedLayer) -> None:
        self._drain()
        if layer._slot is not None:
            layer._slot.owner, layer._slot = None, None
        layer._k = layer._v = None
        layer._n = layer._stored = 0
        layer.pinned = None
        self.tier.drop(layer.idx)
        self._recount_pinned()

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Wait for the copies in flight, give the tier's memory and files back. A copy
        that failed is not raised again here (it was raised in the forward, or is now
        moot)."""
        if self._closed:
            return
        for fut in self._jobs:
            try:
                fut.result()
            except Exception:
                pass
        for layer in self.layers:
            if isinstance(layer, OffloadedLayer) and layer._fetch is not None:
                try:
                    layer._fetch.result()
                except Exception:
                    pass
                layer._fetch = None
        self._closed = True
        self._jobs = []
        self._slots = []
        self._finalizer()

    def __enter__(self) -> OffloadedKVCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OffloadedKVCache(budget={self.budget}, tier={getattr(self.tier, 'name', '')})"


def _shape_of(layer: OffloadedLayer) -> tuple[int, int, int]:
    """(batch, kv_heads, head_dim) of a layer, from its last known shape."""
    shape = getattr(layer, "_shape", None)
    if shape is None:
        raise KVOffloadError(f"layer {layer.idx}: its shape is unknown", layer=layer.idx)
    return shape


def _is_view_of(t: torch.Tensor, base: torch.Tensor | None) -> bool:
    return base is not None and t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def _shutdown(copier: ThreadPoolExecutor, tier: Any) -> None:
    copier.shutdown(wait=True)
    tier.close()


def offloaded_cache(allocator: Any, model: Any, cache: Any) -> OffloadedKVCache:
    """The :class:`OffloadedKVCache` ``allocator`` (an offload allocator with
    ``resident_kv_bytes``) generates with, in place of the KV policy's ``cache``."""
    cfg = allocator.config
    if type(cache) is not DynamicCache or any(
        type(layer) is not DynamicLayer or getattr(layer, "is_initialized", False)
        for layer in cache.layers
    ):
        raise ConfigError(
            f"allocator {allocator.name!r} offloads the layers of an empty transformers "
            f"DynamicCache, but the KV policy's cache is a {type(cache).__name__}: run this "
            "KV policy with every layer resident (leave resident_kv_bytes unset)",
            [("allocator.resident_kv_bytes", str(cfg.resident_kv_bytes))],
        )
    tier = allocator.kv_tier()
    return OffloadedKVCache(
        model.config,
        tier,
        cfg.resident_kv_bytes,
        prefetch=cfg.kv_prefetch,
        name=f"allocator {allocator.name!r}",
    )
