"""tiered: access-class decisions, real page binding (mbind + move_pages), emulated far tiers."""

import pytest
import torch
from apportion.testing.contracts import AllocatorContract
from apportion_offload.errors import PoolCapacityError
from apportion_offload.numa import page_nodes, topology
from apportion_offload.tiered import Decision, TieredAllocator, TieredConfig, TierModel, predict


class TestTieredContract(AllocatorContract):
    component = "tiered"


def test_decisions_by_access_class():
    a = TieredAllocator(
        TieredConfig(local_capacity_bytes=8 << 20, emulate="on", emulated_far_nodes=3)
    )
    opt = a.allocate((1 << 20,), torch.float32, access="optimizer")  # 4 MiB
    act = a.allocate((1 << 20,), torch.float32, access="activation")
    ckpt = a.allocate((1 << 20,), torch.bfloat16, access="checkpoint")
    opt2 = a.allocate((1 << 20,), torch.float32, access="optimizer")
    spill = a.allocate((1 << 20,), torch.float32, access="optimizer")  # local budget is used up
    d = {
        k: a.decision_of(t)
        for k, t in dict(opt=opt, act=act, ckpt=ckpt, opt2=opt2, spill=spill).items()
    }
    assert d["opt"].tier == d["opt2"].tier == "local" and d["opt"].policy == "bind"
    assert d["act"].tier == d["ckpt"].tier == "far" and d["act"].policy == "interleave"
    assert d["act"].nodes == a.far_nodes and len(a.far_nodes) == 3
    assert (
        d["spill"].tier == "far"
        and d["spill"].nodes == [a.far_nodes[0]]
        and "spilled" in d["spill"].reason
    )
    extra = a.stats().extra
    assert extra["spills"] == 1 and extra["tier_bytes"] == {
        "local": 8 << 20,
        "far": 10 << 20,
    }  # 4 + 2 + 4 MiB
    for t in (opt, act, ckpt, opt2, spill):
        a.free(t)
    assert a.stats().extra["tier_bytes"] == {"local": 0, "far": 0}
    with pytest.raises(ValueError, match="unknown access class"):
        a.allocate((4,), torch.float32, access="sometimes")


def test_request_over_the_cap_is_an_error_not_an_oom():
    a = TieredAllocator(TieredConfig(cap_bytes=8 << 20, emulate="on"))
    with pytest.raises(PoolCapacityError, match="cap_bytes=8388608"):
        a.allocate((1 << 40,), torch.float32)  # 4 TiB: refused before any memory is touched
    keep = a.allocate((1 << 20,), torch.float32, access="activation")
    with pytest.raises(PoolCapacityError, match="4194304 in use"):
        a.allocate((5 << 20,), torch.uint8)
    a.free(keep)
    a.free(a.allocate((5 << 20,), torch.uint8))
    assert a.stats().current_bytes == 0


def test_pages_really_land_on_the_bound_node():
    a = TieredAllocator(TieredConfig(emulate="auto"))
    t = a.allocate((256, 1024), torch.float32, access="optimizer")
    t.fill_(1.0)  # first touch places the pages under the policy set by mbind
    nodes = set(page_nodes(t.data_ptr(), t.numel() * 4))
    assert a.stats().extra["bind_error"] is None
    assert nodes <= set(a.local_nodes), nodes
    if a.emulated:
        assert len(topology()) == 1 or not any(not n.has_cpus for n in topology())


def test_tier_aware_beats_first_come_under_a_small_local_budget():
    """Activations arrive first in a step; first-come would give them the DRAM the optimizer
    states need, pushing those (latency-bound) to CXL."""
    model = TierModel(
        local_bandwidth=20e9,
        local_latency=90e-9,
        far_bandwidth=10e9,
        far_latency=200e-9,
        far_nodes=2,
    )
    trace = [(64 << 20, "activation", 2.0)] * 4 + [(32 << 20, "optimizer", 1.0)] * 4
    a = TieredAllocator(TieredConfig(local_capacity_bytes=160 << 20, emulate="on", bind=False))
    ours = []
    for n, acc, _ in trace:
        ours.append(a.place(n, acc))
        a._tier_bytes[ours[-1].tier] += n  # account as allocate() would
    first_come, used = [], 0
    for n, acc, _ in trace:
        local = used + n <= 160 << 20
        used += n if local else 0
        first_come.append(
            Decision(
                "local" if local else "far", [0] if local else [a.far_nodes[0]], "bind", acc, ""
            )
        )
    assert all(d.tier == "local" for d in ours[4:]) and all(d.tier == "far" for d in ours[:4])
    assert predict(trace, ours, model) < predict(trace, first_come, model)


def test_measured_model_is_sane():
    m = TieredAllocator(TieredConfig(emulate="on")).model
    assert m.measured and m.local_bandwidth > 1e8 and 0 < m.local_latency < 1e-5
    assert m.far_latency > m.local_latency and m.stream_seconds(1e9, "far", 4) < m.stream_seconds(
        1e9, "far", 1
    )
