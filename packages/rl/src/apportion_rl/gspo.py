"""Trainer strategy ``gspo`` (GSPO, "Group Sequence Policy Optimization", Zheng et al. 2025).

The importance ratio is taken per *sequence*, as the length-normalised likelihood ratio
``s_i = exp(mean_t(log pi(y_t) - log pi_old(y_t)))``, and clipped per sequence with a much
tighter range (the paper's 3e-4 / 4e-4). Every token of a sequence shares its ratio, so token
noise in long responses no longer scatters the update (the cause of MoE collapse in GRPO).

TRL counterpart: ``loss_type="grpo"`` with ``importance_sampling_level="sequence"`` and
``epsilon=3e-4, epsilon_high=4e-4`` (what :meth:`~apportion_rl.grpo.GRPO.trl_args` returns);
the per-sequence mean aggregation is GRPO's, as in the paper.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from apportion_rl.grpo import GRPO, GRPOConfig


class GSPOConfig(GRPOConfig):
    clip_eps: float = Field(3e-4, gt=0, lt=1, description="lower clip of the sequence ratio")
    clip_eps_high: float | None = Field(4e-4, gt=0, description="upper clip of the sequence ratio")


class GSPO(GRPO):
    name = "gspo"
    summary = "GSPO: sequence-level importance ratio, clipped per sequence"
    Config = GSPOConfig
    trl_importance_sampling_level = "sequence"

    def log_ratio(self, logps: Any, old_logps: Any, mask: Any) -> Any:
        per_seq = ((logps - old_logps) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.unsqueeze(-1)
