"""Trainer strategy ``xrpo`` (XRPO, "Pushing the limits of GRPO with targeted exploration and
exploitation", Bamba et al. 2025): three additions to GRPO.

1. **Uncertainty-driven rollout allocation.** A prompt's uncertainty is the half-width of a
   Student-t confidence interval on its mean reward (its success rate, for 0/1 rewards)::

       h(n) = t_{(1+c)/2, n-1+m0} * s / sqrt(n)

   where ``s`` is the sample std shrunk toward a prior variance ``v0`` with ``m0`` pseudo
   observations (so a group that is all-correct after two rollouts is not taken as certain).
   Each extra rollout goes to the prompt with the largest
   ``h(n) - h(n+1) + lambda * sqrt(ln(1 + N) / n)``: the uncertainty it removes, plus a UCB
   exploration bonus (``N`` rollouts drawn so far). The fixed budget is handed out in phases:
   ``initial_rollouts`` per prompt first, then ``phases`` rounds, each re-scored on the rewards
   seen so far. :meth:`GRPO.collect` drives the rounds.
2. **In-context seeding.** For a group where every rollout failed, :meth:`XRPO.seed_prompt`
   prepends curated solved exemplars (chosen by the icl package's selection when it is
   installed, else by lexical overlap) so the next rollouts of that prompt can succeed.
3. **Novelty-aware advantage sharpening.** :meth:`XRPO.sharpen`: a correct response (positive
   advantage) whose length-normalised log-likelihood is below its group's correct responses'
   mean gets its advantage multiplied by ``1 + min(kappa * z, cap)``, ``z`` its deficit in
   group standard deviations: rare correct reasoning is reinforced more, and boundedly.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from apportion.base import ComponentConfig
from pydantic import Field

from apportion_rl.grpo import GRPO, GRPOConfig, is_valid_reward


class XRPOConfig(GRPOConfig):
    initial_rollouts: int = Field(4, ge=1, description="rollouts per prompt in the first phase")
    phases: int = Field(2, ge=1, description="allocation rounds after the first phase")
    max_rollouts_per_prompt: int = Field(32, ge=1, description="cap on one prompt's group")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the Student-t interval")
    # not 0.25 (the Bernoulli maximum): that prior swamps groups of 2-4 rollouts, every prompt
    # looks equally uncertain and the allocation comes out uniform
    prior_variance: float = Field(0.05, ge=0, description="v0: reward variance assumed a priori")
    prior_strength: float = Field(1.0, ge=0, description="m0: pseudo-observations of v0")
    exploration: float = Field(0.05, ge=0, description="lambda: weight of the UCB bonus")
    novelty_coef: float = Field(0.5, ge=0, description="kappa: boost per std of likelihood deficit")
    novelty_cap: float = Field(0.5, ge=0, description="largest relative boost of an advantage")
    success_threshold: float = Field(0.5, description="a reward above this counts as a success")
    seed_exemplars: int = Field(
        2, ge=0, description="solved exemplars prepended to a failed prompt"
    )
    seed_strategy: str | None = Field(
        "auto",
        description="prompt-strategy that picks exemplars: a registered name, 'auto' "
        "(the icl package's selection when installed) or None (lexical overlap)",
    )


@lru_cache(maxsize=4096)
def t_quantile(q: float, df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


@dataclass
class Exemplar:
    """A solved training problem, offered as an in-context demonstration."""

    question: str
    answer: str

    def as_dict(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer}


_WORD = re.compile(r"\w+")


class XRPO(GRPO):
    name = "xrpo"
    summary = "XRPO: Student-t uncertainty rollout allocator, ICL seeding, novelty sharpening"
    Config = XRPOConfig
    phased = True

    def __init__(self, config: ComponentConfig | None = None):
        super().__init__(config)
        self._loaded: Any = None
        self._seeder: Any = None  # the seed_strategy's prompt strategy, built on first use

    # ------------------------------------------------------------------ allocation

    def half_width(self, rewards: Sequence[float], n: int | None = None) -> float:
        """Half-width of the Student-t interval on the mean of ``rewards`` (if ``n`` is
        given: as if ``n`` rewards with the same spread had been seen)."""
        cfg = self.config
        valid = [float(r) for r in rewards if is_valid_reward(r)]
        n = len(valid) if n is None else n
        if n == 0:
            return math.inf
        ss = 0.0
        if valid:
            mean = sum(valid) / len(valid)
            ss = sum((r - mean) ** 2 for r in valid)
        dof = len(valid) - 1 + cfg.prior_strength
        if dof <= 0:
            return math.inf
        var = (ss + cfg.prior_strength * cfg.prior_variance) / dof
        df = n - 1 + cfg.prior_strength
        return t_quantile((1 + cfg.confidence) / 2, df) * math.sqrt(var / n)

    def priority(self, rewards: Sequence[float], n: int, total: int) -> float:
        """Value of one more rollout for a prompt with ``n`` rollouts drawn (``rewards`` the
        valid ones): the uncertainty it removes plus the exploration bonus."""
        if n == 0:
            return math.inf
        gain = self.half_width(rewards, n) - self.half_width(rewards, n + 1)
        return gain + self.config.exploration * math.sqrt(math.log(1 + total) / n)

    def allocate_rollouts(
        self, n_prompts: int, budget: int, history: Sequence[Sequence[float | None]] | None = None
    ) -> list[int]:
        """How many rollouts to draw *now* for each prompt.

        Without ``history`` (or with every prompt still unsampled): the first phase,
        ``min(initial_rollouts, budget // n_prompts)`` each. With ``history`` (one list of the
        rewards drawn so far per prompt, ``None``/NaN allowed): the next phase's share of what
        is left of ``budget``, one rollout at a time to the highest :meth:`priority`.
        Returns all zeros once the budget is spent or every prompt is at the cap.
        """
        first = super().allocate_rollouts(n_prompts, budget)  # validates n_prompts and budget
        cfg = self.config
        n0 = max(1, min(cfg.initial_rollouts, min(first), cfg.max_rollouts_per_prompt))
        if history is None or all(len(h) == 0 for h in history):
            return [n0] * n_prompts
        if len(history) != n_prompts:
            raise ValueError(f"history has {len(history)} groups but there are {n_prompts} prompts")
        drawn = [len(h) for h in history]
        spent = sum(drawn)
        remaining = budget - spent
        if remaining <= 0:
            return [0] * n_prompts
        phase = math.ceil((budget - n0 * n_prompts) / cfg.phases)
        now = min(remaining, max(phase, 1))
        valid = [[float(r) for r in h if is_valid_reward(r)] for h in history]
        counts = [0] * n_prompts
        heap = [
            (-self.priority(valid[i], drawn[i], spent), i)
            for i in range(n_prompts)
            if drawn[i] < cfg.max_rollouts_per_prompt
        ]
        heapq.heapify(heap)
        for k in range(now):
            if not heap:
                break
            _, i = heapq.heappop(heap)
            counts[i] += 1
            n = drawn[i] + counts[i]
            if n < cfg.max_rollouts_per_prompt:
                heapq.heappush(heap, (-self.priority(valid[i], n, spent + k + 1), i))
        return counts

    # -------------------------------------------------------------------- seeding

    def all_failed(self, rewards: Sequence[float | None]) -> bool:
        valid = [float(r) for r in rewards if is_valid_reward(r)]
        return bool(valid) and max(valid) <= self.config.success_threshold

    def _select_lexical(self, query: str, pool: Sequence[Exemplar], k: int) -> list[Exemplar]:
        words = set(_WORD.findall(query.lower()))

        def overlap(e: Exemplar) -> float:
            other = set(_WORD.findall(e.question.lower()))
            return len(words & other) / max(1, len(words | other))

        return sorted(pool, key=overlap, reverse=True)[:k]

    def bind(self, loaded: Any) -> None:
        """Keep the policy model (an :class:`apportion.host.LoadedModel`) for the prompt
        strategy that picks seeding exemplars, which gets it through its own ``bind``."""
        self._loaded = loaded
        if self._seeder is not None:
            self._seeder.bind(loaded)

    def _icl_strategy(self) -> Any:
        """The prompt strategy named by ``seed_strategy``, built once per instance (and bound
        to this strategy's model, if it has one), or ``None`` for lexical selection."""
        if self._seeder is None:
            self._seeder = self._build_icl_strategy()
            if self._seeder is not None and self._loaded is not None:
                self._seeder.bind(self._loaded)
        return self._seeder

    def _build_icl_strategy(self) -> Any:
        name = self.config.seed_strategy
        if name is None:
            return None
        from apportion import get_registry

        registry = get_registry()
        if name == "auto":  # the icl package's embedding selection, when it is installed
            if (
                "knn" in registry.names("prompt-strategy")
                and registry.get("prompt-strategy", "knn").provider == "apportion-icl"
            ):
                return registry.create("prompt-strategy", "knn", {"k": self.config.seed_exemplars})
            return None
        return registry.create("prompt-strategy", name)

    def seed_prompt(
        self,
        query: str,
        pool: Sequence[Exemplar],
        *,
        tokenizer: Any = None,
        budget: int | None = None,
    ) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """Chat messages: solved exemplars as earlier user/assistant turns, then the query;
        and how they were chosen.

        ``pool``: solved problems (e.g. prompts of this run whose groups held a correct
        rollout, with that rollout). With an icl prompt strategy (``seed_strategy``; ``auto``
        picks the icl package's ``knn`` embedding selection when installed) that strategy
        chooses the demos that fit ``budget`` tokens; otherwise the ``seed_exemplars`` most
        lexically similar are used. An empty pool returns the query alone.
        """
        k = self.config.seed_exemplars
        pool = [e for e in pool if e.question != query]
        if not pool or k == 0:
            return [{"role": "user", "content": query}], {"seeded": 0, "selector": None}
        strategy = self._icl_strategy()
        if strategy is not None:
            prompt = strategy.build(
                query, demos=[e.as_dict() for e in pool], budget=budget, tokenizer=tokenizer
            )
            return prompt.messages, {
                "seeded": prompt.accounting.get("demos_kept"),
                "selector": strategy.name,
            }
        chosen = self._select_lexical(query, pool, k)
        messages = [
            m
            for e in reversed(chosen)
            for m in (
                {"role": "user", "content": e.question},
                {"role": "assistant", "content": e.answer},
            )
        ]
        return messages + [{"role": "user", "content": query}], {
            "seeded": len(chosen),
            "selector": "lexical",
        }

    # ------------------------------------------------------------------ sharpening

    def sharpen(
        self, advantages: Sequence[Sequence[float]], seq_logps: Sequence[Sequence[float]]
    ) -> list[list[float]]:
        """Boost the positive advantages of unlikely correct responses (see the module doc).

        ``seq_logps``: per response, its mean token log-likelihood under the policy that drew
        it, grouped like ``advantages``. The boost is at most ``novelty_cap`` times the
        advantage; non-positive advantages are returned unchanged.
        """
        cfg = self.config
        out = []
        for adv, lp in zip(advantages, seq_logps, strict=True):
            if len(adv) != len(lp):
                raise ValueError(f"a group has {len(adv)} advantages but {len(lp)} log-likelihoods")
            good = [x for a, x in zip(adv, lp, strict=True) if a > 0 and math.isfinite(x)]
            if len(good) < 2:
                out.append(list(adv))
                continue
            mean = sum(good) / len(good)
            std = math.sqrt(sum((x - mean) ** 2 for x in good) / (len(good) - 1))
            row = []
            for a, x in zip(adv, lp, strict=True):
                if a > 0 and math.isfinite(x) and std > 0:
                    z = max(0.0, (mean - x) / std)
                    a = a * (1 + min(cfg.novelty_coef * z, cfg.novelty_cap))
                row.append(a)
            out.append(row)
        return out
