"""context-attention: the user turn's markers, head selection, exactness at alpha=1, steering."""

from __future__ import annotations

import pytest
import torch
from apportion.base import Prompt
from apportion.host import Host
from apportion.host.attention import AttentionBackend
from apportion.testing.contracts import AttentionContract
from apportion_attention.context_steer import (
    ContextSteer,
    ContextSteerConfig,
    calibration_prompts,
    find_markers,
    select_heads,
)

CONTEXT = (
    "The archive keeps its letters in boxes. In this story, the capital of France is Lyon. "
    "Each box is labelled by year and sender."
)
QUESTION = "What is the capital of France?"


def _prompt() -> Prompt:
    return Prompt([{"role": "user", "content": f"{CONTEXT}\n\n{QUESTION}"}], question=QUESTION)


class TestContextSteerContract(AttentionContract):
    """Steering changes the selected heads' attention by design: logits differ from dense."""

    component = "context-attention"
    max_logit_diff = None


class TestContextSteerAlphaOneContract(AttentionContract):
    """alpha = 1 adds nothing to any logit: exactly the plain model."""

    component = "context-attention"
    options = {"alpha": 1.0}
    max_logit_diff = 0.0


@pytest.fixture(scope="module")
def steer(smollm2):
    backend = ContextSteer(ContextSteerConfig(alpha=4.0, heads=24))
    backend.bind(smollm2)
    return backend


def test_markers_of_the_chatml_template(smollm2):
    tok = smollm2.tokenizer
    markers = find_markers(tok)
    assert markers is not None
    assert tok.decode(list(markers.open)) == "<|im_start|>user\n"
    assert markers.close == tok.convert_tokens_to_ids("<|im_end|>")


def test_user_span_is_the_users_text(smollm2, steer):
    enc = Host(smollm2).encode(_prompt())
    start, end = steer.user_span(enc.ids, enc.question_len)  # span="user" by default
    assert smollm2.tokenizer.decode(enc.ids[start:end]) == f"{CONTEXT}\n\n{QUESTION}"
    before = ContextSteer(ContextSteerConfig(span="context"))
    before.markers = steer.markers
    start, end = before.user_span(enc.ids, enc.question_len)
    assert smollm2.tokenizer.decode(enc.ids[start:end]).strip() == CONTEXT
    plain = Host(smollm2, chat_template=False).encode(_prompt())
    assert steer.user_span(plain.ids, plain.question_len) is None  # no user turn: unsteered


def test_head_selection_is_deterministic(smollm2, steer):
    again = ContextSteer(ContextSteerConfig(alpha=4.0, heads=24))
    prompts = calibration_prompts(smollm2.tokenizer, 2, 96, 0, span="context")
    assert torch.equal(
        again.measure_drops(smollm2.model, prompts), steer.measure_drops(smollm2.model, prompts)
    )
    again.bind(smollm2)
    assert again.selected_heads() == steer.selected_heads()
    assert len(steer.selected_heads()) == 24
    n_layers = smollm2.model.config.num_hidden_layers
    n_heads = smollm2.model.config.num_attention_heads
    assert steer.drops is not None and tuple(steer.drops.shape) == (n_layers, n_heads)
    # the selected heads are the largest drops
    chosen = {(layer, h) for layer, h in steer.selected_heads()}
    worst_chosen = min(float(steer.drops[layer, h]) for layer, h in chosen)
    others = [
        float(steer.drops[layer, h])
        for layer in range(n_layers)
        for h in range(n_heads)
        if (layer, h) not in chosen
    ]
    assert worst_chosen >= max(others)


def test_select_heads_breaks_ties_by_position_and_honours_the_threshold():
    drops = torch.tensor([[0.5, 0.1, 0.5], [0.5, -0.2, 0.3]])
    assert select_heads(drops, 2, 0.0) == {0: [0, 2]}
    assert select_heads(drops, 3, 0.0) == {0: [0, 2], 1: [0]}
    assert select_heads(drops, 10, 0.2) == {0: [0, 2], 1: [0, 2]}
    assert select_heads(drops, 10, 0.6) == {}
    assert select_heads(drops, 0, -1.0) == {}


def test_alpha_one_is_exactly_the_plain_model(smollm2):
    one = ContextSteer(ContextSteerConfig(alpha=1.0))
    one.bind(smollm2)
    assert one.selected_heads()  # heads are chosen; alpha=1 just does nothing to them
    got = Host(smollm2, one).generate(_prompt(), max_new_tokens=8)[0]
    ref = Host(smollm2, AttentionBackend()).generate(_prompt(), max_new_tokens=8)[0]
    assert got.token_ids == ref.token_ids


def test_steering_raises_the_mass_on_the_users_tokens(smollm2, steer):
    enc = Host(smollm2).encode(_prompt())
    span = steer.user_span(enc.ids, enc.question_len)
    assert span is not None
    plain = steer.user_mass(smollm2.model, enc.ids, span, steer=False)
    steered = steer.user_mass(smollm2.model, enc.ids, span, steer=True)
    for layer, h in steer.selected_heads():
        assert steered[layer, h] > plain[layer, h], (layer, h)
    # before the first steered layer nothing changes; in it, only the selected heads do
    first = steer.selected_heads()[0][0]
    assert torch.equal(steered[:first], plain[:first])
    others = [h for h in range(plain.shape[1]) if h not in steer.selected[first]]
    assert torch.allclose(steered[first, others], plain[first, others])


def test_a_prompt_without_the_template_is_read_unsteered(smollm2, steer):
    got = Host(smollm2, steer, chat_template=False).generate(_prompt(), max_new_tokens=6)[0]
    ref = Host(smollm2, chat_template=False).generate(_prompt(), max_new_tokens=6)[0]
    assert got.token_ids == ref.token_ids


def test_a_padded_batch_is_steered_row_by_row(smollm2, steer):
    host = Host(smollm2, steer)
    short = Prompt([{"role": "user", "content": f"Lyon is nice.\n\n{QUESTION}"}], question=QUESTION)
    batch = host.generate([_prompt(), short], max_new_tokens=8)
    alone = [host.generate(p, max_new_tokens=8)[0] for p in (_prompt(), short)]
    assert [b.text for b in batch] == [a.text for a in alone]


def test_a_cache_that_lost_positions_is_read_unsteered():
    backend = ContextSteer()
    backend._ctx = torch.tensor([[False, True, True, False]])
    assert backend._context_keys(1, 6) is not None
    assert backend._context_keys(1, 6)[0].tolist() == [False, True, True, False, False, False]
    assert backend._context_keys(1, 3) is None  # evicted: the positions no longer map
    assert backend._ctx is None


@pytest.mark.parametrize("queries", ["after", "all"])
def test_only_the_queries_past_the_users_span_are_steered_by_default(queries):
    import math

    backend = ContextSteer(ContextSteerConfig(alpha=math.e, queries=queries))
    ctx = torch.tensor([[False, True, True, False, False]])
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    bias = backend._bias(causal, ctx, 5, torch.float32)[0, 0]
    assert torch.isinf(bias[0, 1:]).all() and (bias[0, :1] == 0).all()  # the future is masked
    steered_rows = [3, 4] if queries == "after" else [1, 2, 3, 4]
    for q in range(1, 5):  # the queries that see key 1
        expected = 1.0 if q in steered_rows else 0.0
        assert bias[q, 1].item() == pytest.approx(expected), (q, bias[q])
        assert bias[q, 0].item() == 0.0
    one_query = backend._bias(None, torch.tensor([[True, True, False]]), 1, torch.float32)
    assert one_query[0, 0, 0].tolist() == pytest.approx([1.0, 1.0, 0.0])  # a decode step
