"""Trainer strategy ``dr-grpo`` (Dr. GRPO, "Understanding R1-Zero-Like Training", Liu et al. 2025).

Two biases of GRPO removed: the advantage is ``r - mean`` (no division by the group's std,
which over-weights near-uniform groups), and the loss sums token terms and divides by a
*constant* ``batch * max_completion_length`` (no per-sequence length normalisation, which
favours long wrong answers).

TRL counterpart: ``loss_type="dr_grpo"`` with ``scale_rewards="none"``. TRL's constant is
``GRPOConfig.max_completion_length``, the generation limit; the standalone :meth:`DrGRPO.loss`
sees only a padded batch, so with ``max_completion_length=None`` it divides by the padded
length instead, which equals TRL's only when the batch is padded to the limit. Set
``max_completion_length`` for the same constant; :meth:`~apportion_rl.grpo.GRPO.trl_args`
then passes it to TRL as well (it also bounds generation there).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from apportion_rl.grpo import GRPO, GRPOConfig


class DrGRPOConfig(GRPOConfig):
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "none", description="Dr.GRPO does not divide by the group's std"
    )
    max_completion_length: int | None = Field(
        None, ge=1, description="the constant divisor's length; None = the padded batch length"
    )


class DrGRPO(GRPO):
    name = "dr-grpo"
    summary = "Dr.GRPO: advantage r - mean, loss over a constant token count"
    Config = DrGRPOConfig
    trl_loss_type = "dr_grpo"

    def trl_args(self) -> dict[str, Any] | None:
        args = super().trl_args() or {}
        if self.config.max_completion_length is not None:
            args["max_completion_length"] = self.config.max_completion_length
        return args

    def aggregate(self, per_token: Any, mask: Any) -> Any:
        length = self.config.max_completion_length or mask.shape[-1]
        return (per_token * mask).sum() / (mask.shape[0] * length)
