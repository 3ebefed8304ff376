"""LongHeads on the embedded model: contract, exactness when every chunk is selected,
position remapping, chunk selection, reading past the model's window."""

from __future__ import annotations

import pytest
import torch
from apportion.host.rope import inv_freq, rotate_by
from apportion.testing.contracts import QUESTION, AttentionContract, _long_context
from apportion_attention.longheads import LongHeads, LongHeadsConfig


class TestLongHeadsContract(AttentionContract):
    """The contract's prompt fits in (top_k + 1) chunks, where LongHeads is exactly dense."""

    component = "longheads"
    max_logit_diff = 1e-3


def _prefill_logits(smollm2, backend, ids):
    from apportion.host.kv import KVPolicy

    cache = KVPolicy().make_cache(smollm2.model)
    with torch.inference_mode(), backend.installed(smollm2.model):
        return backend.prefill(
            smollm2.model,
            ids,
            torch.ones_like(ids),
            cache,
            question_len=0,
            inner=KVPolicy().prefill,
        ).logits.float()


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
    inv = inv_freq(smollm2.model.config, 64, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=g)
    a, b = torch.tensor([3, 10, 0, 7, 100]), torch.tensor([-3, 4, 9, 1, -50])
    assert torch.allclose(
        rotate_by(rotate_by(x, a, inv), b, inv), rotate_by(x, a + b, inv), atol=1e-4
    )
    q, k = torch.randn(64, generator=g), torch.randn(64, generator=g)
    # q.k depends only on the relative shift: rotating both alike changes nothing
    d1 = (
        rotate_by(q[None], torch.tensor([9000]), inv)
        * rotate_by(k[None], torch.tensor([8990]), inv)
    ).sum()
    d2 = (
        rotate_by(q[None], torch.tensor([20]), inv) * rotate_by(k[None], torch.tensor([10]), inv)
    ).sum()
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
        Host(
            smollm2, LongHeads(LongHeadsConfig(chunk_size=2048, top_k=4, prefill_block=2048))
        ).generate("Hi.", 1)
    with pytest.raises(ValueError, match="multiple"):
        LongHeadsConfig(chunk_size=100, prefill_block=150)


def test_max_scoring_finds_a_single_matching_key(smollm2):
    """One key that matches the query (a needle) lifts its chunk under ``chunk_score="max"``,
    though that chunk's mean key loses to a chunk of uniformly lukewarm keys."""
    d, c = 64, 16
    inv = inv_freq(smollm2.model.config, d, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    noise = 0.01 * torch.randn(4 * c, d, generator=g)
    raw = noise.clone()
    raw[c : 2 * c] += 0.5 * q  # chunk 1: every key lukewarm
    raw[2 * c : 3 * c] -= 0.5 * q  # chunk 2: one needle among cold keys
    raw[2 * c + 5] = 3.0 * q
    n = raw.shape[0]
    key = rotate_by(
        raw[None, None], torch.arange(n), inv
    )  # cached keys carry RoPE at their positions
    q_raw = q.view(1, 1, d).expand(1, 3, d)  # three query heads share the one kv head
    best = {}
    for how in ("max", "mean"):
        lh = LongHeads(LongHeadsConfig(chunk_size=c, top_k=1, prefill_block=c, chunk_score=how))
        scores = lh._chunk_scores(0, q_raw, key, n, inv)
        assert scores.shape == (1, 3, 4)
        best[how] = int(scores[0, 0, 1:].argmax()) + 1
    assert best == {"max": 2, "mean": 1}
    lh = LongHeads(LongHeadsConfig(chunk_size=c, top_k=1, prefill_block=c))
    # a partial last chunk is scored too, and the selection keeps chunk 0 in front
    query = rotate_by(q.view(1, 1, 1, d).expand(1, 3, 1, d), torch.tensor([n + c]), inv)
    chunks = lh._select(0, query, key, n + c, n - 3, inv)
    assert chunks.tolist() == [[[0, 2]] * 3]


def test_question_is_read_as_its_own_block():
    lh = LongHeads(LongHeadsConfig(chunk_size=32, top_k=2, prefill_block=64))
    assert lh.blocks(200, 10) == [(0, 64), (64, 128), (128, 190), (190, 200)]
    assert lh.blocks(200, 0) == [(0, 64), (64, 128), (128, 192), (192, 200)]
    assert lh.blocks(200, 65) == lh.blocks(200, 0)  # a question longer than a block: plain blocks
    assert lh.blocks(10, 10) == [(0, 10)]


def test_question_chunks_are_read_while_generating(smollm2):
    """With ``question_chunks`` every head reads, at each generated token, the chunks it chose
    for the question besides its own fresh choice (a chunk in both is read once); without,
    only the fresh choice. The window bound counts the extra chunks."""
    from apportion.base import Prompt
    from apportion.host import Host

    prompt = Prompt(
        [{"role": "user", "content": f"{_long_context(20)}\n\n{QUESTION}"}], question=QUESTION
    )
    cfg = LongHeadsConfig(chunk_size=32, top_k=2, prefill_block=64)
    assert cfg.model_copy(update={"question_chunks": True}).window() == cfg.window() + 2 * 32
    texts = {}
    for keep in (False, True):
        lh = LongHeads(cfg.model_copy(update={"question_chunks": keep}))
        texts[keep] = Host(smollm2, lh).generate(prompt, max_new_tokens=3)[0].text
        asked = lh._question_sel[5]  # (B, H, top_k + 1): the question block's choice, chunk 0 first
        now = lh.last_selection[5]  # the last generated token's
        assert asked.shape[-1] == 3
        if not keep:
            assert now.shape[-1] == 3
            continue
        assert now.shape[-1] == 6 and bool((now[..., 1:] >= now[..., :-1]).all())
        for h in range(now.shape[1]):
            assert set(asked[0, h].tolist()) <= set(now[0, h].tolist())
    assert all(t.strip() for t in texts.values())
