"""Asynchronous swapping of whole requests between a device pool and a host pool.

A swap runs on a worker thread (torch copies release the GIL; on CUDA they go on a side
stream into pinned memory), so the caller keeps computing while it proceeds; the returned
future completes when the data has landed. Swaps are **copy, then commit**: the source
blocks are released only after every copy succeeded. A swap that fails midway raises
:class:`SwapError` from its future, the request keeps its KV where it was, the partly
written destination blocks are returned to their pool, and the caller requeues it.

``granularity="group"`` (FastSwitch) copies each contiguous run of blocks once;
``"block"`` (the vLLM baseline) copies block by block and layer by layer, as vLLM's
``swap_blocks`` does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch
from apportion.errors import ApportionError

from apportion_kvcache.fastswitch.blocks import (
    BlockAllocator,
    BlockGroupAllocator,
    Group,
    GroupPool,
    KVShape,
    LayerPool,
)


class SwapError(ApportionError):
    """A swap failed midway; the request's KV is intact at its source."""


@dataclass
class SwapRecord:
    request: str
    direction: Literal["out", "in"]
    blocks: int
    bytes: int
    copies: int
    seconds: float


@dataclass
class Tier:
    """One memory tier: an allocator and the tensors it manages."""

    allocator: BlockGroupAllocator | BlockAllocator
    pool: GroupPool | LayerPool


@dataclass
class Placement:
    tier: Literal["device", "host"]
    groups: list[Group] = field(default_factory=list)

    @property
    def blocks(self) -> int:
        return sum(g.count for g in self.groups)


class SwapManager:
    """Owns a device tier and a host tier and moves requests between them."""

    def __init__(
        self,
        shape: KVShape,
        device_blocks: int,
        host_blocks: int,
        *,
        granularity: Literal["group", "block"] = "group",
        device: str | None = None,
        workers: int = 1,
        fault: Callable[[str, int], None] | None = None,
    ):
        self.shape = shape
        self.granularity = granularity
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pin = dev.startswith("cuda")
        alloc_cls = BlockGroupAllocator if granularity == "group" else BlockAllocator
        pool_cls = GroupPool if granularity == "group" else LayerPool
        self.device = Tier(alloc_cls(device_blocks), pool_cls(shape, device_blocks, dev))
        self.host = Tier(alloc_cls(host_blocks), pool_cls(shape, host_blocks, "cpu", pin=pin))
        self.cuda = dev.startswith("cuda")
        self._stream = torch.cuda.Stream() if self.cuda else None
        self._exec = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastswitch-swap")
        self._lock = threading.Lock()
        self.placement: dict[str, Placement] = {}
        self.records: list[SwapRecord] = []
        self.fault = fault  # test hook: called before each copy with (request, copy index)

    def close(self) -> None:
        self._exec.shutdown(wait=True)

    # -- allocation on the device tier
    def allocate(self, request: str, blocks: int) -> Placement:
        """Give ``request`` ``blocks`` more device blocks (extending its last group if possible)."""
        with self._lock:
            p = self.placement.setdefault(request, Placement("device"))
            if p.tier != "device":
                raise SwapError(f"request {request} is on the host; swap it in before growing it")
            after = p.groups[-1] if p.groups else None
            p.groups.extend(self.device.allocator.allocate(blocks, after=after))
            p.groups = _merge_adjacent(p.groups)
            return p

    def release(self, request: str) -> None:
        with self._lock:
            p = self.placement.pop(request, None)
            if p is not None:
                (self.device if p.tier == "device" else self.host).allocator.free(p.groups)

    def write(self, request: str, kv: torch.Tensor) -> None:
        """Store real KV (blocks, layers, 2, kvh, bs, d) into ``request``'s device blocks."""
        p = self.placement[request]
        tier = self.device if p.tier == "device" else self.host
        with torch.inference_mode():
            tier.pool.write(p.groups, kv.to(dtype=self.shape.dtype))

    def read(self, request: str) -> torch.Tensor:
        p = self.placement[request]
        tier = self.device if p.tier == "device" else self.host
        return tier.pool.read(p.groups)

    # -- swaps
    def swap_out(self, request: str) -> Future[SwapRecord]:
        return self._exec.submit(self._swap, request, "out")

    def swap_in(self, request: str) -> Future[SwapRecord]:
        return self._exec.submit(self._swap, request, "in")

    def _swap(self, request: str, direction: Literal["out", "in"]) -> SwapRecord:
        src_tier, dst_tier = (
            (self.device, self.host) if direction == "out" else (self.host, self.device)
        )
        want = "device" if direction == "out" else "host"
        with self._lock:
            p = self.placement.get(request)
            if p is None or p.tier != want:
                raise SwapError(
                    f"cannot swap {direction} request {request}: it is "
                    f"{'unknown' if p is None else 'on the ' + p.tier}"
                )
            dst = dst_tier.allocator.allocate(p.blocks)  # PoolExhaustedError: caller queues
        t0 = time.perf_counter()
        try:
            copies = self._copy(request, src_tier.pool, p.groups, dst_tier.pool, dst)
        except Exception as exc:
            with self._lock:
                dst_tier.allocator.free(dst)
            raise SwapError(
                f"swap {direction} of request {request} failed midway ({exc}); "
                f"its KV is intact on the {want}"
            ) from exc
        seconds = time.perf_counter() - t0
        with self._lock:  # commit
            src_tier.allocator.free(p.groups)
            self.placement[request] = Placement("host" if direction == "out" else "device", dst)
        rec = SwapRecord(
            request, direction, p.blocks, p.blocks * self.shape.block_bytes, copies, seconds
        )
        self.records.append(rec)
        return rec

    def _copy(
        self, request: str, src, src_groups: list[Group], dst, dst_groups: list[Group]
    ) -> int:
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else _null()
        copies = 0
        # pools may have been made under inference mode (inside a host's generate): copy in it too
        with ctx, torch.inference_mode():
            if isinstance(src, GroupPool):
                for a, b in src.copy_plan(src_groups, dst_groups):
                    if self.fault is not None:
                        self.fault(request, copies)
                    dst.data[b].copy_(src.data[a], non_blocking=self.cuda)
                    copies += 1
            else:
                s_blocks = [x for g in src_groups for x in range(g.start, g.end)]
                d_blocks = [x for g in dst_groups for x in range(g.start, g.end)]
                for st, dt in zip(
                    src.layers, dst.layers, strict=True
                ):  # vLLM: per layer, per block, K then V
                    for a, b in zip(s_blocks, d_blocks, strict=True):
                        for kv in (0, 1):
                            if self.fault is not None:
                                self.fault(request, copies)
                            dt[b, kv].copy_(st[a, kv], non_blocking=self.cuda)
                            copies += 1
        if self._stream is not None:
            self._stream.synchronize()
        return copies


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _merge_adjacent(groups: list[Group]) -> list[Group]:
    out: list[Group] = []
    for g in groups:
        if out and out[-1].end == g.start:
            out[-1] = Group(out[-1].start, out[-1].count + g.count)
        else:
            out.append(g)
    return out


def raw_copy_seconds(nbytes: int, device: str = "cpu", repeats: int = 5) -> float:
    """Best time of one contiguous ``nbytes`` copy (the memcpy bandwidth reference)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=device.startswith("cuda"))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best
