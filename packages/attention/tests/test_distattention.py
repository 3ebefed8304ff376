"""DistAttention: exact micro-attention merge, a real 2-process SmolLM2 generation, dead ranks."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from apportion.testing.contracts import AttentionContract
from apportion_attention.distattention import (
    DistAttentionError,
    as_bool_mask,
    distributed_generate,
    launch,
    micro_attention,
    split_chunks,
)


class TestDistAttentionContract(AttentionContract):
    component = "distattention"
    max_logit_diff = 1e-3  # exact up to fp32 rounding (measured ~1e-5 on the logits)


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
@pytest.mark.parametrize("q_len", [1, 37])
def test_micro_attention_exact_fp32(shards: int, q_len: int) -> None:
    g = torch.Generator().manual_seed(shards * 100 + q_len)
    b, hq, hkv, k_len, d = 2, 9, 3, 301, 64
    q = torch.randn(b, hq, q_len, d, generator=g) * 2
    k = torch.randn(b, hkv, k_len, d, generator=g) * 2
    v = torch.randn(b, hkv, k_len, d, generator=g)
    mask = as_bool_mask(None, q_len, k_len, q.device)
    got = micro_attention(q, k, v, scale=d**-0.5, mask=mask, shards=shards)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (got - ref).abs().max().item() < 1e-5


def test_padding_mask_rows_and_float_masks() -> None:
    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 3, 10, 8)
    v = torch.randn(1, 3, 10, 8)
    allowed = torch.ones(1, 1, 4, 10, dtype=torch.bool)
    allowed[..., :3] = False  # left padding
    additive = torch.zeros(1, 1, 4, 10).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    for m in (allowed, additive):
        got = micro_attention(
            q, k, v, scale=8**-0.5, mask=as_bool_mask(m, 4, 10, q.device), shards=4
        )
        assert (got - ref).abs().max().item() < 1e-5


def test_split_chunks() -> None:
    assert split_chunks(10, 3) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(DistAttentionError, match="cannot be split"):
        split_chunks(2, 4)


@pytest.fixture(scope="module")
def needle_prompt(smollm2):
    from apportion.host import Host
    from apportion.testing.contracts import QUESTION, _long_context

    host = Host(smollm2)
    prompt = f"{_long_context(14)}\n\n{QUESTION}"
    return prompt, host.encode(prompt).ids


def test_two_rank_generation_matches_single_process(smollm2, needle_prompt) -> None:
    from apportion.host import Host

    prompt, ids = needle_prompt
    ref = Host(smollm2).generate(prompt, max_new_tokens=10)[0]
    eos = [smollm2.tokenizer.eos_token_id]
    results = distributed_generate(ids, world_size=2, max_new_tokens=10, eos_ids=eos, timeout_s=400)
    assert results[0]["tokens"] == results[1]["tokens"]
    assert results[0]["text"] == ref.text
    # the KV really is split: each rank holds about half of the prompt's entries
    entries = [r["shard_entries"] for r in results]
    assert sum(entries) >= len(ids) and min(entries) >= len(ids) // 2 - 1
    assert all(r["shard_bytes"] > 0 for r in results)


def test_dead_rank_is_reported_quickly(needle_prompt) -> None:
    _, ids = needle_prompt
    t0 = time.monotonic()
    with pytest.raises(DistAttentionError, match=r"rank 1 .*exit code 17"):
        distributed_generate(ids[:64], world_size=2, max_new_tokens=2, timeout_s=300, die_on_rank=1)
    assert time.monotonic() - t0 < 60  # the dead rank is noticed at once, not at the timeout


def test_worker_exception_names_rank() -> None:
    with pytest.raises(DistAttentionError, match="rank 0 failed: .*no_such_function"):
        launch("apportion_attention.distattention:no_such_function", {}, world_size=1, timeout_s=30)
