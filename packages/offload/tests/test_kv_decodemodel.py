"""The decode-speed model of an offloaded KV cache (``apportion plan --offload TIER`` with a
resident KV budget): its placement is the cache's, its step obeys the pipeline's bounds, it
moves the right way with budget and bandwidth, and the CLI prints it in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from apportion.errors import ConfigError
from apportion.plan import HARDWARE, KVOffloadQuery, Plan, resolve_model
from apportion_offload.kv.cache import OffloadedKVCache
from apportion_offload.kv.decodemodel import (
    DecodeHardware,
    KVShape,
    Link,
    calibrate,
    pinned_at,
    pinned_layers,
    predict,
)
from apportion_offload.pool import PinnedPool, PinnedPoolConfig
from apportion_offload.stepmodel import plan_offload

SMOL = KVShape.from_model_shape(resolve_model("smollm2").with_dtype("float32"))
P, NEW = 2000, 32


def _hw(**changes) -> DecodeHardware:
    """A CPU-like machine: 5 GB/s weights, 10 GB/s copies, a 1 GB/s disk."""
    base = DecodeHardware(
        name="test",
        compute_bandwidth=5e9,
        append_bandwidth=10e9,
        host_copy=Link(1e-6, 10e9),
        disk_read=Link(200e-6, 1e9),
        disk_write=Link(2e-3, 0.5e9),
        job_latency=20e-6,
    )
    return replace(base, **changes)


def _full(shape: KVShape = SMOL, prompt: int = P, new: int = NEW) -> float:
    return (prompt + new) * shape.token_bytes * shape.layers


def test_placement_is_the_caches():
    """Pinned layers after the prompt and after the decode (pinned layers that outgrow the
    budget move to the tier) match a real OffloadedKVCache fed the same shapes."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        num_hidden_layers=12,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=64,
        vocab_size=64,
    )
    prompt, new, tok = 96, 24, 2 * 2 * 32 * 4
    for share in (0.15, 0.3, 0.6, 0.95, 1.3):
        budget = int(share * (prompt + new) * tok * 12)
        pool = PinnedPool(PinnedPoolConfig(resident_kv_bytes=budget))
        with OffloadedKVCache(cfg, pool.kv_tier(), budget) as cache, torch.inference_mode():
            for i in range(12):
                cache.update(torch.randn(1, 2, prompt, 32), torch.randn(1, 2, prompt, 32), i)
            for step in range(new):
                for i in range(12):
                    cache.update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32), i)
                if step == 0:  # the prompt's last layer is placed at the first step
                    first = len(cache.placement()["pinned_layers"])
            last = len(cache.placement()["pinned_layers"])
        assert first == pinned_layers(12, budget, prompt, tok), share
        assert last == pinned_at(12, budget, prompt, prompt + new, tok), share
    assert pinned_at(12, budget, prompt, prompt + new, tok) == 12  # the roomiest holds all


def test_all_resident_when_the_budget_holds_everything():
    hw = _hw()
    for tier in ("pinned-pool", "nvme"):
        roomy = predict(SMOL, hw, tier, P, NEW, 10 * _full(), resident_step_seconds=0.1)
        assert roomy.offloaded_layers == 0 and roomy.pinned_layers == SMOL.layers
        assert roomy.step_seconds == pytest.approx(0.1) == roomy.resident_step_seconds
        assert roomy.copy_seconds == 0 and roomy.fetch_hidden_share == 1.0
        # the smallest budget that pins every layer through the decode gives the same
        tok = SMOL.token_bytes
        budget = next(
            b
            for b in range(int(_full()), int(2 * _full()), int(tok))
            if pinned_at(SMOL.layers, b, P, P + NEW - 1, tok) == SMOL.layers
        )
        edge = predict(SMOL, hw, tier, P, NEW, budget, resident_step_seconds=0.1)
        assert edge.offloaded_layers == 0 and edge.step_seconds == pytest.approx(0.1)
        # the compute model alone (no measured step) agrees with itself the same way
        alone = predict(SMOL, hw, tier, P, NEW, 10 * _full())
        assert alone.step_seconds == pytest.approx(alone.resident_step_seconds)


def test_a_tight_budget_offloads_most_layers_and_the_copy_thread_carries_them():
    out = predict(SMOL, _hw(), "nvme", P, NEW, _full() / 4, resident_step_seconds=0.1)
    assert 0 < out.pinned_layers < SMOL.layers // 4
    layer = (P + NEW // 2) * SMOL.token_bytes
    # every offloaded layer is read back from the disk once a step, at least
    assert out.copy_seconds >= out.offloaded_layers * layer / 1e9
    assert 0.0 <= out.fetch_hidden_share <= 1.0


def test_step_is_the_pipeline_bound():
    """Fetch-bound (a slow disk): the step is the copy thread's time a step; compute-bound
    (fast host copies): the step is the compute, and all of the fetch is hidden."""
    slow = predict(
        SMOL, _hw(disk_read=Link(1e-3, 0.2e9)), "nvme", P, NEW, _full() / 4,
        resident_step_seconds=0.05,
    )  # fmt: skip
    assert slow.step_seconds == pytest.approx(slow.copy_seconds, rel=0.05)
    assert slow.step_seconds > 2 * slow.resident_step_seconds and slow.fetch_hidden_share < 0.5
    free = _hw(handoff=0.0)  # hand-offs that cost nothing (see the test below)
    fast = predict(SMOL, free, "pinned-pool", P, NEW, _full() / 4, resident_step_seconds=0.1)
    assert fast.wait_seconds == 0 and fast.fetch_hidden_share == pytest.approx(1.0)
    # no concatenation for the offloaded layers, some bookkeeping: near the resident step
    assert 0.8 < fast.step_seconds / fast.resident_step_seconds < 1.05


def test_hand_offs_are_paid_per_offloaded_layer_and_step():
    """A busy CPU makes each offloaded layer's hand-off to the copy thread cost the compute:
    the step grows by it once per offloaded layer, and that time counts as not hidden."""
    calm = predict(SMOL, _hw(), "pinned-pool", P, NEW, _full() / 4, resident_step_seconds=0.1)
    busy = predict(
        SMOL, _hw(handoff=1e-3), "pinned-pool", P, NEW, _full() / 4, resident_step_seconds=0.1
    )
    extra = (1e-3 - _hw().handoff) * calm.offloaded_layers
    assert busy.step_seconds - calm.step_seconds == pytest.approx(extra, rel=0.05)
    assert busy.fetch_hidden_share < calm.fetch_hidden_share


def test_the_calibration_fit_survives_noise():
    from apportion_offload.kv.decodemodel import _fit

    line = _fit((64 << 10, 1e-3), (4 << 20, 5e-3))
    assert line.seconds(4 << 20) == pytest.approx(5e-3) and line.latency > 0
    flat = _fit((64 << 10, 5e-3), (4 << 20, 4e-3))  # the large one no slower: noise
    assert flat.bandwidth <= 2 * (4 << 20) / 4e-3 and flat.seconds(4 << 20) == pytest.approx(4e-3)


def test_monotone_in_bandwidth_and_budget():
    budgets = [_full() * s for s in (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)]
    for tier in ("pinned-pool", "nvme"):
        copies = [
            predict(SMOL, _hw(), tier, P, NEW, b, resident_step_seconds=0.1).copy_seconds
            for b in budgets
        ]
        assert copies == sorted(copies, reverse=True) and copies[-1] == 0
    # fetch-bound: more budget, fewer layers to read back, a faster step (until nothing
    # streams: the last one or two offloaded layers stay in their slots and skip the
    # resident layers' concatenation, a hair faster than all resident)
    slow = _hw(disk_read=Link(1e-3, 0.2e9))
    steps = [predict(SMOL, slow, "nvme", P, NEW, b, resident_step_seconds=0.05) for b in budgets]
    times = [s.step_seconds for s in steps]
    assert times[:-2] == sorted(times[:-2], reverse=True) and times[0] > 3 * times[-1]
    assert max(times[-2:]) <= min(times[:-2])
    # more bandwidth never slows a step
    for tier, field, links in (
        ("nvme", "disk_read", [Link(3e-4, g * 1e9) for g in (0.1, 0.3, 1, 3, 10)]),
        ("pinned-pool", "host_copy", [Link(1e-6, g * 1e9) for g in (0.05, 0.2, 1, 5, 50)]),
    ):
        times = [
            predict(
                SMOL, _hw(**{field: link}), tier, P, NEW, _full() / 4, resident_step_seconds=0.05
            ).step_seconds
            for link in links
        ]
        assert times == sorted(times, reverse=True) and times[0] > times[-1], tier


def test_prefetch_hides_what_fetching_on_demand_pays():
    hw = _hw(host_copy=Link(1e-6, 2e9))
    ahead = predict(SMOL, hw, "pinned-pool", P, NEW, _full() / 4, resident_step_seconds=0.1)
    demand = predict(
        SMOL, hw, "pinned-pool", P, NEW, _full() / 4, resident_step_seconds=0.1, prefetch=False
    )
    assert ahead.step_seconds < demand.step_seconds
    assert ahead.fetch_hidden_share > 0.9 > 0.1 > demand.fetch_hidden_share
    # on demand, every fetch is waited for: the step is the compute plus the copies
    assert demand.step_seconds == pytest.approx(ahead.step_seconds + demand.copy_seconds, rel=0.1)


def test_a_budget_smaller_than_one_layer_is_refused_naming_the_minimum():
    minimum = (P + NEW - 1) * SMOL.token_bytes
    with pytest.raises(ValueError, match=f"the minimum is {minimum:.0f}"):
        predict(SMOL, _hw(), "nvme", P, NEW, minimum - 1)
    predict(SMOL, _hw(), "nvme", P, NEW, minimum)  # one layer: every layer streams
    with pytest.raises(ValueError, match="unknown KV tier 'floppy'"):
        predict(SMOL, _hw(), "floppy", P, NEW, _full())


def test_the_plan_hook_answers_a_kv_query():
    shape, hw = resolve_model("llama-3-8b"), HARDWARE["a100-80gb"]
    query = KVOffloadQuery(resident_bytes=0.25 * shape.kv_bytes_per_token * (32768 + 250))
    plan = Plan(shape, hw, 32768, 250, query)
    from apportion.plugins import get_plugin_host

    out = get_plugin_host().hook.apportion_plan_offload(plan=plan, placement="nvme", hardware=hw)
    assert out["model"] == "kv-decode" and out["tier"] == "nvme"
    assert out["offloaded_layers"] > 0 and out["decode_tokens_per_s"] > 0
    assert out["figures"]["disk_read_gbps"] == pytest.approx(7.0)  # the preset's NVMe
    host = plan_offload(plan, "pinned-pool", hw)
    assert host["decode_ms_per_step"] < out["decode_ms_per_step"]  # PCIe beats the disk
    with pytest.raises(ConfigError, match="names the KV cache's tier"):
        plan_offload(plan, "params=nvme,optimizer=nvme", hw)
    plan.kv_offload = KVOffloadQuery(resident_bytes=1000.0)
    with pytest.raises(ConfigError, match="smaller than one layer's KV; the minimum is"):
        plan_offload(plan, "nvme", hw)
    plan.kv_offload = None  # without a KV query, the training step model as before
    assert plan_offload(plan, "nvme", hw)["placement"].startswith("params=nvme")


def test_calibrate_measures_this_machine(tmp_path):
    hw = calibrate(str(tmp_path), block_bytes=1 << 20, repeats=3)
    assert hw.measured and "this machine" in hw.name
    for figure in (hw.compute_bandwidth, hw.host_copy.bandwidth, hw.disk_read.bandwidth):
        assert 1e7 < figure < 1e13
    assert hw.disk_write.bandwidth > 0 and hw.disk_read.latency >= 0 and hw.job_latency > 0
    assert list(tmp_path.iterdir()) == []  # its files are gone
    out = predict(SMOL, hw, "nvme", 1000, 16, _full(prompt=1000, new=16) / 4)
    assert out.step_seconds > 0


# ---------------------------------------------------------------- the CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "apportion.cli", "plan", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_prints_the_prediction_in_one_line():
    out = _cli("--offload", "nvme", "--resident-kv-fraction", "0.25", "--context", "4096")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1, out.stdout
    assert "context 4,096" in lines[0] and "KV on nvme: 25% resident" in lines[0]
    for part in ("tokens/s", "ms/step", "of the fetch hidden", "a100-80gb"):
        assert part in lines[0]
    js = _cli(
        "--model", "smollm2", "--dtype", "float32", "--offload", "pinned-pool",
        "--resident-kv-bytes", str(2 << 20), "--context", "1000", "--new-tokens", "32",
        "--step-ms", "120", "--json",
    )  # fmt: skip
    assert js.returncode == 0, js.stderr
    kv = json.loads(js.stdout)["plans"][0]["offload"]
    assert kv["resident_kv_bytes"] == 2 << 20 and kv["step_from"] == "measured"
    assert kv["resident_ms_per_step"] == pytest.approx(120.0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resident-kv-fraction", "0.25"], "needs --offload"),
        (
            ["--offload", "nvme", "--resident-kv-fraction", "0.2", "--resident-kv-bytes", "9"],
            "not both",
        ),
        (["--offload", "nvme", "--resident-kv-fraction", "1.5"], "Invalid value"),
        (["--offload", "nvme", "--resident-kv-fraction", "0"], "must be positive"),
        (["--offload", "floppy", "--resident-kv-fraction", "0.25"], "names the KV cache's tier"),
        (["--offload", "nvme", "--resident-kv-bytes", "1000"], "the minimum is"),
        (
            ["--offload", "nvme", "--resident-kv-fraction", "0.2", "--dtype", "int3"],
            "unknown dtype",
        ),
        (["--offload", "nvme", "--step-ms", "80"], "belong to the KV decode model"),
    ],
)
def test_cli_bad_input_exits_2(args, message):
    out = _cli(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr and "Traceback" not in out.stderr
