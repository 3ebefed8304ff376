"""XRPO: the Student-t allocator, in-context seeding and novelty sharpening."""

from __future__ import annotations

import math

import pytest
from apportion_rl.xrpo import XRPO, Exemplar, XRPOConfig
from scipy.stats import t


def test_half_width_by_hand():
    s = XRPO(XRPOConfig(prior_strength=0.0))
    # rewards 1,0,1,0: sample var 1/3, t(0.975, 3) * sqrt(1/3 / 4)
    want = t.ppf(0.975, 3) * math.sqrt((1 / 3) / 4)
    assert s.half_width([1, 0, 1, 0]) == pytest.approx(want)
    # with the prior (m0=1, v0=0.05): var = (1 + 0.05) / (3 + 1), df = 4
    p = XRPO()
    assert p.half_width([1, 0, 1, 0]) == pytest.approx(t.ppf(0.975, 4) * math.sqrt(1.05 / 4 / 4))
    # an all-equal group is still uncertain under the prior, less than a mixed one
    assert 0 < p.half_width([1, 1, 1, 1]) < p.half_width([1, 0, 1, 0])
    assert p.half_width([]) == math.inf


def test_first_phase_then_uncertain_prompts_get_more():
    s = XRPO(XRPOConfig(initial_rollouts=4, phases=2, exploration=0.0))
    assert s.allocate_rollouts(4, 48) == [4, 4, 4, 4]
    history = [[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]]
    extra = s.allocate_rollouts(4, 48, history)
    assert sum(extra) == 16  # (48 - 16) / 2 phases
    assert extra[2] >= extra[3] > max(extra[0], extra[1]) and abs(extra[0] - extra[1]) <= 1  # ties
    # the last phase spends what is left, then nothing more
    history = [h + [1] * c for h, c in zip(history, extra, strict=True)]
    last = s.allocate_rollouts(4, 48, history)
    assert sum(last) == 16
    history = [h + [1] * c for h, c in zip(history, last, strict=True)]
    assert s.allocate_rollouts(4, 48, history) == [0, 0, 0, 0]


def test_small_groups_are_not_allocated_uniformly():
    # the real-run regime: 4 prompts, 2 initial rollouts each, a budget of 16
    s = XRPO(XRPOConfig(initial_rollouts=2, phases=1))
    extra = s.allocate_rollouts(4, 16, [[1, 0], [0, 1], [1, 1], [0, 0]])
    assert sum(extra) == 8
    assert min(extra[0], extra[1]) > max(extra[2], extra[3]) >= 1  # all-equal groups still get some


def test_exploration_bonus_favours_little_sampled_prompts():
    s = XRPO(XRPOConfig(exploration=1.0, phases=1))
    extra = s.allocate_rollouts(2, 40, [[0, 0], [0] * 30])
    assert extra[0] > extra[1]


def test_cap_and_bad_history():
    s = XRPO(XRPOConfig(initial_rollouts=2, max_rollouts_per_prompt=3, phases=1))
    assert s.allocate_rollouts(2, 100, [[1, 0], [1, 0]]) == [1, 1]  # capped at 3 each
    with pytest.raises(ValueError, match="history has 1 groups but there are 2 prompts"):
        s.allocate_rollouts(2, 10, [[1, 0]])
    with pytest.raises(ValueError, match="budget 1 is smaller than the number of prompts 2"):
        s.allocate_rollouts(2, 1)


def test_none_rewards_count_as_spent_not_as_evidence():
    s = XRPO(XRPOConfig(initial_rollouts=2, phases=1))
    extra = s.allocate_rollouts(2, 8, [[None, None], [1.0, 0.0]])
    assert sum(extra) == 4  # the two None rollouts were spent
    assert extra[0] >= 1  # a prompt with no valid reward is the most uncertain


def test_collect_phases_with_a_budget_smaller_than_initial_groups():
    s = XRPO(XRPOConfig(initial_rollouts=8))
    seen = []

    def sample(counts):
        seen.append(list(counts))
        return [[float(i % 2)] * c for i, c in enumerate(counts)]

    got = s.collect(3, 7, sample)
    assert seen[0] == [2, 2, 2]  # first phase shrinks to budget // prompts
    assert sum(len(g) for g in got) == 7


def test_sharpen_boosts_unlikely_correct_answers_boundedly():
    s = XRPO(XRPOConfig(novelty_coef=0.5, novelty_cap=0.5))
    adv = [[1.0, 1.0, 1.0, -1.0]]
    lp = [[-0.1, -0.2, -3.0, -5.0]]
    out = s.sharpen(adv, lp)[0]
    good = [-0.1, -0.2, -3.0]
    mean = sum(good) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in good) / 2)
    z = (mean - -3.0) / std
    assert out[2] == pytest.approx(1 + min(0.5 * z, 0.5))
    assert out[0] == 1.0 and out[1] == 1.0  # more likely than the mean: unchanged
    assert out[3] == -1.0  # negative advantages are never sharpened
    assert max(out) <= 1.5
    with pytest.raises(ValueError, match="2 advantages but 1 log-likelihoods"):
        s.sharpen([[1.0, 0.0]], [[-1.0]])


def test_seed_prompt_lexical_when_no_icl_selector():
    s = XRPO(XRPOConfig(seed_strategy=None, seed_exemplars=1))
    pool = [Exemplar("What is 3 * 4?", "12"), Exemplar("Spell cat backwards.", "tac")]
    messages, info = s.seed_prompt("What is 7 * 8?", pool)
    assert messages == [
        {"role": "user", "content": "What is 3 * 4?"},
        {"role": "assistant", "content": "12"},
        {"role": "user", "content": "What is 7 * 8?"},
    ]
    assert info == {"seeded": 1, "selector": "lexical"}
    assert s.seed_prompt("What is 7 * 8?", []) == (
        [{"role": "user", "content": "What is 7 * 8?"}],
        {"seeded": 0, "selector": None},
    )
    assert (
        s.all_failed([0.0, None, 0.0]) and not s.all_failed([0.0, 1.0]) and not s.all_failed([None])
    )


def test_seed_prompt_auto_uses_icl_selection_when_installed():
    pytest.importorskip("apportion_icl")
    from apportion import get_registry

    if "knn" not in get_registry().names("prompt-strategy"):
        pytest.skip("this apportion-icl has no knn selection")
    s = XRPO(XRPOConfig(seed_exemplars=1))  # seed_strategy="auto"
    pool = [Exemplar("What is 1 + 1?", "2"), Exemplar("Name a colour of the sky.", "blue")]
    messages, info = s.seed_prompt("What is 2 + 2?", pool)
    assert info == {"seeded": 1, "selector": "knn"}
    assert messages[-1]["content"].endswith("What is 2 + 2?")
    assert any(m["content"] == "What is 1 + 1?" for m in messages[:-1])


def test_seed_strategy_is_built_once_and_gets_the_bound_model(monkeypatch):
    s = XRPO(XRPOConfig(seed_strategy="zero-shot", seed_exemplars=1))
    pool = [Exemplar("What is 1 + 1?", "2")]
    s.seed_prompt("What is 2 + 2?", pool)
    seeder = s._icl_strategy()
    assert seeder is not None and seeder.name == "zero-shot"
    s.seed_prompt("What is 3 + 3?", pool)
    assert s._icl_strategy() is seeder  # one per XRPO instance, not one per seeded prompt
    bound = []
    monkeypatch.setattr(type(seeder), "bind", lambda self, loaded: bound.append(loaded))
    loaded = object()  # stands in for an apportion.host.LoadedModel
    s.bind(loaded)
    assert bound == [loaded]
