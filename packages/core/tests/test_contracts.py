"""The core baselines pass the contract suites every plugin inherits."""

from apportion.testing import (
    AllocatorContract,
    AttentionContract,
    BenchmarkContract,
    KVPolicyContract,
    PromptStrategyContract,
    TrainerStrategyContract,
)


class TestDense(AttentionContract):
    component = "dense"
    max_logit_diff = 0.0


class TestFull(KVPolicyContract):
    component = "full"


class TestPageable(AllocatorContract):
    component = "pageable"


class TestGRPO(TrainerStrategyContract):
    component = "grpo"


class TestZeroShot(PromptStrategyContract):
    component = "zero-shot"


class TestNiah(BenchmarkContract):
    component = "niah"


def test_grpo_hand_computed():
    from apportion.baselines.grpo import GRPO

    adv = GRPO().advantages([[1.0, 0.0, 0.0, 1.0]])[0]
    # mean 0.5, sample std sqrt(1/3) = 0.57735
    assert [round(a, 3) for a in adv] == [0.866, -0.866, -0.866, 0.866]


def test_niah_needle_once_at_depth(smollm2):
    from apportion.baselines.niah import SingleNeedle

    bench = SingleNeedle(SingleNeedle.Config(lengths=[1024], depths=[0.0, 0.5, 1.0], samples=1))
    for s in bench.samples(smollm2.tokenizer):
        needle = f"is: {s.answers[0]}."
        assert s.context.count(needle) == 1
        at = s.context.index(needle) / len(s.context)
        assert abs(at - s.depth) < 0.08, (s.depth, at)
