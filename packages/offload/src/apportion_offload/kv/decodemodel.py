"""The decode-speed model of an offloaded KV cache, behind
``apportion plan --offload TIER --resident-kv-fraction F`` (or ``--resident-kv-bytes N``).

It predicts one greedy decode step of :class:`~apportion_offload.kv.cache.OffloadedKVCache`
by replaying the cache's own schedule, layer by layer, on two timelines: the compute
(the model's forward, one layer after the other) and the copy thread (one job at a time,
in submission order). It is the roofline of the decode (every step reads the weights and the
resident KV, Fu 2024) with the offload's transfers pipelined beside it, as FlexGen
(Sheng et al., 2023) and ZeRO-Inference model theirs: a layer's time is at least its
compute and at least the fetch of the layer it waits for, ``step ~ sum_i max(compute_i,
fetch_{i+1})`` plus what the copy thread also carries (write-backs, the disk's file
writes), which the replay charges where they delay a fetch.

What the replay follows, as the cache does it:

- **placement**: the first layers are *pinned* while the pinned bytes, one layer and both
  slots' headroom fit ``resident_kv_bytes`` (decided at the prompt's length); as the decode
  grows the layers, the last pinned layer that no longer fits is moved to the tier (its
  whole KV written). Pinned layers grow by concatenation, as a ``DynamicCache``'s do, so
  each step also copies their KV once; an offloaded layer appends in its slot.
- **streaming**: offloaded layers pass through two slots. Touching layer ``i`` queues the
  write-back of the layer before it, waits for ``i``'s fetch (or fetches it on demand), then
  queues the fetch of the next offloaded layer into the slot ``i`` does not hold, circling
  to the first offloaded layer at the end of a step; a layer still in a slot is not fetched
  again (with two offloaded layers or fewer, nothing streams after the first step).
- **tiers**: host memory (``pinned-pool``, ``tiered``): a fetch is one copy of the layer
  (``memcpy`` on a CPU, PCIe on a GPU); NVMe (``nvme``): every swap file of the layer read
  back with O_DIRECT and verified (the prompt's file, then one per ``segment_tokens`` decode
  tokens), then copied into the slot; decode tokens are gathered in host memory and every
  ``segment_tokens`` become one more file (written, synced, renamed).

The compute side is the memory-bound decode: a layer reads its weights and its KV at
``compute_bandwidth`` (a resident layer also copies its KV once at ``append_bandwidth``),
the LM head its weights. Given the all-resident decode step measured at this context, the
model keeps that time and only splits it over the layers by those bytes. Each offloaded
layer also costs the compute a *hand-off* a step (the cache's bookkeeping, waking the copy
thread and waiting on it), a figure of the machine: small beside a GPU, up to a
millisecond on a CPU whose cores are all busy.

Figures: :class:`DecodeHardware` from a core hardware preset (:meth:`DecodeHardware.from_preset`)
or measured on this machine (:func:`calibrate`). The share of the fetch *hidden* is the
copy thread's time that did not lengthen the step, ``1 - (wait + hand-offs) / copy``, the
quantity the cache's counters give as ``1 - fetch_wait_seconds / copy_seconds``.
"""

from __future__ import annotations

import functools
import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

SLOT_HEADROOM = 16  # as apportion_offload.kv.cache: tokens a slot holds beyond its layer
TIERS = {"pinned-pool": "host", "tiered": "host", "host": "host", "cpu": "host", "nvme": "nvme"}


@dataclass(frozen=True)
class KVShape:
    """What the model needs to know about a model and its KV cache.

    ``kv_bytes``: bytes of one KV element (4 for float32, 2 for bfloat16);
    ``layer_weight_bytes``: weights one decoder layer reads per step; ``head_weight_bytes``:
    the LM head's.
    """

    layers: int
    kv_heads: int
    head_dim: int
    kv_bytes: float = 2.0
    layer_weight_bytes: float = 0.0
    head_weight_bytes: float = 0.0
    batch: int = 1

    @property
    def token_bytes(self) -> float:
        """Keys and values of one token in one layer."""
        return 2.0 * self.batch * self.kv_heads * self.head_dim * self.kv_bytes

    @classmethod
    def from_model_shape(cls, shape: Any) -> KVShape:
        """From the core's :class:`apportion.plan.ModelShape` (read by attribute)."""
        return cls(
            layers=int(shape.layers),
            kv_heads=int(shape.kv_heads),
            head_dim=int(shape.head_dim),
            kv_bytes=float(shape.kv_bytes),
            layer_weight_bytes=float(getattr(shape, "layer_weight_bytes", 0.0)),
            head_weight_bytes=float(getattr(shape, "head_weight_bytes", 0.0)),
        )


@dataclass(frozen=True)
class Link:
    """Seconds to move ``n`` bytes in ``ops`` operations: ``ops * latency + n / bandwidth``."""

    latency: float  # s per operation
    bandwidth: float  # B/s

    def seconds(self, nbytes: float, ops: int = 1) -> float:
        return ops * self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class DecodeHardware:
    """The figures of one machine the decode runs on.

    ``compute_bandwidth``: bytes/s at which a decode step reads weights and KV (its memory
    bound); ``append_bandwidth``: bytes/s of the copy a resident layer's concatenation makes;
    ``host_copy``: a layer between host memory and its resident slot; ``disk_read`` /
    ``disk_write``: one swap file read back / written (O_DIRECT, checksummed, synced);
    ``job_latency``: handing one job to the copy thread and back; ``handoff``: what an
    offloaded layer costs the compute each step beside its transfers (the cache's
    bookkeeping, waking the copy thread and waiting on it: on a busy CPU, the scheduler).
    """

    name: str
    compute_bandwidth: float
    append_bandwidth: float
    host_copy: Link
    disk_read: Link
    disk_write: Link
    job_latency: float = 20e-6
    handoff: float = 30e-6
    measured: bool = False

    @classmethod
    def from_preset(cls, hardware: Any) -> DecodeHardware:
        """From the core's :class:`apportion.plan.Hardware` (``hbm_bandwidth``,
        ``pcie_bandwidth``, ``extra["nvme_bandwidth"]`` in B/s): a GPU that computes from HBM,
        fetches host layers over PCIe and disk layers from NVMe through the host."""
        extra = getattr(hardware, "extra", None) or {}
        hbm = float(hardware.hbm_bandwidth)
        nvme = float(extra.get("nvme_bandwidth", 7e9))
        return cls(
            name=str(getattr(hardware, "name", "gpu")),
            compute_bandwidth=hbm,
            append_bandwidth=hbm / 2,  # a concatenation reads and writes
            host_copy=Link(10e-6, float(hardware.pcie_bandwidth)),
            disk_read=Link(100e-6, nvme),
            disk_write=Link(2e-3, nvme / 2),  # fdatasync and rename per file
        )

    def figures(self) -> dict[str, Any]:
        """The figures in GB/s and microseconds, for printing."""
        return {
            "hardware": self.name,
            "measured": self.measured,
            "compute_gbps": round(self.compute_bandwidth / 1e9, 3),
            "copy_gbps": round(self.host_copy.bandwidth / 1e9, 3),
            "disk_read_gbps": round(self.disk_read.bandwidth / 1e9, 3),
            "disk_read_latency_us": round(self.disk_read.latency * 1e6, 1),
            "disk_write_gbps": round(self.disk_write.bandwidth / 1e9, 3),
            "disk_write_latency_us": round(self.disk_write.latency * 1e6, 1),
            "job_latency_us": round(self.job_latency * 1e6, 1),
            "handoff_us": round(self.handoff * 1e6, 1),
        }


@dataclass(frozen=True)
class DecodePrediction:
    """One placement's predicted decode, averaged over its steps."""

    tier: str
    prompt_tokens: int
    new_tokens: int
    resident_kv_bytes: float
    full_kv_bytes: float
    pinned_layers: int  # at the first decode step
    offloaded_layers: int
    step_seconds: float
    resident_step_seconds: float
    copy_seconds: float  # per step, the copy thread's work (fetches and write-backs)
    wait_seconds: float  # per step, the compute waiting for fetches
    step_from: str  # "measured" or "compute model"
    handoff_seconds: float = 0.0  # per step, the offloaded layers' hand-offs on the compute

    @property
    def exposed_seconds(self) -> float:
        """What streaming adds to a step's compute: waiting for fetches, and the hand-offs."""
        return self.wait_seconds + self.handoff_seconds

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.step_seconds

    @property
    def fetch_hidden_share(self) -> float:
        """Share of the copy thread's time that did not lengthen the step: ``1 - exposed /
        copy`` (1.0: no copies)."""
        if self.copy_seconds <= 0:
            return 1.0
        return min(1.0, max(0.0, 1.0 - self.exposed_seconds / self.copy_seconds))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            decode_tokens_per_s=round(self.tokens_per_s, 4),
            decode_ms_per_step=round(1e3 * self.step_seconds, 4),
            resident_ms_per_step=round(1e3 * self.resident_step_seconds, 4),
            vs_resident=round(self.resident_step_seconds / self.step_seconds, 4),
            fetch_ms_per_step=round(1e3 * self.copy_seconds, 4),
            fetch_hidden_share=round(self.fetch_hidden_share, 4),
            bottleneck="fetch" if self.exposed_seconds > 0.05 * self.step_seconds else "compute",
        )
        return out


# ---------------------------------------------------------------------- placement


def headroom(budget: float, layer_bytes: float, token_bytes: float) -> int:
    """Tokens a slot holds beyond its layer (the cache's rule: up to 16, fewer when tight)."""
    spare = (budget - layer_bytes) // (2 * token_bytes)
    return int(max(1, min(SLOT_HEADROOM, spare)))


def pinned_layers(layers: int, budget: float, tokens: int, token_bytes: float) -> int:
    """How many of the first layers the cache pins at a prompt of ``tokens``: each while the
    pinned layers, itself, one more layer and both slots' headroom fit the budget."""
    layer = tokens * token_bytes
    room = layer + 2 * headroom(budget, layer, token_bytes) * token_bytes
    return max(0, min(layers, math.floor((budget - room) / layer)))


def pinned_at(
    layers: int, budget: float, prompt_tokens: int, tokens: int, token_bytes: float
) -> int:
    """How many layers stay pinned once every layer holds ``tokens`` entries, after a prompt of
    ``prompt_tokens`` placed them: as the layers grow, the cache moves the last pinned layer
    to the tier while the pinned layers and the room the offloaded ones stream through (the
    largest layer and both slots' headroom) overrun the budget."""
    return min(
        pinned_layers(layers, budget, prompt_tokens, token_bytes),
        pinned_layers(layers, budget, max(tokens, prompt_tokens), token_bytes),
    )


def minimum_budget(shape: KVShape, prompt_tokens: int, new_tokens: int) -> float:
    """The smallest ``resident_kv_bytes`` the cache takes: one layer at its longest (the
    layer being computed is always resident)."""
    return (prompt_tokens + max(new_tokens - 1, 0)) * shape.token_bytes


# ---------------------------------------------------------------------- the replay


class _CopyThread:
    """One worker, jobs in submission order: a job starts when it is queued and the one
    before it is done."""

    def __init__(self) -> None:
        self.free_at = 0.0
        self.busy = 0.0

    def run(self, now: float, seconds: float) -> float:
        start = max(self.free_at, now)
        self.free_at = start + seconds
        self.busy += seconds
        return self.free_at


def _replay(
    shape: KVShape,
    hw: DecodeHardware,
    tier: str,
    prompt_tokens: int,
    new_tokens: int,
    budget: float,
    scale: float,
    prefetch: bool,
    segment_tokens: int,
) -> tuple[float, float, float, int]:
    """Total decode seconds, copy-thread seconds and compute wait over the decode's steps,
    and the layers pinned at its start (see the module docstring)."""
    L, tok = shape.layers, shape.token_bytes
    disk = TIERS[tier] == "nvme"
    pinned = pinned_layers(L, budget, prompt_tokens, tok)
    start_pinned = pinned

    def compute(n: int, resident: bool) -> float:
        read = (shape.layer_weight_bytes + n * tok) / hw.compute_bandwidth
        grow = n * tok / hw.append_bandwidth if resident else 0.0
        return scale * (read + grow)

    def fetch(n: int, appended: int) -> float:
        nbytes = n * tok
        if not disk:
            return hw.job_latency + hw.host_copy.seconds(nbytes)
        files = 1 + appended // segment_tokens
        return hw.job_latency + hw.disk_read.seconds(nbytes, files) + hw.host_copy.seconds(nbytes)

    def store_whole(n: int) -> float:
        nbytes = n * tok
        out = hw.job_latency + hw.host_copy.seconds(nbytes)
        return out + (hw.disk_write.seconds(nbytes) if disk else 0.0)

    def write_back(appended: int) -> float:
        out = hw.job_latency + hw.host_copy.seconds(tok)
        if disk and appended % segment_tokens == 0:  # the gathered tokens become a file
            out += hw.disk_write.seconds(segment_tokens * tok)
        return out

    copier = _CopyThread()
    now = wait = 0.0
    ready: dict[int, float] = {}  # layer -> when its fetch lands
    slots: list[int | None] = [None, None]  # the layer each slot holds
    prev: int | None = None
    first = True
    head = scale * shape.head_weight_bytes / hw.compute_bandwidth
    steps = max(new_tokens - 1, 0)
    begin = 0.0
    for s in range(-1, steps):  # step -1 warms the pipeline up; it is not counted
        if s == 0:
            begin, copier.busy, wait = now, 0.0, 0.0
        n = prompt_tokens + max(s, 0) + 1
        appended = max(s, 0) + 1
        while pinned > pinned_at(L, budget, prompt_tokens, n, tok):  # the cache's rebalance
            pinned -= 1  # the last pinned layer goes to the tier, whole
            copier.run(now, store_whole(n))
        if first and s == 0 and pinned < L:  # the prompt's last layer is placed now
            copier.run(now, store_whole(n - 1))
            first = False
        for i in range(L):
            offloaded = i >= pinned
            if prev is not None and prev != i and prev >= pinned:
                copier.run(now, write_back(appended))
            if offloaded:
                if i not in slots:  # not prefetched: fetched on demand
                    j = next((k for k, x in enumerate(slots) if x is None), None)
                    slots[0 if j is None else j] = i
                    ready[i] = copier.run(now, fetch(n - 1, appended - 1))
                landed = ready.pop(i, now)
                if landed > now:
                    wait += landed - now
                    now = landed
            if prefetch and pinned < L:
                nxt = max(i + 1, pinned)  # the next offloaded layer, circling
                nxt = pinned if nxt >= L else nxt
                if nxt != i and nxt not in slots:
                    j = next((k for k, x in enumerate(slots) if x is None), None)
                    if j is None:
                        j = next((k for k, x in enumerate(slots) if x != i), None)
                    if j is not None:
                        slots[j] = nxt
                        # fetched before the step that needs it appends: one token fewer
                        later = 0 if nxt > i else 1
                        ready[nxt] = copier.run(now, fetch(n - 1 + later, appended - 1 + later))
            if offloaded:
                now += hw.handoff  # the cache's bookkeeping on the compute thread
            now += compute(n, resident=not offloaded)
            prev = i
        now += head
    return now - begin, copier.busy, wait, start_pinned


def predict(
    shape: KVShape,
    hw: DecodeHardware,
    tier: str,
    prompt_tokens: int,
    new_tokens: int,
    resident_kv_bytes: float,
    *,
    resident_step_seconds: float | None = None,
    prefetch: bool = True,
    segment_tokens: int = 64,
) -> DecodePrediction:
    """Predict the decode of ``new_tokens`` after a prompt of ``prompt_tokens`` with
    ``resident_kv_bytes`` of KV resident and the rest in ``tier`` (``pinned-pool``,
    ``tiered``, ``nvme``; ``host``/``cpu`` for host memory).

    ``resident_step_seconds``: the all-resident decode step measured at this context; the
    model keeps it and adds what the offload changes (``None``: the compute model).
    ``prefetch``, ``segment_tokens``: the allocator's ``kv_prefetch`` and
    ``kv_segment_tokens``. Raises :class:`ValueError` for a budget smaller than one layer
    (naming the minimum) or an unknown tier.
    """
    if tier not in TIERS:
        raise ValueError(f"unknown KV tier {tier!r}; use one of: {', '.join(TIERS)}")
    if prompt_tokens < 1 or new_tokens < 1:
        raise ValueError("the prompt and the new tokens must be at least one token each")
    if not resident_kv_bytes > 0:
        raise ValueError(f"resident_kv_bytes must be positive, got {resident_kv_bytes}")
    minimum = minimum_budget(shape, prompt_tokens, new_tokens)
    if resident_kv_bytes < minimum:
        raise ValueError(
            f"resident_kv_bytes={resident_kv_bytes:.0f} is smaller than one layer's KV; the "
            f"minimum is {minimum:.0f} ({prompt_tokens + new_tokens - 1} tokens x "
            f"{shape.token_bytes:.0f} bytes)"
        )
    steps = max(new_tokens - 1, 1)
    L, tok = shape.layers, shape.token_bytes
    mean_n = prompt_tokens + (steps + 1) / 2
    modelled = (
        L
        * (
            (shape.layer_weight_bytes + mean_n * tok) / hw.compute_bandwidth
            + mean_n * tok / hw.append_bandwidth
        )
        + shape.head_weight_bytes / hw.compute_bandwidth
    )
    scale = 1.0 if resident_step_seconds is None else resident_step_seconds / modelled
    resident_step = modelled * scale
    total, busy, wait, pinned = _replay(
        shape,
        hw,
        tier,
        prompt_tokens,
        new_tokens,
        resident_kv_bytes,
        scale,
        prefetch,
        max(1, int(segment_tokens)),
    )
    n_steps = max(new_tokens - 1, 1)
    step = total / n_steps if new_tokens > 1 else resident_step
    if pinned >= L:
        step = resident_step  # nothing offloaded: the all-resident cache's step
    return DecodePrediction(
        tier=tier,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        resident_kv_bytes=float(resident_kv_bytes),
        full_kv_bytes=(prompt_tokens + new_tokens) * tok * L,
        pinned_layers=pinned,
        offloaded_layers=L - pinned,
        step_seconds=step,
        resident_step_seconds=resident_step,
        copy_seconds=busy / n_steps,
        wait_seconds=wait / n_steps,
        step_from="compute model" if resident_step_seconds is None else "measured",
        handoff_seconds=hw.handoff * (L - pinned) if pinned < L else 0.0,
    )


# ---------------------------------------------------------------------- calibration


def _median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fit(small: tuple[float, float], large: tuple[float, float]) -> Link:
    """A latency + size / bandwidth line through two (bytes, seconds) measurements; the
    larger one spends at least half its time moving bytes (noise can make it no slower than
    the small one)."""
    (n0, t0), (n1, t1) = small, large
    bandwidth = (n1 - n0) / max(t1 - t0, t1 / 2, 1e-9)
    return Link(max(t1 - n1 / bandwidth, 0.0), bandwidth)


class _DecodeLoad:
    """A stand-in for the decode on a thread: matrix-vector products over ``nbytes`` of
    small weight matrices, one after the other, as a decoder's layers run (memory-bound,
    and holding the interpreter between the products as a forward does). Its bandwidth is
    the compute figure; while it runs, the copies are timed beside it."""

    def __init__(self, nbytes: int = 64 << 20, side: int = 768):
        import torch

        count = max(1, nbytes // (side * side * 4))
        self.weights = [torch.randn(side, side) for _ in range(count)]
        self.x = torch.randn(side)
        self.nbytes = count * side * side * 4
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def forward(self) -> None:
        import torch

        x = self.x
        for w in self.weights:
            x = torch.mv(w, x).tanh_()

    def bandwidth(self, repeats: int = 5) -> float:
        self.forward()
        return self.nbytes / _median_seconds(self.forward, repeats)

    def __enter__(self) -> _DecodeLoad:
        def loop() -> None:
            while not self._stop.is_set():
                self.forward()

        self._thread = threading.Thread(target=loop, name="apportion-calibrate-load")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _handoff_seconds(load: _DecodeLoad, repeats: int = 7) -> float:
    """Per offloaded layer and step, what streaming costs the compute beyond its copies: a
    small decode (12 layers of 64 tokens, a slice of ``load`` as each layer's compute) through
    a real :class:`~apportion_offload.kv.cache.OffloadedKVCache` on a host tier, two layers
    resident, against the same decode through a ``DynamicCache``. The layers are small, so
    their copies take next to nothing: the difference is bookkeeping and hand-offs."""
    import torch
    from transformers import DynamicCache, LlamaConfig

    from apportion_offload.kv.cache import OffloadedKVCache
    from apportion_offload.pool import PinnedPool, PinnedPoolConfig

    layers, heads, dim, prompt, steps = 12, 2, 32, 64, 8
    cfg = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=heads * dim,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=dim,
        intermediate_size=64,
        vocab_size=64,
    )
    per_layer = load.weights[: max(1, len(load.weights) // layers)]
    budget = 4 * (prompt + steps + 16) * 2 * heads * dim * 4  # two layers pinned at most
    counts: dict[str, int] = {}

    def decode(offload: bool) -> float:
        pool = PinnedPool(PinnedPoolConfig(resident_kv_bytes=budget))
        cache: Any = (
            OffloadedKVCache(cfg, pool.kv_tier(), budget) if offload else DynamicCache(config=cfg)
        )
        try:
            with torch.inference_mode():
                for i in range(layers):
                    kv = torch.randn(1, heads, prompt, dim)
                    cache.update(kv, kv.clone(), i)
                t0 = time.perf_counter()
                for _ in range(steps):
                    for i in range(layers):
                        kv = torch.randn(1, heads, 1, dim)
                        cache.update(kv, kv.clone(), i)
                        x = load.x
                        for w in per_layer:
                            x = torch.mv(w, x).tanh_()
                seconds = time.perf_counter() - t0
            if offload:
                counts["offloaded"] = len(cache.placement()["offloaded_layers"])
            return seconds
        finally:
            if offload:
                cache.close()

    decode(True)
    extra = statistics.median(decode(True) - decode(False) for _ in range(repeats))  # paired
    return max(extra, 0.0) / (steps * max(counts.get("offloaded", 1), 1))


def calibrate(
    directory: str | None = None, *, block_bytes: int = 4 << 20, repeats: int = 5
) -> DecodeHardware:
    """Measure this machine's figures for a CPU decode (a second or two): the bandwidth of a
    decode-like loop of matrix-vector products (the compute), and, *beside* that loop (the
    copy thread runs beside the decode), a copy of ``block_bytes`` out of cache (the host tier,
    a concatenation), and the project's O_DIRECT swapper (:class:`~apportion_offload.nvme.
    NvmeSwapper`) writing and reading back swap files of 64 KiB and ``block_bytes`` in
    ``directory`` (a temporary directory when ``None``; its file system is the disk
    measured), fitted as latency + size / bandwidth. The copy thread's job latency is a
    round trip through a one-worker pool; what an offloaded layer costs the compute beside
    its copies is measured on a small decode through the real cache (``_handoff_seconds``).
    """
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from apportion_offload.nvme import NvmeSwapConfig, NvmeSwapper

    small = 64 << 10
    block_bytes = max(int(block_bytes), 4 * small)
    load = _DecodeLoad()
    compute = load.bandwidth()
    pool = ThreadPoolExecutor(1, thread_name_prefix="apportion-calibrate")
    tmp = tempfile.TemporaryDirectory(prefix="apportion-calibrate-", dir=directory)
    swapper = NvmeSwapper(NvmeSwapConfig(directory=tmp.name))
    try:
        job = _median_seconds(lambda: pool.submit(int).result(), 51)
        # a working set larger than the caches: each copy reads and writes cold memory
        count = max(4, (96 << 20) // block_bytes)
        srcs = [torch.ones(block_bytes // 4) for _ in range(count)]
        dst = [torch.empty_like(srcs[0]) for _ in range(count)]
        turn = iter(range(1 << 30))

        def copy() -> None:
            i = next(turn) % count
            dst[i].copy_(srcs[i])

        blocks = {n: torch.ones(n // 4) for n in (small, block_bytes)}
        keys = iter(range(1 << 30))
        written: dict[int, list[str]] = {small: [], block_bytes: []}

        def write(n: int) -> None:
            key = f"cal{n}-{next(keys)}"
            swapper.swap_out(key, blocks[n]).result()
            written[n].append(key)

        def read(n: int) -> None:
            key = written[n][next(keys) % len(written[n])]
            swapper.free(swapper.swap_in(key).result())

        with load:
            time.sleep(0.05)
            for _ in range(count):  # first touch of every page
                copy()
            copy_s = _median_seconds(copy, 3 * count)
            write_small = _median_seconds(lambda: write(small), repeats)
            write_large = _median_seconds(lambda: write(block_bytes), repeats)
            read_small = _median_seconds(lambda: read(small), 2 * repeats)
            read_large = _median_seconds(lambda: read(block_bytes), 2 * repeats)
        handoff = _handoff_seconds(load)
    finally:
        pool.shutdown()
        swapper.close()
        tmp.cleanup()
    copy_bw = block_bytes / copy_s
    disk = "O_DIRECT" if swapper.direct else "buffered"
    return DecodeHardware(
        name=f"this machine (cpu, measured; disk {disk})",
        compute_bandwidth=compute,
        append_bandwidth=copy_bw,
        host_copy=Link(0.0, copy_bw),
        disk_read=_fit((small, read_small), (block_bytes, read_large)),
        disk_write=_fit((small, write_small), (block_bytes, write_large)),
        job_latency=job,
        handoff=handoff,
        measured=True,
    )


@functools.lru_cache(maxsize=4)
def calibrated(directory: str | None = None) -> DecodeHardware:
    """:func:`calibrate`, measured once per process and directory."""
    return calibrate(directory)


# ---------------------------------------------------------------------- the plan hook


def plan_kv_decode(plan: Any, placement: str, hardware: Any = None) -> dict[str, Any]:
    """``plan --offload TIER`` with a resident KV budget: ``plan`` is the core's
    :class:`apportion.plan.Plan` with its ``kv_offload`` query
    (:class:`apportion.plan.KVOffloadQuery`). Bad input is a
    :class:`~apportion.errors.ConfigError` naming the option."""
    from apportion.errors import ConfigError

    query = plan.kv_offload
    tier = (placement or "").strip().lower()
    if tier not in TIERS:
        raise ConfigError(
            f"--offload {placement!r} with a resident KV budget names the KV cache's tier: "
            f"use one of {', '.join(TIERS)}",
            [("offload", str(placement))],
        )
    if query.calibrate:
        hw = calibrated(query.directory)
    elif isinstance(hardware, DecodeHardware):
        hw = hardware
    elif hardware is not None and hasattr(hardware, "hbm_bandwidth"):
        hw = DecodeHardware.from_preset(hardware)
    else:
        raise ConfigError("the KV decode model needs a hardware preset or --calibrate")
    shape = KVShape.from_model_shape(plan.model)
    step = query.step_seconds
    if step is not None and not step > 0:
        raise ConfigError(f"--step-ms must be positive, got {1e3 * step:g}", [("step-ms", "")])
    try:
        out = predict(
            shape,
            hw,
            tier,
            int(plan.context),
            int(plan.new_tokens),
            float(query.resident_bytes),
            resident_step_seconds=step,
        )
    except ValueError as exc:
        raise ConfigError(f"--offload {tier}: {exc}", [("resident-kv", str(exc))]) from None
    return {"model": "kv-decode", **out.as_dict(), "figures": hw.figures()}
