"""Squeezed Attention on the embedded model: contract, budgets, fallbacks, plain transformers."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from apportion.testing.contracts import QUESTION, AttentionContract, _long_context
from apportion_attention.squeezed import Squeezed, SqueezedConfig, build_layer_index


class TestSqueezedContract(AttentionContract):
    """Default config on the contract's short prompt: the context is shorter than
    ``min_context_tokens`` (256), so squeezed falls back to dense and must match it exactly."""

    component = "squeezed"
    max_logit_diff = 1e-3


class TestSqueezedActiveContract(AttentionContract):
    """Clustering forced on the short prompt (``min_context_tokens=32``) at half the keys: the
    question tokens read only their selected keys, so the first-token logits move. 3.0 is the
    bound observed with margin (the answer itself must still come out: ``generates``)."""

    component = "squeezed"
    options = {"min_context_tokens": 32, "budget": 0.5}
    max_logit_diff = 3.0


def _prefill(smollm2, backend, prompt):
    from apportion.host import Host
    from apportion.host.kv import KVPolicy

    host = Host(smollm2, backend, KVPolicy())
    enc = host.encode(prompt)
    ids = torch.tensor([enc.ids])
    cache = KVPolicy().make_cache(smollm2.model)
    with torch.inference_mode(), backend.installed(smollm2.model):
        pre = backend.prefill(
            smollm2.model,
            ids,
            torch.ones_like(ids),
            cache,
            question_len=enc.question_len,
            inner=KVPolicy().prefill,
        )
    return pre.logits.float(), enc


@pytest.fixture(scope="module")
def prompt():
    from apportion.base import Prompt

    return Prompt(
        [{"role": "user", "content": f"{_long_context(24)}\n\n{QUESTION}"}], question=QUESTION
    )


@pytest.fixture(scope="module")
def dense_logits(smollm2, prompt):
    from apportion.host.attention import AttentionBackend

    return _prefill(smollm2, AttentionBackend(), prompt)[0]


def test_budget_one_and_budget_tokens_over_context_are_dense(smollm2, prompt, dense_logits, caplog):
    with caplog.at_level(logging.WARNING, "apportion_attention.squeezed"):
        full, _ = _prefill(
            smollm2, Squeezed(SqueezedConfig(budget=1.0, min_context_tokens=32)), prompt
        )
    assert (full - dense_logits).abs().max().item() < 1e-4
    assert "whole context" in caplog.text
    over, _ = _prefill(
        smollm2, Squeezed(SqueezedConfig(budget_tokens=10**6, min_context_tokens=32)), prompt
    )
    assert (over - dense_logits).abs().max().item() < 1e-4


def test_budget_zero_reads_only_the_question_and_decodes(smollm2, prompt, dense_logits):
    from apportion.host import Host

    backend = Squeezed(SqueezedConfig(budget=0.0, min_context_tokens=32))
    zero, _ = _prefill(smollm2, backend, prompt)
    assert backend.stats["selected_keys"] == 0 and backend.stats["context_keys"] > 0
    assert (zero - dense_logits).abs().max().item() > 1e-2  # it really read less
    out = Host(smollm2, backend).generate(prompt, max_new_tokens=4)[0]
    assert out.new_tokens > 0 and backend.stats["selected_keys"] == 0


def test_active_budget_selects_about_the_budget(smollm2, prompt):
    # Accuracy is measured by benchmarks/attention_niah_squeezed.py, not asserted here: on this
    # 456-token prompt at a 30% budget the model answered without the code.
    from apportion.host import Host

    backend = Squeezed(SqueezedConfig(budget=0.3, min_context_tokens=32))
    out = Host(smollm2, backend).generate(prompt, max_new_tokens=8)[0]
    frac = backend.selected_fraction()
    assert frac is not None and 0.05 < frac < 0.75, frac
    assert out.new_tokens > 0


def test_short_context_falls_back_with_a_logged_reason(smollm2, caplog):
    from apportion.host import Host

    backend = Squeezed()
    with caplog.at_level(logging.WARNING, "apportion_attention.squeezed"):
        Host(smollm2, backend).generate("Say hello.", max_new_tokens=2)
    assert "too short to cluster" in caplog.text
    assert backend.stats["steps"] == 0


def test_plain_transformers_attn_implementation(smollm2):
    import apportion_attention.hf as hf
    from transformers import AttentionInterface

    hf.register()
    assert "apportion-squeezed" in AttentionInterface._global_mapping
    backend = hf.BACKENDS["apportion-squeezed"]
    model, tok = smollm2.model, smollm2.tokenizer
    backend.config = SqueezedConfig(min_context_tokens=32, budget=0.5)
    text = tok.apply_chat_template(
        [{"role": "user", "content": f"{_long_context(12)}\n\n{QUESTION}"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(text, return_tensors="pt").input_ids
    previous = model.config._attn_implementation
    model.set_attn_implementation("apportion-squeezed")
    try:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
    finally:
        model.set_attn_implementation(previous)
    assert out.shape[1] == ids.shape[1] + 4
    assert backend.stats["steps"] > 0  # decode steps went through the centroid lookup


def test_changed_cache_falls_back_to_dense(smollm2, caplog):
    module = smollm2.model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    backend = Squeezed(SqueezedConfig(min_context_tokens=16, budget=0.5))
    q = torch.randn(1, 9, 64, 64, generator=g)
    k, v = torch.randn(1, 3, 64, 64, generator=g), torch.randn(1, 3, 64, 64, generator=g)
    backend._attend(module, q, k, v, None)
    assert backend._layers[0] is not None
    with caplog.at_level(logging.WARNING, "apportion_attention.squeezed"):
        out, _ = backend._attend(
            module, q[:, :, :1], k[:, :, :40], v[:, :, :40], None
        )  # evicted behind its back
    assert "evicted" in caplog.text and backend._layers[0] is None
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, :1], k[:, :, :40], v[:, :, :40], enable_gqa=True
    )
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        backend._attend(module, torch.randn(1, 4, 1, 64), k, v, None)
    with pytest.raises(ValueError, match="expected query"):
        backend._attend(module, torch.randn(9, 1, 64), k, v, None)


def test_index_calibrates_to_the_budget():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(2, 32, 16, generator=g) * 3
    keys = centers.repeat_interleave(32, dim=1) + torch.randn(2, 1024, 16, generator=g)
    calib = centers[:, None, :8] + 0.3 * torch.randn(2, 3, 8, 16, generator=g)
    for budget in (0.05, 0.2):
        index = build_layer_index(keys, calib, budget=budget, scale=0.25, cluster_size=16)
        frac = index.select(calib, 0.25).float().mean().item()
        assert budget / 3 < frac < budget * 3, (budget, frac)
    assert not build_layer_index(keys, calib, budget=0.0, scale=0.25).select(calib, 0.25).any()
    assert build_layer_index(keys, calib, budget=1.0, scale=0.25).select(calib, 0.25).all()
    with pytest.raises(ValueError, match="calib_q"):
        build_layer_index(keys, calib[0], budget=0.1, scale=0.25)
    with pytest.raises(ValueError, match="budget"):
        build_layer_index(keys, calib, budget=1.5, scale=0.25)


def _decode_case(n_ctx=700, tail=9, seed=2):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 24, 32, generator=g) * 2
    keys = centers.gather(
        1, torch.randint(0, 24, (3, n_ctx + tail, 1), generator=g).expand(-1, -1, 32)
    )
    keys = keys + torch.randn(3, n_ctx + tail, 32, generator=g)
    values = torch.randn(3, n_ctx + tail, 32, generator=g)
    calib = centers[:, None, :6] + 0.3 * torch.randn(3, 2, 6, 32, generator=g)
    valid = torch.ones(3, n_ctx, dtype=torch.bool)
    valid[1, :40] = False  # padding keys are in no cluster
    index = build_layer_index(
        keys[:, :n_ctx], calib, budget=0.1, scale=0.2, valid=valid, cluster_size=8
    )
    queries = centers[:, None, 6:10].permute(2, 0, 1, 3) + 0.3 * torch.randn(
        4, 3, 2, 32, generator=g
    )
    return index, keys, values, queries  # queries: (4, rows, G, d)


def test_cluster_positions_are_the_mask_selection():
    from apportion_attention.squeezed.kernels import reference

    index, _, _, queries = _decode_case()
    order, starts = index.by_cluster()
    assert starts[:, -1].tolist() == [700, 660, 700]  # valid keys per row
    for q in queries:
        mask = index.select_one(q, 0.2, reference)
        pos, counts = index.select_positions(q, 0.2, reference)
        assert counts == mask.sum(-1).tolist() and sum(counts) > 0
        for r, part in enumerate(pos.split(counts)):
            assert part.sort().values.tolist() == mask[r].nonzero().flatten().tolist()
    built = index.order.clone()
    index.order = index.starts = None  # an index made without the lists gets them on first use
    assert torch.equal(index.by_cluster()[0], built)


@pytest.mark.parametrize("with_mask", [False, True])
def test_torch_decode_path_equals_the_masked_compaction_path(with_mask):
    """The CPU decode path (cluster lists, tail read in place) against the generic one
    (mask, compaction, padded index lists): same keys, same attention, same counts."""
    from apportion_attention.squeezed.kernels import reference

    index, keys, values, queries = _decode_case()
    n = keys.shape[1]
    mask = None
    if with_mask:  # an all-visible 4D mask keeps the fast path; one hidden key leaves it
        mask = torch.ones(1, 1, 1, n, dtype=torch.bool)
    for q in queries:
        fast = Squeezed(SqueezedConfig(kernels="torch"))
        out, _ = fast._decode(index, q.reshape(1, 6, 1, 32), keys[None], values[None], mask, 0.2)
        sel = index.select_one(q, 0.2, reference)
        keep = torch.cat([sel, torch.ones(3, n - index.n_ctx, dtype=torch.bool)], dim=1)
        idx, cnt = reference.compact(keep)
        ref, _ = reference.sparse_decode(q, keys, values, idx, cnt, scale=0.2)
        assert torch.allclose(out.reshape(3, 2, 32), ref, atol=1e-5)
        assert fast.stats["selected_keys"] == int(sel.sum())
    if with_mask:
        hidden = mask.clone()
        hidden[..., n - 1] = False
        q = queries[0]
        out, _ = Squeezed(SqueezedConfig(kernels="torch"))._decode(
            index, q.reshape(1, 6, 1, 32), keys[None], values[None], hidden, 0.2
        )
        sel = index.select_one(q, 0.2, reference)
        keep = torch.cat([sel, torch.ones(3, n - index.n_ctx, dtype=torch.bool)], dim=1)
        keep[:, -1] = False
        idx, cnt = reference.compact(keep)
        ref, _ = reference.sparse_decode(q, keys, values, idx, cnt, scale=0.2)
        assert torch.allclose(out.reshape(3, 2, 32), ref, atol=1e-5)


def test_question_votes_spread_and_budget():
    from apportion_attention.squeezed.index import question_votes, top_voted

    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 300, 16, generator=g)
    q = torch.zeros(2, 3, 4, 16)
    q[0] = keys[0, 120] * 4  # row 0's question reads key 120
    q[1] = keys[1, 7] * 4
    valid = torch.ones(2, 300, dtype=torch.bool)
    valid[1, :5] = False
    for reduce in ("sum", "max"):
        votes = question_votes(keys, q, scale=0.25, valid=valid, reduce=reduce)
        assert votes.shape == (2, 300) and votes[1, :5].eq(0).all()
        keep = top_voted(votes, torch.tensor([10, 3]), valid=valid)
        assert (
            keep.sum(-1).tolist() == [10, 3]
            and keep[0, 120]
            and keep[1, 7]
            and not keep[1, :5].any()
        )
    spread = top_voted(votes, torch.tensor([6, 6]), valid=valid, before=1, after=4)
    assert spread[0, 119:125].all() and spread[0].sum() == 6  # the read key, 1 before, 4 after
    assert not top_voted(votes, torch.tensor([0, 0])).any()
    with pytest.raises(ValueError, match="reduce"):
        question_votes(keys, q, scale=0.25, reduce="mean")


def test_sticky_keys_stay_selected_at_decode():
    """Keys the question selected stay selected at every decode step (mask, cluster lists
    and the decode kernels' output agree), and the fraction stays within the budget."""
    from apportion_attention.squeezed.kernels import reference

    index, keys, values, queries = _decode_case()
    n = keys.shape[1]
    own = [index.select_one(q, 0.2, reference) for q in queries]  # per-step selection alone
    sticky = torch.zeros(3, index.n_ctx, dtype=torch.bool)
    sticky[:, 300:335] = True  # 5% of the context
    sticky[1, :40] = True  # row 1's padding: never selected
    index.set_sticky(sticky)
    for q, alone in zip(queries, own, strict=True):
        mask = index.select_one(q, 0.2, reference)
        assert mask[:, 300:335].all() and not mask[1, :40].any()
        assert mask.equal(alone | sticky & (index.assign >= 0))  # the union: no key counted twice
        assert mask.sum() <= alone.sum() + 3 * 35
        pos, counts = index.select_positions(q, 0.2, reference)
        assert counts == mask.sum(-1).tolist()
        for r, part in enumerate(pos.split(counts)):
            assert part.sort().values.tolist() == mask[r].nonzero().flatten().tolist()
        assert index.select(q[:, :, None], 0.2)[:, 0].equal(mask)
        fast = Squeezed(SqueezedConfig(kernels="torch"))
        out, _ = fast._decode(index, q.reshape(1, 6, 1, 32), keys[None], values[None], None, 0.2)
        keep = torch.cat([mask, torch.ones(3, n - index.n_ctx, dtype=torch.bool)], dim=1)
        idx, cnt = reference.compact(keep)
        ref, _ = reference.sparse_decode(q, keys, values, idx, cnt, scale=0.2)
        assert torch.allclose(out.reshape(3, 2, 32), ref, atol=1e-5)
    index.set_sticky(None)
    assert not index.select_one(queries[0], 0.2, reference)[:, 300:335].all()


def test_question_share_keeps_question_keys_through_generation(smollm2, prompt):
    from apportion.host import Host

    backend = Squeezed(SqueezedConfig(budget=0.2, min_context_tokens=32, question_share=0.5))
    out = Host(smollm2, backend).generate(prompt, max_new_tokens=6)[0]
    assert out.new_tokens > 0
    frac = backend.selected_fraction()
    assert frac is not None and frac <= 0.2 * 1.5, (
        frac
    )  # sticky 10% + per-step ~10%, overlaps counted once
    for index in backend._layers.values():
        assert index is not None and index.sticky is not None
        n_valid = int((index.assign >= 0).sum(-1).max())
        assert 0 < int(index.sticky.sum(-1).max()) <= math.ceil(n_valid * 0.1)
    old = Squeezed(SqueezedConfig(budget=0.2, min_context_tokens=32, question_share=0.0))
    Host(smollm2, old).generate(prompt, max_new_tokens=2)
    assert all(index is not None and index.sticky is None for index in old._layers.values())


def _equal_key_case(seed: int = 5):
    """A context whose keys come in 12 groups of 24 equal keys (well apart), so every fine
    cluster holds equal keys, with random values and 6 keys after the context."""
    g = torch.Generator().manual_seed(seed)
    rows, n_ctx, tail, d = 3, 288, 6, 16
    distinct = 3.0 * torch.randn(rows, 12, d, generator=g)
    perm = torch.stack([torch.randperm(n_ctx, generator=g) for _ in range(rows)])
    ctx_keys = distinct.gather(1, (perm // 24)[..., None].expand(rows, n_ctx, d))
    keys = torch.cat([ctx_keys, torch.randn(rows, tail, d, generator=g)], dim=1)
    values = torch.randn(rows, n_ctx + tail, d, generator=g)
    calib = torch.randn(rows, 2, 4, d, generator=g)
    index = build_layer_index(ctx_keys, calib, budget=0.25, scale=0.25, cluster_size=12)
    # precondition of exactness: every fine cluster holds one distinct key only
    for r in range(rows):
        for c in index.assign[r].unique():
            members = ctx_keys[r][index.assign[r] == c]
            assert torch.equal(members, members[:1].expand_as(members))
    return index, keys, values, torch.randn(rows, 2, d, generator=g)


def _dense(q, keys, values, scale):
    p = torch.softmax(torch.einsum("rgd,rnd->rgn", q, keys) * scale, dim=-1)
    return torch.einsum("rgn,rnd->rgd", p, values)


@pytest.mark.parametrize("sticky", [False, True])
def test_estimate_of_the_rest_is_exact_when_clusters_hold_equal_keys(sticky):
    """Each unselected cluster stands in for its keys as one key of weight n with their mean
    value: exactly the keys' attention when they are equal. So decode (torch path) and the
    multi-query masked path then equal dense attention, whatever was selected."""
    from apportion_attention.squeezed.kernels import reference

    index, keys, values, q = _equal_key_case()
    n_ctx = index.n_ctx
    if sticky:
        keep = torch.zeros(3, n_ctx, dtype=torch.bool)
        keep[:, 40:60] = True
        index.set_sticky(keep)
        assert index.rest_v is None  # set_sticky invalidates the summaries
    index.summarize_rest(values[:, :n_ctx])
    sel = index.select_one(q, 0.25, reference)
    assert 0 < int(sel.sum()) < sel.numel()  # some keys read exactly, some estimated
    dense = _dense(q, keys, values, 0.25)
    backend = Squeezed(SqueezedConfig(kernels="torch"))
    out, _ = backend._decode(index, q.reshape(1, 6, 1, 16), keys[None], values[None], None, 0.25)
    assert torch.allclose(out.reshape(3, 2, 16), dense, atol=1e-5)
    # several queries at once (the question's path): the last query sees every tail key
    qs = torch.randn(1, 6, 3, 16, generator=torch.Generator().manual_seed(9))
    out, _ = backend._masked(index, qs, keys[None], values[None], None, 0.25)
    last = _dense(qs[0, :, -1].reshape(3, 2, 16), keys, values, 0.25)
    assert torch.allclose(out[0, -1].reshape(3, 2, 16), last, atol=1e-5)
    # the Triton path (compaction + split-K kernel, interpreted here) merges the estimate too
    tri = Squeezed(SqueezedConfig(kernels="triton"))
    visible = torch.ones(1, 1, 1, keys.shape[1], dtype=torch.bool)
    out, _ = tri._decode(index, q.reshape(1, 6, 1, 16), keys[None], values[None], visible, 0.25)
    assert torch.allclose(out.reshape(3, 2, 16), dense, atol=1e-5)
    # without the estimate the same selection misses the rest's mass
    index.rest_v = index.rest_shift = None
    sparse, _ = backend._decode(index, q.reshape(1, 6, 1, 16), keys[None], values[None], None, 0.25)
    assert not torch.allclose(sparse.reshape(3, 2, 16), dense, atol=1e-3)


def test_sticky_keys_count_against_the_budget():
    """With sticky keys the centroid thresholds are calibrated to the rest of the budget, so
    the union fills about the budget instead of spending part of it twice."""
    index, keys, values, _ = _decode_case()
    n_ctx = index.n_ctx
    g = torch.Generator().manual_seed(4)
    calib = torch.randn(3, 2, 8, 32, generator=g)
    sticky = torch.zeros(3, n_ctx, dtype=torch.bool)
    sticky[:, 300:335] = True
    ctx = keys[:, :n_ctx]
    plain = build_layer_index(ctx, calib, budget=0.2, scale=0.2)
    filled = build_layer_index(ctx, calib, budget=0.2, scale=0.2, sticky=sticky)
    assert filled.sticky is not None and filled.sticky[:, 300:335].all()
    with_sticky = filled.select(calib, 0.2).float().mean().item()
    assert with_sticky == pytest.approx(0.2, abs=0.06)
    assert (
        filled.t_fine >= plain.t_fine
    ).all()  # the centroid part selects less than the whole budget
    with pytest.raises(ValueError, match="sticky"):
        build_layer_index(ctx, calib, budget=0.2, scale=0.2, sticky=sticky[:, :10])
