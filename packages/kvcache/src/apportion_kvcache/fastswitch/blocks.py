"""Paged KV memory with block-group allocation.

A pool holds ``num_blocks`` KV blocks. vLLM hands out blocks one at a time from a free list,
so a request's blocks end up scattered and swapping it takes one small copy per block (and
per layer). FastSwitch allocates **block groups**: runs of contiguous blocks, sized to what
the request needs (and grown in place when the next blocks are free), so a swap is a few
large copies. Free runs are coalesced on release.

Both layouts hold real tensors: :class:`GroupPool` is block-major
``(num_blocks, layers, 2, kv_heads, block_size, head_dim)`` so a group of any length is one
contiguous slice across every layer; :class:`LayerPool` is vLLM's layer-major
``layers x (num_blocks, 2, kv_heads, block_size, head_dim)``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from apportion.errors import ApportionError


class PoolExhaustedError(ApportionError):
    """Not enough free blocks: the caller queues the request (admission control)."""


@dataclass(frozen=True)
class Group:
    """``count`` contiguous blocks starting at ``start``."""

    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


class BlockGroupAllocator:
    """Extent allocator over ``num_blocks`` blocks: best-fit, split, coalesce."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[tuple[int, int]] = [(0, num_blocks)]  # sorted (start, count)

    @property
    def free_blocks(self) -> int:
        return sum(c for _, c in self._free)

    @property
    def free_runs(self) -> int:
        return len(self._free)

    def allocate(self, n: int, *, after: Group | None = None) -> list[Group]:
        """``n`` blocks in as few groups as possible. With ``after``, first try to extend that
        group in place (the result's first group then starts at ``after.end``)."""
        if n <= 0:
            return []
        if n > self.free_blocks:
            raise PoolExhaustedError(
                f"need {n} KV blocks, {self.free_blocks} of {self.num_blocks} free"
            )
        out: list[Group] = []
        if after is not None:
            i = bisect.bisect_left(self._free, (after.end, 0))
            if i < len(self._free) and self._free[i][0] == after.end:
                take = min(n, self._free[i][1])
                out.append(self._take(i, take))
                n -= take
        while n > 0:
            fits = [(c, s, i) for i, (s, c) in enumerate(self._free) if c >= n]
            if fits:  # best fit: the smallest run that holds everything
                _, _, i = min(fits)
                out.append(self._take(i, n))
                n = 0
            else:  # none large enough: take the largest run and continue
                i = max(range(len(self._free)), key=lambda j: self._free[j][1])
                take = self._free[i][1]
                out.append(self._take(i, take))
                n -= take
        return out

    def _take(self, i: int, n: int) -> Group:
        s, c = self._free[i]
        if n == c:
            del self._free[i]
        else:
            self._free[i] = (s + n, c - n)
        return Group(s, n)

    def free(self, groups: list[Group]) -> None:
        for g in groups:
            i = bisect.bisect_left(self._free, (g.start, 0))
            prev_end = self._free[i - 1][0] + self._free[i - 1][1] if i > 0 else -1
            if prev_end > g.start or (i < len(self._free) and self._free[i][0] < g.end):
                raise ValueError(f"double free of blocks {g.start}..{g.end - 1}")
            self._free.insert(i, (g.start, g.count))
            # coalesce with neighbours
            if i + 1 < len(self._free) and g.end == self._free[i + 1][0]:
                self._free[i] = (g.start, g.count + self._free[i + 1][1])
                del self._free[i + 1]
            if i > 0 and prev_end == g.start:
                s, c = self._free[i - 1]
                self._free[i - 1] = (s, c + self._free[i][1])
                del self._free[i]


class BlockAllocator:
    """vLLM-style: a LIFO free list of single blocks (no contiguity)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._is_free = set(self._free)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int, *, after: Group | None = None) -> list[Group]:
        if n > len(self._free):
            raise PoolExhaustedError(
                f"need {n} KV blocks, {len(self._free)} of {self.num_blocks} free"
            )
        out = [Group(self._free.pop(), 1) for _ in range(n)]
        self._is_free.difference_update(g.start for g in out)
        return out

    def free(self, groups: list[Group]) -> None:
        for g in groups:
            for b in range(g.start, g.end):
                if b in self._is_free:
                    raise ValueError(f"double free of block {b}")
                self._free.append(b)
                self._is_free.add(b)


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    block_size: int = 16
    dtype: torch.dtype = torch.float16

    @property
    def block_bytes(self) -> int:
        return (
            2
            * self.layers
            * self.kv_heads
            * self.block_size
            * self.head_dim
            * torch.finfo(self.dtype).bits
            // 8
        )

    @classmethod
    def of(cls, config, block_size: int = 16, dtype: torch.dtype = torch.float16) -> KVShape:
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        return cls(
            config.num_hidden_layers, config.num_key_value_heads, head_dim, block_size, dtype
        )


class GroupPool:
    """Block-major pool: a group is one contiguous slice of every layer's K and V."""

    layout = "block-major"

    def __init__(
        self, shape: KVShape, num_blocks: int, device: str | torch.device = "cpu", pin: bool = False
    ):
        self.shape = shape
        self.data = torch.zeros(
            num_blocks,
            shape.layers,
            2,
            shape.kv_heads,
            shape.block_size,
            shape.head_dim,
            dtype=shape.dtype,
            device=device,
            pin_memory=pin,
        )

    def copy_plan(self, src: list[Group], dst: list[Group]) -> list[tuple[slice, slice]]:
        """Pair up source and destination runs into maximal contiguous copies."""
        plan = []
        si = di = so = do = 0
        while si < len(src) and di < len(dst):
            n = min(src[si].count - so, dst[di].count - do)
            a, b = src[si].start + so, dst[di].start + do
            plan.append((slice(a, a + n), slice(b, b + n)))
            so += n
            do += n
            if so == src[si].count:
                si, so = si + 1, 0
            if do == dst[di].count:
                di, do = di + 1, 0
        return plan

    def write(self, groups: list[Group], kv: torch.Tensor) -> None:
        """Store ``kv`` (blocks, layers, 2, kvh, bs, d) into ``groups`` in order."""
        i = 0
        for g in groups:
            self.data[g.start : g.end].copy_(kv[i : i + g.count])
            i += g.count

    def read(self, groups: list[Group]) -> torch.Tensor:
        return (
            torch.cat([self.data[g.start : g.end] for g in groups])
            if groups
            else self.data[:0].clone()
        )


class LayerPool:
    """vLLM's layer-major layout: one (num_blocks, 2, kvh, bs, d) tensor per layer."""

    layout = "layer-major"

    def __init__(
        self, shape: KVShape, num_blocks: int, device: str | torch.device = "cpu", pin: bool = False
    ):
        self.shape = shape
        self.layers = [
            torch.zeros(
                num_blocks,
                2,
                shape.kv_heads,
                shape.block_size,
                shape.head_dim,
                dtype=shape.dtype,
                device=device,
                pin_memory=pin,
            )
            for _ in range(shape.layers)
        ]

    def write(self, groups: list[Group], kv: torch.Tensor) -> None:
        blocks = [b for g in groups for b in range(g.start, g.end)]
        for layer, t in enumerate(self.layers):
            for i, b in enumerate(blocks):
                t[b].copy_(kv[i, layer])

    def read(self, groups: list[Group]) -> torch.Tensor:
        blocks = [b for g in groups for b in range(g.start, g.end)]
        return torch.stack([torch.stack([t[b] for t in self.layers]) for b in blocks])
