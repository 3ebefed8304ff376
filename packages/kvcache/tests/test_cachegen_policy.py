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
