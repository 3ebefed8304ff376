"""Trainer strategy ``dapo`` (DAPO, Yu et al. 2025).

- **Clip-higher**: the ratio is clipped to ``[1 - 0.2, 1 + 0.28]``, so low-probability tokens
  can still rise (against entropy collapse).
- **Dynamic sampling**: a group whose valid rewards are all equal has zero advantage and so no
  gradient; :meth:`DAPO.keep_groups` says which groups to keep, and the caller drops the rest
  from the loss (the TRL trainer masks them; a sampler may draw more prompts instead).
- **Token-level loss**: every token of the batch weighs the same (sum over tokens divided by
  the number of tokens), so long sequences are not diluted.
- **Overlong reward shaping** (optional): :meth:`DAPO.shape_rewards` adds the soft overlong
  penalty, linear from 0 to -1 over the last ``overlong_buffer`` tokens before the limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from apportion_rl.grpo import GRPO, GRPOConfig, is_valid_reward


class DAPOConfig(GRPOConfig):
    clip_eps: float = Field(0.2, gt=0, lt=1, description="lower clip")
    clip_eps_high: float | None = Field(0.28, gt=0, description="upper clip (clip-higher)")
    dynamic_sampling: bool = Field(True, description="drop groups whose rewards are all equal")
    max_completion_length: int | None = Field(
        None, ge=1, description="length limit for the overlong penalty (None: no shaping)"
    )
    overlong_buffer: int = Field(
        0, ge=0, description="tokens before the limit where the penalty ramps"
    )


class DAPO(GRPO):
    name = "dapo"
    summary = "DAPO: clip-higher, dynamic sampling of equal-reward groups, token-level loss"
    Config = DAPOConfig

    def keep_groups(self, rewards: Sequence[Sequence[float | None]]) -> list[bool]:
        """One flag per group: False for a group with < 2 valid rewards or all equal ones.
        Dropped groups are counted in ``stats.dropped_groups``."""
        keep = []
        for group in rewards:
            valid = [float(r) for r in group if is_valid_reward(r)]
            ok = not self.config.dynamic_sampling or (len(valid) >= 2 and max(valid) != min(valid))
            keep.append(ok)
            self.stats.dropped_groups += not ok
        return keep

    def shape_rewards(
        self, rewards: Sequence[float | None], lengths: Sequence[int]
    ) -> list[float | None]:
        """Add the soft overlong penalty to each reward (``None``/NaN stay as they are)."""
        limit, buf = self.config.max_completion_length, self.config.overlong_buffer
        if limit is None or buf == 0:
            return list(rewards)
        if len(rewards) != len(lengths):
            raise ValueError(f"{len(rewards)} rewards but {len(lengths)} lengths")
        out: list[float | None] = []
        for r, n in zip(rewards, lengths, strict=True):
            if not is_valid_reward(r):
                out.append(r)
                continue
            if n <= limit - buf:
                penalty = 0.0
            elif n <= limit:
                penalty = (limit - buf - n) / buf
            else:
                penalty = -1.0
            out.append(float(r) + penalty)
        return out

    def aggregate(self, per_token: Any, mask: Any) -> Any:
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
