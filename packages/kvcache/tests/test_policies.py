"""Eviction policies: the kv-policy contract, plus what each technique promises."""

from __future__ import annotations

import pytest
import torch
from apportion.base import Prompt
from apportion.host import Host
from apportion.host.kv import KVPolicy
from apportion.testing.contracts import FACT, QUESTION, KVPolicyContract, _long_context


class TestStreamingContract(KVPolicyContract):
    component = "streaming"


class TestSnapKVContract(KVPolicyContract):
    component = "snapkv"


class TestH2OContract(KVPolicyContract):
    component = "h2o"


class TestQSpanContract(KVPolicyContract):
    component = "qspan"


class TestProbeContract(KVPolicyContract):
    component = "probe"


class TestSurpriseContract(KVPolicyContract):
    component = "surprise"


def _prompt(n: int = 30) -> Prompt:
    return Prompt(
        [{"role": "user", "content": f"{_long_context(n)}\n\n{QUESTION}"}], question=QUESTION
    )


@pytest.fixture(scope="module")
def prefilled(smollm2):
    """One prompt's full KV, for checking what each policy keeps."""
    host = Host(smollm2)
    enc = host.encode(_prompt())
    ids = torch.tensor([enc.ids])
    return ids, enc.question_len


def _prefill(smollm2, policy, ids, question_len):
    cache = policy.make_cache(smollm2.model)
    with torch.inference_mode():
        out = policy.prefill(
            smollm2.model, ids, torch.ones_like(ids), cache, question_len=question_len
        )
    return cache, out


@pytest.mark.parametrize("name", ["streaming", "snapkv", "h2o", "qspan", "probe"])
def test_budget_is_exact_and_question_kept(registry, smollm2, prefilled, name):
    """Every layer and head keeps exactly n_keep entries, and the question's keys are intact."""
    ids, qlen = prefilled
    full_cache, _ = _prefill(smollm2, KVPolicy(), ids, qlen)
    policy = registry.create("kv-policy", name, {"compression_ratio": 0.75})
    cache, out = _prefill(smollm2, policy, ids, qlen)
    n = ids.shape[1]
    n_keep = -(-(n - qlen) // 4) + qlen
    assert out.info["n_keep"] == n_keep
    for full_layer, layer in zip(full_cache.layers, cache.layers, strict=True):
        assert layer.keys.shape[-2] == n_keep and layer.values.shape == layer.keys.shape
        # the tail is kept verbatim: it is the question, at its original RoPE positions
        torch.testing.assert_close(layer.keys[..., -qlen:, :], full_layer.keys[..., -qlen:, :])


def test_streaming_keeps_sinks_and_recent(registry, smollm2, prefilled):
    ids, qlen = prefilled
    full_cache, _ = _prefill(smollm2, KVPolicy(), ids, qlen)
    policy = registry.create("kv-policy", "streaming", {"compression_ratio": 0.5, "n_sink": 4})
    cache, out = _prefill(smollm2, policy, ids, qlen)
    k_full, k = full_cache.layers[3].keys, cache.layers[3].keys
    n_keep = k.shape[-2]
    torch.testing.assert_close(k[..., :4, :], k_full[..., :4, :])
    torch.testing.assert_close(k[..., 4:, :], k_full[..., -(n_keep - 4) :, :])


def test_snapkv_heads_keep_their_own_tokens(registry, smollm2, prefilled):
    """GQA-aware: different KV heads keep different token sets (not one shared selection)."""
    ids, qlen = prefilled
    full_cache, _ = _prefill(smollm2, KVPolicy(), ids, qlen)
    cache, _ = _prefill(
        smollm2, registry.create("kv-policy", "snapkv", {"compression_ratio": 0.75}), ids, qlen
    )
    k_full, k = full_cache.layers[10].keys[0], cache.layers[10].keys[0]
    kept = []
    for h in range(k.shape[0]):
        # recover which original tokens each head kept by matching key rows
        d = torch.cdist(k[h], k_full[h])
        kept.append(set(d.argmin(-1).tolist()))
    assert len({frozenset(s) for s in kept}) > 1


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_eviction_keeps_the_needle_answer(registry, smollm2, ratio):
    """Where full attention finds the code, the question-aware policy still does after eviction.

    (SmolLM2-135M itself loses this bare fact past ~25 sentences of prose, so the haystack stays
    where ``full`` answers; the niah benchmark measures the longer lengths.)
    """
    prompt = _prompt(20)
    full = Host(smollm2).generate(prompt, max_new_tokens=16)[0]
    assert "4417" in full.text, ("the premise: full attention answers", full.text)
    out = Host(
        smollm2, kv_policy=registry.create("kv-policy", "qspan", {"compression_ratio": ratio})
    ).generate(prompt, max_new_tokens=16)[0]
    assert out.peak_kv_bytes < full.peak_kv_bytes
    assert "4417" in out.text, (FACT, out.text)


def test_patch_plain_transformers_generate_matches_host(registry, smollm2):
    """``policy.patch(model)`` around ``model.generate`` gives the host's answer (positions
    kept)."""
    policy = registry.create("kv-policy", "snapkv", {"compression_ratio": 0.5})
    host = Host(smollm2, kv_policy=policy)
    prompt = _prompt(20)
    enc = host.encode(prompt)
    want = host.generate(prompt, max_new_tokens=12)[0].text
    ids = torch.tensor([enc.ids])
    with torch.inference_mode(), policy.patch(smollm2.model, question_len=enc.question_len):
        out = smollm2.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
    got = smollm2.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert got.startswith(want[:20]), (got, want)


def test_one_shared_prefill_serves_every_eviction_policy(smollm2, registry):
    """full + the eviction policies from one prefill, decoded as one batch: every answer,
    cache size and peak is the one the policy gets alone (``surprise`` alone runs a scoring
    pass first; shared, the one forward serves it)."""
    from apportion.base import Prompt
    from apportion.host import Host
    from apportion.host.shared import generate_shared
    from apportion.testing.contracts import QUESTION, _long_context

    prompt = Prompt(
        [{"role": "user", "content": f"{_long_context(40)}\n\n{QUESTION}"}], question=QUESTION
    )
    policies = [registry.create("kv-policy", "full")] + [
        registry.create("kv-policy", name, {"compression_ratio": ratio})
        for name in ("streaming", "snapkv", "h2o", "qspan", "probe", "surprise")
        for ratio in (0.5, 0.75)
    ]
    assert all(p.layerwise for p in policies)
    alone = [Host(smollm2, kv_policy=p).generate(prompt, max_new_tokens=20)[0] for p in policies]
    shared = generate_shared(Host(smollm2), policies, prompt, 20)
    for p, a, s in zip(policies, alone, shared, strict=True):
        assert (s.text, s.kv_tokens, s.peak_kv_bytes) == (a.text, a.kv_tokens, a.peak_kv_bytes), p


def test_a_misspelt_policy_option_suggests_the_option_and_lists_them(registry):
    """The misspelling users make most, ``compresion_ratio``, is a one-line config error
    that names the nearest option and the valid ones, before anything loads."""
    from apportion.config import parse_config, resolve_config
    from apportion.errors import ConfigError

    cfg = parse_config({"kv_policy": {"name": "snapkv", "compresion_ratio": 0.5}})
    with pytest.raises(ConfigError) as exc:
        resolve_config(cfg, registry)
    msg = " ".join(m for _, m in exc.value.errors)
    assert "Did you mean 'compression_ratio'?" in msg and "window" in msg


def test_surprise_one_pass_keeps_the_same_entries_in_one_forward(registry, smollm2, prefilled):
    """``one_pass`` trades the peak for time: the same kept keys and values as the two-pass
    default, from one forward of the model instead of two, and a peak at the full cache
    instead of the compressed cache plus one layer."""
    ids, qlen = prefilled
    forwards = []
    handle = smollm2.model.get_decoder().register_forward_hook(lambda *a: forwards.append(1))
    try:
        runs = {}
        for one_pass in (False, True):
            forwards.clear()
            policy = registry.create(
                "kv-policy", "surprise", {"compression_ratio": 0.75, "one_pass": one_pass}
            )
            cache, out = _prefill(smollm2, policy, ids, qlen)
            runs[one_pass] = (cache, out, len(forwards))
    finally:
        handle.remove()
    (two_cache, two_out, two_fw), (one_cache, one_out, one_fw) = runs[False], runs[True]
    assert (two_fw, one_fw) == (2, 1)
    for a, b in zip(two_cache.layers, one_cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)
    full_cache, _ = _prefill(smollm2, KVPolicy(), ids, qlen)
    full = sum(layer.keys.nbytes + layer.values.nbytes for layer in full_cache.layers)
    assert one_out.info["peak_kv_bytes"] >= full > two_out.info["peak_kv_bytes"]


def test_qspan_after_makes_the_span_one_sided(monkeypatch):
    """A question peak at position 10 lifts 8..12 with a centred span of 5, and 9..13 with
    ``after`` 3 (one before, three after: a fact's key, then its value)."""
    import types

    import apportion_kvcache.qspan as qspan_mod
    import torch
    from apportion_kvcache.qspan import QSpan, QSpanConfig

    attn = torch.zeros(1, 2, 1, 20)
    attn[..., 10] = 1.0
    monkeypatch.setattr(qspan_mod, "window_attention", lambda inputs, w: attn)
    inputs = types.SimpleNamespace(question_len=1, keys=torch.zeros(1, 1, 20, 4))

    def lifted(**opts):
        scores = QSpan(QSpanConfig(compression_ratio=0.5, **opts)).score(inputs)
        return (scores[0, 0] > 0.5).nonzero().flatten().tolist()

    assert lifted(span=5) == [8, 9, 10, 11, 12]
    assert lifted(span=5, after=3) == [9, 10, 11, 12, 13]
    assert lifted(span=5, after=0) == [6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="after"):
        QSpanConfig(span=5, after=5)
