"""SSA: the selector, the loss (differentiable, both directions), sparse inference."""

from __future__ import annotations

import pytest
import torch
from apportion.testing.contracts import AttentionContract
from apportion_attention.ssa import SSAConfig, SSALoss, attention_sparsity, sparse_mask


class TestSSAContract(AttentionContract):
    """Block-sparse by design: the contract prompt is longer than the kept blocks, so the
    logits differ from dense; the check is skipped (generation must still work)."""

    component = "ssa"
    max_logit_diff = None


def test_selector_keeps_sink_local_and_budget():
    cfg = SSAConfig(block_size=4, top_blocks=2, sink_blocks=1, local_blocks=1)
    q = torch.randn(1, 6, 40, 8)
    k = torch.randn(1, 2, 40, 8)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()[None, None]
    keep = sparse_mask(q, k, causal, cfg)
    assert keep.shape == (1, 6, 40, 40)
    assert not (keep & ~causal).any()  # never the future
    assert keep[..., 39, 36:40].all() and keep[..., 39, 0:4].all()  # local + sink
    assert int(keep[0, 0, 39].sum()) == 4 * 4  # sink + local + 2 chosen blocks
    assert keep[..., 5, :6].all()  # early queries see everything visible


def test_sparse_equals_full_when_budget_covers_everything():
    cfg = SSAConfig(block_size=4, top_blocks=100)
    q, k = torch.randn(1, 3, 16, 8), torch.randn(1, 3, 16, 8)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    assert torch.equal(sparse_mask(q, k, causal, cfg), causal.expand(1, 3, 16, 16))


@pytest.fixture(scope="module")
def batch(smollm2):
    from apportion.testing.contracts import _long_context

    ids = torch.tensor([smollm2.tokenizer.encode(_long_context(8))[:96]])
    labels = ids.clone()
    labels[:, :48] = -100
    return ids, labels


def test_loss_backpropagates_both_directions(smollm2, batch):
    ids, labels = batch
    model = smollm2.model
    cfg = SSAConfig(block_size=8, top_blocks=2)
    before = model.config._attn_implementation
    w = model.model.layers[0].self_attn.q_proj.weight
    try:
        w.requires_grad_(True)
        loss = SSALoss(cfg)(model, ids, labels, mode="sparse")
        loss.backward()
        assert loss.components["mode"] == "sparse" and loss.components["align"] > 0
        assert w.grad is not None and w.grad.abs().sum() > 0
    finally:
        w.grad = None
        for p in model.parameters():
            p.requires_grad_(False)
    assert model.config._attn_implementation == before
    with torch.no_grad():
        full = SSALoss(cfg)(model, ids, labels, mode="full")
    assert full.components["align"] == 0.0  # nothing recorded without grad
    with pytest.raises(ValueError, match="labels mask every token"):
        SSALoss(cfg)(model, ids, torch.full_like(ids, -100))


def test_sparsity_is_a_share(smollm2, batch):
    ids, _ = batch
    small = attention_sparsity(smollm2.model, ids, SSAConfig(block_size=8, top_blocks=1))
    large = attention_sparsity(smollm2.model, ids, SSAConfig(block_size=8, top_blocks=6))
    assert 0.0 < small < large <= 1.0 + 1e-5
