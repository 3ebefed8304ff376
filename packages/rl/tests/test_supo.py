"""SUPO on the real SmolLM2: a rollout with a tiny working context is split at its summary."""

from __future__ import annotations

import pytest
import torch
from apportion_rl.supo import SUPO, Segment, SUPOConfig, Trajectory, rollout

MESSAGES = [{"role": "user", "content": "Write a long story about a brave knight and a dragon."}]


@pytest.fixture(scope="module")
def trajectory(smollm2):
    torch.manual_seed(0)
    cfg = SUPOConfig(
        working_limit=200, summary_tokens=12, max_summaries=1, max_new_tokens=130, temperature=0.0
    )
    return rollout(smollm2.model, smollm2.tokenizer, MESSAGES, cfg), cfg


def test_rollout_summarises_near_the_limit(trajectory, smollm2):
    traj, cfg = trajectory
    assert len(traj.summaries) == 1 and len(traj.segments) == 2
    first, second = traj.segments
    assert first.ends_with_summary and not second.ends_with_summary
    for seg in traj.segments:  # the policy never saw more than its working context
        assert len(seg.context_ids) + len(seg.completion_ids) <= cfg.working_limit
        assert len(seg.completion_mask) == len(seg.completion_ids)
    # the inserted instruction is masked out, the policy's own tokens (and summary) are trained
    zeros = [i for i, m in enumerate(first.completion_mask) if m == 0]
    assert zeros and zeros == list(range(zeros[0], zeros[-1] + 1))
    inserted = smollm2.tokenizer.decode([first.completion_ids[i] for i in zeros])
    assert "Summarize your progress" in inserted
    # the next segment restarts from the prompt plus the summary
    resumed = smollm2.tokenizer.decode(second.context_ids)
    assert traj.summaries[0] in resumed and "a brave knight and a dragon" in resumed
    assert len(second.context_ids) < len(first.context_ids) + len(first.completion_ids)


def test_overlong_trajectories_are_masked_and_counted():
    def traj(reward, finished, n_segments=1):
        t = Trajectory(segments=[Segment([1], [2, 3], [1, 1])] * n_segments, finished=finished)
        t.reward = reward
        return t

    s = SUPO()
    segments, adv, keep = s.segment_batch([[traj(1.0, True, 2), traj(0.0, True), traj(1.0, False)]])
    assert len(segments) == 4 and keep == [1, 1, 1, 0]
    # the overlong reward is excluded: the group is {1, 0}, mean 0.5, std 0.7071
    assert adv[0] == adv[1] == pytest.approx(0.5 / 0.70721, rel=1e-4)
    assert adv[2] == pytest.approx(-0.5 / 0.70721, rel=1e-4) and adv[3] == 0.0
    assert s.stats.excluded_rewards == 1


def test_prompt_too_long_for_the_working_context(smollm2):
    with pytest.raises(ValueError, match="leaves no room under working_limit=40"):
        rollout(smollm2.model, smollm2.tokenizer, MESSAGES, SUPOConfig(working_limit=40))
