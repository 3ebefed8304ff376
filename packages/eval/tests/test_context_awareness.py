"""context-awareness: the built-in facts, the samples, the scoring, and a real model run."""

from __future__ import annotations

import pytest
from apportion.base import PromptStrategy
from apportion.errors import ConfigError
from apportion.host import Host
from apportion_eval.context_awareness import (
    CATEGORIES,
    FACTS,
    ContextAwareness,
    ContextAwarenessConfig,
    split_facts,
)
from apportion_eval.scoring import found


def _bench(**options) -> ContextAwareness:
    return ContextAwareness(ContextAwarenessConfig(**options))


def test_the_facts_are_many_distinct_and_contradictable():
    assert len(FACTS) >= 40
    assert len({f.subject for f in FACTS}) == len(FACTS)
    for f in FACTS:
        assert len(f.counterfactuals) >= 2, f.subject
        for c in f.counterfactuals:
            assert not found(f.prior, c) and not found(c, f.prior), (f.subject, c)


def test_splits_are_disjoint_and_cover_every_fact():
    dev, test = split_facts("dev"), split_facts("test")
    assert dev and test and not {f.subject for f in dev} & {f.subject for f in test}
    assert len(dev) + len(test) == len(split_facts("all")) == len(FACTS)
    assert {f.category for f in split_facts("all", ["capital"])} == {"capital"}
    with pytest.raises(ValueError, match="unknown categories"):
        ContextAwarenessConfig(categories=["planets"])


def test_options_are_validated_by_the_registry(registry):
    spec = registry.get("benchmark", "context-awareness")
    with pytest.raises(ConfigError, match="split"):
        spec.validate_options({"split": "train"})


def test_the_counterfactual_is_in_the_context_and_the_prior_is_not(smollm2):
    bench = _bench(lengths=[256, 512], depths=[0.1, 0.9], samples=3, seed=5)
    samples = list(bench.samples(smollm2.tokenizer))
    assert len(samples) == 12
    assert len({s.meta["subject"] for s in samples}) == 12  # distinct facts while any are left
    for s in samples:
        answer, prior = s.answers[0], s.meta["prior"]
        assert s.meta["needle"] in s.context
        assert s.meta["needle"] == f"In this story, {s.meta['subject']} is {answer}."
        assert found(answer, s.context) and not found(prior, s.context), s.id
        assert s.question.startswith(
            next(f.question for f in FACTS if f.subject == s.meta["subject"])
        )
        depth = s.meta["needle_depth"]
        assert abs(depth - s.depth) < 0.15, (s.id, depth)
    again = list(bench.samples(smollm2.tokenizer))
    assert [(s.id, s.context, s.question) for s in samples] == [
        (s.id, s.context, s.question) for s in again
    ]


@pytest.mark.parametrize(
    ("prediction", "score", "prior"),
    [
        ("The capital of France is Lyon.", 1.0, 0.0),
        ("lyon", 1.0, 0.0),
        ("The capital of France is Paris.", 0.0, 1.0),
        ("In the story it is Lyon, but really it is Paris.", 0.0, 1.0),
        ("Lyons", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_scoring(prediction, score, prior):
    from apportion.base import Sample

    bench = _bench()
    sample = Sample(
        id="x",
        context="In this story, the capital of France is Lyon.",
        question="What is the capital of France?",
        answers=["Lyon"],
        meta={"prior": "Paris", "category": "capital"},
    )
    assert bench.score(sample, prediction) == score
    metrics = bench.metrics(sample, prediction)
    assert metrics["prior"] == prior
    assert metrics["counterfactual"] == float(found("Lyon", prediction))
    assert metrics["category"] == "capital"


def test_the_model_knows_the_priors(smollm2):
    """A few facts of each kind, asked with no context: the model gives the prior."""
    picks = [next(f for f in FACTS if f.category == c) for c in ("capital", "language")]
    picks += [FACTS[len(FACTS) // 2]]
    results = Host(smollm2).generate([f.question for f in picks], max_new_tokens=16)
    for fact, r in zip(picks, results, strict=True):
        assert found(fact.prior, r.text), (fact.question, r.text)


def test_generation_is_deterministic_with_and_without_the_template(smollm2):
    bench = _bench(lengths=[256], depths=[0.5], samples=1)
    sample = next(iter(bench.samples(smollm2.tokenizer)))
    prompt = PromptStrategy().build(sample.question, context=sample.context)
    for chat in (True, False):
        host = Host(smollm2, chat_template=chat)
        a, b = (host.generate(prompt, max_new_tokens=8)[0] for _ in range(2))
        assert a.token_ids == b.token_ids and a.new_tokens > 0
        assert 0.0 <= bench.score(sample, a.text) <= 1.0
    with_template = Host(smollm2).encode(prompt)
    without = Host(smollm2, chat_template=False).encode(prompt)
    assert len(without.ids) < len(with_template.ids)


def test_categories_listed_in_the_option_help():
    field = ContextAwarenessConfig.model_fields["categories"]
    assert all(c in (field.description or "") for c in CATEGORIES)
