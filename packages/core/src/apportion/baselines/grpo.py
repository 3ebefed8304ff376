"""Trainer strategy ``grpo``: group-relative advantages (DeepSeekMath), PPO-clipped loss."""

from __future__ import annotations

from pydantic import Field

from apportion.base import ComponentConfig, TrainerStrategy


class GRPOConfig(ComponentConfig):
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip")
    rollouts_per_prompt: int = Field(8, ge=1, description="group size when the budget is not given")


class GRPO(TrainerStrategy):
    name = "grpo"
    summary = "GRPO: uniform rollouts, group-normalised advantages, clipped loss"
    Config = GRPOConfig
