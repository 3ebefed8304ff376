"""Generated tasks, the exact-match reward, and the trainer's refusal of a missing reward."""

from __future__ import annotations

import re

import pytest
from apportion_rl.tasks import arithmetic_problems, exact_match_reward
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
