"""A trace-driven serving simulator with measured costs.

Iteration-level, as vLLM and FastSwitch schedule: each iteration the fair scheduler orders
the active requests, the highest-priority ones that fit the device pool run (one prefill or
one decode step each), lower-priority ones are preempted to the host. The allocator and
scheduler are the real ones (:mod:`.blocks`, :mod:`.scheduler`); time comes from a
:class:`CostModel` whose copy costs are *measured* by swapping real KV tensors through
:class:`~.swap.SwapManager` in both modes and whose compute costs are measured (or given).

Two systems on the same trace:

- ``vllm``: blocks from a free list, swaps block by block and layer by layer, synchronous
  (the batch waits for them), and a finished turn's KV is dropped (the next turn prefills
  the whole history again).
- ``fastswitch``: block groups, swaps as few large copies on a swap thread that overlaps
  compute (a request swapping in joins the batch when its copy lands; nobody else waits),
  and a finished turn's KV stays on the host for the conversation's next turn.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from apportion_kvcache.fastswitch.blocks import (
    BlockAllocator,
    BlockGroupAllocator,
    Group,
    KVShape,
    PoolExhaustedError,
)
from apportion_kvcache.fastswitch.scheduler import FairScheduler, Request

System = Literal["vllm", "fastswitch"]


@dataclass
class CostModel:
    """Seconds for compute and copies. Copy time = copies * per_copy + bytes / bandwidth."""

    prefill_per_token: float
    decode_step: float  # one decode iteration's fixed cost
    decode_per_seq: float  # per sequence in the batch
    block_bytes: int
    group_per_copy: float
    group_bandwidth: float
    block_per_copy: float
    block_bandwidth: float
    layers: int

    def compute(self, prefill_tokens: int, decode_seqs: int) -> float:
        t = prefill_tokens * self.prefill_per_token
        if decode_seqs:
            t += self.decode_step + decode_seqs * self.decode_per_seq
        return t

    def swap(self, system: System, blocks: int, runs: int) -> float:
        nbytes = blocks * self.block_bytes
        if system == "fastswitch":
            return runs * self.group_per_copy + nbytes / self.group_bandwidth
        return blocks * self.layers * 2 * self.block_per_copy + nbytes / self.block_bandwidth

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def measure_copy_costs(
    shape: KVShape, *, blocks: int = 256, device: str | None = None
) -> dict[str, float]:
    """Swap real KV out and back in both modes; fit per-copy overhead and bandwidth from a
    small and a large swap."""
    import torch

    from apportion_kvcache.fastswitch.swap import SwapManager, raw_copy_seconds

    out: dict[str, float] = {}
    for gran in ("group", "block"):
        mgr = SwapManager(shape, blocks * 2 + 8, blocks * 2 + 8, granularity=gran, device=device)
        pts = []
        for n in (max(1, blocks // 16), blocks):
            best = float("inf")
            copies = 0
            for rep in range(3):
                rid = f"cal-{n}-{rep}"
                mgr.allocate(rid, n)
                mgr.write(
                    rid,
                    torch.randn(
                        n, shape.layers, 2, shape.kv_heads, shape.block_size, shape.head_dim
                    ),
                )
                rec = mgr.swap_out(rid).result()
                back = mgr.swap_in(rid).result()
                best = min(best, rec.seconds, back.seconds)
                copies = rec.copies
                mgr.release(rid)
            pts.append((n, copies, best))
        mgr.close()
        (n1, c1, t1), (n2, c2, t2) = pts
        b1, b2 = n1 * shape.block_bytes, n2 * shape.block_bytes
        if gran == "group":  # one copy each way: t = per_copy + bytes/bw
            bw = (b2 - b1) / max(t2 - t1, 1e-9)
            per = max(t1 - b1 / bw, 0.0)
        else:
            # copies grow with bytes: attribute everything to per-copy cost + raw memcpy bandwidth
            bw = b2 / max(raw_copy_seconds(b2), 1e-9)
            per = max((t2 - b2 / bw) / c2, 0.0)
        out[f"{gran}_bandwidth"] = bw
        out[f"{gran}_per_copy"] = per
        out[f"{gran}_seconds_{n2}"] = t2
        out[f"{gran}_copies_{n2}"] = c2
    big = blocks * shape.block_bytes
    out["memcpy_bandwidth"] = big / raw_copy_seconds(
        big, device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    return out


@dataclass
class TraceItem:
    arrival: float
    conversation: str
    turn: int
    prompt_tokens: int
    output_tokens: int


def make_trace(
    conversations: int = 24,
    turns: int = 3,
    *,
    rate: float = 2.0,
    think_s: float = 2.0,
    prompt: tuple[int, int] = (200, 900),
    output: tuple[int, int] = (32, 256),
    seed: int = 0,
) -> list[TraceItem]:
    """Multi-turn conversations (ShareGPT-like lengths): Poisson conversation starts at
    ``rate``/s; each next turn arrives ``think_s`` after... its scheduled time (the simulator
    releases a turn only once the previous one finished)."""
    rng = random.Random(seed)
    t = 0.0
    items = []
    for c in range(conversations):
        t += rng.expovariate(rate)
        for turn in range(turns):
            items.append(
                TraceItem(
                    t + turn * think_s, f"c{c}", turn, rng.randint(*prompt), rng.randint(*output)
                )
            )
    return items


@dataclass
class SimResult:
    system: str
    ttft: list[float] = field(default_factory=list)
    tbt: list[float] = field(default_factory=list)
    swaps: int = 0
    swap_seconds: float = 0.0
    preemptions: int = 0
    reused_turns: int = 0
    makespan: float = 0.0
    waited_for_memory: int = 0
    rejected: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "requests": len(self.ttft),
            "ttft_p50": pct(self.ttft, 50),
            "ttft_p99": pct(self.ttft, 99),
            "tbt_p50": pct(self.tbt, 50),
            "tbt_p99": pct(self.tbt, 99),
            "swaps": self.swaps,
            "swap_seconds": self.swap_seconds,
            "preemptions": self.preemptions,
            "reused_turns": self.reused_turns,
            "makespan_s": self.makespan,
            "admission_waits": self.waited_for_memory,
            "rejected": self.rejected,
        }


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def simulate(
    trace: list[TraceItem],
    system: System,
    cost: CostModel,
    *,
    device_blocks: int,
    host_blocks: int,
    block_size: int = 16,
    max_batch: int = 32,
    scheduler: FairScheduler | None = None,
    max_iterations: int = 1_000_000,
) -> SimResult:
    """Run ``trace`` through ``system``; returns per-request TTFT and per-token TBT."""
    sched = scheduler or FairScheduler()
    alloc = (
        BlockGroupAllocator(device_blocks)
        if system == "fastswitch"
        else BlockAllocator(device_blocks)
    )
    host = (
        BlockGroupAllocator(host_blocks) if system == "fastswitch" else BlockAllocator(host_blocks)
    )
    res = SimResult(system)
    dev_groups: dict[str, list[Group]] = {}
    host_groups: dict[str, list[Group]] = {}
    kept: dict[
        str, tuple[list[Group], int]
    ] = {}  # conversation -> host groups of its finished turns
    pending = sorted(trace, key=lambda x: (x.arrival, x.conversation, x.turn))
    by_conv: dict[str, list[TraceItem]] = {}
    for it in pending:
        by_conv.setdefault(it.conversation, []).append(it)
    history: dict[str, int] = {}
    released = [by_conv[c][0] for c in by_conv]
    queue = sorted(released, key=lambda x: x.arrival)
    active: list[Request] = []
    now = 0.0
    channel = 0.0  # FastSwitch's swap thread: busy until this time

    def blocks_for(tokens: int) -> int:
        return -(-tokens // block_size)

    def swap_cost(n: int, groups: list[Group]) -> float:
        return cost.swap(system, n, max(len(groups), 1))

    for _ in range(max_iterations):
        while queue and queue[0].arrival <= now:
            it = queue.pop(0)
            active.append(
                Request(
                    f"{it.conversation}/{it.turn}",
                    it.conversation,
                    it.arrival,
                    it.prompt_tokens,
                    it.output_tokens,
                    history_tokens=history.get(it.conversation, 0),
                )
            )
        if not active:
            if not queue:
                break
            now = max(now, queue[0].arrival)
            continue
        sched.update(active, now)
        blocking = 0.0  # synchronous swap time (vllm)
        running: list[Request] = []
        order = sched.order(active)
        for r in list(order):
            if len(running) >= max_batch:
                break
            if r.state == "swapping" and r.ready_at > now:
                continue
            if r.state == "swapping":
                r.state = "running"
            if blocks_for(r.context + 1) > device_blocks:  # can never fit: refuse, don't deadlock
                r.state = "done"
                active.remove(r)
                res.rejected += 1
                continue
            need = blocks_for(r.context + 1) - sum(g.count for g in dev_groups.get(r.id, []))
            if r.state == "swapped":
                need = blocks_for(r.context + 1)
            if need > alloc.free_blocks:
                # preempt lower-priority running requests (the end of the order) to make room
                victims = [
                    v
                    for v in reversed(order)
                    if v.state == "running"
                    and v is not r
                    and v not in running
                    and v.priority < r.priority
                ]
                for v in victims:
                    if need <= alloc.free_blocks:
                        break
                    groups = dev_groups.pop(v.id)
                    n = sum(g.count for g in groups)
                    try:
                        hg = host.allocate(n)
                    except PoolExhaustedError:
                        dev_groups[v.id] = groups
                        continue
                    alloc.free(groups)
                    host_groups[v.id] = hg
                    t = swap_cost(n, groups)
                    res.swaps += 1
                    res.swap_seconds += t
                    if system == "fastswitch":
                        channel = max(channel, now) + t
                    else:
                        blocking += t
                    v.state = "swapped"
                    v.preemptions += 1
                    res.preemptions += 1
            if need > alloc.free_blocks:
                res.waited_for_memory += 1
                continue  # admission control: wait
            if r.state == "swapped":
                hg = host_groups.pop(r.id)
                dg = alloc.allocate(need)
                host.free(hg)
                dev_groups[r.id] = dg
                t = swap_cost(need, dg)
                res.swaps += 1
                res.swap_seconds += t
                if system == "fastswitch":
                    channel = max(channel, now) + t
                    r.state, r.ready_at = "swapping", channel
                    continue  # joins when the copy lands
                blocking += t
                r.state = "running"
            else:
                groups = dev_groups.setdefault(r.id, [])
                if need > 0:
                    groups.extend(alloc.allocate(need, after=groups[-1] if groups else None))
                if (
                    not r.prefilled
                    and system == "fastswitch"
                    and r.conversation in kept
                    and r.history_tokens
                ):
                    hg, n = kept.pop(r.conversation)
                    host.free(hg)
                    t = swap_cost(n, hg)
                    res.swaps += 1
                    res.swap_seconds += t
                    channel = max(channel, now) + t
                    r.reused_history = True
                    res.reused_turns += 1
                    r.state, r.ready_at = "swapping", channel
                    continue
                r.state = "running"
            running.append(r)
        if not running:
            # nothing runnable: jump to the next event (a swap landing or an arrival)
            nxt = [r.ready_at for r in active if r.state == "swapping" and r.ready_at > now]
            if queue:
                nxt.append(queue[0].arrival)
            now = max(now + blocking, min(nxt)) if nxt else now + max(blocking, 1e-3)
            continue
        prefill = sum(
            (r.prompt_tokens + (0 if r.reused_history else r.history_tokens))
            for r in running
            if not r.prefilled
        )
        decode = sum(1 for r in running if r.prefilled)
        now += cost.compute(prefill, decode) + blocking
        for r in running:
            if not r.prefilled:
                r.prefilled = True
                sched.served(
                    r, prefill=r.prompt_tokens + (0 if r.reused_history else r.history_tokens)
                )
                r.first_token_at = now
                res.ttft.append(now - r.arrival)
            else:
                sched.served(r, decode=1)
                res.tbt.append(now - r.token_times[-1])
            r.generated += 1
            r.token_times.append(now)
            if r.generated >= r.output_tokens:
                r.state = "done"
                active.remove(r)
                groups = dev_groups.pop(r.id)
                history[r.conversation] = r.context
                n = sum(g.count for g in groups)
                if system == "fastswitch":  # keep the KV on the host for the next turn
                    old = kept.pop(r.conversation, None)
                    if old:
                        host.free(old[0])
                    try:
                        hg = host.allocate(n)
                        kept[r.conversation] = (hg, n)
                        channel = max(channel, now) + swap_cost(n, groups)
                    except PoolExhaustedError:
                        pass
                alloc.free(groups)
                nxt_turns = [
                    x for x in by_conv[r.conversation] if x.turn == int(r.id.split("/")[1]) + 1
                ]
                if nxt_turns:
                    it = nxt_turns[0]
                    queue.append(
                        TraceItem(
                            max(it.arrival, now),
                            it.conversation,
                            it.turn,
                            it.prompt_tokens,
                            it.output_tokens,
                        )
                    )
                    queue.sort(key=lambda x: x.arrival)
    res.makespan = now
    return res


def measure_compute(loaded: Any, *, prompt_tokens: int = 256, batch: int = 4) -> dict[str, float]:
    """Measure the model's prefill cost per token and decode step cost (batch 1 and ``batch``)."""
    import torch
    from apportion.host.kv import cache_kwargs

    model = loaded.model
    ids = torch.randint(100, 1000, (1, prompt_tokens))
    from transformers import DynamicCache

    def run(b: int) -> tuple[float, float]:
        cache = DynamicCache(config=model.config)
        x = ids.expand(b, -1)
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(input_ids=x, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
            t1 = time.perf_counter()
            steps = 4
            for _ in range(steps):
                model(input_ids=x[:, :1], use_cache=True, **cache_kwargs(model, cache))
            t2 = time.perf_counter()
        return (t1 - t0) / (prompt_tokens * b), (t2 - t1) / steps

    p1, d1 = run(1)
    pb, db = run(batch)
    per_seq = max((db - d1) / (batch - 1), 0.0)
    return {
        "prefill_per_token": min(p1, pb),
        "decode_step": max(d1 - per_seq, 0.0),
        "decode_per_seq": per_seq,
    }
