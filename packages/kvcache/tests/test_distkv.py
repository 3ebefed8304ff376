"""DistKV: blocks lent across instances, exact LSE-merged attention, capacity and faults."""

from __future__ import annotations

import time

import pytest
import torch
from apportion.host import Host
from apportion.host.kv import KVPolicy
from apportion.testing.contracts import QUESTION, KVPolicyContract, _long_context
from apportion_kvcache.distkv import (
    DistKV,
    DistKVCache,
    DistKVConfig,
    DistKVError,
    KVCapacityError,
    RManager,
)


class TestDistKVContract(KVPolicyContract):
    """The defaults (two in-process instances, 128 home tokens) spill every contract prompt
    longer than 128 tokens onto the lending instance."""

    component = "distkv"


def _prefill_logits(smollm2, policy, ids):
    cache = policy.make_cache(smollm2.model)
    with torch.inference_mode():
        pre = policy.prefill(smollm2.model, ids, torch.ones_like(ids), cache)
    return pre.logits, cache


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    enc = Host(smollm2).encode(f"{_long_context(10)}\n\n{QUESTION}")
    return torch.tensor([enc.ids])


def test_attention_over_lent_blocks_is_exact(smollm2, prompt_ids):
    full, _ = _prefill_logits(smollm2, KVPolicy(), prompt_ids)
    policy = DistKV(DistKVConfig(instances=3, block_size=16, local_capacity_tokens=64))
    got, cache = _prefill_logits(smollm2, policy, prompt_ids)
    assert cache.remote_blocks >= (prompt_ids.shape[1] - 64) // 16 - 1
    assert len(policy.gmanager.holders(cache.request)) == 2  # both lenders hold blocks
    assert (got - full).abs().max().item() < 1e-3
    assert int(got.argmax()) == int(full.argmax())


def test_gmanager_lends_from_the_idlest_instance():
    busy, idle = RManager(1, 10), RManager(2, 10)
    for b in range(8):
        busy.put(
            99,
            b,
            0,
            torch.zeros(1, 1, 2, 4),
            torch.zeros(1, 1, 2, 4),
            torch.ones(1, 2, dtype=torch.bool),
        )
    policy = DistKV(DistKVConfig(), instances=[busy, idle])
    assert policy.gmanager.lend() is idle


def test_too_long_a_prompt_is_refused_before_compute(smollm2, prompt_ids):
    policy = DistKV(
        DistKVConfig(
            instances=2, block_size=16, local_capacity_tokens=32, instance_capacity_tokens=64
        )
    )
    cache = policy.make_cache(smollm2.model)
    with pytest.raises(KVCapacityError, match="exceeds the 96 KV tokens"):
        policy.prefill(smollm2.model, prompt_ids, torch.ones_like(prompt_ids), cache)


def test_other_policies_are_untouched_after_install(smollm2, prompt_ids):
    DistKV().make_cache(smollm2.model)  # wraps the attention layers
    a, _ = _prefill_logits(smollm2, KVPolicy(), prompt_ids[:, :40])
    assert not isinstance(_, DistKVCache) and torch.isfinite(a).all()


# ----------------------------------------------------------------------------- processes


def test_blocks_across_processes_exact(smollm2, prompt_ids):
    from apportion_kvcache.distkv.ranks import Cluster

    full, _ = _prefill_logits(smollm2, KVPolicy(), prompt_ids)
    with Cluster(3, capacity_blocks=64, timeout_s=60) as cluster:
        policy = DistKV(
            DistKVConfig(block_size=16, local_capacity_tokens=64), instances=cluster.instances
        )
        got, cache = _prefill_logits(smollm2, policy, prompt_ids)
        assert sum(i.puts for i in cluster.instances) > 0
        assert all(i.attends > 0 for i in cluster.instances)
    assert cluster.codes == [0, 0]
    assert (got - full).abs().max().item() < 1e-3


def test_a_dead_rank_is_a_clear_error_and_the_others_exit(smollm2, prompt_ids):
    from apportion_kvcache.distkv.ranks import Cluster

    cluster = Cluster(3, capacity_blocks=64, timeout_s=20, die_after={2: 30})
    policy = DistKV(
        DistKVConfig(block_size=16, local_capacity_tokens=64), instances=cluster.instances
    )
    t0 = time.monotonic()
    with pytest.raises(DistKVError, match="instance 2"):
        _prefill_logits(smollm2, policy, prompt_ids)
    assert time.monotonic() - t0 < 60
    codes = cluster.close()
    assert codes[0] == 0  # the surviving rank was stopped and exited cleanly
    assert codes[1] == 3  # the one that died
