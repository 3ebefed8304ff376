"""Allocator ``pinned-pool``: MemAscend's size-classed, reusable pinned buffer pool.

Offloading moves the same few tensor shapes back and forth every step. Allocating a pinned
buffer per tensor (as ``torch.empty(..., pin_memory=True)`` does through CUDA's caching host
allocator) rounds every request up to a power of two and caches each freed block for its own
size only, so host memory grows to the sum of every size class's peak and is never returned.

This pool instead

- rounds a request to a fine size class (``classes_per_doubling`` classes between powers of
  two, so at most ``1/classes_per_doubling`` is wasted, and pages are aligned for O_DIRECT);
- takes the model's tensor inventory (:meth:`PinnedPool.plan`, or :meth:`PinnedPool.reserve`
  to pin the buffers up front, as MemAscend sizes its pool): each listed size becomes an exact
  class, rounded to the alignment only, so the tensors offloaded every step waste nothing;
- reuses a cached buffer of the same class, or of a slightly larger one (``reuse_slack``);
- keeps cached buffers only while the pool holds at most ``1 + retain_headroom`` times the
  most its in-use buffers ever needed at once: a miss beyond that releases the least recently
  freed cached buffers first (:meth:`PinnedPool.reserve`'d ones are kept), so buffers of sizes
  the workload has moved on from (last step's sequence length, say) do not pile up, and the
  pool's footprint follows its peak need rather than the sum of every size's peak;
- holds everything under a hard ``cap_bytes``: when a new buffer would cross it, cached
  buffers are released first, and if the live tensors alone would cross it the request fails
  with :class:`~apportion_offload.errors.PoolCapacityError`, before any memory is touched;
- pins each buffer through CUDA, else ``mlock``, else leaves it pageable and records why
  (see :mod:`apportion_offload.hostmem`); ``stats().extra`` reports which.

``stats().peak_bytes`` is the peak of host memory the pool held (live + cached), the figure
MemAscend reduces.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from apportion.base import Allocator, AllocatorStats
from pydantic import Field, field_validator

from apportion_offload.errors import PoolCapacityError
from apportion_offload.hostmem import PAGE, HostBuffer, pin, round_up
from apportion_offload.kv.options import KVOffloadConfig, OffloadsKV


class PinnedPoolConfig(KVOffloadConfig):
    cap_bytes: int = Field(
        1 << 30, ge=PAGE, description="hard cap on host memory held (live + cached)"
    )
    alignment: int = Field(
        4096, description="buffer sizes are multiples of this: a power of two, 512 to the page size"
    )
    classes_per_doubling: int = Field(
        4, ge=1, le=64, description="size classes per power of two; waste <= 1/N"
    )
    reuse_slack: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="a cached buffer up to (1 + slack) x the class may serve a request",
    )
    retain_headroom: float | None = Field(
        0.0,
        ge=0.0,
        description="cached buffers are kept while the pool holds at most (1 + headroom) x "
        "its peak in-use bytes (reserve()d ones always); None keeps them until cap_bytes "
        "forces a release",
    )
    pin: Literal["auto", "cuda", "mlock", "none"] = Field(
        "auto", description="how buffers are pinned"
    )

    @field_validator("alignment")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 512 or v > PAGE or v & (v - 1):
            raise ValueError(f"alignment must be a power of two between 512 and {PAGE}, got {v}")
        return v


def size_class(nbytes: int, alignment: int, classes_per_doubling: int) -> int:
    """The buffer size serving ``nbytes``: a multiple of ``alignment`` of the form
    ``2**e * (1 + k / classes_per_doubling)``, the smallest one that fits."""
    n = round_up(max(nbytes, 1), alignment)
    if n <= alignment:
        return alignment
    base = 1 << ((n - 1).bit_length() - 1)  # base < n <= 2 * base
    step = max(base // classes_per_doubling, alignment)
    return min(round_up(n, step), 2 * base)


def as_shape(shape: Sequence[int] | int) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints (an int is a 1-d shape), or a clear error."""
    import operator

    if isinstance(shape, int):
        shape = (shape,)
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of integers, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must hold non-negative integers, got {dims!r}")
    return dims


def tensor_nbytes(shape: Sequence[int] | int, dtype: Any) -> int:
    """Bytes of a ``shape`` x ``dtype`` tensor, with clear errors for bad input."""
    import torch

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return math.prod(as_shape(shape)) * torch.empty((), dtype=dtype).element_size()


class PinnedPool(OffloadsKV, Allocator):
    """See the module docstring. With ``resident_kv_bytes`` it is also a KV tier: the KV
    cache's layers beyond the budget live in its buffers during generation
    (:mod:`apportion_offload.kv`)."""

    name = "pinned-pool"
    summary = "MemAscend pinned buffer pool: size-classed, aligned, reused, under a hard cap"
    Config = PinnedPoolConfig

    def __init__(self, config: PinnedPoolConfig | None = None):
        super().__init__(config)
        self._lock = threading.Lock()
        self._free: dict[int, list[HostBuffer]] = {}
        self._classes: list[int] = []  # sorted keys of _free with buffers in them
        # id(buffer) -> cached buffer, least recently freed first; reserve()d ones apart
        self._lru: dict[int, HostBuffer] = {}
        self._lru_kept: dict[int, HostBuffer] = {}
        self._kept: set[int] = set()  # ids of reserve()d buffers (alive)
        self._cached = 0
        self._exact: list[int] = []  # sorted exact size classes from plan()/reserve()
        self._in_use = 0  # bytes of buffers handed out (live tensors, acquired buffers)
        self._peak_in_use = 0
        self._evicted = 0
        self._held: dict[
            int, tuple[Any, HostBuffer, int]
        ] = {}  # id(tensor) -> (tensor, buffer, bytes)
        self._reserved = 0
        self._live = 0
        self._peak_live = 0
        self._hits = self._misses = self._trimmed = 0
        self._mode_bytes = {"cuda": 0, "mlock": 0, "pageable": 0}
        self.pin_fallback: str | None = None

    # ------------------------------------------------------------------ inventory
    def size_class_of(self, nbytes: int) -> int:
        """The buffer size serving a request of ``nbytes``: the smallest planned exact class
        that fits, when it is smaller than the regular ``classes_per_doubling`` class."""
        cfg = self.config
        cls = size_class(nbytes, cfg.alignment, cfg.classes_per_doubling)
        i = bisect.bisect_left(self._exact, round_up(max(nbytes, 1), cfg.alignment))
        return self._exact[i] if i < len(self._exact) and self._exact[i] < cls else cls

    def plan(self, inventory: Iterable[int | tuple[Sequence[int] | int, Any]]) -> list[int]:
        """Take a tensor inventory (byte counts, or ``(shape, dtype)`` pairs) and make each
        size an exact class (rounded to ``alignment`` only). Returns the classes, sorted.

        MemAscend sizes its buffer pool from the model's tensors: the parameters, gradients
        and optimizer states move every step, so their sizes are known before the first one.
        """
        sizes = sorted(
            {round_up(max(_inventory_bytes(item), 1), self.config.alignment) for item in inventory}
        )
        with self._lock:
            self._exact = sorted(set(self._exact).union(sizes))
        return sizes

    def reserve(self, inventory: Iterable[int | tuple[Sequence[int] | int, Any]]) -> int:
        """:meth:`plan` the inventory and pin one cached buffer per entry now (a repeated
        entry gets as many buffers), so the first step finds them ready. Reserved buffers are
        not released to make room for other sizes, only to keep live tensors under the hard
        cap (or by :meth:`trim`). Raises :class:`PoolCapacityError` (with nothing allocated)
        if they would cross the cap. Returns the bytes reserved."""
        items = list(inventory)
        self.plan(items)
        classes = [self.size_class_of(_inventory_bytes(item)) for item in items]
        total = sum(classes)
        with self._lock:
            if self._reserved - self._cached + total > self.config.cap_bytes:
                raise PoolCapacityError(
                    f"pinned-pool: reserving {len(classes)} buffers ({total} bytes) would exceed "
                    f"cap_bytes={self.config.cap_bytes} "
                    f"({self._reserved - self._cached} bytes in use)"
                )
        bufs = []
        try:
            for n in classes:
                bufs.append(self.acquire(n))
                with self._lock:
                    self._kept.add(id(bufs[-1]))
        finally:
            for buf in bufs:
                self.give_back(buf)
        return total

    # ------------------------------------------------------------------ raw buffers
    def acquire(self, nbytes: int) -> HostBuffer:
        """A buffer of at least ``nbytes`` (its ``nbytes`` is the size class), under the cap."""
        cfg = self.config
        if nbytes < 0:
            raise ValueError(f"cannot acquire a negative number of bytes ({nbytes})")
        with self._lock:
            cls = self.size_class_of(nbytes)
            buf = self._take_cached(cls)
            if buf is None:
                self._misses += 1
                self._make_room(cls, nbytes)
                buf = HostBuffer.create(cls)
                reason = pin(buf, cfg.pin)
                if reason and self.pin_fallback is None:
                    self.pin_fallback = reason
                self._mode_bytes[buf.mode] += buf.nbytes
                self._reserved += buf.nbytes
                self._stats.peak_bytes = max(self._stats.peak_bytes, self._reserved)
            else:
                self._hits += 1
            self._in_use += buf.nbytes
            self._peak_in_use = max(self._peak_in_use, self._in_use)
            self._stats.current_bytes = self._reserved
            return buf

    def give_back(self, buf: HostBuffer) -> None:
        """Return a buffer from :meth:`acquire` to the cache (it stays pinned, ready for reuse)."""
        with self._lock:
            self._in_use -= buf.nbytes
            self._free.setdefault(buf.nbytes, []).append(buf)
            if len(self._free[buf.nbytes]) == 1:
                bisect.insort(self._classes, buf.nbytes)
            (self._lru_kept if id(buf) in self._kept else self._lru)[id(buf)] = buf
            self._cached += buf.nbytes

    def _uncache(self, buf: HostBuffer) -> None:
        bufs = self._free[buf.nbytes]
        bufs.remove(buf)  # by identity: HostBuffer compares by identity (eq=False)
        if not bufs:
            del self._free[buf.nbytes]
            self._classes.pop(bisect.bisect_left(self._classes, buf.nbytes))
        (self._lru_kept if id(buf) in self._kept else self._lru).pop(id(buf))
        self._cached -= buf.nbytes

    def _take_cached(self, cls: int) -> HostBuffer | None:
        limit = cls * (1 + self.config.reuse_slack)
        i = bisect.bisect_left(self._classes, cls)
        if i < len(self._classes) and self._classes[i] <= limit:
            buf = self._free[self._classes[i]][-1]  # the most recently freed: its pages are warm
            self._uncache(buf)
            return buf
        return None

    def _make_room(self, cls: int, nbytes: int) -> None:
        cap = self.config.cap_bytes
        if self._reserved - self._cached + cls > cap:
            raise PoolCapacityError(
                f"pinned-pool: a request of {nbytes} bytes (size class {cls}) would exceed "
                f"cap_bytes={cap}: {self._live} bytes are live in {len(self._held)} tensors. "
                f"Free tensors first or raise cap_bytes."
            )
        headroom = self.config.retain_headroom
        if headroom is not None:  # hold no more than the workload has shown it needs
            limit = int(max(self._peak_in_use, self._in_use + cls) * (1 + headroom))
            self._evict(self._lru, self._reserved + cls - limit)
        self._evict(self._lru, self._reserved + cls - cap)  # the hard cap: anything cached goes,
        self._evict(self._lru_kept, self._reserved + cls - cap)  # reserved buffers last

    def _evict(self, lru: dict[int, HostBuffer], excess: int) -> None:
        """Release cached buffers of ``lru``, least recently freed first, until ``excess``
        bytes are gone (or none is left)."""
        while excess > 0 and lru:
            buf = next(iter(lru.values()))
            self._uncache(buf)
            self._evicted += 1
            excess -= buf.nbytes
            self._release(buf)

    def _release(self, buf: HostBuffer) -> None:
        self._reserved -= buf.nbytes
        self._mode_bytes[buf.mode] -= buf.nbytes
        self._trimmed += buf.nbytes
        self._kept.discard(id(buf))
        buf.release()

    def _cached_bytes(self) -> int:
        return self._cached

    def trim(self) -> int:
        """Release every cached (free) buffer to the OS; returns the bytes released."""
        with self._lock:
            before = self._reserved
            for bufs in self._free.values():
                for buf in bufs:
                    self._release(buf)
            self._free.clear()
            self._classes.clear()
            self._lru.clear()
            self._lru_kept.clear()
            self._cached = 0
            self._stats.current_bytes = self._reserved
            return before - self._reserved

    # ------------------------------------------------------------------ Allocator API
    def allocate(self, shape: Sequence[int], dtype: Any, *, access: str = "default") -> Any:
        nbytes = tensor_nbytes(shape, dtype)
        if nbytes > self.config.cap_bytes:
            raise PoolCapacityError(
                f"pinned-pool: a {as_shape(shape)} {dtype} tensor needs {nbytes} bytes, more than "
                f"cap_bytes={self.config.cap_bytes}; raise cap_bytes or split the tensor"
            )
        buf = self.acquire(nbytes)
        tensor = buf.tensor[:nbytes].view(dtype).view(as_shape(shape))
        with self._lock:
            self._held[id(tensor)] = (tensor, buf, nbytes)
            self._live += nbytes
            self._peak_live = max(self._peak_live, self._live)
            self._stats.allocations += 1
        return tensor

    def free(self, tensor: Any) -> None:
        with self._lock:
            entry = self._held.get(id(tensor))
            if entry is None or entry[0] is not tensor:
                raise ValueError("free() of a tensor this pool did not allocate (or freed twice)")
            del self._held[id(tensor)]
            self._live -= entry[2]
        self.give_back(entry[1])

    def buffer_of(self, tensor: Any) -> HostBuffer | None:
        """The pool buffer under a live tensor from :meth:`allocate` (``None`` if foreign)."""
        entry = self._held.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def stats(self) -> AllocatorStats:
        with self._lock:
            s = self._stats
            s.current_bytes = self._reserved
            s.extra = {
                "live_bytes": self._live,
                "peak_live_bytes": self._peak_live,
                "cached_bytes": self._cached_bytes(),
                "cap_bytes": self.config.cap_bytes,
                "hits": self._hits,
                "misses": self._misses,
                "trimmed_bytes": self._trimmed,
                "evictions": self._evicted,
                "peak_in_use_bytes": self._peak_in_use,
                "planned_classes": len(self._exact),
                "pinned_bytes": self._mode_bytes["cuda"] + self._mode_bytes["mlock"],
                "pageable_bytes": self._mode_bytes["pageable"],
                "pin_modes": {k: v for k, v in self._mode_bytes.items() if v},
                "pin_fallback": self.pin_fallback,
            }
            return s

    def kv_tier(self) -> Any:
        from apportion_offload.kv.tiers import host_tier

        return host_tier(self)

    def close(self) -> None:
        """Release every buffer. Tensors still live become invalid (like any allocator's)."""
        self.trim()
        with self._lock:
            for _, buf, _ in self._held.values():
                self._reserved -= buf.nbytes
                self._mode_bytes[buf.mode] -= buf.nbytes
                buf.release()
            self._held.clear()
            self._kept.clear()
            self._live = 0
            self._in_use = 0


def _inventory_bytes(item: int | tuple[Sequence[int] | int, Any]) -> int:
    """Bytes of one inventory entry: an int, or a ``(shape, dtype)`` pair."""
    import operator

    if isinstance(item, tuple) and len(item) == 2:
        return tensor_nbytes(item[0], item[1])
    try:
        n = operator.index(item)
    except TypeError:
        raise TypeError(
            f"an inventory entry is a byte count or a (shape, dtype) pair, got {item!r}"
        ) from None
    if n < 0:
        raise ValueError(f"an inventory entry cannot be negative ({n} bytes)")
    return n
