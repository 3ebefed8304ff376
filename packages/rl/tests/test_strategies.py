"""The GRPO family against hand-computed values, plus the contract suite for each strategy."""

from __future__ import annotations

import math

import pytest
import torch
from apportion.testing.contracts import TrainerStrategyContract
from apportion_rl.dapo import DAPO, DAPOConfig
from apportion_rl.dr_grpo import DrGRPO, DrGRPOConfig
from apportion_rl.grpo import GRPO, GRPOConfig
from apportion_rl.gspo import GSPO


class TestGRPOContract(TrainerStrategyContract):
    component = "grpo"


class TestDrGRPOContract(TrainerStrategyContract):
    component = "dr-grpo"


class TestDAPOContract(TrainerStrategyContract):
    component = "dapo"


class TestGSPOContract(TrainerStrategyContract):
    component = "gspo"


class TestXRPOContract(TrainerStrategyContract):
    component = "xrpo"


class TestSUPOContract(TrainerStrategyContract):
    component = "supo"


def test_grpo_replaces_core_baseline(registry):
    spec = registry.get("trainer-strategy", "grpo")
    assert spec.provider == "apportion-rl"
    assert type(spec.create()).__module__ == "apportion_rl.grpo"


# ----------------------------------------------------------------------- advantages


def test_grpo_advantages_by_hand():
    # rewards 1, 0, 0, 1 -> mean 0.5, sample std sqrt(1/3) = 0.57735
    adv = GRPO().advantages([[1.0, 0.0, 0.0, 1.0]])[0]
    a = 0.5 / (0.57735027 + 1e-4)
    assert adv == pytest.approx([a, -a, -a, a], rel=1e-6)
    # rewards 3, 1, 2 -> mean 2, std 1
    assert GRPO().advantages([[3.0, 1.0, 2.0]])[0] == pytest.approx([1 / 1.0001, -1 / 1.0001, 0.0])


def test_dr_grpo_advantages_are_centred_not_scaled():
    assert DrGRPO().advantages([[3.0, 1.0, 2.0]])[0] == pytest.approx([1.0, -1.0, 0.0])
    assert DrGRPO().advantages([[1.0, 0.0, 0.0, 0.0]])[0] == pytest.approx(
        [0.75, -0.25, -0.25, -0.25]
    )


def test_bad_rewards_excluded_and_counted():
    s = GRPO()
    adv = s.advantages([[1.0, None, 0.0, float("nan")], [0.5], [None, None], [2.0, 2.0]])
    # only 1.0 and 0.0 count: mean 0.5, std sqrt(0.5) = 0.70711
    assert adv[0] == pytest.approx([0.5 / 0.70721, 0.0, -0.5 / 0.70721, 0.0], rel=1e-4)
    assert adv[1] == [0.0] and adv[2] == [0.0, 0.0] and adv[3] == [0.0, 0.0]
    assert s.stats.excluded_rewards == 4
    assert s.stats.singleton_groups == 2  # the group of one and the all-None group
    assert s.stats.zero_std_groups == 1
    assert s.stats.groups == 4 and s.stats.rewards == 9


def test_non_numeric_reward_is_a_clear_error():
    with pytest.raises(TypeError, match="reward must be a number"):
        GRPO().advantages([[1.0, "yes"]])


# ----------------------------------------------------------------------------- loss


def _batch():
    logps = torch.log(torch.tensor([[0.5, 0.25, 0.5], [0.2, 0.4, 0.8]]))
    old = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.4, 0.4, 0.8]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -1.0])
    return logps, old, adv, mask


def test_grpo_loss_by_hand():
    logps, old, adv, mask = _batch()
    # ratios: seq0 [2, 1, (1)], seq1 [0.5, 1, 1]; eps 0.2
    # seq0 A=+1: -min(2, 1.2) = -1.2 ; -1 -> mean over 2 tokens = -1.1
    # seq1 A=-1: -min(-0.5, -0.8) = 0.8 ; 1 ; 1 -> mean over 3 = 0.93333
    expected = (-1.1 + (0.8 + 1 + 1) / 3) / 2
    assert GRPO().loss(logps, old, adv, mask).item() == pytest.approx(expected, rel=1e-6)


def test_dr_grpo_loss_by_hand():
    logps, old, adv, mask = _batch()
    expected = (-1.2 - 1 + 0.8 + 1 + 1) / (2 * 3)  # constant divisor: batch * length
    assert DrGRPO().loss(logps, old, adv, mask).item() == pytest.approx(expected, rel=1e-6)
    s = DrGRPO(DrGRPOConfig(max_completion_length=10))
    assert s.loss(logps, old, adv, mask).item() == pytest.approx((-1.2 - 1 + 0.8 + 1 + 1) / 20)


def test_dapo_loss_clip_higher_token_level_by_hand():
    logps, old, adv, mask = _batch()
    # upper clip 1.28: seq0 token0 -> -1.28 ; seq1 token0 lower clip 0.8 -> 0.8
    expected = (-1.28 - 1 + 0.8 + 1 + 1) / 5  # sum over the 5 unmasked tokens / 5
    assert DAPO().loss(logps, old, adv, mask).item() == pytest.approx(expected, rel=1e-6)


def test_gspo_sequence_ratio_by_hand():
    logps, old, adv, mask = _batch()
    s0 = math.exp((math.log(2) + 0) / 2)  # sqrt(2): far outside [1 - 3e-4, 1 + 4e-4]
    s1 = math.exp((math.log(0.5) + 0 + 0) / 3)  # 0.5 ** (1/3)
    l0 = -min(s0 * 1, (1 + 4e-4) * 1)
    l1 = -min(s1 * -1, (1 - 3e-4) * -1)
    assert GSPO().loss(logps, old, adv, mask).item() == pytest.approx((l0 + l1) / 2, abs=1e-7)


def test_gspo_gradient_flows_through_the_sequence_ratio():
    logps, old, adv, mask = _batch()
    logps = old.clone().requires_grad_(True)  # ratio 1: inside the clip, gradient -A/len per token
    GSPO().loss(logps, old, adv, mask).backward()
    assert logps.grad[0, :2].tolist() == pytest.approx([-0.25, -0.25])
    assert logps.grad[0, 2].item() == 0.0
    assert logps.grad[1].tolist() == pytest.approx([1 / 6] * 3)


def test_kl_penalty_zero_at_reference_and_positive_elsewhere():
    logps, old, adv, mask = _batch()
    s = GRPO(GRPOConfig(beta=0.1))
    same = s.loss(logps, old, adv, mask, ref_logps=logps)
    assert same.item() == pytest.approx(GRPO().loss(logps, old, adv, mask).item())
    assert s.loss(logps, old, adv, mask, ref_logps=old).item() > same.item()


# ---------------------------------------------------------------------------- dapo


def test_dapo_dynamic_sampling_drops_equal_groups():
    s = DAPO()
    keep = s.keep_groups([[1.0, 1.0, 1.0], [0.0, 1.0], [0.0, None, 0.0], [1.0]])
    assert keep == [False, True, False, False]
    assert s.stats.dropped_groups == 3
    assert DAPO(DAPOConfig(dynamic_sampling=False)).keep_groups([[1.0, 1.0]]) == [True]


def test_dapo_overlong_shaping_by_hand():
    s = DAPO(DAPOConfig(max_completion_length=20, overlong_buffer=4))
    assert s.shape_rewards([1.0, 1.0, 1.0, 1.0, None], [16, 18, 20, 21, 30]) == [
        1.0,
        0.5,
        0.0,
        0.0,
        None,
    ]
    with pytest.raises(ValueError, match="lengths"):
        s.shape_rewards([1.0], [1, 2])


# ------------------------------------------------------------------- allocation


def test_budget_smaller_than_prompts_is_refused_by_every_strategy(registry):
    for name in ("grpo", "dr-grpo", "dapo", "gspo", "xrpo", "supo"):
        with pytest.raises(ValueError, match="budget 3 is smaller than the number of prompts 4"):
            registry.create("trainer-strategy", name).allocate_rollouts(4, 3)


def test_collect_uniform_one_round():
    calls = []

    def sample(counts):
        calls.append(counts)
        return [[1.0] * c for c in counts]

    got = GRPO().collect(3, 10, sample)
    assert calls == [[4, 3, 3]] and [len(g) for g in got] == [4, 3, 3]


def test_collect_checks_what_sample_returns():
    with pytest.raises(ValueError, match="returned 1 rollouts for prompt 0, asked 2"):
        GRPO().collect(2, 4, lambda counts: [[1.0], [1.0, 1.0]])
