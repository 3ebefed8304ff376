"""Where an offloaded KV layer lives: host memory from an allocator, or NVMe swap files.

A tier stores each layer's keys and values as one ``(2, batch, kv_heads, tokens, head_dim)``
block and is driven by :class:`~apportion_offload.kv.cache.OffloadedKVCache` from its copy
thread (one at a time, in submission order):

- ``store(layer, keys, values, start)``: the layer's tokens from ``start`` on (``start=0``
  replaces the layer; otherwise ``start`` is the tokens already stored: an append);
- ``load(layer, keys_out, values_out)``: copy the layer's tokens into the first entries of
  the two (resident) tensors; returns how many;
- ``drop(layer)``, ``nbytes()`` (bytes held), ``close()``.

:class:`HostTier` keeps a layer in one buffer of the allocator (``pinned-pool``: pinned,
size-classed, reused; ``tiered``: ``access="kv"``, bandwidth-bound, so striped over the far
NUMA nodes), grown with headroom as decode appends. :class:`NvmeTier` writes a layer as
swap files of the project's O_DIRECT swapper (checksummed, preallocated, renamed into place):
the prefill's entries as one file, then every ``segment_tokens`` decode tokens (gathered in
the swapper's pinned pool) as one more; a load reads them all back in parallel and verifies
every block. :class:`SpillingTier` puts a layer the first tier has no room for in the next
one (``kv_on_full="spill"``).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any

from apportion_offload.errors import KVOffloadError, OffloadError, PoolCapacityError

_ids = itertools.count()


class TierFull(Exception):
    """Raised by a tier that has no room for a layer (and was told to spill, not wait)."""


def _wait_for_room(allocate: Any, what: str, layer: int, on_full: str, wait_seconds: float) -> Any:
    """``allocate()``, retried while the allocator is full for up to ``wait_seconds`` when
    ``on_full == "wait"``; :class:`TierFull` at once when it is ``"spill"``."""
    deadline: float | None = None
    while True:
        try:
            return allocate()
        except (PoolCapacityError, MemoryError) as exc:
            if on_full == "spill":
                raise TierFull(str(exc)) from None
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + wait_seconds
            if now >= deadline:
                raise KVOffloadError(
                    f"layer {layer}: the {what} stayed full for {wait_seconds:g} s ({exc}); "
                    "raise its cap, lower the context, or set kv_on_full='spill'",
                    layer=layer,
                ) from None
            time.sleep(0.005)


class HostTier:
    """Layers in host buffers of ``allocator`` (its ``allocate(shape, dtype, access=)`` and
    ``free``). Each buffer has ``headroom`` (1/8, at least 16 tokens) for the decode."""

    def __init__(
        self,
        allocator: Any,
        *,
        access: str = "kv",
        on_full: str = "spill",
        wait_seconds: float = 10.0,
        name: str | None = None,
    ):
        self.allocator, self.access = allocator, access
        self.on_full, self.wait_seconds = on_full, wait_seconds
        self.name = name or f"{getattr(allocator, 'name', 'host')} tier"
        self._layers: dict[int, tuple[Any, int]] = {}  # layer -> (buffer, tokens)
        self._lock = threading.Lock()

    def where(self, layer: int) -> str:
        return self.name

    def length(self, layer: int) -> int:
        return self._layers.get(layer, (None, 0))[1]

    def store(self, layer: int, keys: Any, values: Any, start: int) -> None:
        buf, n = self._layers.get(layer, (None, 0))
        if start == 0:
            n = 0
        elif start != n:
            raise KVOffloadError(
                f"layer {layer}: an append at token {start}, but the {self.name} holds {n}",
                layer=layer,
            )
        b, h, m, d = keys.shape
        need = n + m
        if (
            buf is None
            or tuple(buf.shape[:3]) != (2, b, h)
            or buf.shape[-1] != d
            or (buf.shape[3] < need or buf.dtype != keys.dtype)
        ):
            cap = need + max(16, need // 8)
            new = _wait_for_room(
                lambda: self.allocator.allocate((2, b, h, cap, d), keys.dtype, access=self.access),
                self.name,
                layer,
                self.on_full,
                self.wait_seconds,
            )
            if buf is not None:
                if n:
                    new[:, :, :, :n].copy_(buf[:, :, :, :n])
                self.allocator.free(buf)
            buf = new
        buf[0, :, :, n:need].copy_(keys)
        buf[1, :, :, n:need].copy_(values)
        with self._lock:
            self._layers[layer] = (buf, need)

    def load(self, layer: int, keys_out: Any, values_out: Any) -> int:
        buf, n = self._layers.get(layer, (None, 0))
        if buf is None:
            return 0
        keys_out[:, :, :n].copy_(buf[0, :, :, :n])
        values_out[:, :, :n].copy_(buf[1, :, :, :n])
        return n

    def drop(self, layer: int) -> None:
        with self._lock:
            buf, _ = self._layers.pop(layer, (None, 0))
        if buf is not None:
            self.allocator.free(buf)

    def layers(self) -> list[int]:
        return sorted(self._layers)

    def nbytes(self) -> int:
        with self._lock:
            return sum(b.numel() * b.element_size() for b, _ in self._layers.values())

    def close(self) -> None:
        for layer in list(self._layers):
            self.drop(layer)


class NvmeTier:
    """Layers as swap files of ``swapper`` (an :class:`~apportion_offload.nvme.NvmeSwapper`):
    one file per stored run of tokens, and up to ``segment_tokens`` decode tokens gathered in
    its pinned pool before they become a file. ``owns_swapper``: close it with the tier."""

    def __init__(
        self,
        swapper: Any,
        *,
        segment_tokens: int = 64,
        on_full: str = "spill",
        wait_seconds: float = 10.0,
        owns_swapper: bool = False,
    ):
        self.swapper = swapper
        self.segment_tokens = int(segment_tokens)
        self.on_full, self.wait_seconds = on_full, wait_seconds
        self.owns_swapper = owns_swapper
        self.name = f"nvme tier ({swapper.directory})"
        self._uid = f"kv{os.getpid()}-{next(_ids)}"
        self._files: dict[int, list[tuple[str, int]]] = {}  # layer -> [(key, tokens)]
        self._tail: dict[int, tuple[Any, int]] = {}  # layer -> (pool tensor, tokens)
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def where(self, layer: int) -> str:
        files = self._files.get(layer)
        if files:
            return str(self.swapper.path(files[-1][0]))
        return str(self.swapper.directory)

    def length(self, layer: int) -> int:
        tail = self._tail.get(layer)
        return sum(n for _, n in self._files.get(layer, [])) + (tail[1] if tail else 0)

    # ------------------------------------------------------------------ writing
    def _write_file(self, layer: int, block: Any, tokens: int) -> None:
        """Swap ``block`` (a pool tensor) out as the layer's next file; waits for it."""
        key = f"{self._uid}-L{layer}-s{next(self._seq)}"
        path = self.swapper.path(key)
        try:
            self.swapper.swap_out(key, block).result()
        except (OffloadError, OSError, ValueError) as exc:
            raise KVOffloadError(
                f"layer {layer}: writing its KV to swap file {path} failed: {exc}",
                layer=layer,
                path=str(path),
            ) from exc
        with self._lock:
            self._files.setdefault(layer, []).append((key, tokens))

    def _pool_tensor(self, layer: int, shape: tuple[int, ...], dtype: Any) -> Any:
        return _wait_for_room(
            lambda: self.swapper.allocate(shape, dtype),
            f"{self.name}'s host pool",
            layer,
            self.on_full,
            self.wait_seconds,
        )

    def _write_run(self, layer: int, keys: Any, values: Any) -> None:
        b, h, m, d = keys.shape
        block = self._pool_tensor(layer, (2, b, h, m, d), keys.dtype)
        try:
            block[0].copy_(keys)
            block[1].copy_(values)
            self._write_file(layer, block, m)
        finally:
            self.swapper.free(block)

    def _flush_tail(self, layer: int) -> None:
        tail = self._tail.pop(layer, None)
        if tail is None:
            return
        block, n = tail
        try:
            if n:
                run = block[:, :, :, :n]
                self._write_file(layer, run if run.is_contiguous() else run.contiguous(), n)
        finally:
            self.swapper.free(block)

    def store(self, layer: int, keys: Any, values: Any, start: int) -> None:
        if start == 0:
            self.drop(layer)
        elif start != self.length(layer):
            raise KVOffloadError(
                f"layer {layer}: an append at token {start}, but the {self.name} holds "
                f"{self.length(layer)}",
                layer=layer,
            )
        m = keys.shape[-2]
        if start == 0 or m >= self.segment_tokens:  # a long run: a file of its own
            self._flush_tail(layer)
            self._write_run(layer, keys, values)
            return
        done = 0
        while done < m:
            tail = self._tail.get(layer)
            if tail is None:
                b, h, _, d = keys.shape
                try:
                    block = self._pool_tensor(layer, (2, b, h, self.segment_tokens, d), keys.dtype)
                except TierFull:  # no host room to gather in: straight to disk
                    self._write_run(layer, keys[:, :, done:], values[:, :, done:])
                    return
                tail = (block, 0)
            block, n = tail
            take = min(m - done, self.segment_tokens - n)
            block[0, :, :, n : n + take].copy_(keys[:, :, done : done + take])
            block[1, :, :, n : n + take].copy_(values[:, :, done : done + take])
            done += take
            self._tail[layer] = (block, n + take)
            if n + take == self.segment_tokens:
                self._flush_tail(layer)

    # ------------------------------------------------------------------ reading
    def load(self, layer: int, keys_out: Any, values_out: Any) -> int:
        files = list(self._files.get(layer, []))
        pending = []
        try:
            for key, n in files:  # every file in flight at once
                path = self.swapper.path(key)
                try:
                    pending.append((path, n, self.swapper.swap_in(key)))
                except (OffloadError, OSError, ValueError) as exc:
                    raise self._read_error(layer, path, exc) from exc
            off = 0
            while pending:
                path, n, fut = pending.pop(0)
                try:
                    block = fut.result()
                except (OffloadError, OSError, ValueError) as exc:
                    raise self._read_error(layer, path, exc) from exc
                try:
                    keys_out[:, :, off : off + n].copy_(block[0])
                    values_out[:, :, off : off + n].copy_(block[1])
                finally:
                    self.swapper.free(block)
                off += n
        finally:
            for _, _, fut in pending:  # an error above: give back what the others read
                try:
                    self.swapper.free(fut.result())
                except Exception:
                    pass
        tail = self._tail.get(layer)
        if tail is not None and tail[1]:
            block, n = tail
            keys_out[:, :, off : off + n].copy_(block[0, :, :, :n])
            values_out[:, :, off : off + n].copy_(block[1, :, :, :n])
            off += n
        return off

    def _read_error(self, layer: int, path: Any, exc: BaseException) -> KVOffloadError:
        what = "is missing" if isinstance(exc, FileNotFoundError) else "cannot be read back"
        return KVOffloadError(
            f"layer {layer}: its swap file {path} {what} ({type(exc).__name__}: {exc}); the "
            "generation stopped, no answer was produced from partial KV",
            layer=layer,
            path=str(path),
        )

    # ------------------------------------------------------------------ housekeeping
    def drop(self, layer: int) -> None:
        tail = self._tail.pop(layer, None)
        if tail is not None:
            self.swapper.free(tail[0])
        with self._lock:
            files = self._files.pop(layer, [])
        for key, _ in files:
            try:
                self.swapper.remove(key)
            except FileNotFoundError:
                pass

    def layers(self) -> list[int]:
        return sorted(set(self._files) | set(self._tail))

    def files(self, layer: int) -> list[str]:
        """The swap files holding ``layer``, in token order."""
        return [str(self.swapper.path(k)) for k, _ in self._files.get(layer, [])]

    def nbytes(self) -> int:
        """Bytes on disk for this tier's files (and the host tails)."""
        total = 0
        for files in list(self._files.values()):
            for key, _ in files:
                try:
                    total += self.swapper.path(key).stat().st_size
                except FileNotFoundError:
                    continue
        return total + sum(t.numel() * t.element_size() for t, _ in self._tail.values())

    def close(self) -> None:
        for layer in self.layers():
            self.drop(layer)
        if self.owns_swapper:
            self.swapper.close()


class SpillingTier:
    """``first``, and for the layers it has no room for, the tier ``make_next()`` builds (on
    first need): a layer lives whole in one of them. ``spilled`` lists the layers moved."""

    def __init__(self, first: Any, make_next: Any):
        self.first, self._make_next = first, make_next
        self.next: Any = None
        self.spilled: list[int] = []
        self.name = f"{first.name}, spilling to NVMe"

    def _tier(self, layer: int) -> Any:
        return self.next if layer in self.spilled else self.first

    def where(self, layer: int) -> str:
        return self._tier(layer).where(layer)

    def length(self, layer: int) -> int:
        return self._tier(layer).length(layer)

    def store(self, layer: int, keys: Any, values: Any, start: int) -> None:
        if layer in self.spilled:
            self.next.store(layer, keys, values, start)
            return
        try:
            self.first.store(layer, keys, values, start)
        except TierFull:
            import torch

            if self.next is None:
                self.next = self._make_next()
            n = self.first.length(layer) if start else 0
            if n:  # what the first tier holds moves along
                b, h, _, d = keys.shape
                old_k = torch.empty((b, h, n, d), dtype=keys.dtype)
                old_v = torch.empty_like(old_k)
                self.first.load(layer, old_k, old_v)
                self.next.store(layer, old_k, old_v, 0)
            self.first.drop(layer)
            self.spilled.append(layer)
            self.next.store(layer, keys, values, start if n else 0)

    def load(self, layer: int, keys_out: Any, values_out: Any) -> int:
        return self._tier(layer).load(layer, keys_out, values_out)

    def drop(self, layer: int) -> None:
        self._tier(layer).drop(layer)
        if layer in self.spilled:
            self.spilled.remove(layer)

    def nbytes(self) -> int:
        return self.first.nbytes() + (self.next.nbytes() if self.next is not None else 0)

    def close(self) -> None:
        self.first.close()
        if self.next is not None:
            self.next.close()


def host_tier(allocator: Any, access: str = "kv") -> Any:
    """The KV tier of a host allocator (``pinned-pool``, ``tiered``) under its
    :class:`~apportion_offload.kv.options.KVOffloadConfig`: its buffers, spilling to NVMe
    swap files when it is full (``kv_on_full="spill"``) or waiting for room."""
    cfg = allocator.config
    first = HostTier(
        allocator, access=access, on_full=cfg.kv_on_full, wait_seconds=cfg.kv_wait_seconds
    )
    if cfg.kv_on_full != "spill":
        return first

    def make_next() -> NvmeTier:
        from apportion_offload.nvme import NvmeSwapConfig, NvmeSwapper

        swapper = NvmeSwapper(NvmeSwapConfig(directory=cfg.kv_spill_directory))
        return NvmeTier(
            swapper,
            segment_tokens=cfg.kv_segment_tokens,
            on_full="spill",
            owns_swapper=True,
        )

    return SpillingTier(first, make_next)
