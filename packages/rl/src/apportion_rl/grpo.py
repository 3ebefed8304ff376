"""Trainer strategy ``grpo`` (DeepSeekMath): group-relative advantages, PPO-clipped token loss.

This is the base of the whole family. It keeps the contract of
:class:`apportion.base.TrainerStrategy` and adds what every subclass shares:

- bad rewards: ``None`` and NaN rewards are *excluded* from a group's statistics, get an
  advantage of exactly 0, and are *counted* in :attr:`GRPO.stats` (``excluded_rewards``);
- a group with fewer than two valid rewards carries no signal: every advantage is 0 and it is
  counted as ``singleton_groups``;
- a group whose valid rewards are all equal is counted as ``zero_std_groups``;
- an optional KL penalty (``beta``) against reference log-probs (the k3 estimator, as TRL).

Advantages are computed in plain Python (groups may differ in size); the loss takes padded
``(batch, tokens)`` tensors: ``logps``/``old_logps``/``ref_logps`` per completion token,
``advantages`` of shape ``(batch,)`` or ``(batch, tokens)``, and a 0/1 ``mask``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from apportion.base import TrainerStrategy
from apportion.config import ComponentConfig
from pydantic import Field


class GRPOConfig(ComponentConfig):
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip (lower side)")
    clip_eps_high: float | None = Field(
        None, gt=0, description="upper clip; None = clip_eps (symmetric)"
    )
    beta: float = Field(0.0, ge=0, description="KL penalty weight against the reference policy")
    scale_rewards: bool = Field(
        True, description="divide by the group's std (GRPO); False = Dr.GRPO"
    )
    std_eps: float = Field(1e-4, gt=0, description="added to the std before dividing")
    rollouts_per_prompt: int = Field(8, ge=1, description="group size when no budget is given")


@dataclass
class RewardStats:
    """Running counts of what :meth:`GRPO.advantages` saw (reset with :meth:`GRPO.reset_stats`)."""

    groups: int = 0
    rewards: int = 0
    excluded_rewards: int = 0  # None or NaN: excluded from the statistics, advantage 0
    singleton_groups: int = 0  # fewer than two valid rewards: no signal
    zero_std_groups: int = 0  # all valid rewards equal: no signal
    dropped_groups: int = 0  # removed by dynamic sampling (DAPO)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def reward_of(result: Any) -> Any:
    """The reward inside a rollout result: the value itself, ``result.reward``, or
    ``result[0]`` for a tuple."""
    if result is None or isinstance(result, (int, float)):
        return result
    if hasattr(result, "reward"):
        return result.reward
    if isinstance(result, tuple):
        return result[0]
    raise TypeError(f"cannot read a reward from {result!r}")


def is_valid_reward(r: Any) -> bool:
    if r is None:
        return False
    try:
        return math.isfinite(float(r))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"a reward must be a number or None, got {r!r}") from exc


class GRPO(TrainerStrategy):
    """GRPO: uniform rollouts, ``(r - mean) / (std + eps)`` per group, clipped token loss
    averaged per sequence, then over the batch."""

    name = "grpo"
    summary = "GRPO: group-normalised advantages, clipped token loss; counts bad rewards"
    Config = GRPOConfig

    #: True for allocators that hand out a budget over several phases (see ``xrpo``).
    phased = False

    def __init__(self, config: ComponentConfig | None = None):
        super().__init__(config)
        self.stats = RewardStats()

    def reset_stats(self) -> None:
        self.stats = RewardStats()

    # ------------------------------------------------------------------ allocation

    def collect(
        self, n_prompts: int, budget: int, sample: Callable[[list[int]], Sequence[Sequence[Any]]]
    ) -> list[list[Any]]:
        """Spend ``budget`` rollouts over ``n_prompts`` prompts; returns each prompt's results.

        ``sample(counts)`` draws ``counts[i]`` more rollouts of prompt ``i`` and returns, per
        prompt, a list of exactly that many results: rewards (``float``/``None``), or tuples /
        objects whose reward :func:`reward_of` can read. One call for uniform strategies,
        one per phase for phased ones (``xrpo``).
        """
        history: list[list[Any]] = [[] for _ in range(n_prompts)]
        counts = self.allocate_rollouts(n_prompts, budget)
        while sum(counts) > 0:
            drawn = sample(list(counts))
            if len(drawn) != n_prompts:
                raise ValueError(f"sample() returned {len(drawn)} groups for {n_prompts} prompts")
            for i, (c, got) in enumerate(zip(counts, drawn, strict=True)):
                if len(got) != c:
                    raise ValueError(
                        f"sample() returned {len(got)} rollouts for prompt {i}, asked {c}"
                    )
                history[i].extend(got)
            if not self.phased:
                break
            counts = self.allocate_rollouts(
                n_prompts, budget, [[reward_of(x) for x in h] for h in history]
            )
        return history

    # ------------------------------------------------------------------ advantages

    def _center(self, valid: list[float]) -> tuple[float, float]:
        """(baseline, scale) of one group's valid rewards."""
        mean = sum(valid) / len(valid)
        if not self.config.scale_rewards:
            return mean, 1.0
        std = math.sqrt(sum((r - mean) ** 2 for r in valid) / (len(valid) - 1))
        return mean, std + self.config.std_eps

    def advantages(self, rewards: Sequence[Sequence[float | None]]) -> list[list[float]]:
        out: list[list[float]] = []
        for group in rewards:
            ok = [is_valid_reward(r) for r in group]
            valid = [float(r) for r, good in zip(group, ok, strict=True) if good]
            self.stats.groups += 1
            self.stats.rewards += len(group)
            self.stats.excluded_rewards += len(group) - len(valid)
            if len(valid) < 2:
                self.stats.singleton_groups += 1
                out.append([0.0] * len(group))
                continue
            if max(valid) == min(valid):
                self.stats.zero_std_groups += 1
            base, scale = self._center(valid)
            out.append(
                [
                    (float(r) - base) / scale if good else 0.0
                    for r, good in zip(group, ok, strict=True)
                ]
            )
        return out

    # ------------------------------------------------------------------------ loss

    def _clip(self) -> tuple[float, float]:
        lo = self.config.clip_eps
        hi = self.config.clip_eps_high if self.config.clip_eps_high is not None else lo
        return lo, hi

    def log_ratio(self, logps: Any, old_logps: Any, mask: Any) -> Any:
        """Per-token log importance ratio (GSPO overrides this with a sequence-level one)."""
        return logps - old_logps

    def per_token_loss(
        self, logps: Any, old_logps: Any, advantages: Any, mask: Any, ref_logps: Any = None
    ) -> Any:
        import torch

        lo, hi = self._clip()
        adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        ratio = torch.exp(self.log_ratio(logps, old_logps, mask))
        loss = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - lo, 1 + hi) * adv)
        if self.config.beta and ref_logps is not None:
            d = ref_logps - logps
            loss = loss + self.config.beta * (torch.exp(d) - d - 1)
        return loss.expand_as(logps) if loss.shape != logps.shape else loss

    def aggregate(self, per_token: Any, mask: Any) -> Any:
        """GRPO: mean over each sequence's tokens, then over sequences."""
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.mean()

    def loss(
        self, logps: Any, old_logps: Any, advantages: Any, mask: Any, ref_logps: Any = None
    ) -> Any:
        mask = mask.to(logps.dtype)
        return self.aggregate(
            self.per_token_loss(logps, old_logps, advantages, mask, ref_logps), mask
        )
