"""StrategyGRPOTrainer with ``dapo`` on the real SmolLM2 (+ LoRA, one step): groups whose
rewards are all equal are replaced by newly sampled prompts of the training set."""

from __future__ import annotations

import os

import pytest
import torch
from apportion_rl.tasks import arithmetic_problems
from apportion_rl.trainer import StrategyGRPOTrainer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def digit_or_fixed(completions, fixed, **_):
    """1.0 when the completion holds a digit (a 135M model does about half the time), except
    on prompts whose ``fixed`` column sets the reward: their groups are all equal, so
    dynamic sampling has to replace them."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [
        float(any(ch.isdigit() for ch in t)) if f is None else f
        for t, f in zip(texts, fixed, strict=True)
    ]


@pytest.fixture(scope="module")
def dapo_run(smollm2, tmp_path_factory):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig

    torch.manual_seed(0)
    rows = [
        {**p.row(), "fixed": 1.0 if i % 2 == 0 else None}
        for i, p in enumerate(arithmetic_problems(12, seed=0, levels=(0, 3)))
    ]
    trainer = StrategyGRPOTrainer(
        smollm2.model,
        digit_or_fixed,
        args=GRPOConfig(
            output_dir=str(tmp_path_factory.mktemp("dapo")),
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
            shuffle_dataset=False,  # the first batch is rows 0 and 1: row 0 is fixed
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=smollm2.tokenizer,
        peft_config=LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        ),
        strategy="dapo",
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    yield trainer, before
    trainer.model.unload()  # give the shared session model back without its LoRA layers
    smollm2.model.eval()


def test_dropped_groups_are_refilled_and_counted(dapo_run):
    trainer, _ = dapo_run
    (report,) = trainer.refill_reports
    assert report.target == 2 and report.retries >= 1
    assert report.dropped >= 1 and report.drawn > 2  # row 0's group was dropped and replaced
    assert trainer.allocations == [[4, 4]]  # TRL's batch keeps its shape
    assert trainer.rollouts_drawn == report.rollouts == report.drawn * 4
    rewards, kept = trainer.last_round["rewards"], trainer.last_round["kept"]
    informative = [len(set(r)) > 1 for r in rewards]
    assert all(inf for k, inf in zip(kept, informative, strict=True) if k)  # kept: informative
    if report.reached:
        assert kept == [True, True] and all(informative)
    assert report.informative == sum(kept)
    assert trainer.strategy.stats.dropped_groups == report.dropped


def test_refill_metrics_logged_and_trls_dapo_loss_trained(dapo_run):
    trainer, before = dapo_run
    assert trainer.loss_type == "dapo" and trainer.epsilon_high == 0.28
    logged = trainer.state.log_history[0]
    report = trainer.refill_reports[0]
    assert logged["apportion/refill_drawn"] == report.drawn
    assert logged["apportion/refill_reached"] == float(report.reached)
    changed = any(
        not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before
    )
    assert changed == any(trainer.last_round["kept"])
