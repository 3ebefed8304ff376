"""Trainer strategy ``dr-grpo`` (Dr. GRPO, "Understanding R1-Zero-Like Training", Liu et al. 2025).

Two biases of GRPO removed: the advantage is ``r - mean`` (no division by the group's std,
which over-weights near-uniform groups), and the loss sums token terms and divides by a
*constant* ``batch * max_completion_length`` (no per-sequence length normalisation, which
favours long wrong answers).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from apportion_rl.grpo import GRPO, GRPOConfig


class DrGRPOConfig(GRPOConfig):
    scale_rewards: bool = Field(False, description="Dr.GRPO does not divide by the group's std")
    max_completion_length: int | None = Field(
        None, ge=1, description="the constant divisor's length; None = the padded batch length"
    )


class DrGRPO(GRPO):
    name = "dr-grpo"
    summary = "Dr.GRPO: advantage r - mean, loss over a constant token count"
    Config = DrGRPOConfig

    def aggregate(self, per_token: Any, mask: Any) -> Any:
        length = self.config.max_completion_length or mask.shape[-1]
        return (per_token * mask).sum() / (mask.shape[0] * length)
