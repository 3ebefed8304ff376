"""Budgets, pools, demo parsing, data, selection (no LLM generation here)."""

import warnings

import pytest
from apportion_icl import data
from apportion_icl.demos import Demo, as_demos
from apportion_icl.errors import BudgetError, EmptyPoolWarning
from apportion_icl.knn import KNN, KNNConfig


def test_budget_smaller_than_query_names_both(tok):
    with pytest.raises(
        BudgetError, match=r"budget of 5 tokens is smaller than the query alone \(\d+ tokens"
    ):
        KNN().build("How many legs does a spider have?", budget=5, tokenizer=tok)


def test_empty_pool_is_zero_shot_with_warning(tok):
    with pytest.warns(EmptyPoolWarning, match="empty"):
        p = KNN().build("Is this review positive or negative? Great!", demos=[], tokenizer=tok)
    assert len(p.messages) == 1 and p.accounting["demos_kept"] == 0


def test_bad_demo_is_named():
    with pytest.raises(ValueError, match="demonstration 1 has keys"):
        as_demos([("a", "b"), {"foo": 1}])
    d = as_demos([{"question": "q", "answer": "a", "skills": ["x"]}])[0]
    assert d == Demo("q", "a", ("x",), "0")


def test_shipped_data_sizes_and_scoring():
    cls, qa = data.classification(), data.qa()
    assert len(cls) >= 120 and {e.task for e in cls} == {"sentiment", "topic", "intent"}
    assert len(data.classification("pool")) >= 40 and len(data.classification("train")) >= 40
    assert len(qa) >= 100 and {e.meta["hop"] for e in qa} == {1, 2}
    e = data.classification("test")[0]
    assert data.score(e, f"The answer is {e.answer}.") == 1.0
    other = next(o for o in e.options if o != e.answer)
    assert data.score(e, f"{other}, not {e.answer}") == 0.0
    q = data.qa("test")[0]
    ctx = data.qa_context(q)
    assert all(data.documents()[d]["text"] in ctx for d in q.meta["docs"])
    with pytest.raises(ValueError, match="unknown split"):
        data.classification("dev")


def test_knn_picks_same_task_and_fits_budget(tok, pool):
    query = data.classification("test")[0]
    p = KNN(KNNConfig(k=4)).build(query.query, demos=pool, tokenizer=tok)
    tasks = {next(d for d in pool if d.id == i).meta["task"] for i in p.accounting["demo_ids"]}
    assert tasks == {query.task}
    assert p.messages[-1]["content"] == query.query and p.messages[-2]["role"] == "assistant"
    small = KNN(KNNConfig(k=4)).build(
        query.query, demos=pool, tokenizer=tok, budget=p.accounting["prompt_tokens"] - 1
    )
    assert small.accounting["demos_kept"] < 4 and small.accounting["dropped_for_budget"]
    assert small.accounting["prompt_tokens"] <= p.accounting["prompt_tokens"] - 1


def test_mmr_diversifies(pool):
    from apportion.host.embed import SentenceEmbedder
    from apportion_icl.select import mmr

    vecs = SentenceEmbedder.shared().encode(
        [pool[0].input] + [d.input for d in pool] + [pool[0].input]
    )
    plain = mmr(vecs[0], vecs[1:], 2, lam=1.0)
    diverse = mmr(vecs[0], vecs[1:], 2, lam=0.5)
    assert {plain[0][0], plain[1][0]} == {0, len(pool)}  # the exact duplicate and itself
    assert diverse[1][0] != len(pool)


def test_no_tokenizer_counts_are_marked_approximate():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyPoolWarning)
        p = KNN().build("What is 2+2?")
    assert p.accounting["tokens_exact"] is False and p.accounting["prompt_tokens"] > 0
