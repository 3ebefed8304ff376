"""CacheGen's controller: text vs KV and the level, under bandwidth and an SLO."""

from __future__ import annotations

import pytest
from apportion_kvcache.cachegen.controller import Controller, CostModel

COSTS = CostModel(
    prefill_s=2e-3, level_bytes=[20_000.0, 12_000.0, 6_000.0], decode_s=[1e-4, 1e-4, 1e-4]
)


def test_high_bandwidth_sends_best_quality_kv_or_text():
    # 1 GB/s: KV level 0 costs 20us+100us per token, text costs 2ms per token: KV wins on time,
    # but with a loose SLO the lossless text is the best quality that fits
    c = Controller(COSTS)
    assert {ch.config for ch in c.plan(1024, 256, 1e9, slo_s=100.0)} == {"text"}
    assert {ch.config for ch in c.plan(1024, 256, 1e9, slo_s=0.5)} == {"level-0"}


def test_shrinking_bandwidth_moves_to_coarser_levels_then_text():
    c = Controller(COSTS)
    slo = 1024 * 2e-3 * 0.9  # tighter than recomputing everything
    picks = [c.plan(1024, 256, bw, slo_s=slo)[0].config for bw in (1e9, 8e6, 5e6)]
    assert picks == ["level-0", "level-1", "level-2"]
    # at very low bandwidth nothing fits: the fastest option, recomputing from text, is taken
    assert c.plan(1024, 256, 1e5, slo_s=slo)[0].config == "text"


def test_no_slo_takes_the_fastest():
    c = Controller(COSTS)
    assert c.plan(512, 256, 1e9)[0].config == "level-2"


def test_adapts_to_a_bandwidth_drop_mid_stream():
    c = Controller(COSTS)
    trace = [1e9, 1e9, 1e7, 1e7, 1e7, 1e7]
    plan = c.plan(6 * 256, 256, trace, slo_s=1.5)
    assert plan[0].config == "level-0"
    assert plan[-1].config != "level-0"
    assert sum(p.seconds for p in plan) <= 1.5 * 1.5


def test_bad_bandwidth():
    with pytest.raises(ValueError, match="bandwidth"):
        Controller(COSTS).chunk_cost("text", 10, 0)


def test_measured_costs_come_from_the_real_model(smollm2):
    import torch
    from apportion_kvcache.cachegen import CacheGenCodec, CodecConfig

    ids = torch.tensor(
        [smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)]
    )
    costs = CostModel.measure(smollm2, ids, CacheGenCodec(CodecConfig(chunk_tokens=32)))
    assert costs.prefill_s > 0 and len(costs.level_bytes) == 4
    assert costs.level_bytes == sorted(costs.level_bytes, reverse=True)
    assert costs.quality == sorted(costs.quality)
