"""Trainer strategy ``dapo`` (DAPO, Yu et al. 2025).

- **Clip-higher**: the ratio is clipped to ``[1 - 0.2, 1 + 0.28]``, so low-probability tokens
  can still rise (against entropy collapse).
- **Dynamic sampling**: a group whose valid rewards are all equal has zero advantage and so no
  gradient. :meth:`DAPO.fill_batch` drops such groups and samples new prompts in their place
  until the batch holds its target of informative groups, for at most ``max_refill_rounds``
  rounds; each step's counts come back as a :class:`RefillReport`. When the rounds run out
  the step goes on with the informative groups it has (the empty slots keep dropped groups,
  masked out of the loss, so the batch keeps its shape), logs a warning and counts the step in
  ``stats.refill_exhausted``. :meth:`DAPO.keep_groups` is the filter alone.
- **Token-level loss**: every token of the batch weighs the same (sum over tokens divided by
  the number of tokens), so long sequences are not diluted.
- **Overlong reward shaping** (optional): :meth:`DAPO.shape_rewards` adds the soft overlong
  penalty, linear from 0 to -1 over the last ``overlong_buffer`` tokens before the limit.

TRL counterpart of the loss: ``loss_type="dapo"``, ``epsilon=0.2, epsilon_high=0.28``. TRL
divides by the unmasked tokens of the whole generation batch (``num_items_in_batch``, spread
over gradient-accumulation steps); the standalone :meth:`DAPO.loss` divides by those of the
batch it is given, the same number when that batch is the generation batch. Dynamic sampling,
refilling and overlong shaping are not part of TRL's ``GRPOTrainer``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import Field

from apportion_rl.grpo import GRPO, GRPOConfig, is_valid_reward, reward_of

logger = logging.getLogger(__name__)


class DAPOConfig(GRPOConfig):
    clip_eps: float = Field(0.2, gt=0, lt=1, description="lower clip")
    clip_eps_high: float | None = Field(0.28, gt=0, description="upper clip (clip-higher)")
    dynamic_sampling: bool = Field(True, description="drop groups whose rewards are all equal")
    max_refill_rounds: int = Field(
        4,
        ge=0,
        description="sampling rounds allowed per step to replace dropped groups "
        "(0: dropped groups are only masked)",
    )
    max_completion_length: int | None = Field(
        None, ge=1, description="length limit for the overlong penalty (None: no shaping)"
    )
    overlong_buffer: int = Field(
        0, ge=0, description="tokens before the limit where the penalty ramps"
    )


@dataclass
class RefillReport:
    """What dynamic sampling did in one step (:meth:`DAPO.fill_batch`)."""

    target: int  # informative groups the batch should hold
    informative: int  # informative groups it holds
    drawn: int  # groups sampled this step, the first batch included
    dropped: int  # of those, groups with all-equal (or fewer than two valid) rewards
    refilled: int  # informative groups in the batch that came from refill rounds
    retries: int  # refill rounds used
    rollouts: int  # rollouts sampled this step, refill rounds included
    reached: bool  # informative == target

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class DAPO(GRPO):
    name = "dapo"
    summary = "DAPO: clip-higher, dynamic sampling that refills the batch, token-level loss"
    Config = DAPOConfig
    trl_loss_type = "dapo"

    def informative(self, group: Sequence[Any]) -> bool:
        """A group teaches something: at least two valid rewards, not all equal."""
        valid = [float(r) for r in (reward_of(x) for x in group) if is_valid_reward(r)]
        return len(valid) >= 2 and max(valid) != min(valid)

    def keep_groups(self, rewards: Sequence[Sequence[float | None]]) -> list[bool]:
        """One flag per group: False for a group with < 2 valid rewards or all equal ones.
        Dropped groups are counted in ``stats.dropped_groups``."""
        keep = []
        for group in rewards:
            ok = not self.config.dynamic_sampling or self.informative(group)
            keep.append(ok)
            self.stats.dropped_groups += not ok
        return keep

    def fill_batch(
        self,
        first: Sequence[Sequence[Any]],
        draw: Callable[[int], Sequence[Sequence[Any]]],
        target: int | None = None,
    ) -> tuple[list[list[Any]], list[bool], RefillReport]:
        """Dynamic sampling with refill: the batch's groups, informative ones first.

        ``first``: the step's groups, each a list of rollout results whose reward
        :func:`~apportion_rl.grpo.reward_of` reads. ``draw(n)``: samples ``n`` new prompts and
        returns their ``n`` groups. ``target``: informative groups wanted (default: as many
        as ``first`` has groups).

        Each refill round draws enough new prompts for the groups still missing at the
        informative rate seen so far (at least the number missing, at most ``target``), for
        at most ``max_refill_rounds`` rounds. Returns ``(groups, keep, report)``: exactly
        ``len(first)`` groups, the informative ones in the order they were drawn (surplus
        ones left out), then, if the rounds ran out, dropped groups to keep the batch's
        shape; ``keep`` flags the ``target`` informative ones (mask the others out of the
        loss). Counts go to ``stats``; a step short of its target logs a warning. With
        ``dynamic_sampling`` off, ``first`` comes back unchanged and every group is kept.
        """
        cfg = self.config
        size = len(first)
        target = size if target is None else target
        if not 0 <= target <= size:
            raise ValueError(f"target {target} must be between 0 and the batch's {size} groups")
        drawn = [list(g) for g in first]
        if not cfg.dynamic_sampling:
            flags = [self.informative(g) for g in drawn]
            report = RefillReport(
                target=size,
                informative=sum(flags),
                drawn=size,
                dropped=0,
                refilled=0,
                retries=0,
                rollouts=sum(map(len, drawn)),
                reached=all(flags),
            )
            return drawn, [True] * size, report
        flags = [self.informative(g) for g in drawn]
        retries = 0
        while sum(flags) < target and retries < cfg.max_refill_rounds:
            missing = target - sum(flags)
            rate = (sum(flags) + 1) / (len(drawn) + 2)  # Laplace: never 0, never 1
            n = min(max(missing, math.ceil(missing / rate)), max(target, 1))
            new = [list(g) for g in draw(n)]
            if len(new) != n:
                raise ValueError(f"draw({n}) returned {len(new)} groups, asked {n}")
            retries += 1
            drawn.extend(new)
            flags.extend(self.informative(g) for g in new)
        good = [i for i, f in enumerate(flags) if f]
        # informative groups in draw order up to the target, then (short of it, or with a
        # smaller target) dropped groups, then surplus informative ones, to keep the shape
        order = good[:target] + [i for i, f in enumerate(flags) if not f] + good[target:]
        chosen_idx = order[:size]
        chosen = [drawn[i] for i in chosen_idx]
        wanted = set(good[:target])
        keep = [i in wanted for i in chosen_idx]
        informative = sum(keep)
        dropped = len(drawn) - len(good)
        report = RefillReport(
            target=target,
            informative=informative,
            drawn=len(drawn),
            dropped=dropped,
            refilled=sum(1 for i in chosen_idx[:informative] if i >= size),
            retries=retries,
            rollouts=sum(map(len, drawn)),
            reached=informative >= target,
        )
        self.stats.dropped_groups += dropped
        self.stats.refilled_groups += report.refilled
        self.stats.refill_rounds += retries
        if not report.reached:
            self.stats.refill_exhausted += 1
            logger.warning(
                "dapo: %s: the batch holds %d of %d informative groups (%d drawn, %d dropped); "
                "the step proceeds with them",
                f"refill budget of {cfg.max_refill_rounds} rounds exhausted"
                if cfg.max_refill_rounds
                else "refilling is off (max_refill_rounds=0)",
                report.informative,
                target,
                report.drawn,
                dropped,
            )
        return chosen, keep, report

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
