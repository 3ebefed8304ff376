"""Trainer strategy ``grpo`` (DeepSeekMath): group-relative advantages, PPO-clipped token loss.

This is the base of the whole family. It keeps the contract of
:class:`apportion.base.TrainerStrategy` and adds what every subclass shares:

- bad rewards: ``None`` and NaN rewards are *excluded* from a group's statistics, get an
  advantage of exactly 0, and are *counted* in :attr:`GRPO.stats` (``excluded_rewards``);
- a group with fewer than two valid rewards carries no signal: every advantage is 0 and it is
  counted as ``singleton_groups``;
- a group whose valid rewards are all equal is counted as ``zero_std_groups``;
- an optional KL penalty (``beta``) against reference log-probs: the k3 estimator, weighted
  by the importance ratio unless ``kl_bias_correction`` is off (both as TRL).

Advantages are computed in plain Python (groups may differ in size); the loss takes padded
``(batch, tokens)`` tensors: ``logps``/``old_logps``/``ref_logps`` per completion token,
``advantages`` of shape ``(batch,)`` or ``(batch, tokens)``, and a 0/1 ``mask``.

Relation to TRL. Each of ``grpo``, ``dr-grpo``, ``dapo`` and ``gspo`` is a preset of TRL's
``GRPOTrainer``: :meth:`GRPO.trl_args` gives the ``trl.GRPOConfig`` options (``loss_type``,
``importance_sampling_level``, ``epsilon``/``epsilon_high``, ``beta``, ``scale_rewards``) under
which TRL's own loss computes exactly :meth:`GRPO.loss`, and
:class:`apportion_rl.trainer.StrategyGRPOTrainer` trains with TRL's loss under those options.
:meth:`GRPO.loss` is the standalone form of the same maths (no trainer needed); the tests hold
the two equal, losses and gradients, on the same batch. The advantages are this package's
own, because TRL's assume every prompt has ``num_generations`` rollouts; on equal groups they
equal TRL's for each ``scale_rewards`` mode. What TRL does not do: groups of different sizes,
counting (not just zeroing) the rewards it cannot use, and a configurable ``std_eps`` (TRL
fixes 1e-4, the default here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from apportion.base import TrainerStrategy
from apportion.config import ComponentConfig
from pydantic import Field, field_validator


class GRPOConfig(ComponentConfig):
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip (lower side)")
    clip_eps_high: float | None = Field(
        None, gt=0, description="upper clip; None = clip_eps (symmetric)"
    )
    beta: float = Field(0.0, ge=0, description="KL penalty weight against the reference policy")
    kl_bias_correction: bool = Field(
        True,
        description="weight the KL term by the importance ratio (DeepSeek-V3.2's unbiased "
        "estimator, TRL's use_bias_correction_kl default); False: DeepSeekMath's plain k3",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="divide by the std of the group (GRPO), of the whole batch, or not at all "
        "(Dr.GRPO); True/False mean 'group'/'none', as in TRL",
    )
    std_eps: float = Field(1e-4, gt=0, description="added to the std before dividing")
    rollouts_per_prompt: int = Field(8, ge=1, description="group size when no budget is given")

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _scale_from_bool(cls, v: Any) -> Any:
        return {True: "group", False: "none"}.get(v, v) if isinstance(v, bool) else v


@dataclass
class RewardStats:
    """Running counts of what :meth:`GRPO.advantages` saw (reset with :meth:`GRPO.reset_stats`)."""

    groups: int = 0
    rewards: int = 0
    excluded_rewards: int = 0  # None or NaN: excluded from the statistics, advantage 0
    singleton_groups: int = 0  # fewer than two valid rewards: no signal
    zero_std_groups: int = 0  # all valid rewards equal: no signal
    dropped_groups: int = 0  # removed by dynamic sampling (DAPO)
    refilled_groups: int = 0  # informative groups sampled to replace dropped ones (DAPO)
    refill_rounds: int = 0  # sampling rounds spent refilling (DAPO)
    refill_exhausted: int = 0  # steps that ran out of refill rounds short of the target (DAPO)

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
    #: TRL ``GRPOConfig.loss_type`` whose loss equals :meth:`loss` (None: no TRL counterpart).
    trl_loss_type: ClassVar[str | None] = "grpo"
    #: TRL ``GRPOConfig.importance_sampling_level`` matching :meth:`log_ratio`.
    trl_importance_sampling_level: ClassVar[str] = "token"

    def __init__(self, config: ComponentConfig | None = None):
        super().__init__(config)
        self.stats = RewardStats()

    def reset_stats(self) -> None:
        self.stats = RewardStats()

    def trl_args(self) -> dict[str, Any] | None:
        """``trl.GRPOConfig`` options under which TRL's ``GRPOTrainer`` computes this
        strategy's loss (and, on groups of equal size, its advantages); ``None`` when TRL has
        no counterpart. ``StrategyGRPOTrainer`` applies them to its ``args``."""
        if self.trl_loss_type is None:
            return None
        lo, hi = self._clip()
        return {
            "loss_type": self.trl_loss_type,
            "importance_sampling_level": self.trl_importance_sampling_level,
            "epsilon": lo,
            "epsilon_high": hi,
            "beta": self.config.beta,
            "use_bias_correction_kl": self.config.kl_bias_correction,
            "scale_rewards": self.config.scale_rewards,
        }

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

    @staticmethod
    def _std(values: list[float]) -> float:
        """Sample standard deviation (``n - 1``, as TRL's ``nanstd``); 0 for fewer than two."""
        if len(values) < 2:
            return 0.0
        mean = sum(values) / len(values)
        return math.sqrt(sum((r - mean) ** 2 for r in values) / (len(values) - 1))

    def _center(self, valid: list[float], batch_std: float = 0.0) -> tuple[float, float]:
        """(baseline, scale) of one group's valid rewards."""
        mean = sum(valid) / len(valid)
        mode = self.config.scale_rewards
        if mode == "none":
            return mean, 1.0
        std = batch_std if mode == "batch" else self._std(valid)
        return mean, std + self.config.std_eps

    def advantages(self, rewards: Sequence[Sequence[float | None]]) -> list[list[float]]:
        """``(r - group mean) / (std + std_eps)`` per group, the std being the group's, the
        batch's or 1 (``scale_rewards``). ``None``/NaN rewards are excluded from every
        statistic and get 0; a group with fewer than two valid rewards gets 0 throughout."""
        batch_std = 0.0
        if self.config.scale_rewards == "batch":
            batch_std = self._std([float(r) for g in rewards for r in g if is_valid_reward(r)])
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
            base, scale = self._center(valid, batch_std)
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
            kl = torch.exp(d) - d - 1
            if self.config.kl_bias_correction:
                kl = kl * ratio
            loss = loss + self.config.beta * kl
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
