"""DAPO's dynamic sampling with refill, driven by real code: prompts from the task generator,
completions from a deterministic policy table, rewards from the exact-match reward."""

from __future__ import annotations

import logging
import random

import pytest
from apportion_rl.dapo import DAPO, DAPOConfig
from apportion_rl.tasks import Problem, arithmetic_problems, exact_match_reward

G = 4  # rollouts per prompt


class TablePolicy:
    """A deterministic stand-in for sampling: prompt ``i`` answers correctly with probability
    ``skill[i]``, decided per (prompt, rollout) by a seeded generator, so every run of a test
    sees the same completions. Wrong answers are off by one."""

    def __init__(self, problems: list[Problem], skill: list[float], seed: int = 0):
        self.problems, self.skill, self.seed = problems, skill, seed
        self.drawn = 0  # rollouts generated

    def completions(self, i: int, k: int) -> list[str]:
        p = self.problems[i]
        out = []
        for j in range(k):
            right = random.Random(f"{self.seed}-{i}-{j}").random() < self.skill[i]
            out.append(f"{p.question.split('?')[0]} = {p.answer if right else int(p.answer) + 1}")
        self.drawn += k
        return out

    def group(self, i: int) -> list[float | None]:
        return exact_match_reward(self.completions(i, G), [self.problems[i].answer] * G)


class PromptStream:
    """Training prompts in order; ``take(n)`` hands out the next ``n`` indices."""

    def __init__(self, n: int):
        self.n, self.next = n, 0

    def take(self, n: int) -> list[int]:
        out = [(self.next + j) % self.n for j in range(n)]
        self.next += n
        return out


def _setup(skill: list[float], seed: int = 0):
    problems = arithmetic_problems(len(skill), seed=seed, levels=(0, 1, 3))
    return TablePolicy(problems, skill, seed), PromptStream(len(skill))


def _step(s: DAPO, policy: TablePolicy, stream: PromptStream, prompts: int):
    first = [policy.group(i) for i in stream.take(prompts)]
    return s.fill_batch(first, lambda n: [policy.group(i) for i in stream.take(n)])


def test_refill_replaces_dropped_groups_and_counts():
    # prompts 0-3 always right or always wrong (dropped), the rest answered half the time
    skill = [1.0, 0.0, 1.0, 0.0] + [0.5] * 36
    policy, stream = _setup(skill)
    s = DAPO()
    groups, keep, report = _step(s, policy, stream, prompts=6)
    assert len(groups) == 6 and all(len(g) == G for g in groups)
    assert keep == [True] * 6 and all(s.informative(g) for g in groups)
    assert report.reached and report.informative == report.target == 6
    assert report.retries >= 1 and report.drawn > 6
    assert report.dropped >= 4  # at least the four fixed prompts of the first batch
    assert report.refilled >= 4
    assert report.rollouts == report.drawn * G == policy.drawn
    assert s.stats.dropped_groups == report.dropped
    assert s.stats.refilled_groups == report.refilled and s.stats.refill_exhausted == 0


def test_kept_groups_come_in_draw_order():
    skill = [0.5, 0.0, 0.5, 1.0, 0.5, 0.5, 0.5, 0.5]
    policy, _ = _setup(skill)
    first = [policy.group(i) for i in range(4)]
    later = iter([[policy.group(i)] for i in range(4, 8)])
    s = DAPO()
    groups, _, report = s.fill_batch(first, lambda n: [g for _ in range(n) for g in next(later)])
    informative_first = [g for g in first if s.informative(g)]
    assert groups[: len(informative_first)] == informative_first
    assert report.refilled == 4 - len(informative_first)


def test_exhausted_budget_proceeds_with_what_it_has_and_says_so(caplog):
    policy, stream = _setup([1.0, 0.0] * 20 + [0.5])  # nothing informative but the last prompt
    s = DAPO(DAPOConfig(max_refill_rounds=2))
    with caplog.at_level(logging.WARNING, logger="apportion_rl.dapo"):
        groups, keep, report = _step(s, policy, stream, prompts=4)
    assert not report.reached and report.retries == 2 and report.informative == 0
    assert len(groups) == 4 and keep == [False] * 4  # the shape holds, the loss masks them
    assert s.stats.refill_exhausted == 1
    assert "refill budget of 2 rounds exhausted" in caplog.text
    assert "0 of 4 informative groups" in caplog.text


def test_no_refill_rounds_masks_only():
    policy, stream = _setup([1.0, 0.5, 0.5, 0.5] * 4)
    s = DAPO(DAPOConfig(max_refill_rounds=0))
    groups, keep, report = _step(s, policy, stream, prompts=4)
    assert report.retries == 0 and report.drawn == 4 and policy.drawn == 16
    assert keep.count(True) == report.informative < 4


def test_dynamic_sampling_off_returns_the_batch():
    policy, stream = _setup([1.0, 0.5, 0.0, 0.5])
    s = DAPO(DAPOConfig(dynamic_sampling=False))
    first = [policy.group(i) for i in stream.take(4)]
    groups, keep, report = s.fill_batch(first, lambda n: pytest.fail("no draw expected"))
    assert groups == first and keep == [True] * 4 and report.retries == 0


def test_draw_returning_the_wrong_number_of_groups_is_an_error():
    with pytest.raises(ValueError, match=r"draw\(\d+\) returned 0 groups"):
        DAPO().fill_batch([[1.0, 1.0]], lambda n: [])
    with pytest.raises(ValueError, match="target 3 must be between 0"):
        DAPO().fill_batch([[1.0, 0.0]], lambda n: [], target=3)


def test_refilled_batches_hold_the_target_in_95_percent_of_steps():
    """100 steps of 8 prompts over a training set where about half the groups are
    informative (skills spread over [0, 1], a quarter of the prompts always or never solved):
    with the default four refill rounds at least 95% of the steps reach the target, against
    few steps without refilling."""
    rng = random.Random(7)
    skill = [rng.choice([0.0, 1.0]) if rng.random() < 0.25 else rng.random() for _ in range(400)]
    rates = {}
    for rounds in (4, 0):
        policy, stream = _setup(skill, seed=1)
        s = DAPO(DAPOConfig(max_refill_rounds=rounds))
        reports = [_step(s, policy, stream, prompts=8)[2] for _ in range(100)]
        rates[rounds] = sum(r.reached for r in reports) / len(reports)
    assert rates[4] >= 0.95
    assert rates[0] < 0.2
