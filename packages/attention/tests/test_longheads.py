"""LongHeads on the embedded model: contract, exactness when every chunk is selected,
position remapping, chunk selection, reading past the model's window."""

from __future__ import annotations

import pytest
import torch
from apportion.testing.contracts import QUESTION, AttentionContract, _long_context
from apportion_attention.longheads import LongHeads, LongHeadsConfig
from apportion_attention.rope import inv_freq_for, rotate


class TestLongHeadsContract(AttentionContract):
    """The contract's prompt fits in (top_k + 1) chunks, where LongHeads is exactly dense."""

    component = "longheads"
    max_logit_diff = 1e-3


def _prefill_logits(smollm2, backend, ids):
    from apportion.host.kv import KVPolicy

    cache = KVPolicy().make_cache(smollm2.model)
    with torch.inference_mode(), backend.installed(smollm2.model):
        return backend.prefill(smollm2.model, ids, torch.ones_like(ids), cache, question_len=0,
                               inner=KVPolicy().prefill).logits.float()


@pytest.fixture(scope="module")
def ids(smollm2):
    from apportion.host import Host

    enc = Host(smollm2).encode(f"{_long_context(20)}\n\n{QUESTION}")
    n = len(enc.ids) // 64 * 64  # whole blocks: every block starts on a chunk boundary
    return torch.tensor([enc.ids[:n]])


def test_all_chunks_selected_equals_dense(smollm2, ids):
    from apportion.host.attention import AttentionBackend

    dense = _prefill_logits(smollm2, AttentionBackend(), ids)
    every = LongHeads(LongHeadsConfig(chunk_size=32, top_k=64, prefill_block=64))
    got = _prefill_logits(smollm2, every, ids)
    assert every.last_selection == {}  # fits: dense path, no selection at all
    few = LongHeads(LongHeadsConfig(chunk_size=32, top_k=2, prefill_block=64))
    sel = _prefill_logits(smollm2, few, ids)
    assert (got - dense).abs().max().item() < 1e-3
    chunks = few.last_selection[0]
    assert chunks.shape[-1] == 3 and bool((chunks[..., 0] == 0).all())  # first chunk always kept
    assert bool((chunks[..., 1:] > 0).all())
    # heads choose differently (that is the point of per-head selection)
    assert len({tuple(h.tolist()) for h in chunks[0]}) > 1
    assert (sel - dense).abs().max().item() > 1e-3


def test_rotation_remaps_positions(smollm2):
    inv = inv_freq_for(smollm2.model.config, 64, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=g)
    a, b = torch.tensor([3, 10, 0, 7, 100]), torch.tensor([-3, 4, 9, 1, -50])
    assert torch.allclose(rotate(rotate(x, a, inv), b, inv), rotate(x, a + b, inv), atol=1e-4)
    q, k = torch.randn(64, generator=g), torch.randn(64, generator=g)
    # q.k depends only on the relative shift: rotating both alike changes nothing
    d1 = (rotate(q[None], torch.tensor([9000]), inv) * rotate(k[None], torch.tensor([8990]), inv)).sum()
    d2 = (rotate(q[None], torch.tensor([20]), inv) * rotate(k[None], torch.tensor([10]), inv)).sum()
    assert torch.allclose(d1, d2, atol=1e-3)


def test_reads_past_the_window_and_refuses_bad_setups(smollm2):
    from apportion.errors import ConfigError
    from apportion.host import Host
    from apportion.host.kv import KVPolicy

    backend = LongHeads(LongHeadsConfig(chunk_size=32, top_k=2, prefill_block=64))
    assert backend.extends_context
    out = Host(smollm2, backend).generate(f"{_long_context(20)}\n\n{QUESTION}", max_new_tokens=4)[0]
    assert out.new_tokens > 0
    with pytest.raises(ConfigError, match="full"):
        class Other(KVPolicy):
            def prefill(self, *a, **k):
                return super().prefill(*a, **k)
        Host(smollm2, backend, Other()).generate("Hi.", max_new_tokens=1)
    with pytest.raises(ConfigError, match="padded"):
        Host(smollm2, backend).generate(["Hi.", "A longer prompt here."], max_new_tokens=1)
    with pytest.raises(ConfigError, match="exceeds"):
        Host(smollm2, LongHeads(LongHeadsConfig(chunk_size=2048, top_k=4, prefill_block=2048))).generate("Hi.", 1)
    with pytest.raises(ValueError, match="multiple"):
        LongHeadsConfig(chunk_size=100, prefill_block=150)
