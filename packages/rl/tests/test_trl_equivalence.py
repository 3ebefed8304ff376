"""Our GRPO-family losses and advantages against TRL's own code, on the same batch.

TRL keeps its loss inside ``GRPOTrainer._compute_loss(model, inputs)``, which takes the
per-token log-probs from ``model(..., labels=..., fused_lm_head=True).log_probs`` (the fused
LM head TRL installs). So each check builds a real ``trl.GRPOTrainer`` (a tiny randomly
initialised Llama made here, so that TRL's own ``__init__`` sets every attribute its loss
reads, from ``GRPOConfig(**strategy.trl_args())``), and calls its ``_compute_loss`` with
:class:`GivenLogps`: a module whose log-probs are its parameters. TRL's code then runs as is,
from the log-prob slicing to the aggregation, and the gradient w.r.t. those parameters is the
gradient w.r.t. the log-probs. The advantages come from TRL's ``_generate_and_score_completions``
with a reward function that reads each row's reward from a dataset column.

The trainer's model is in eval mode (as ``__init__`` leaves it), so TRL scales by no
gradient-accumulation count.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
from apportion_rl.dapo import DAPO
from apportion_rl.dr_grpo import DrGRPO, DrGRPOConfig
from apportion_rl.grpo import GRPO, GRPOConfig
from apportion_rl.gspo import GSPO
from apportion_rl.supo import SUPO
from apportion_rl.xrpo import XRPO

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

B, G, P, T = 6, 3, 3, 5  # sequences, group size, prompt tokens, completion tokens
GSPO_NOISE = 5e-4  # old log-probs this close: some sequences inside the tight clip, some out


class GivenLogps(torch.nn.Module):
    """A policy whose per-token log-probs are its parameters. It answers TRL's fused-head call
    ``model(input_ids, attention_mask, labels=..., fused_lm_head=True)`` as
    ``trl.trainer.utils.add_fused_lm_head`` does: ``log_probs[:, i]`` scores token ``i + 1``."""

    def __init__(self, logps: torch.Tensor):
        super().__init__()
        self.logps = torch.nn.Parameter(logps.clone())

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, **_):
        if not fused_lm_head:
            raise TypeError("TRL's loss path asks for the fused LM head")
        b, length = input_ids.shape
        lead = self.logps.new_zeros(b, length - 1 - self.logps.shape[1])
        log_probs = torch.cat([lead, self.logps], dim=1)
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs))


def column_reward(completions, reward, **_):
    """A real reward function: each row's reward is the dataset's ``reward`` column."""
    return list(reward)


def _trl_args(tmp_path, preset, **kw):
    from trl import GRPOConfig as TRLConfig

    base = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": B,
        "num_generations": G,
        "max_completion_length": T,
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    return TRLConfig(**{**base, **preset, **kw})


def _trainer(tiny_model_dir, tmp_path, cls=None, **kw):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    cls = cls or GRPOTrainer
    ds = Dataset.from_list([{"prompt": "w1 w2", "reward": 0.0}] * 4)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = kw.pop("args")
    return cls(
        str(tiny_model_dir),
        column_reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        **kw,
    )


def _batch(noise: float, seed: int = 0):
    """float64 log-probs, old and reference log-probs near them, a right-padded mask with a
    different length per sequence, advantages from two groups of rewards."""
    gen = torch.Generator().manual_seed(seed)
    logps = torch.log(torch.rand(B, T, generator=gen, dtype=torch.float64) * 0.9 + 0.05)
    old = logps + noise * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = logps + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    rewards = [[1.0, 0.0, 0.5], [0.0, 2.0, 1.0]]
    return logps, old, ref, mask, rewards


def _trl_inputs(old, ref, mask, adv, num_items=None):
    return {
        "prompt_ids": torch.full((B, P), 3),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.full((B, T), 4),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum() if num_items is None else num_items,
    }


def _ours(strategy, logps, old, ref, mask, adv):
    x = logps.clone().requires_grad_(True)
    loss = strategy.loss(x, old, adv, mask, ref_logps=ref)
    loss.backward()
    return loss.detach(), x.grad


def _theirs(trainer, logps, inputs):
    policy = GivenLogps(logps)
    trainer.model.eval()
    loss = trainer._compute_loss(policy, inputs)
    loss.backward()
    return loss.detach(), policy.logps.grad


CASES = [
    ("grpo", GRPO, {}, 0.3),
    ("grpo-kl", GRPO, {"beta": 0.1}, 0.3),
    ("grpo-kl-plain", GRPO, {"beta": 0.1, "kl_bias_correction": False}, 0.3),
    ("dr-grpo", DrGRPO, {"max_completion_length": T}, 0.3),
    ("dr-grpo-kl", DrGRPO, {"max_completion_length": 8, "beta": 0.05}, 0.3),
    ("dapo", DAPO, {}, 0.3),
    ("dapo-kl", DAPO, {"beta": 0.1}, 0.3),
    ("gspo", GSPO, {}, GSPO_NOISE),  # near the tight sequence clip: some sequences in, some out
    ("gspo-kl", GSPO, {"beta": 0.1}, GSPO_NOISE),
    ("gspo-kl-plain", GSPO, {"beta": 0.1, "kl_bias_correction": False}, GSPO_NOISE),
    ("xrpo", XRPO, {"beta": 0.1}, 0.3),  # XRPO's loss is GRPO's
    ("supo", SUPO, {}, 0.3),  # token-level over the batch: TRL's bnpo
]


@pytest.mark.parametrize(("label", "cls", "options", "noise"), CASES, ids=[c[0] for c in CASES])
def test_loss_and_gradient_equal_trl(tiny_model_dir, tmp_path, label, cls, options, noise):
    strategy = cls(cls.Config(**options))
    preset = strategy.trl_args()
    trainer = _trainer(tiny_model_dir, tmp_path, args=_trl_args(tmp_path, preset))
    assert trainer.loss_type == strategy.trl_loss_type
    assert trainer.importance_sampling_level == strategy.trl_importance_sampling_level
    assert trainer.beta == strategy.config.beta
    logps, old, ref, mask, rewards = _batch(noise)
    adv = torch.tensor([a for g in strategy.advantages(rewards) for a in g], dtype=torch.float64)
    ours, our_grad = _ours(strategy, logps, old, ref, mask, adv)
    theirs, their_grad = _theirs(trainer, logps, _trl_inputs(old, ref, mask, adv))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-10, atol=1e-12)
    assert our_grad.abs().sum() > 0  # a real gradient, not two zeros
    assert (our_grad[mask == 0] == 0).all()  # padding gets none


def test_gspo_clipping_is_exercised(tiny_model_dir, tmp_path):
    """The GSPO batch mixes clipped and unclipped sequences, so the equality above covers
    both sides of TRL's sequence clip."""
    logps, old, _, mask, _ = _batch(GSPO_NOISE)
    m = mask.double()
    ratio = torch.exp(((logps - old) * m).sum(-1) / m.sum(-1))
    inside = (ratio > 1 - 3e-4) & (ratio < 1 + 4e-4)
    assert inside.any() and (~inside).any()


def test_dr_grpo_constant_is_trls_generation_limit(tiny_model_dir, tmp_path):
    """By design: without ``max_completion_length`` the standalone loss divides by the
    padded length (all it sees); TRL divides by its generation limit. Equal when the two
    agree, in the ratio of the two otherwise."""
    logps, old, ref, mask, rewards = _batch(0.3)
    ours_s = DrGRPO()  # max_completion_length=None
    adv = torch.tensor([a for g in ours_s.advantages(rewards) for a in g], dtype=torch.float64)
    ours, _ = _ours(ours_s, logps, old, ref, mask, adv)
    preset = ours_s.trl_args()
    assert "max_completion_length" not in preset
    for limit in (T, 3 * T):
        trainer = _trainer(
            tiny_model_dir, tmp_path, args=_trl_args(tmp_path, preset, max_completion_length=limit)
        )
        theirs, _ = _theirs(trainer, logps, _trl_inputs(old, ref, mask, adv))
        assert theirs.item() == pytest.approx(ours.item() * T / limit, rel=1e-10)


def test_dapo_normaliser_is_the_generation_batch(tiny_model_dir, tmp_path):
    """By design: TRL's dapo divides by the tokens of the whole generation batch
    (``num_items_in_batch``); the standalone loss by those of the batch it is given."""
    s = DAPO()
    logps, old, ref, mask, rewards = _batch(0.3)
    adv = torch.tensor([a for g in s.advantages(rewards) for a in g], dtype=torch.float64)
    ours, _ = _ours(s, logps, old, ref, mask, adv)
    trainer = _trainer(tiny_model_dir, tmp_path, args=_trl_args(tmp_path, s.trl_args()))
    twice = 2 * mask.sum()  # as if this were half of the generation batch
    theirs, _ = _theirs(trainer, logps, _trl_inputs(old, ref, mask, adv, num_items=twice))
    assert theirs.item() == pytest.approx(ours.item() / 2, rel=1e-10)


@pytest.mark.parametrize("name", ["grpo", "dr-grpo", "dapo", "gspo", "xrpo"])
def test_strategy_trainer_uses_trls_loss_under_the_preset(tiny_model_dir, tmp_path, name):
    """StrategyGRPOTrainer applies the strategy's TRL options to ``args`` (here TRL's
    defaults: loss_type="dapo", epsilon_high=None, beta=0) and trains with TRL's loss, which
    equals the strategy's standalone loss."""
    from apportion import get_registry
    from apportion_rl.trainer import StrategyGRPOTrainer

    options = {"beta": 0.1} | ({"max_completion_length": T} if name == "dr-grpo" else {})
    strategy = get_registry().create("trainer-strategy", name, options)
    trainer = _trainer(
        tiny_model_dir,
        tmp_path,
        cls=StrategyGRPOTrainer,
        args=_trl_args(tmp_path, {}),
        strategy=strategy,
    )
    lo, hi = strategy._clip()
    assert (trainer.loss_type, trainer.epsilon_low, trainer.epsilon_high, trainer.beta) == (
        strategy.trl_loss_type,
        lo,
        hi,
        0.1,
    )
    assert trainer.ref_model is not None  # beta came from the strategy: TRL keeps a reference
    logps, old, ref, mask, rewards = _batch(GSPO_NOISE if name == "gspo" else 0.3)
    adv = torch.tensor([a for g in strategy.advantages(rewards) for a in g], dtype=torch.float64)
    ours, our_grad = _ours(strategy, logps, old, ref, mask, adv)
    theirs, their_grad = _theirs(trainer, logps, _trl_inputs(old, ref, mask, adv))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------- advantages

REWARDS = [
    [1.0, 0.0, 0.0, 1.0],
    [3.0, 1.0, 2.0, None],  # None: unscorable, excluded
    [0.5, 0.5, 0.5, 0.5],  # zero std
    [None, None, 2.0, None],  # one valid reward: no signal
    [0.0, 0.25, 1.0, 0.75],
]


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_advantages_equal_trl(tiny_model_dir, tmp_path, mode):
    trainer = _trainer(
        tiny_model_dir,
        tmp_path,
        args=_trl_args(
            tmp_path,
            {"scale_rewards": mode},
            num_generations=4,
            per_device_train_batch_size=4 * len(REWARDS),
            max_completion_length=2,
        ),
    )
    rows = [{"prompt": f"w{i} w{i + 1}", "reward": r} for i, g in enumerate(REWARDS) for r in g]
    trainer.model.train()
    theirs = trainer._generate_and_score_completions(rows)["advantages"].tolist()
    ours = GRPO(GRPOConfig(scale_rewards=mode)).advantages(REWARDS)
    assert [a for g in ours for a in g] == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    assert any(abs(a) > 0.1 for a in theirs)


def test_scale_rewards_accepts_trls_booleans():
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group"
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
    assert DrGRPOConfig().scale_rewards == "none"
    with pytest.raises(ValueError, match="scale_rewards"):
        GRPOConfig(scale_rewards="sometimes")


def test_variable_groups_by_design():
    """TRL groups rewards by a fixed ``num_generations``; ours takes groups of any size, and
    each group's advantages are what that group alone would get."""
    s = GRPO()
    groups = [[1.0, 0.0], [3.0, 1.0, 2.0, 0.0, 5.0], [1.0, 1.0, 0.0]]
    together = s.advantages(groups)
    assert together == [s.advantages([g])[0] for g in groups]
    mean, std = 2.2, math.sqrt(sum((x - 2.2) ** 2 for x in groups[1]) / 4)
    assert together[1] == pytest.approx([(x - mean) / (std + 1e-4) for x in groups[1]])


def test_preset_replacing_a_users_choice_is_logged(tiny_model_dir, tmp_path, caplog):
    import logging

    from apportion_rl.trainer import StrategyGRPOTrainer

    with caplog.at_level(logging.WARNING, logger="apportion_rl.trainer"):
        trainer = _trainer(
            tiny_model_dir,
            tmp_path,
            cls=StrategyGRPOTrainer,
            args=_trl_args(tmp_path, {"loss_type": "bnpo"}),
            strategy="dapo",
        )
    assert trainer.loss_type == "dapo"
    assert "strategy 'dapo' sets loss_type='dapo' (args had 'bnpo')" in caplog.text
    assert "epsilon" not in caplog.text  # TRL's defaults are replaced silently
