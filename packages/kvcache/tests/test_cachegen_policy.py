"""kv-policy ``cachegen``: the contract, the round trip through the codec, and store reuse."""

from __future__ import annotations

from apportion.base import Prompt
from apportion.host import Host
from apportion.testing.contracts import QUESTION, KVPolicyContract, _long_context


class TestCacheGenContract(KVPolicyContract):
    component = "cachegen"


def test_round_trip_keeps_the_answer_and_store_reuses_context(registry, smollm2, tmp_path):
    prompt = Prompt(
        [{"role": "user", "content": f"{_long_context(20)}\n\n{QUESTION}"}], question=QUESTION
    )
    full = Host(smollm2).generate(prompt, max_new_tokens=16)[0]
    assert "4417" in full.text, ("the premise: full attention answers", full.text)
    policy = registry.create("kv-policy", "cachegen", {"level": 1, "store": str(tmp_path)})
    first = Host(smollm2, kv_policy=policy).generate(prompt, max_new_tokens=16)[0]
    info = dict(policy.last_info)
    assert not info["store_hit"] and 0 < info["bitstream_bytes"] < info["fp16_bytes"] / 2
    assert "4417" in first.text and first.text[:12] == full.text[:12]
    second = Host(smollm2, kv_policy=policy).generate(prompt, max_new_tokens=16)[0]
    assert policy.last_info["store_hit"]
    assert second.text == first.text


def _context_prompt() -> Prompt:
    return Prompt(
        [{"role": "user", "content": f"{_long_context(20)}\n\n{QUESTION}"}], question=QUESTION
    )


def test_levels_sharing_a_store_keep_their_own_entries(registry, smollm2, tmp_path):
    """Level 3 next to level 0 over one store: two entries, each decoded at its own level."""
    import torch
    from apportion_kvcache.cachegen import kv_error
    from apportion_kvcache.kv import kv_from_cache
    from apportion_kvcache.store import LocalStore

    prompt = _context_prompt()
    policies = {
        lv: registry.create("kv-policy", "cachegen", {"level": lv, "store": str(tmp_path)})
        for lv in (0, 3)
    }
    for lv, policy in policies.items():
        Host(smollm2, kv_policy=policy).generate(prompt, max_new_tokens=2)
        assert not policy.last_info["store_hit"], f"level {lv} hit another level's entry"
    store = LocalStore(tmp_path)
    assert len(store.keys()) == 2
    host = Host(smollm2)
    enc = host.encode(prompt)
    ctx = enc.ids[: len(enc.ids) - enc.question_len]
    with torch.inference_mode():
        exact = kv_from_cache(smollm2.model(torch.tensor([ctx]), use_cache=True).past_key_values)
    errors, sizes = {}, {}
    for lv, policy in policies.items():
        variant = policy.store_variant(smollm2.model)
        key = __import__("apportion.host.store", fromlist=["x"]).prefix_key(
            smollm2.fingerprint, ctx, variant
        )
        entry = store.get(key)
        assert entry is not None and policy.codec.read_header(entry.payload).level == lv
        sizes[lv] = len(entry.payload)
        kv = store.load_kv(smollm2.fingerprint, ctx, variant=variant, codec=policy.codec)
        errors[lv] = kv_error(exact, kv)["rel_rmse"]
        Host(smollm2, kv_policy=policy).generate(prompt, max_new_tokens=2)
        assert policy.last_info["store_hit"]
    assert sizes[3] < sizes[0] and errors[3] > errors[0]


def test_the_store_variant_names_everything_that_changes_the_bytes(smollm2, monkeypatch):
    from types import SimpleNamespace

    import apportion_kvcache.cachegen.codec as codec
    import torch
    from apportion_kvcache.cachegen import CacheGenPolicy, CacheGenPolicyConfig

    model = smollm2.model

    def variant(**kw):
        cfg = CacheGenPolicyConfig(**{"levels": [[16], [16]], "level": 0, **kw})
        return CacheGenPolicy(cfg).store_variant(model)

    base = variant()
    assert variant(level=1) != base  # the same bins at another level: the header differs
    assert variant(levels=[[20], [16]]) != base
    assert variant(levels=[[16, 8], [16]]) != base
    assert variant(group_size=5) != base
    assert variant(chunk_tokens=512) != base
    assert variant(levels=[[16], [16], [4]]) == base  # levels not used do not change the bytes
    other_dtype = CacheGenPolicy(CacheGenPolicyConfig(levels=[[16], [16]])).store_variant(
        SimpleNamespace(dtype=torch.bfloat16)
    )
    assert other_dtype != base  # a bf16 load of a bf16 checkpoint shares the fingerprint
    monkeypatch.setattr(codec, "VERSION", codec.VERSION + 1)
    assert variant() != base


def test_a_plain_string_prompt_hits_the_store(registry, smollm2, tmp_path):
    """No question (question_len 0): the second run is a store hit, not a reshape error."""
    text = f"{_long_context(20)}\n\n{QUESTION}"
    policy = registry.create("kv-policy", "cachegen", {"level": 1, "store": str(tmp_path)})
    first = Host(smollm2, kv_policy=policy).generate(text, max_new_tokens=8)[0]
    assert not policy.last_info["store_hit"]
    second = Host(smollm2, kv_policy=policy).generate(text, max_new_tokens=8)[0]
    assert policy.last_info["store_hit"]
    assert second.text == first.text
