"""Allocator ``pinned-pool``: MemAscend's size-classed, reusable pinned buffer pool.

Offloading moves the same few tensor shapes back and forth every step. Allocating a pinned
buffer per tensor (as ``torch.empty(..., pin_memory=True)`` does through CUDA's caching host
allocator) rounds every request up to a power of two and caches each freed block for its own
size only, so host memory grows to the sum of every size class's peak and is never returned.

This pool instead

- rounds a request to a fine size class (``classes_per_doubling`` classes between powers of
  two, so at most ``1/classes_per_doubling`` is wasted, and pages are aligned for O_DIRECT);
- reuses a cached buffer of the same class, or of a slightly larger one (``reuse_slack``);
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
from collections.abc import Sequence
from typing import Any, Literal

from apportion.base import Allocator, AllocatorStats
from apportion.config import ComponentConfig
from pydantic import Field, field_validator

from apportion_offload.errors import PoolCapacityError
from apportion_offload.hostmem import PAGE, HostBuffer, pin, round_up


class PinnedPoolConfig(ComponentConfig):
    cap_bytes: int = Field(1 << 30, ge=PAGE, description="hard cap on host memory held (live + cached)")
    alignment: int = Field(4096, description="buffer sizes are multiples of this: a power of two, 512 to the page size")
    classes_per_doubling: int = Field(4, ge=1, le=64, description="size classes per power of two; waste <= 1/N")
    reuse_slack: float = Field(0.25, ge=0.0, le=1.0, description="a cached buffer up to (1 + slack) x the class may serve a request")
    pin: Literal["auto", "cuda", "mlock", "none"] = Field("auto", description="how buffers are pinned")

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


class PinnedPool(Allocator):
    name = "pinned-pool"
    Config = PinnedPoolConfig

    def __init__(self, config: PinnedPoolConfig | None = None):
        super().__init__(config)
        self._lock = threading.Lock()
        self._free: dict[int, list[HostBuffer]] = {}
        self._classes: list[int] = []  # sorted keys of _free with buffers in them
        self._held: dict[int, tuple[Any, HostBuffer, int]] = {}  # id(tensor) -> (tensor, buffer, bytes)
        self._reserved = 0
        self._live = 0
        self._peak_live = 0
        self._hits = self._misses = self._trimmed = 0
        self._mode_bytes = {"cuda": 0, "mlock": 0, "pageable": 0}
        self.pin_fallback: str | None = None

    # ------------------------------------------------------------------ raw buffers
    def acquire(self, nbytes: int) -> HostBuffer:
        """A buffer of at least ``nbytes`` (its ``nbytes`` is the size class), under the cap."""
        cfg = self.config
        if nbytes < 0:
            raise ValueError(f"cannot acquire a negative number of bytes ({nbytes})")
        cls = size_class(nbytes, cfg.alignment, cfg.classes_per_doubling)
        with self._lock:
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
            self._stats.current_bytes = self._reserved
            return buf

    def give_back(self, buf: HostBuffer) -> None:
        """Return a buffer from :meth:`acquire` to the cache (it stays pinned, ready for reuse)."""
        with self._lock:
            self._free.setdefault(buf.nbytes, []).append(buf)
            if len(self._free[buf.nbytes]) == 1:
                bisect.insort(self._classes, buf.nbytes)

    def _take_cached(self, cls: int) -> HostBuffer | None:
        limit = cls * (1 + self.config.reuse_slack)
        i = bisect.bisect_left(self._classes, cls)
        if i < len(self._classes) and self._classes[i] <= limit:
            size = self._classes[i]
            buf = self._free[size].pop()
            if not self._free[size]:
                del self._free[size]
                self._classes.pop(i)
            return buf
        return None

    def _make_room(self, cls: int, nbytes: int) -> None:
        cap = self.config.cap_bytes
        if self._reserved + cls <= cap:
            return
        if self._reserved - self._cached_bytes() + cls > cap:
            raise PoolCapacityError(
                f"pinned-pool: a request of {nbytes} bytes (size class {cls}) would exceed "
                f"cap_bytes={cap}: {self._live} bytes are live in {len(self._held)} tensors. "
                f"Free tensors first or raise cap_bytes."
            )
        while self._reserved + cls > cap:  # release cached buffers, largest first
            size = self._classes[-1]
            buf = self._free[size].pop()
            if not self._free[size]:
                del self._free[size]
                self._classes.pop()
            self._release(buf)

    def _release(self, buf: HostBuffer) -> None:
        self._reserved -= buf.nbytes
        self._mode_bytes[buf.mode] -= buf.nbytes
        self._trimmed += buf.nbytes
        buf.release()

    def _cached_bytes(self) -> int:
        return sum(size * len(bufs) for size, bufs in self._free.items())

    def trim(self) -> int:
        """Release every cached (free) buffer to the OS; returns the bytes released."""
        with self._lock:
            before = self._reserved
            for bufs in self._free.values():
                for buf in bufs:
                    self._release(buf)
            self._free.clear()
            self._classes.clear()
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
                "pinned_bytes": self._mode_bytes["cuda"] + self._mode_bytes["mlock"],
                "pageable_bytes": self._mode_bytes["pageable"],
                "pin_modes": {k: v for k, v in self._mode_bytes.items() if v},
                "pin_fallback": self.pin_fallback,
            }
            return s

    def close(self) -> None:
        """Release every buffer. Tensors still live become invalid (like any allocator's)."""
        self.trim()
        with self._lock:
            for _, buf, _ in self._held.values():
                self._reserved -= buf.nbytes
                self._mode_bytes[buf.mode] -= buf.nbytes
                buf.release()
            self._held.clear()
            self._live = 0
