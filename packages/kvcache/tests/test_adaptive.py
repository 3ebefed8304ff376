"""``adakv``: adaptive per-head / per-layer budgets over a scored policy, in ragged storage."""

from __future__ import annotations

import math

import pytest
import torch
from apportion.base import Prompt
from apportion.errors import ConfigError
from apportion.host import Host
from apportion.host.attention import AttentionBackend
from apportion.host.kv import KVPolicy, cache_kwargs, cache_seq_lengths
from apportion.testing.contracts import QUESTION, KVPolicyContract, _long_context
from apportion_kvcache.adaptive import allocate_heads, layer_budgets
from apportion_kvcache.ragged import RaggedCache, RaggedLayer, ragged_attention


class TestAdaKVContract(KVPolicyContract):
    component = "adakv"
    options = {"policy": "probe", "allocation": "heads"}


def _prompt(n: int = 30) -> Prompt:
    return Prompt(
        [{"role": "user", "content": f"{_long_context(n)}\n\n{QUESTION}"}], question=QUESTION
    )


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    enc = Host(smollm2).encode(_prompt())
    return torch.tensor([enc.ids]), enc.question_len


def _prefill(smollm2, policy, ids, question_len):
    cache = policy.make_cache(smollm2.model)
    with torch.inference_mode():
        out = policy.prefill(
            smollm2.model, ids, torch.ones_like(ids), cache, question_len=question_len
        )
    return cache, out


# ----------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    ("allocation", "inner"), [("heads", "probe"), ("layers", "snapkv"), ("both", "qspan")]
)
def test_total_budget_is_the_uniform_one(registry, smollm2, prompt_ids, allocation, inner):
    """Per-head allocation keeps exactly the uniform policy's entries in every layer; the
    layer schedule never more in total, and never more before the last layer (the running
    total a prefill holds). Every head of every layer keeps the question verbatim."""
    ids, qlen = prompt_ids
    ratio = 0.75
    full, _ = _prefill(smollm2, KVPolicy(), ids, qlen)
    uniform, _ = _prefill(
        smollm2, registry.create("kv-policy", inner, {"compression_ratio": ratio}), ids, qlen
    )
    policy = registry.create(
        "kv-policy",
        "adakv",
        {"policy": inner, "compression_ratio": ratio, "allocation": allocation},
    )
    cache, out = _prefill(smollm2, policy, ids, qlen)
    layers = cache.layers
    assert all(isinstance(layer, RaggedLayer) for layer in layers)
    per_layer = [int(layer.counts.sum()) for layer in layers]
    uniform_per_layer = [layer.keys.shape[1] * layer.keys.shape[2] for layer in uniform.layers]
    assert out.info["kept_entries"] == sum(per_layer)
    n = ids.shape[1]
    n_keep = math.ceil((n - qlen) * (1 - ratio)) + qlen
    assert uniform_per_layer[0] == 3 * n_keep
    if allocation == "heads":
        assert per_layer == uniform_per_layer
    else:
        assert sum(per_layer) <= sum(uniform_per_layer)
        assert sum(per_layer[:-1]) <= sum(uniform_per_layer[:-1])
        assert per_layer[0] > per_layer[-1]  # a pyramid: the first layers keep more
    for layer, dense in zip(layers, full.layers, strict=True):
        for h in range(layer.counts.shape[1]):
            keys, _, _ = layer.head_prefix(h)
            torch.testing.assert_close(keys[0, -qlen:], dense.keys[0, h, -qlen:])
    # the host-side width is the uniform budget, whatever each layer holds
    assert cache_seq_lengths(cache) == [n_keep] * len(layers)


def test_heads_really_get_different_budgets(registry, smollm2, prompt_ids):
    """On the real model AdaKV gives the KV heads of a layer different numbers of entries
    (and the per-head storage holds exactly them, no padding)."""
    ids, qlen = prompt_ids
    policy = registry.create("kv-policy", "adakv", {"policy": "probe", "compression_ratio": 0.75})
    cache, _ = _prefill(smollm2, policy, ids, qlen)
    uneven = [i for i, layer in enumerate(cache.layers) if len(set(layer.counts[0].tolist())) > 1]
    assert len(uneven) >= len(cache.layers) // 2, [layer.counts.tolist() for layer in cache.layers]
    spread = max(int(layer.counts.max() - layer.counts.min()) for layer in cache.layers)
    assert spread > 20
    for layer in cache.layers:
        assert layer.prefix_keys.shape[0] == int(layer.counts.sum())


def test_layer_schedule():
    budgets = layer_budgets(30, 200, 40, 800, 20.0)
    assert len(budgets) == 30 and sum(budgets[:-1]) == 29 * 200 and budgets[-1] <= 200
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False))
    assert min(budgets) >= 40 and budgets[-2] <= 40 + 160 / 20 + 1
    capped = layer_budgets(30, 700, 40, 800, 20.0)  # the first layers cannot keep past 800
    assert max(capped) == 800 and sum(capped[:-1]) == 29 * 700
    assert layer_budgets(30, 50, 50, 800, 20.0) == [50] * 30  # no room above the tail


def test_allocate_heads_pools_scores_with_a_floor():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [-1.0, -2.0, -3.0, -0.5], [5.0, 0.0, 0.0, 0.0]])
    kept = allocate_heads(scores, 2, 0)  # the layer's 6 entries go where the scores are
    assert (kept // 4).bincount(minlength=3).tolist() == [4, 0, 2]
    assert kept.tolist() == sorted(kept.tolist())
    kept = allocate_heads(scores, 2, 1)  # every head keeps at least its own best
    assert (kept // 4).bincount(minlength=3).tolist() == [4, 1, 1]
    assert 7 in kept.tolist()  # head 1's best: position 3


# ----------------------------------------------------------------------------- memory


def test_peak_kv_falls_and_stays_under_uniform(registry, smollm2):
    """The host's measured peak falls with the budget and is never above the uniform
    policy's at the same ratio, with the question in the prefill and without it."""
    prompt = _prompt(30)
    full = Host(smollm2).generate(prompt, max_new_tokens=4)[0].peak_kv_bytes

    def peak(name, opts, ratio, agnostic):
        policy = registry.create("kv-policy", name, {**opts, "compression_ratio": ratio})
        host = Host(smollm2, kv_policy=policy, question_in_prefill=not agnostic)
        return host.generate(prompt, max_new_tokens=4)[0].peak_kv_bytes

    for agnostic in (False, True):
        peaks = []
        for ratio in (0.5, 0.75):
            uniform = peak("probe", {}, ratio, agnostic)
            for allocation in ("heads", "both"):
                got = peak("adakv", {"policy": "probe", "allocation": allocation}, ratio, agnostic)
                assert got <= uniform, (agnostic, ratio, allocation, got, uniform)
            peaks.append(got)
        assert peaks[1] < peaks[0] < 0.62 * full, (agnostic, peaks, full)


# ----------------------------------------------------------------------------- attention


def _layer_from(prefix_k, prefix_v, counts):
    """A RaggedLayer keeping the first ``counts[b, h]`` entries of each (b, h) of dense
    ``(B, H, L, D)`` tensors."""
    b, h = counts.shape
    ks = [prefix_k[i, j, : counts[i, j]] for i in range(b) for j in range(h)]
    vs = [prefix_v[i, j, : counts[i, j]] for i in range(b) for j in range(h)]
    return RaggedLayer(torch.cat(ks), torch.cat(vs), counts, int(counts.max()))


def test_ragged_attention_equals_sdpa_when_every_head_keeps_everything():
    torch.manual_seed(0)
    b, h, g, length, t, d = 2, 3, 3, 11, 4, 16
    pk, pv = torch.randn(b, h, length, d), torch.randn(b, h, length, d)
    tk, tv = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    query = torch.randn(b, h * g, t, d)
    layer = _layer_from(pk, pv, torch.full((b, h), length))
    key, value = layer.update(tk, tv)
    assert key is layer and layer.get_seq_length() == length + t
    got, _ = ragged_attention(None, query, key, value, None, scaling=d**-0.5)
    k = torch.cat([pk, tk], 2).repeat_interleave(g, 1)
    v = torch.cat([pv, tv], 2).repeat_interleave(g, 1)
    mask = torch.ones(t, length + t, dtype=torch.bool)
    mask[:, length:] = torch.ones(t, t, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-4)
    # the same through an explicit 4-D mask (as transformers builds it), and on plain tensors
    # the function is SDPA
    tail = mask[None, None, :, length:].expand(b, 1, t, t)
    mask4 = torch.cat([torch.ones(b, 1, t, 7, dtype=torch.bool), tail], -1)
    again, _ = ragged_attention(None, query, layer, layer, mask4, scaling=d**-0.5)
    torch.testing.assert_close(again, got)
    dense, _ = ragged_attention(
        torch.nn.Module(), query, k, v, mask[None, None].expand(b, 1, t, length + t)
    )
    torch.testing.assert_close(dense, want.transpose(1, 2), atol=1e-5, rtol=1e-4)


def test_ragged_attention_reads_each_heads_own_entries():
    """Ragged lengths: each (row, KV head) attends over its own segment plus the appended
    tail, which a left-padded row masks; compared with a per-head computation by hand."""
    torch.manual_seed(1)
    b, h, g, length, t, d = 2, 3, 2, 9, 3, 8
    counts = torch.tensor([[2, 9, 5], [7, 1, 4]])
    pk, pv = torch.randn(b, h, length, d), torch.randn(b, h, length, d)
    tk, tv = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    query = torch.randn(b, h * g, t, d)
    layer = _layer_from(pk, pv, counts)
    layer.update(tk, tv)
    tail_ok = torch.ones(t, t, dtype=torch.bool).tril()[None].repeat(b, 1, 1)
    tail_ok[1, :, 0] = False  # row 1's first appended token is left padding
    mask4 = torch.cat([torch.ones(b, t, layer.width, dtype=torch.bool), tail_ok], -1)[:, None]
    got, _ = ragged_attention(None, query, layer, layer, mask4, scaling=d**-0.5)
    for i in range(b):
        for j in range(h):
            n = int(counts[i, j])
            keys = torch.cat([pk[i, j, :n], tk[i, j]]).double()
            values = torch.cat([pv[i, j, :n], tv[i, j]]).double()
            visible = torch.cat([torch.ones(t, n, dtype=torch.bool), tail_ok[i]], -1)
            for q_head in range(j * g, (j + 1) * g):
                logits = query[i, q_head].double() @ keys.T * d**-0.5
                probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
                want = (probs @ values).float()
                torch.testing.assert_close(got[i, :, q_head], want, atol=1e-5, rtol=1e-4)


def test_ragged_layer_crop_and_select_rows():
    torch.manual_seed(2)
    counts = torch.tensor([[4, 6], [5, 3]])
    pk, pv = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    layer = _layer_from(pk, pv, counts)
    layer.update(torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4))
    assert layer.get_seq_length() == 6 + 2
    layer.crop(-3)  # the two appended entries and the last kept one of every head
    assert layer.tail_keys.shape[-2] == 0 and layer.counts.tolist() == [[3, 5], [4, 2]]
    keys, _, valid = layer.head_prefix(1)
    torch.testing.assert_close(keys[0, :5], pk[0, 1, :5])
    torch.testing.assert_close(keys[1, :2], pk[1, 1, :2])
    assert valid is not None and valid[1, 0].tolist() == [True, True] + [False] * 3
    with pytest.raises(ValueError, match="keeps only"):
        layer.crop(-3)
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.counts.tolist() == [[4, 2]] and layer.nbytes() == 6 * 4 * 4 * 2
    torch.testing.assert_close(layer.head_prefix(0)[0][0], pk[1, 0, :4])


# ----------------------------------------------------------------------------- batches, modes


def test_left_padded_batch_keeps_what_each_row_keeps_alone(registry, smollm2):
    """Each row of a left-padded batch gets the budget it gets alone (its own length) and is
    scored alone: per layer and head it keeps the same entries, and the host-side mask marks
    the shorter row's missing width. Generated, it answers as it does alone (query-agnostic,
    both allocations)."""
    opts = {"policy": "probe", "compression_ratio": 0.5, "allocation": "both"}
    host = Host(smollm2)
    encs = [host.encode(_prompt(8)), host.encode(_prompt(20))]
    qlen = encs[0].question_len
    width = max(len(e.ids) for e in encs)
    ids = torch.full((2, width), int(smollm2.tokenizer.pad_token_id))
    mask = torch.zeros((2, width), dtype=torch.long)
    for b, e in enumerate(encs):
        ids[b, width - len(e.ids) :] = torch.tensor(e.ids)
        mask[b, width - len(e.ids) :] = 1
    policy = registry.create("kv-policy", "adakv", opts)
    cache = policy.make_cache(smollm2.model)
    with torch.inference_mode():
        out = policy.prefill(smollm2.model, ids, mask, cache, question_len=qlen)
    for b, e in enumerate(encs):
        alone, alone_out = _prefill(smollm2, policy, torch.tensor([e.ids]), qlen)
        assert int(out.kv_mask[b].sum()) == alone_out.info["n_keep"]
        for layer, single in zip(cache.layers, alone.layers, strict=True):
            assert layer.counts[b].tolist() == single.counts[0].tolist()
            for h in range(single.counts.shape[1]):
                n = int(single.counts[0, h])
                got = layer.head_prefix(h)[0][b, :n]
                torch.testing.assert_close(got, single.head_prefix(h)[0][0], atol=1e-4, rtol=0)

    def gen(batch):
        policy = registry.create("kv-policy", "adakv", opts)
        host = Host(smollm2, kv_policy=policy, question_in_prefill=False)
        return host.generate(batch, max_new_tokens=12)

    prompts = [_prompt(8), _prompt(20)]
    batch = gen(prompts)
    alone = [gen(p)[0] for p in prompts]
    assert [b.text for b in batch] == [a.text for a in alone]
    assert all(b.new_tokens > 0 for b in batch)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"policy": "no-such-policy"}, "no-such-policy"),
        ({"policy": "cachegen"}, "cachegen"),
        ({"policy": "full"}, "full"),
        ({"policy": "adakv"}, "adakv"),
        ({"compression_ratio": 1.0}, "compression_ratio"),
        ({"compression_ratio": -0.1}, "compression_ratio"),
        ({"policy_options": {"compression_ratio": 0.5}}, "compression_ratio"),
        ({"policy_options": {"window_size": 0}, "policy": "snapkv"}, "window_size"),
        ({"policy_options": {"decode_budget": 512}}, "decode_budget"),
        ({"allocation": "rows"}, "allocation"),
    ],
)
def test_bad_options_are_config_errors(registry, options, match):
    with pytest.raises(ConfigError, match=match):
        registry.create("kv-policy", "adakv", options)


def test_refused_beside_an_attention_backend_of_its_own(registry, smollm2):
    """An attention backend that installs its own function cannot read ragged KV: the run
    config is refused at validation for the known ones, and the host refuses any other
    before the prefill."""
    from apportion.config import parse_config, resolve_config

    if "squeezed" in {s.name for s in registry.specs("attention")}:
        config = parse_config(
            {"name": "x", "attention": {"name": "squeezed"}, "kv_policy": {"name": "adakv"}}
        )
        with pytest.raises(ConfigError, match="squeezed"):
            resolve_config(config, registry)

    class OwnAttention(AttentionBackend):
        name = "own-test"

        def attention_function(self):
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward

    policy = registry.create("kv-policy", "adakv", {"compression_ratio": 0.5})
    host = Host(smollm2, OwnAttention(), policy)
    before = smollm2.model.config._attn_implementation
    with pytest.raises(ConfigError, match="apportion-own-test"):
        host.generate(_prompt(6), max_new_tokens=4)
    assert smollm2.model.config._attn_implementation == before


def test_cache_refuses_to_be_read_without_its_attention(registry, smollm2, prompt_ids):
    ids, qlen = prompt_ids
    policy = registry.create("kv-policy", "adakv", {"compression_ratio": 0.5})
    cache, out = _prefill(smollm2, policy, ids, qlen)
    assert isinstance(cache, RaggedCache)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="installed"):
        smollm2.model(
            input_ids=ids[:, -1:],
            position_ids=out.next_position[:, None],
            **cache_kwargs(smollm2.model, cache),
        )
