"""Generated tasks, the exact-match reward, and the trainer's refusal of a missing reward."""

from __future__ import annotations

import re

import pytest
from apportion_rl.tasks import TASKS, arithmetic_problems, exact_match_reward, extremum_problems
from apportion_rl.trainer import MissingRewardFunctionError, StrategyGRPOTrainer


def test_missing_reward_function_is_a_clear_error():
    # refused before any model is touched
    with pytest.raises(MissingRewardFunctionError, match="needs reward_funcs"):
        StrategyGRPOTrainer("any-model", None, strategy="grpo")
    with pytest.raises(MissingRewardFunctionError, match="needs reward_funcs"):
        StrategyGRPOTrainer("any-model", [], strategy="grpo")


def test_exact_match_reward():
    assert exact_match_reward(
        ["12 + 7 = 19", "The answer is 20.", "no idea", [{"content": "1,024"}]],
        ["19", "19", "19", "1024"],
    ) == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        exact_match_reward(["1", "2"], ["1"])


def test_arithmetic_problems_are_deterministic_and_checked():
    a = arithmetic_problems(6, seed=3)
    assert a == arithmetic_problems(6, seed=3) and a != arithmetic_problems(6, seed=4)
    for p in a:
        expr = re.match(r"What is (\d+) ([+*-]) (\d+)\?", p.question)
        x, op, y = int(expr[1]), expr[2], int(expr[3])
        assert str(x + y if op == "+" else x - y if op == "-" else x * y) == p.answer
    with pytest.raises(ValueError, match="unknown difficulty levels"):
        arithmetic_problems(2, levels=(9,))


def test_extremum_problems_are_deterministic_and_checked():
    a = extremum_problems(12, seed=5)
    assert a == extremum_problems(12, seed=5) and a != extremum_problems(12, seed=6)
    assert [p.level for p in a[:6]] == [3, 4, 5, 6, 7, 8]  # levels (list lengths) cycled
    words = set()
    for p in a:
        m = re.match(r"Which number is the (largest|smallest): ([\d, ]+)\? ", p.question)
        xs = [int(x) for x in m[2].split(", ")]
        assert len(xs) == p.level == len(set(xs)) and all(10 <= x <= 99 for x in xs)
        assert p.answer == str(max(xs) if m[1] == "largest" else min(xs))
        words.add(m[1])
    assert words == {"largest", "smallest"}
    # the exact-match reward reads the answer off a sentence
    p = a[0]
    assert exact_match_reward([f"The {p.question.split()[4]} number is {p.answer}."], [p.answer])
    assert TASKS["extremum"] is extremum_problems and TASKS["arithmetic"] is arithmetic_problems


def test_extremum_bad_levels():
    with pytest.raises(ValueError, match="unknown list lengths"):
        extremum_problems(2, levels=(2,))
    with pytest.raises(ValueError, match="fewer than 8 distinct numbers"):
        extremum_problems(2, levels=(8,), lo=1, hi=5)
    with pytest.raises(ValueError, match="n must be >= 0"):
        extremum_problems(-1)
