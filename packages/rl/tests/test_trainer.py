"""StrategyGRPOTrainer: a tiny real TRL run on the CPU (SmolLM2 + LoRA, one step)."""

from __future__ import annotations

import os
import re

import pytest
import torch
from apportion_rl.tasks import arithmetic_problems
from apportion_rl.trainer import StrategyGRPOTrainer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def has_digit_reward(completions, **_):
    """A real verifiable reward that a 135M model hits about half the time."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(bool(re.search(r"\d", t))) for t in texts]


def _args(tmp_path, **kw):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        max_steps=1,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
        gradient_checkpointing=False,
        **kw,
    )


@pytest.fixture(scope="module")
def xrpo_run(smollm2, tmp_path_factory):
    from datasets import Dataset
    from peft import LoraConfig

    torch.manual_seed(0)
    ds = Dataset.from_list([p.row() for p in arithmetic_problems(4, seed=0, levels=(0, 3))])
    trainer = StrategyGRPOTrainer(
        smollm2.model,
        has_digit_reward,
        args=_args(tmp_path_factory.mktemp("xrpo")),
        train_dataset=ds,
        processing_class=smollm2.tokenizer,
        peft_config=LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        ),
        strategy="xrpo",
        strategy_options={"initial_rollouts": 1, "phases": 2, "seed_strategy": None},
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.train()
    yield trainer, before, result
    trainer.model.unload()  # give the shared session model back without its LoRA layers
    smollm2.model.eval()


def test_xrpo_round_has_variable_groups_from_the_whole_budget(xrpo_run):
    trainer, _, _ = xrpo_run
    (groups,) = trainer.allocations
    assert len(groups) == 2 and sum(groups) == 8 and min(groups) >= 1


def test_advantages_recomputed_per_actual_group(xrpo_run):
    trainer, _, _ = xrpo_run
    rewards, adv = trainer.last_round["rewards"], trainer.last_round["advantages"]
    assert [len(g) for g in rewards] == trainer.allocations[-1] == [len(a) for a in adv]
    for r, a in zip(rewards, adv, strict=True):
        if len(set(r)) == 1:
            assert a == [0.0] * len(a)
        else:
            assert all((x > 0) == (y == 1.0) for x, y in zip(a, r, strict=True))


def test_training_step_ran_and_logged(xrpo_run):
    trainer, before, result = xrpo_run
    assert torch.isfinite(torch.tensor(result.training_loss))
    logged = trainer.state.log_history[0]
    assert {"reward", "apportion/max_group", "apportion/min_group"} <= set(logged)
    informative = any(len(set(r)) > 1 for r in trainer.last_round["rewards"])
    changed = any(
        not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before
    )
    assert changed == informative  # the LoRA weights move exactly when some group had signal
