"""One prefill for many layer-wise KV policies, decoded as one batch: every policy's answer,
cache size and peak memory are the ones it gets alone."""

import math

import pytest
import torch
from apportion.base import Prompt
from apportion.host import Host
from apportion.host.kv import CompressionConfig, KVPolicy
from apportion.host.shared import generate_shared, layerwise_prefill
from apportion.testing.contracts import QUESTION, _long_context


class KeyNorm(KVPolicy):
    """Keeps the entries with the smallest key norm per KV head (and the question): a
    layer-wise policy small enough to write in a test."""

    name = "test-keynorm"
    summary = "smallest key norms"
    Config = CompressionConfig
    layerwise = True

    def plan(self, attention_mask, question_len):
        length = attention_mask.shape[1]
        n = math.ceil((length - question_len) * (1 - self.config.compression_ratio))
        n_keep = n + question_len
        return None if n_keep >= length else n_keep

    def evict_layer(self, inputs):
        scores = -inputs.keys.float().norm(dim=-1)
        if inputs.question_len:
            scores[..., -inputs.question_len :] = float("inf")
        idx = scores.topk(inputs.n_keep, dim=-1).indices.sort(dim=-1).values
        gather = idx[..., None].expand(-1, -1, -1, inputs.keys.shape[-1])
        return inputs.keys.gather(2, gather), inputs.values.gather(2, gather)

    def prefill(self, model, input_ids, attention_mask, cache, *, question_len=0):
        out = layerwise_prefill(model, input_ids, attention_mask, [self], question_len, [cache])
        return out[0].prefill


def _prompt(n=30):
    return Prompt(
        [{"role": "user", "content": f"{_long_context(n)}\n\n{QUESTION}"}], question=QUESTION
    )


def test_a_subclass_that_overrides_prefill_is_not_layerwise():
    class Custom(KVPolicy):
        name = "custom"

        def prefill(self, *args, **kwargs):
            return super().prefill(*args, **kwargs)

    assert KVPolicy.layerwise and KeyNorm.layerwise and not Custom.layerwise
    with pytest.raises(TypeError, match="not layer-wise"):
        layerwise_prefill(
            None, torch.zeros((1, 4), dtype=torch.long), torch.ones((1, 4)), [Custom()], 0
        )


def test_shared_prefill_and_batched_decode_match_each_policy_alone(smollm2):
    policies = [
        KVPolicy(),
        KeyNorm(KeyNorm.Config(compression_ratio=0.5)),
        KeyNorm(KeyNorm.Config(compression_ratio=0.75)),
    ]
    prompt = _prompt()
    alone = [Host(smollm2, kv_policy=p).generate(prompt, max_new_tokens=24)[0] for p in policies]
    for batch_size in (None, 1):
        shared = generate_shared(Host(smollm2), policies, prompt, 24, batch_size=batch_size)
        for a, s in zip(alone, shared, strict=True):
            assert s.text == a.text and s.new_tokens == a.new_tokens
            assert s.kv_tokens == a.kv_tokens and s.finish_reason == a.finish_reason
            assert s.peak_kv_bytes == a.peak_kv_bytes, (s.peak_kv_bytes, a.peak_kv_bytes)
        assert {s.batch_size for s in shared} == ({3} if batch_size is None else {1})
    # the compressed policies really hold less, and the peak counts one full layer in flight
    assert alone[1].kv_tokens < 0.6 * alone[0].kv_tokens
    assert alone[1].peak_kv_bytes < 0.62 * alone[0].peak_kv_bytes


def test_the_run_loop_shares_the_prefill_and_records_what_each_config_gets_alone(tmp_path, smollm2):
    from apportion.config import parse_config
    from apportion.plugins import get_plugin_host, reset
    from apportion.runner import RunOptions, execute

    get_plugin_host().registry.register_function("kv-policy", "tests", "0")(KeyNorm)
    try:
        data = {
            "benchmarks": [{"name": "niah", "lengths": [384], "depths": [0.3, 0.7], "samples": 1}],
            "sweep": [
                {"label": "full"},
                {"label": "kn50", "kv_policy": {"name": "test-keynorm", "compression_ratio": 0.5}},
                {"label": "kn75", "kv_policy": {"name": "test-keynorm", "compression_ratio": 0.75}},
            ],
            "generation": {"max_new_tokens": 12, "batch_size": 4},
        }
        opts = RunOptions(progress=False)
        shared = execute(parse_config(data), tmp_path / "s", opts, loaded=smollm2).records
        data["generation"] |= {"share_prefill": False, "batch_size": 1}
        alone = execute(parse_config(data), tmp_path / "a", opts, loaded=smollm2).records
    finally:
        reset()
    key = lambda r: (r["variant"], r["sample_id"])  # noqa: E731
    shared, alone = sorted(shared, key=key), sorted(alone, key=key)
    assert len(shared) == len(alone) == 6
    for s, a in zip(shared, alone, strict=True):
        assert key(s) == key(a)
        for field in ("prediction", "score", "kv_tokens", "peak_kv_bytes", "new_tokens"):
            assert s[field] == a[field], (key(s), field, s[field], a[field])
        assert s["shared_prefill"] == 3 and s["batch_size"] == 3 and "shared_prefill" not in a


def test_query_agnostic_mode_feeds_the_question_after_the_compressed_context(smollm2):
    prompt = _prompt()
    # the full cache: feeding the question after the context is the same computation
    aware = Host(smollm2).generate(prompt, max_new_tokens=16)[0]
    agnostic = Host(smollm2, question_in_prefill=False).generate(prompt, max_new_tokens=16)[0]
    assert agnostic.text == aware.text and agnostic.prompt_tokens == aware.prompt_tokens
    # a compressing policy now evicts without protecting the question: it keeps fewer of the
    # prompt's entries before the question joins, and the question is kept whole after it
    policy = KeyNorm(KeyNorm.Config(compression_ratio=0.5))
    qa = Host(smollm2, kv_policy=policy).generate(prompt, max_new_tokens=16)[0]
    qa_free = Host(smollm2, kv_policy=policy, question_in_prefill=False)
    free = qa_free.generate(prompt, max_new_tokens=16)[0]
    n_question = qa_free.encode(prompt).question_len
    assert n_question > 0
    assert free.kv_tokens < qa.kv_tokens
    context = aware.prompt_tokens - n_question
    assert free.kv_tokens == math.ceil(context * 0.5)
    # batched rows with different question lengths (left-padded question chunk)
    other = Prompt(
        [{"role": "user", "content": f"{_long_context(24)}\n\nWhat is it? Say the number."}],
        question="What is it? Say the number.",
    )
    host = Host(smollm2, question_in_prefill=False)
    batch = host.generate([prompt, other], max_new_tokens=16)
    single = host.generate(other, max_new_tokens=16)[0]
    assert batch[0].text == agnostic.text and batch[1].text == single.text


def test_query_agnostic_shared_prefill_matches_each_policy_alone(smollm2):
    policies = [KVPolicy(), KeyNorm(KeyNorm.Config(compression_ratio=0.5))]
    prompt = _prompt()
    alone = [
        Host(smollm2, kv_policy=p, question_in_prefill=False).generate(prompt, 20)[0]
        for p in policies
    ]
    shared = generate_shared(Host(smollm2), policies, prompt, 20, question_in_prefill=False)
    for a, s in zip(alone, shared, strict=True):
        assert s.text == a.text and s.kv_tokens == a.kv_tokens
        assert s.peak_kv_bytes == a.peak_kv_bytes, (s.peak_kv_bytes, a.peak_kv_bytes)


class HiddenNorm(KeyNorm):
    """Keeps the tokens whose final hidden state has the largest norm: a policy whose scores
    need the whole prompt's last layer (``needs_prompt_hidden``)."""

    name = "test-hiddennorm"
    layerwise = True
    needs_prompt_hidden = True
    prepared = 0

    def prepare(self, model, input_ids, attention_mask, hidden, memo):
        type(self).prepared += 1
        self._scores = hidden.float().norm(dim=-1)  # (B, L)

    def release(self):
        self._scores = None

    def evict_layer(self, inputs):
        scores = self._scores[:, None, :].expand(-1, inputs.keys.shape[1], -1).clone()
        if inputs.question_len:
            scores[..., -inputs.question_len :] = float("inf")
        idx = scores.topk(inputs.n_keep, dim=-1).indices.sort(dim=-1).values
        gather = idx[..., None].expand(-1, -1, -1, inputs.keys.shape[-1])
        return inputs.keys.gather(2, gather), inputs.values.gather(2, gather)

    def prefill(self, model, input_ids, attention_mask, cache, *, question_len=0):
        from apportion.host.shared import prompt_hidden

        hidden = prompt_hidden(model, input_ids, attention_mask)
        out = layerwise_prefill(
            model, input_ids, attention_mask, [self], question_len, [cache], hidden=hidden
        )
        return out[0].prefill


def test_a_policy_that_needs_the_final_hidden_states_shares_the_prefill(smollm2):
    """Alone it runs a scoring pass first and holds the compressed cache plus one layer;
    shared, the one forward prepares it and it gets the same cache, answer and peak."""
    policies = [
        KVPolicy(),
        HiddenNorm(HiddenNorm.Config(compression_ratio=0.5)),
        KeyNorm(KeyNorm.Config(compression_ratio=0.5)),
    ]
    prompt = _prompt()
    HiddenNorm.prepared = 0
    alone = [Host(smollm2, kv_policy=p).generate(prompt, max_new_tokens=16)[0] for p in policies]
    assert HiddenNorm.prepared == 1
    shared = generate_shared(Host(smollm2), policies, prompt, 16)
    assert HiddenNorm.prepared == 2
    for a, s in zip(alone, shared, strict=True):
        assert (s.text, s.kv_tokens, s.peak_kv_bytes) == (a.text, a.kv_tokens, a.peak_kv_bytes)
    assert alone[1].peak_kv_bytes < 0.62 * alone[0].peak_kv_bytes
    assert policies[1]._scores is None  # released after the prefill


def test_decode_batches_read_the_fewest_bytes():
    from apportion.host.shared import decode_batches

    def cost(lengths, batches, w):
        return sum(w + len(b) * max(lengths[i] for i in b) for b in batches)

    w = 11_700.0  # SmolLM2's fp32 weights over one cache entry's bytes
    short = [1024] + [512] * 6 + [256] * 6
    assert decode_batches(short, 16, w) == [list(range(13))]  # padding is cheaper
    long = [4096] + [2048] * 6 + [1024] * 6
    batches = decode_batches(long, 16, w)
    assert sorted(sorted(b) for b in batches) == [[0], list(range(1, 13))]
    by_length = [[0], list(range(1, 7)), list(range(7, 13))]
    assert cost(long, batches, w) < min(cost(long, [list(range(13))], w), cost(long, by_length, w))
    capped = decode_batches(short, 4, w)
    assert max(len(b) for b in capped) <= 4
    assert sorted(i for b in capped for i in b) == list(range(13))
    assert decode_batches([], 4, w) == []
