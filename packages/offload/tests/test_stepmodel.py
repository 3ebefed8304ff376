"""The offload step-time model and the plan hook."""

import pytest
from apportion.errors import ConfigError
from apportion_offload.stepmodel import Hardware, Placement, Workload, plan_offload, step_time


def test_placements_parse():
    assert Placement.parse("gpu") == Placement()
    assert Placement.parse("nvme").params == "nvme"
    p = Placement.parse("params=cpu, optimizer=cpu ,activations=cxl")
    assert (p.params, p.gradients, p.optimizer, p.activations) == ("cpu", "gpu", "cpu", "cxl")
    for bad, match in [
        ("params=disk", "bad placement item"),
        ("weights=cpu", "bad placement"),
        ("params=cpu,params=nvme", "twice"),
        ("params=cpu", "optimizer off it too"),
    ]:
        with pytest.raises(ValueError, match=match):
            Placement.parse(bad)


def test_offloading_trades_memory_for_time():
    w = Workload(params=7e9, seq_lengths=(32768,))
    gpu, cpu, nvme = (step_time(w, Placement.parse(p)) for p in ("gpu", "cpu", "nvme"))
    assert gpu["gpu_gb"] > cpu["gpu_gb"] > nvme["gpu_gb"]
    assert gpu["step_seconds"] < cpu["step_seconds"] < nvme["step_seconds"]
    assert nvme["nvme_gb"] == pytest.approx(14 * 7)  # fp16 params + fp32 Adam states


def test_bandwidths_move_the_prediction():
    w = Workload(params=7e9, seq_lengths=(4096,) * 4)
    p = Placement.parse("nvme")
    slow = step_time(w, p, Hardware(nvme_read_gbps=2, nvme_write_gbps=1))
    fast = step_time(w, p, Hardware(nvme_read_gbps=24, nvme_write_gbps=12))
    assert slow["step_seconds"] > fast["step_seconds"]
    act = Placement.parse("cxl")
    assert step_time(w, act, Hardware(cxl_gbps=1, pcie_gbps=1))["bottleneck"] in {"pcie", "cxl_io"}


def test_long_context_attention_is_quadratic():
    a = step_time(Workload(seq_lengths=(65536,)), Placement())["compute_seconds"]
    b = step_time(Workload(seq_lengths=(32768,) * 2), Placement())["compute_seconds"]
    assert a > b


def test_plan_hook():
    class Plan:
        params, layers, hidden, context = 1.3e9, 24, 2048, 16384

    out = plan_offload(Plan(), "cpu", {"pcie_gbps": 12})
    assert out["placement"] == "params=gpu,gradients=cpu,optimizer=cpu,activations=gpu"
    assert out["slowdown_vs_gpu"] >= 1.0 and "hardware" not in out
    assert plan_offload(Plan(), "something-else", None) is None
    with pytest.raises(ConfigError, match="bad placement item"):
        plan_offload(Plan(), "params=floppy", None)
    with pytest.raises(ConfigError, match="positive"):
        plan_offload(Plan(), "cpu", {"pcie_gbps": 0})


def test_hook_is_registered():
    from apportion.plugins import get_plugin_host

    res = get_plugin_host().hook.apportion_plan_offload(
        plan={"params": 1e9}, placement="nvme", hardware=None
    )
    assert res is not None and res["nvme_gb"] == pytest.approx(14.0)


def test_core_plan_objects():
    plan_mod = pytest.importorskip("apportion.plan")
    p = plan_mod.Plan(
        plan_mod.resolve_model("llama-3-8b"), plan_mod.resolve_hardware("a100-80gb"), 32768
    )
    out = plan_offload(p, "nvme", p.hardware)
    assert out["nvme_gb"] == pytest.approx(14 * 8.03, rel=1e-3)
    hw = Hardware.from_any(p.hardware)
    assert hw.pcie_gbps == pytest.approx(25.0) and hw.nvme_read_gbps == pytest.approx(7.0)
    assert hw.gpu_memory_gb == pytest.approx(80 * 2**30 / 1e9)
