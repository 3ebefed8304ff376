"""FastSwitch: block groups, copy-then-commit swaps, the fair scheduler, the simulator and the
``fastswitch`` kv-policy (multi-turn reuse of host-kept KV)."""

from __future__ import annotations

import threading

import pytest
import torch
from apportion.base import Prompt
from apportion.host import Host
from apportion.host.kv import KVPolicy
from apportion.testing.contracts import KVPolicyContract
from apportion_kvcache.fastswitch.blocks import (
    BlockAllocator,
    BlockGroupAllocator,
    Group,
    KVShape,
    PoolExhaustedError,
)
from apportion_kvcache.fastswitch.policy import FastSwitch
from apportion_kvcache.fastswitch.scheduler import FairScheduler, Request
from apportion_kvcache.fastswitch.simulator import CostModel, make_trace, simulate
from apportion_kvcache.fastswitch.swap import SwapError, SwapManager

SHAPE = KVShape(layers=4, kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)


class TestFastSwitchContract(KVPolicyContract):
    component = "fastswitch"


# ----------------------------------------------------------------------------- allocation


def test_groups_are_contiguous_and_coalesce():
    a = BlockGroupAllocator(64)
    g1 = a.allocate(10)
    assert g1 == [Group(0, 10)]
    g2 = a.allocate(5)
    grown = a.allocate(3, after=g2[-1])  # extends in place
    assert grown == [Group(15, 3)]
    a.free(g1)
    a.free(g2 + grown)
    assert a.free_blocks == 64 and a.free_runs == 1
    with pytest.raises(ValueError, match="double free"):
        a.free(g1)


def test_fragmented_pool_still_allocates_and_exhaustion_is_typed():
    a = BlockGroupAllocator(16)
    parts = [a.allocate(2) for _ in range(8)]
    for p in parts[::2]:
        a.free(p)
    got = a.allocate(6)
    assert sum(g.count for g in got) == 6 and len(got) == 3
    with pytest.raises(PoolExhaustedError, match="need 3 KV blocks, 2 of 16 free"):
        a.allocate(3)
    b = BlockAllocator(4)
    assert [g.count for g in b.allocate(4)] == [1, 1, 1, 1]
    with pytest.raises(PoolExhaustedError):
        b.allocate(1)


# ----------------------------------------------------------------------------- swaps


def _kv(n: int) -> torch.Tensor:
    return torch.randn(n, SHAPE.layers, 2, SHAPE.kv_heads, SHAPE.block_size, SHAPE.head_dim)


@pytest.mark.parametrize("granularity", ["group", "block"])
def test_swap_round_trip_moves_real_kv(granularity):
    mgr = SwapManager(SHAPE, 32, 32, granularity=granularity, device="cpu")
    kv = _kv(6)
    mgr.allocate("r", 6)
    mgr.write("r", kv)
    rec = mgr.swap_out("r").result()
    assert mgr.placement["r"].tier == "host" and mgr.device.allocator.free_blocks == 32
    assert torch.equal(mgr.read("r"), kv)
    mgr.swap_in("r").result()
    assert torch.equal(mgr.read("r"), kv)
    # FastSwitch: one copy for one group; vLLM: per layer, per block, K and V
    assert rec.copies == (1 if granularity == "group" else 6 * SHAPE.layers * 2)
    mgr.close()


def test_swap_runs_on_the_swap_thread():
    seen = []
    mgr = SwapManager(
        SHAPE, 8, 8, device="cpu", fault=lambda r, i: seen.append(threading.current_thread().name)
    )
    mgr.allocate("r", 2)
    mgr.swap_out("r").result()
    assert seen and all(n.startswith("fastswitch-swap") for n in seen)
    mgr.close()


def test_failed_swap_requeues_and_loses_no_kv():
    fail = {"on": True}

    def fault(request, i):
        if fail["on"] and i == 1:
            raise OSError("injected copy failure")

    mgr = SwapManager(SHAPE, 32, 32, device="cpu", fault=fault)
    kv = _kv(8)
    mgr.allocate("pad", 1)
    mgr.allocate("r", 4)
    mgr.allocate("pad2", 1)
    mgr.allocate("r", 4)  # two groups -> two copies; the second one fails
    mgr.write("r", kv)
    host_free = mgr.host.allocator.free_blocks
    with pytest.raises(SwapError, match="failed midway.*intact on the device"):
        mgr.swap_out("r").result()
    assert mgr.placement["r"].tier == "device"
    assert torch.equal(mgr.read("r"), kv)
    assert mgr.host.allocator.free_blocks == host_free  # partial destination returned
    fail["on"] = False  # the requeued swap succeeds
    mgr.swap_out("r").result()
    assert torch.equal(mgr.read("r"), kv)
    mgr.close()


def test_swap_into_a_full_host_is_refused_not_crashed():
    mgr = SwapManager(SHAPE, 8, 2, device="cpu")
    mgr.allocate("r", 4)
    with pytest.raises(PoolExhaustedError):
        mgr.swap_out("r").result()
    assert mgr.placement["r"].tier == "device"
    mgr.close()


# ----------------------------------------------------------------------------- scheduling


def test_fair_scheduler_prefers_the_least_served():
    s = FairScheduler(priority_interval=1)
    a, b = Request("a/0", "a", 0.0, 10, 10), Request("b/0", "b", 0.0, 10, 10)
    s.served(a, decode=100)
    s.service.setdefault("b", 0.0)
    s.update([a, b], now=0.0)
    assert s.order([a, b])[0] is b


COST = CostModel(
    prefill_per_token=2e-4,
    decode_step=0.01,
    decode_per_seq=5e-4,
    block_bytes=SHAPE.block_bytes * 200,
    group_per_copy=2e-5,
    group_bandwidth=5e9,
    block_per_copy=2e-5,
    block_bandwidth=5e9,
    layers=30,
)


def test_simulator_completes_both_systems_under_memory_pressure():
    trace = make_trace(
        conversations=8, turns=2, rate=20.0, prompt=(100, 300), output=(16, 48), seed=1
    )
    results = {
        s: simulate(trace, s, COST, device_blocks=48, host_blocks=4000)
        for s in ("vllm", "fastswitch")
    }
    for r in results.values():
        assert len(r.ttft) == len(
            trace
        )  # every request served: admission control waits, never crashes
        assert r.preemptions > 0
    fs, vl = results["fastswitch"].summary(), results["vllm"].summary()
    assert fs["reused_turns"] > 0 and vl["reused_turns"] == 0
    assert fs["ttft_p99"] <= vl["ttft_p99"]


def test_simulator_rejects_a_request_larger_than_the_pool():
    trace = make_trace(conversations=2, turns=1, prompt=(900, 900), output=(4, 4))
    r = simulate(trace, "fastswitch", COST, device_blocks=20, host_blocks=100)
    assert r.rejected == 2 and not r.ttft


# ----------------------------------------------------------------------------- the kv-policy


def test_multi_turn_reuses_host_kept_kv(smollm2):
    policy = FastSwitch()
    host, ref = Host(smollm2, kv_policy=policy), Host(smollm2, kv_policy=KVPolicy())
    turn1 = [{"role": "user", "content": "List three colours of the rainbow."}]
    first = host.generate(Prompt(turn1), max_new_tokens=8)[0]
    assert policy.kept
    turn2 = turn1 + [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "Now name one more."},
    ]
    got = host.generate(Prompt(turn2), max_new_tokens=8)[0]
    assert policy.last_info["reused_tokens"] >= 16
    assert got.text == ref.generate(Prompt(turn2), max_new_tokens=8)[0].text
