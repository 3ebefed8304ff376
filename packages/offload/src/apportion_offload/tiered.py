"""Allocator ``tiered``: tier-aware DRAM/CXL placement by access class (the CXL paper).

CPU-offloaded training keeps two kinds of host data with opposite needs:

- *latency-critical*: the CPU optimizer's working states (fp32 master weights, Adam m and v),
  touched in small dependent steps every iteration; these stay in **local DRAM**;
- *bandwidth-bound*: offloaded activations and checkpoints, streamed in and out whole; these
  are **striped** (page-interleaved) across the far-memory (CXL) NUMA nodes, whose aggregate
  bandwidth grows with each device, leaving local DRAM to what needs its latency.

Latency-critical data beyond ``local_capacity_bytes`` spills to the nearest far node (and is
recorded as a spill); other data takes local DRAM while it has room.

On a machine with far-memory nodes, placement is real: each buffer is ``mbind``-ed
(``MPOL_BIND`` for local, ``MPOL_INTERLEAVE`` over the far nodes) before its first touch. On a
one-node machine the far tier is *emulated*: the decisions are made and recorded the same way
(far node ids are virtual), the memory is bound to node 0, and :class:`TierModel` — local DRAM
bandwidth and random-access latency measured here, far memory scaled by the ratios
CXL measurements report — predicts what each placement would cost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from apportion.base import Allocator, AllocatorStats
from pydantic import Field

from apportion_offload.errors import PoolCapacityError
from apportion_offload.hostmem import HostBuffer
from apportion_offload.kv.options import KVOffloadConfig, OffloadsKV
from apportion_offload.numa import MPOL_BIND, MPOL_INTERLEAVE, mbind, numa, topology
from apportion_offload.pool import as_shape, tensor_nbytes

LATENCY = frozenset({"latency", "optimizer", "optimizer-state", "master-weights", "adam"})
BANDWIDTH = frozenset(
    {"bandwidth", "activation", "activations", "checkpoint", "checkpoints", "kv", "stream"}
)


def access_class(access: str) -> str:
    """``latency``, ``bandwidth`` or ``default`` for an allocation's ``access`` tag."""
    a = (access or "default").lower()
    if a in LATENCY:
        return "latency"
    if a in BANDWIDTH:
        return "bandwidth"
    if a == "default":
        return "default"
    raise ValueError(
        f"unknown access class {access!r}: use one of {sorted(LATENCY | BANDWIDTH | {'default'})}"
    )


class TieredConfig(KVOffloadConfig):
    local_capacity_bytes: int | None = Field(
        None,
        ge=0,
        description="local DRAM budget for this allocator (default: half the local nodes' memory)",
    )
    cap_bytes: int | None = Field(
        None, ge=1, description="refuse allocations past this many bytes in all"
    )
    emulate: Literal["auto", "on", "off"] = Field(
        "auto", description="emulate far tiers (auto: when the machine has no CPU-less nodes)"
    )
    emulated_far_nodes: int = Field(2, ge=1, le=16, description="virtual CXL nodes when emulating")
    cxl_bandwidth_ratio: float = Field(
        0.5, gt=0, description="one CXL node's bandwidth / local DRAM's"
    )
    cxl_latency_ratio: float = Field(2.2, gt=1, description="CXL load latency / local DRAM's")
    bind: bool = Field(
        True, description="mbind buffers to their nodes (real tiers; node 0 when emulating)"
    )


@dataclass
class TierModel:
    """Bandwidth (B/s) and random-access latency (s per cache line) per tier."""

    local_bandwidth: float
    local_latency: float
    far_bandwidth: float  # one far node
    far_latency: float
    far_nodes: int
    measured: bool = False

    @classmethod
    def measure(
        cls, far_nodes: int, bandwidth_ratio: float, latency_ratio: float, nbytes: int = 32 << 20
    ) -> TierModel:
        """Time a streaming copy and random 8-byte gathers over ``nbytes`` of local DRAM."""
        import torch

        src = torch.ones(nbytes // 8, dtype=torch.int64)
        dst = torch.empty_like(src)
        dst.copy_(src)
        t0 = time.perf_counter()
        for _ in range(3):
            dst.copy_(src)
        bandwidth = 2 * 3 * nbytes / (time.perf_counter() - t0)  # read + write
        idx = torch.randint(0, src.numel(), (1 << 18,))
        src.index_select(0, idx)
        t0 = time.perf_counter()
        src.index_select(0, idx)
        latency = (time.perf_counter() - t0) / idx.numel()
        return cls(
            bandwidth,
            latency,
            bandwidth * bandwidth_ratio,
            latency * latency_ratio,
            far_nodes,
            True,
        )

    def stream_seconds(self, nbytes: float, tier: str, nodes: int = 1) -> float:
        """Time to stream ``nbytes`` (interleaved over ``nodes`` far nodes when far)."""
        bw = self.local_bandwidth if tier == "local" else self.far_bandwidth * max(1, nodes)
        return nbytes / bw

    def random_seconds(self, accesses: float, tier: str) -> float:
        return accesses * (self.local_latency if tier == "local" else self.far_latency)


@dataclass
class Decision:
    tier: str  # "local" or "far"
    nodes: list[int]
    policy: str  # "bind" or "interleave"
    access: str
    reason: str


class TieredAllocator(OffloadsKV, Allocator):
    """See the module docstring. With ``resident_kv_bytes`` it is also a KV tier: the KV
    cache's layers beyond the budget are bandwidth-bound data (``access="kv"``), striped over
    the far-memory nodes (:mod:`apportion_offload.kv`)."""

    name = "tiered"
    summary = (
        "tier-aware DRAM/CXL placement: optimizer states local, "
        "activations striped on far NUMA nodes"
    )
    Config = TieredConfig

    def __init__(self, config: TieredConfig | None = None):
        super().__init__(config)
        cfg = self.config
        nodes = topology()
        self.local_nodes = [n.id for n in nodes if n.has_cpus] or [nodes[0].id]
        far = [n for n in nodes if not n.has_cpus and n.mem_bytes > 0]
        if cfg.emulate == "off" and not far:
            self.emulated = False
        else:
            self.emulated = cfg.emulate == "on" or not far
        if self.emulated:
            base = max(n.id for n in nodes) + 1
            self.far_nodes = list(range(base, base + cfg.emulated_far_nodes))
        else:  # nearest first, by the SLIT distance from the first local node
            dist = next(n.distances for n in nodes if n.id == self.local_nodes[0])
            far.sort(key=lambda n: (dist[n.id] if n.id < len(dist) else 255, n.id))
            self.far_nodes = [n.id for n in far]
        local_mem = sum(n.mem_bytes for n in nodes if n.id in self.local_nodes)
        self.local_capacity = (
            cfg.local_capacity_bytes if cfg.local_capacity_bytes is not None else local_mem // 2
        )
        self._lock = threading.Lock()
        self._held: dict[int, tuple[Any, HostBuffer, Decision]] = {}
        self._tier_bytes = {"local": 0, "far": 0}
        self._node_bytes: dict[int, int] = {}
        self._spills = 0
        self.decisions: list[Decision] = []
        self._model: TierModel | None = None
        self.bind_error: str | None = None

    @property
    def model(self) -> TierModel:
        """The tier model (measured on first use)."""
        if self._model is None:
            self._model = TierModel.measure(
                len(self.far_nodes), self.config.cxl_bandwidth_ratio, self.config.cxl_latency_ratio
            )
        return self._model

    def place(self, nbytes: int, access: str = "default") -> Decision:
        """Where ``nbytes`` of this access class go (no memory is touched)."""
        cls = access_class(access)
        local_room = self._tier_bytes["local"] + nbytes <= self.local_capacity
        if cls == "bandwidth" and self.far_nodes:
            return Decision(
                "far",
                list(self.far_nodes),
                "interleave",
                cls,
                "bandwidth-bound: striped over the far-memory nodes",
            )
        if local_room or not self.far_nodes:
            why = "latency-critical: local DRAM" if cls == "latency" else "local DRAM has room"
            return Decision("local", list(self.local_nodes), "bind", cls, why)
        return Decision(
            "far",
            [self.far_nodes[0]],
            "bind",
            cls,
            f"local DRAM budget ({self.local_capacity} bytes) is full: "
            "spilled to the nearest far node",
        )

    def allocate(self, shape: Sequence[int], dtype: Any, *, access: str = "default") -> Any:
        nbytes = tensor_nbytes(shape, dtype)
        cap = self.config.cap_bytes
        with self._lock:
            if (
                cap is not None and self._stats.current_bytes + nbytes > cap
            ):  # before any memory is touched
                raise PoolCapacityError(
                    f"tiered: allocating {nbytes} bytes would exceed cap_bytes={cap} "
                    f"({self._stats.current_bytes} in use)"
                )
            decision = self.place(nbytes, access)
            buf = HostBuffer.create(max(nbytes, 1))
            self._bind(buf, decision)
            tensor = buf.tensor[:nbytes].view(dtype).view(as_shape(shape))
            self._held[id(tensor)] = (tensor, buf, decision)
            self._tier_bytes[decision.tier] += nbytes
            share = nbytes // len(decision.nodes)
            for n in decision.nodes:
                self._node_bytes[n] = self._node_bytes.get(n, 0) + share
            self._spills += decision.reason.startswith("local DRAM budget")
            self.decisions.append(decision)
            self._track(tensor)
        return tensor

    def _bind(self, buf: HostBuffer, decision: Decision) -> None:
        if not self.config.bind:
            return
        if self.emulated:
            nodes, mode = list(self.local_nodes), MPOL_BIND
        else:
            nodes, mode = (
                decision.nodes,
                MPOL_INTERLEAVE if decision.policy == "interleave" else MPOL_BIND,
            )
        try:
            mbind(buf.address, buf.nbytes, mode, nodes)
        except OSError as exc:  # recorded, not fatal: the data is still correct, just unplaced
            self.bind_error = str(exc)

    def free(self, tensor: Any) -> None:
        with self._lock:
            entry = self._held.get(id(tensor))
            if entry is None or entry[0] is not tensor:
                raise ValueError(
                    "free() of a tensor this allocator did not allocate (or freed twice)"
                )
            del self._held[id(tensor)]
            _, buf, decision = entry
            nbytes = tensor.numel() * tensor.element_size()
            self._tier_bytes[decision.tier] -= nbytes
            for n in decision.nodes:
                self._node_bytes[n] -= nbytes // len(decision.nodes)
            super().free(tensor)
        buf.release()

    def kv_tier(self) -> Any:
        from apportion_offload.kv.tiers import host_tier

        return host_tier(self, access="kv")

    def decision_of(self, tensor: Any) -> Decision:
        entry = self._held.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            raise ValueError("not a live tensor of this allocator")
        return entry[2]

    def stats(self) -> AllocatorStats:
        s = self._stats
        s.extra = {
            "emulated": self.emulated,
            "local_nodes": self.local_nodes,
            "far_nodes": self.far_nodes,
            "local_capacity_bytes": self.local_capacity,
            "tier_bytes": dict(self._tier_bytes),
            "node_bytes": dict(self._node_bytes),
            "spills": self._spills,
            "numa_via": numa().via,
            "bind_error": self.bind_error,
        }
        return s


def predict(
    trace: Sequence[tuple[int, str, float]], decisions: Sequence[Decision], model: TierModel
) -> float:
    """Predicted seconds of an access trace: ``(nbytes, access, passes)`` per tensor.

    Latency-critical tensors are charged per cache line at their tier's latency, bandwidth-bound
    ones stream at their tier's (aggregate, when striped) bandwidth; ``passes`` is how many
    times a step touches the tensor.
    """
    total = 0.0
    for (nbytes, access, passes), d in zip(trace, decisions, strict=True):
        if access_class(access) == "latency":
            total += passes * model.random_seconds(nbytes / 64, d.tier)
        else:
            total += passes * model.stream_seconds(nbytes, d.tier, len(d.nodes))
    return total
