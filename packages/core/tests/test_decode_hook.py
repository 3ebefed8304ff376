"""The decode loop's hook for compression while generating (``KVPolicy.after_decode_step``):
called before the first generated token and after every step, with true positions and the
cache's validity mask; an eviction it makes is what the next steps attend to, and what the
host measures."""

import pytest
import torch
from apportion.host import Host
from apportion.host.attention import AttentionBackend
from apportion.host.generate import greedy_decode
from apportion.host.kv import KVPolicy, cache_seq_lengths, kept_mask
from apportion.host.shared import generate_shared
from apportion.runner import can_share


class SinkWindow(KVPolicy):
    """Keeps each row's first ``sink`` real entries and its latest ones, ``keep`` in all,
    cutting the cache back once it holds ``keep + every`` entries: a policy small enough to
    write in a test. Records what the hook was shown."""

    name = "test-sinkwindow"
    compresses_decode = True

    def __init__(self, keep=24, every=8, sink=4):
        super().__init__()
        self.keep, self.every, self.sink = keep, every, sink
        self.seen = []

    def after_decode_step(self, model, cache, step, state):
        mask = None if state.kv_mask is None else state.kv_mask.clone()
        self.seen.append((step, state.position.clone(), mask, cache_seq_lengths(cache)))
        length = cache.layers[0].keys.shape[-2]
        if step == 0 or length < self.keep + self.every:
            return None
        rows = cache.layers[0].keys.shape[0]
        real = state.kv_mask if state.kv_mask is not None else torch.ones(rows, length).bool()
        order = real.long().cumsum(-1) - 1  # place among the row's real entries
        scores = torch.arange(length, dtype=torch.float32).expand(rows, -1).clone()
        scores[(order < self.sink) & real] = float("inf")
        scores[~real] = float("-inf")
        idx = scores.topk(self.keep, -1).indices.sort(-1).values
        for layer in cache.layers:
            k = layer.keys
            gather = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
            layer.keys = k.gather(2, gather).contiguous()
            layer.values = layer.values.gather(2, gather).contiguous()
        kept = kept_mask(real, self.keep)
        return torch.ones(rows, self.keep).bool() if kept is None else kept


def test_the_hook_sees_true_positions_and_its_evictions_bound_the_cache(smollm2):
    prompts = ["Name three colours.", "Write a long story about a dragon who learns to cook."]
    n = 40
    policy = SinkWindow(keep=24, every=8)
    out = Host(smollm2, kv_policy=policy).generate(prompts, max_new_tokens=n)
    full = Host(smollm2).generate(prompts, max_new_tokens=n)
    steps = [s for s, *_ in policy.seen]
    assert steps == list(range(n))  # before the first forward, then after each of n - 1
    lengths = [r.prompt_tokens for r in out]
    width = max(lengths)
    assert lengths[0] < width and width + 1 >= 24 + 8  # left padding; cut at the first step
    for step, position, mask, layer_lengths in policy.seen:
        # positions count every token of the row, whatever was evicted
        assert position.tolist() == [p + step for p in lengths]
        assert len(set(layer_lengths)) == 1
        if step <= 1:  # the prefill's cache, then one more entry: the padding still masked
            assert layer_lengths[0] == width + step and mask.shape == (2, width + step)
            assert mask[0].sum().item() == lengths[0] + step and mask[1].all()
        else:  # cut back to 24 at every 8 more; the padding was evicted, the mask re-derived
            assert 24 < layer_lengths[0] <= 24 + 8 and mask is None
    # every row answers, and the batch held far less than the uncompressed generation
    assert all(r.new_tokens == n for r in out), [r.text for r in out]
    assert out[0].peak_kv_bytes < 0.7 * full[0].peak_kv_bytes


def test_an_eviction_every_step_leaves_each_row_as_alone(smollm2):
    """Cut back after every step: each row of a left-padded batch keeps exactly what it keeps
    alone, so the answers match (the re-derived mask hides the padding)."""
    prompts = ["Name three colours.", "Write a long story about a dragon who learns to cook."]
    batch = Host(smollm2, kv_policy=SinkWindow(keep=40, every=1)).generate(prompts, 32)
    alone = [
        Host(smollm2, kv_policy=SinkWindow(keep=40, every=1)).generate(p, 32)[0] for p in prompts
    ]
    assert [r.text for r in batch] == [r.text for r in alone]


def test_decode_compressing_policies_decode_alone(smollm2):
    dense = AttentionBackend()
    assert can_share({"attention": dense, "kv_policy": KVPolicy(), "allocator": None})
    assert not can_share({"attention": dense, "kv_policy": SinkWindow(), "allocator": None})
    with pytest.raises(TypeError, match="compress while decoding"):
        generate_shared(Host(smollm2), [KVPolicy(), SinkWindow()], "Say hello.", 8)
    with pytest.raises(ValueError, match="keeps every row"):
        greedy_decode(
            None, None, None, 8, eos=set(), pad_id=0, drop_finished=True, policy=SinkWindow()
        )
