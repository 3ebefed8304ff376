"""The allocator protocol of generation: the host asks the run's allocator for the cache
(after the KV policy made its own), measures resident KV beside total KV, and the runner
refuses a resident budget below one layer before the model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from apportion.base import Allocator, ComponentConfig
from apportion.config import parse_config
from apportion.errors import ConfigError
from apportion.host import Host
from apportion.host.attention import AttentionBackend
from apportion.host.kv import KVPolicy, cache_nbytes, cache_resident_nbytes
from apportion.runner import _Study, can_share, check_kv_budgets, summarize
from apportion.testing.contracts import QUESTION, _long_context
from pydantic import Field


class Budget(ComponentConfig):
    resident_kv_bytes: int | None = Field(None, ge=1)


class Budgeted(Allocator):
    """An allocator that states a resident KV budget and hands the host a cache of its own:
    a ``DynamicCache`` that it closes after the generation."""

    name = "test-budgeted"
    Config = Budget

    def __init__(self, config=None):
        super().__init__(config)
        self.made = []

    def kv_budget(self):
        return self.config.resident_kv_bytes

    def kv_cache(self, model, cache):
        from transformers import DynamicCache

        class Closing(DynamicCache):
            closed = 0

            def close(self):
                self.closed += 1

        out = Closing(config=model.config)
        self.made.append(out)
        return out


PROMPT = f"{_long_context(10)}\n\n{QUESTION}"


def test_the_base_allocator_offloads_nothing(smollm2):
    base = Allocator()
    assert base.kv_budget() is None and base.kv_cache(smollm2.model, object()) is None
    plain = Host(smollm2).generate(PROMPT, max_new_tokens=4)[0]
    with_alloc = Host(smollm2, allocator=Allocator()).generate(PROMPT, max_new_tokens=4)[0]
    assert with_alloc.text == plain.text
    assert with_alloc.peak_resident_kv_bytes == with_alloc.peak_kv_bytes == plain.peak_kv_bytes


def test_the_host_generates_on_the_allocators_cache_and_closes_it(smollm2):
    alloc = Budgeted(Budget(resident_kv_bytes=1 << 30))
    got = Host(smollm2, allocator=alloc).generate(PROMPT, max_new_tokens=4)[0]
    ref = Host(smollm2).generate(PROMPT, max_new_tokens=4)[0]
    assert got.text == ref.text
    (cache,) = alloc.made
    assert cache.closed == 1 and cache.get_seq_length() > 0  # it was the one generated on


def test_cache_sizes_follow_an_offloading_cache_s_own_figures():
    class Offloading:
        layers = []

        def kv_nbytes(self):
            return 1000

        def resident_kv_bytes(self):
            return 250

    assert cache_nbytes(Offloading()) == 1000 and cache_resident_nbytes(Offloading()) == 250


def test_a_budget_below_one_layer_is_refused_naming_the_minimum(registry):
    cfg = parse_config(
        {
            "benchmarks": [{"name": "niah", "lengths": [300], "samples": 1}],
            "model": {"device": "cpu", "dtype": "float32"},
            "generation": {"max_new_tokens": 20},
        }
    )
    minimum = 1536 * 320  # SmolLM2: 3 KV heads x 64 x 4 bytes x (K, V); 300 + 20 tokens

    def study(budget):
        comps = {"v": {"allocator": Budgeted(Budget(resident_kv_bytes=budget))}}
        return _Study(cfg, Path("."), [], comps, [], [])

    with pytest.raises(ConfigError, match=f"the minimum is {minimum}"):
        check_kv_budgets(study(minimum - 1), registry)
    check_kv_budgets(study(minimum), registry)  # one layer is enough


def test_an_offloading_variant_does_not_join_a_shared_prefill():
    comps = {"attention": AttentionBackend(), "kv_policy": KVPolicy()}
    assert can_share({**comps, "allocator": Allocator()})
    assert not can_share({**comps, "allocator": Budgeted(Budget(resident_kv_bytes=10))})


def test_the_summary_carries_resident_kv():
    rec = {"variant": "a", "benchmark": "b", "length": 1, "score": 1.0, "peak_kv_bytes": 8}
    rows = summarize([{**rec, "peak_resident_kv_bytes": 2}, {**rec, "peak_resident_kv_bytes": 4}])
    assert rows[0]["peak_resident_kv_bytes"] == 3 and rows[0]["peak_kv_bytes"] == 8
    assert summarize([rec])[0]["peak_resident_kv_bytes"] == 8  # older records: all resident
