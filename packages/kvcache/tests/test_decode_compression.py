"""Compression while generating (``decode_budget``): the cache stays bounded through a long
output, the memory really goes, positions and left padding stay right, and a budget the
generation never reaches changes nothing."""

from __future__ import annotations

import pytest
import torch
from apportion.base import Prompt
from apportion.errors import ConfigError
from apportion.host import Host
from apportion.host.kv import attention_modules
from apportion.testing.contracts import QUESTION, _long_context

STORY = "Write a long story about a dragon who learns to cook. Make it very long and detailed."


class Watch:
    """Records the cache ``policy`` builds, and every layer's cached length each time that
    layer's attention has run (every decode step)."""

    def __init__(self, model, policy):
        self.model, self.caches, self.lengths = model, [], []
        make = policy.make_cache

        def recording(m):
            self.caches.append(make(m))
            return self.caches[-1]

        policy.make_cache = recording

    def _hook(self, module, args, output):
        keys = self.caches[-1].layers[module.layer_idx].keys
        if keys is not None:  # a layer-wise prefill fills the policy's cache after this hook
            self.lengths.append(int(keys.shape[-2]))

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook) for m in attention_modules(self.model)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_a_long_generation_stays_within_the_budget(registry, smollm2):
    """200 new tokens over a short prompt: no layer ever holds more than budget + interval
    entries (watched during the decode and read from the cache after it), the peak KV bytes
    fall to about that share of the uncompressed generation's, and the output matches the
    uncompressed one until the first eviction."""
    limit, interval = 64, 16
    full = Host(smollm2).generate(STORY, max_new_tokens=200)[0]
    policy = registry.create(
        "kv-policy",
        "snapkv",
        {"compression_ratio": 0.0, "decode_budget": limit, "decode_interval": interval},
    )
    assert policy.compresses_decode
    with Watch(smollm2.model, policy) as watch:
        out = Host(smollm2, kv_policy=policy).generate(STORY, max_new_tokens=200)[0]
    assert full.new_tokens == out.new_tokens == 200, (full.finish_reason, out.finish_reason)
    total = out.prompt_tokens + out.new_tokens
    assert total > 3 * (limit + interval)
    assert max(watch.lengths) == limit + interval, max(watch.lengths)
    # the cache after the generation: every layer cut back, and grown by less than interval
    after = [layer.keys.shape[-2] for layer in watch.caches[-1].layers]
    assert len(set(after)) == 1 and limit <= after[0] < limit + interval, after
    assert out.peak_kv_bytes <= 1.05 * full.peak_kv_bytes * (limit + interval) / (total - 1)
    assert out.peak_kv_bytes < 0.4 * full.peak_kv_bytes
    # the same tokens until the cache first reached the budget
    first = limit + interval - out.prompt_tokens
    want = smollm2.tokenizer.encode(full.text, add_special_tokens=False)[: first - 2]
    got = smollm2.tokenizer.encode(out.text, add_special_tokens=False)[: first - 2]
    assert got == want


def test_a_budget_the_generation_never_reaches_changes_nothing(registry, smollm2):
    """decode_budget above prompt + new tokens: token-identical to the same policy without it
    (here with the prefill compressed too), the same cache and peak."""
    prompt = Prompt(
        [{"role": "user", "content": f"{_long_context(20)}\n\n{QUESTION}"}], question=QUESTION
    )
    plain = registry.create("kv-policy", "h2o", {"compression_ratio": 0.5})
    budgeted = registry.create(
        "kv-policy", "h2o", {"compression_ratio": 0.5, "decode_budget": 4096, "decode_interval": 4}
    )
    a = Host(smollm2, kv_policy=plain).generate(prompt, max_new_tokens=48)[0]
    b = Host(smollm2, kv_policy=budgeted).generate(prompt, max_new_tokens=48)[0]
    assert b.prompt_tokens + b.new_tokens < 4096
    assert (b.text, b.kv_tokens, b.peak_kv_bytes) == (a.text, a.kv_tokens, a.peak_kv_bytes)


def test_left_padded_batch_matches_each_row_alone(registry, smollm2):
    """Two prompts of different lengths decoded together with an eviction after every step
    once a row is over budget: each row's answer is the one it gets alone (the padding is
    masked after each eviction, positions count every generated token), and no layer ever
    holds more than budget + 1 entries."""
    opts = {
        "compression_ratio": 0.0,
        "window_size": 16,
        "decode_budget": 40,
        "decode_interval": 1,
        "decode_window": 8,
    }
    prompts = ["Name three colours.", STORY]

    def run(batch):
        policy = registry.create("kv-policy", "snapkv", opts)
        with Watch(smollm2.model, policy) as watch:
            out = Host(smollm2, kv_policy=policy).generate(batch, max_new_tokens=48)
        return out, watch

    batch, watch = run(prompts)
    alone = [run([p])[0][0] for p in prompts]
    assert [r.text for r in batch] == [r.text for r in alone]
    assert all(r.new_tokens > 20 for r in batch), [r.new_tokens for r in batch]
    assert max(watch.lengths) <= 41
    # the long row is cut to the budget in the prefill already, the short one joins it later
    assert batch[0].prompt_tokens < 40 < batch[1].prompt_tokens


def test_bad_decode_options_are_config_errors(registry):
    from apportion.runner import can_share

    with pytest.raises(ConfigError, match="decode_interval"):
        registry.create("kv-policy", "streaming", {"decode_budget": 64, "decode_interval": 0})
    with pytest.raises(ConfigError, match="decode_budget"):
        registry.create("kv-policy", "streaming", {"decode_budget": 0})
    # smaller than what every eviction keeps: the decode window, or SnapKV's own window
    with pytest.raises(ConfigError, match="decode_budget=8 .* 16 recent"):
        registry.create("kv-policy", "streaming", {"decode_budget": 8, "decode_window": 16})
    with pytest.raises(ConfigError, match="decode_budget=24 .* 32 recent"):
        registry.create("kv-policy", "snapkv", {"decode_budget": 24})
    ok = registry.create("kv-policy", "snapkv", {"decode_budget": 32})
    assert ok.compresses_decode
    assert not registry.create("kv-policy", "snapkv").compresses_decode
    # a decode-compressing policy decodes alone, and model.generate cannot follow it
    comps = {"attention": registry.create("attention", "dense"), "allocator": None}
    assert can_share(comps | {"kv_policy": registry.create("kv-policy", "snapkv")})
    assert not can_share(comps | {"kv_policy": ok})
    with pytest.raises(TypeError, match="decode_budget"), ok.patch(torch.nn.Linear(1, 1)):
        pass
