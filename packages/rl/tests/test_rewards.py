"""Reward functions that raise, return NaN or the wrong number of rewards: recorded and
skipped, or stopped with a typed error naming the function, as configured."""

from __future__ import annotations

import asyncio
import functools
import logging
import os

import pytest
from apportion.errors import ApportionError
from apportion_rl.errors import RewardFunctionError
from apportion_rl.rewards import guard_reward_function
from apportion_rl.tasks import exact_match_reward

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

COMPLETIONS = ["2 + 2 = 4", "five", "4", "3"]
ANSWERS = ["4"] * 4


def judge_offline(completions, **_):
    raise ConnectionError("the judge at localhost:9 refused the connection")


def ratio_reward(completions, answer, **_):
    """Digits per character: 0/0 = NaN on an empty completion."""
    out = []
    for c in completions:
        digits = sum(ch.isdigit() for ch in c)
        out.append(digits / len(c) if c else float("nan"))
    return out


def first_only(completions, **_):
    return [1.0]


def labels(completions, **_):
    return ["good" if "4" in c else None for c in completions]


def test_valid_rewards_pass_through_unchanged():
    guarded = guard_reward_function(exact_match_reward)
    assert guarded.__name__ == "exact_match_reward"
    assert guarded(completions=COMPLETIONS, answer=ANSWERS) == [1.0, 0.0, 1.0, 0.0]
    assert guarded(COMPLETIONS, ANSWERS) == [1.0, 0.0, 1.0, 0.0]  # positional, as called directly
    none_ok = guard_reward_function(lambda completions, **_: [None, 1])
    assert none_ok(completions=["a", "b"]) == [None, 1.0]


@pytest.mark.parametrize(
    ("fn", "kind", "message"),
    [
        (judge_offline, "raised", "raised ConnectionError: the judge at localhost:9"),
        (ratio_reward, "non_finite", r"returned 1 non-finite rewards \(at \[1\]"),
        (first_only, "wrong_length", "returned 1 rewards for 4 completions"),
        (labels, "not_a_number", "returned 2 non-numeric rewards"),
    ],
)
def test_raise_names_the_function(fn, kind, message):
    completions = ["4", "", "x", "y"] if fn is ratio_reward else COMPLETIONS
    guarded = guard_reward_function(fn, "raise")
    with pytest.raises(RewardFunctionError, match=message) as info:
        guarded(prompts=["q"] * 4, completions=completions, answer=ANSWERS)
    assert isinstance(info.value, ApportionError)
    assert info.value.function == fn.__name__ and info.value.kind == kind
    assert repr(fn.__name__) in str(info.value)
    if kind == "raised":
        assert isinstance(info.value.__cause__, ConnectionError)


def test_skip_records_and_replaces_only_what_is_bad(caplog):
    issues = []
    with caplog.at_level(logging.WARNING, logger="apportion_rl.rewards"):
        nan = guard_reward_function(ratio_reward, "skip", issues)
        assert nan(completions=["4", "", "ab"], answer=ANSWERS[:3]) == [1.0, None, 0.0]
        raised = guard_reward_function(judge_offline, "skip", issues)
        assert raised(completions=COMPLETIONS) == [None] * 4
        short = guard_reward_function(first_only, "skip", issues)
        assert short(completions=COMPLETIONS) == [None] * 4
        words = guard_reward_function(labels, "skip", issues)
        assert words(completions=COMPLETIONS) == [None, None, None, None]
    assert [(i.function, i.kind, i.affected, i.total) for i in issues] == [
        ("ratio_reward", "non_finite", 1, 3),
        ("judge_offline", "raised", 4, 4),
        ("first_only", "wrong_length", 4, 4),
        ("labels", "not_a_number", 2, 4),
    ]
    assert "reward function 'judge_offline' raised ConnectionError" in caplog.text


def test_async_and_partial_functions_keep_their_nature():
    async def judged(completions, **_):
        return [float("inf")] * len(completions)

    guarded = guard_reward_function(judged, "skip", [])
    assert asyncio.iscoroutinefunction(guarded) and guarded.__name__ == "judged"
    assert asyncio.run(guarded(completions=["a", "b"])) == [None, None]
    part = guard_reward_function(functools.partial(exact_match_reward, answer=["4"]))
    assert part.__name__ == "exact_match_reward" and part(completions=["4"]) == [1.0]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="on_reward_error must be 'raise' or 'skip'"):
        guard_reward_function(exact_match_reward, "ignore")


# ------------------------------------------------------------- in the TRL trainer


def word_count_reward(completions, **_):
    """A real, always valid reward: words in the completion, over 4."""
    return [len(str(c).split()) / 4 for c in completions]


def nan_on_odd(completions, **_):
    return [float("nan") if i % 2 else 1.0 for i in range(len(completions))]


def _train(tiny_model_dir, tmp_path, funcs, **kw):
    from apportion_rl.trainer import StrategyGRPOTrainer
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    trainer = StrategyGRPOTrainer(
        str(tiny_model_dir),
        funcs,
        args=GRPOConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=3,
            max_steps=1,
            logging_steps=1,
            report_to="none",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=Dataset.from_list([{"prompt": f"w{i} w{i + 1}"} for i in range(4)]),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        strategy="grpo",
        **kw,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    ("bad", "kind", "affected"),
    [(judge_offline, "raised", 8), (nan_on_odd, "non_finite", 4), (first_only, "wrong_length", 8)],
)
def test_trainer_skip_records_and_continues(tiny_model_dir, tmp_path, bad, kind, affected):
    trainer = _train(tiny_model_dir, tmp_path, [word_count_reward, bad], on_reward_error="skip")
    assert trainer.state.global_step == 1  # the step ran
    assert [(i.function, i.kind, i.affected) for i in trainer.reward_issues] == [
        (bad.__name__, kind, affected)
    ]
    logged = trainer.state.log_history[0]
    assert logged["apportion/reward_issues"] == 1.0
    assert logged["apportion/excluded_rewards"] == 0.0  # the other function still scored all


def test_trainer_raise_stops_with_the_function_named(tiny_model_dir, tmp_path):
    with pytest.raises(RewardFunctionError, match="'nan_on_odd' returned 4 non-finite"):
        _train(tiny_model_dir, tmp_path, [word_count_reward, nan_on_odd])


def test_trainer_refuses_an_unknown_policy(tiny_model_dir):
    from apportion.errors import ConfigError
    from apportion_rl.trainer import StrategyGRPOTrainer

    with pytest.raises(ConfigError, match="on_reward_error must be 'raise' or 'skip'"):
        StrategyGRPOTrainer(str(tiny_model_dir), word_count_reward, on_reward_error="warn")
