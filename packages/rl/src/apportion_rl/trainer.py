"""TRL integration: :class:`StrategyGRPOTrainer`, a ``trl.GRPOTrainer`` whose rollout
allocation, advantages and loss come from an apportion ``trainer-strategy``.

TRL draws every prompt ``num_generations`` times and normalises rewards over fixed groups of
that size. This trainer keeps TRL's batch shape (``generation_batch_size`` rollouts per
generation round) but lets the strategy decide how those rollouts are shared among the
round's prompts, so groups may differ in size::

    from trl import GRPOConfig
    from apportion_rl.trainer import StrategyGRPOTrainer
    from apportion_rl.tasks import arithmetic_problems, exact_match_reward

    trainer = StrategyGRPOTrainer(
        model, reward_funcs=exact_match_reward, args=GRPOConfig(num_generations=8, ...),
        train_dataset=Dataset.from_list([p.row() for p in arithmetic_problems(64)]),
        strategy="xrpo",                     # or "grpo", "dr-grpo", "dapo", "gspo", an instance
    )

Per generation round, with ``P`` distinct prompts and a budget of ``P * num_generations``:

1. :meth:`~apportion_rl.grpo.GRPO.collect` spends the budget: one round for uniform strategies,
   several phases for ``xrpo`` (each phase generated and scored before the next is allocated;
   all-failed prompts are re-asked with solved exemplars in front, when seeding is on);
2. TRL's own pipeline then runs on the collected rollouts (tokenisation, reference and old
   log-probs, metrics) with generation and scoring replaced by the cached results;
3. the advantages are recomputed per actual group by the strategy (``xrpo`` also sharpens
   them with each completion's likelihood; ``dapo`` masks its dropped groups out of the loss);
4. the loss is the strategy's :meth:`loss` (the KL term weighs ``strategy.config.beta``; TRL
   computes the reference log-probs when ``args.beta`` is non-zero).

Limits: one process (no multi-GPU gathering of variable groups), the transformers or vLLM
generation backends (not ``rollout_func``/tools/environments), text-only prompts.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from apportion.base import TrainerStrategy
from apportion.errors import ApportionError, ConfigError
from trl import GRPOTrainer

from apportion_rl.grpo import GRPO, is_valid_reward


class MissingRewardFunctionError(ConfigError):
    """A trainer or rollout loop was given no reward function."""


def _question(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return str(prompt[-1]["content"])


def _with_messages(prompt: Any, messages: list[dict[str, str]]) -> Any:
    """``prompt`` with its last user turn replaced by ``messages`` (demo turns + the query)."""
    if isinstance(prompt, str):
        return "\n\n".join(m["content"] for m in messages)
    return [*prompt[:-1], *messages]


class StrategyGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` driven by an apportion trainer strategy (see the module doc).

    ``strategy``: a registered ``trainer-strategy`` name or an instance;
    ``strategy_options``: its options when given by name. ``self.allocations`` records, per
    generation round, the group size of each prompt; ``self.strategy.stats`` counts excluded
    rewards, groups of one and dropped groups.
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        *args: Any,
        strategy: str | TrainerStrategy = "grpo",
        strategy_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if reward_funcs is None or (isinstance(reward_funcs, list) and not reward_funcs):
            raise MissingRewardFunctionError(
                "StrategyGRPOTrainer needs reward_funcs: a callable (prompts, completions, "
                "**columns) -> list[float | None], a list of them, or a reward model id; "
                "none was given"
            )
        if isinstance(strategy, str):
            from apportion import get_registry

            strategy = get_registry().create("trainer-strategy", strategy, strategy_options)
        elif strategy_options:
            raise ConfigError("strategy_options are only used when the strategy is given by name")
        if not isinstance(strategy, TrainerStrategy):
            raise ConfigError(f"strategy must be a TrainerStrategy, got {type(strategy).__name__}")
        self.strategy = strategy
        self.allocations: list[list[int]] = []
        self.exemplars: deque[Any] = deque(maxlen=256)
        self._cached: dict[str, Any] | None = None
        self.last_round: dict[str, Any] = {}  # rewards, advantages, kept groups of the last round
        super().__init__(model, reward_funcs, *args, **kwargs)
        if self.accelerator.num_processes != 1:
            raise ApportionError(
                "StrategyGRPOTrainer runs in one process (variable groups are "
                f"not gathered across ranks); got {self.accelerator.num_processes}"
            )
        if self.rollout_func is not None or self.tools or self.environment_factories is not None:
            raise ConfigError(
                "StrategyGRPOTrainer does not combine with rollout_func, tools or environments"
            )
        beta = getattr(strategy.config, "beta", 0.0)
        if beta and not self.beta:
            raise ConfigError(
                f"the strategy's KL weight beta={beta} needs reference log-probs: "
                "set GRPOConfig(beta=...) non-zero as well"
            )

    # ------------------------------------------------------------------ generation

    def _generate(self, prompts: list) -> Any:
        if self._cached is not None:
            return self._cached["generated"]
        return super()._generate(prompts)

    def _calculate_rewards(
        self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any
    ) -> Any:
        if self._cached is not None:
            return self._cached["rewards_per_func"]
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _total_reward(self, rewards_per_func: torch.Tensor) -> list[float | None]:
        w = self.reward_weights.to(rewards_per_func.device)
        total = (rewards_per_func * w.unsqueeze(0)).nansum(dim=1)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        return [
            None if bad else float(t)
            for t, bad in zip(total.tolist(), unscorable.tolist(), strict=True)
        ]

    def _seed(self, row: dict[str, Any]) -> dict[str, Any]:
        seed_prompt = getattr(self.strategy, "seed_prompt", None)
        if seed_prompt is None or not self.exemplars:
            return row
        messages, _ = seed_prompt(
            _question(row["prompt"]), list(self.exemplars), tokenizer=self._tokenizer
        )
        return {**row, "prompt": _with_messages(row["prompt"], messages)}

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        mode = "train" if self.model.training else "eval"
        g = self.num_generations if mode == "train" else self.num_generations_eval
        if len(inputs) % g:
            raise ApportionError(
                f"a generation batch of {len(inputs)} rows is not a whole number "
                f"of groups of num_generations={g}"
            )
        unique = inputs[::g]  # TRL's RepeatSampler repeats each prompt g times in a row
        n_prompts, budget = len(unique), len(inputs)
        strategy = self.strategy
        parts: list[tuple[list[dict], tuple, torch.Tensor]] = []
        threshold = getattr(strategy.config, "success_threshold", 0.5)

        def sample(counts: list[int]) -> list[list[tuple[float | None, int]]]:
            history = [[r for r, _ in h] for h in groups_so_far]
            rows, owner = [], []
            for i, c in enumerate(counts):
                failed = bool(history[i]) and getattr(strategy, "all_failed", lambda _: False)(
                    history[i]
                )
                row = self._seed(dict(unique[i])) if failed else dict(unique[i])
                rows.extend([row] * c)
                owner.extend([i] * c)
            out: list[list[tuple[float | None, int]]] = [[] for _ in counts]
            if not rows:
                return out
            prompts = [r["prompt"] for r in rows]
            generated = super(StrategyGRPOTrainer, self)._generate(prompts)
            completions = generated[3]
            rpf = super(StrategyGRPOTrainer, self)._calculate_rewards(
                rows, prompts, completions, generated[1]
            )
            rewards = self._total_reward(rpf)
            base = sum(len(p[0]) for p in parts)
            parts.append((rows, generated, rpf))
            for k, (i, r) in enumerate(zip(owner, rewards, strict=True)):
                out[i].append((r, base + k))
                if is_valid_reward(r) and r > threshold:
                    from apportion_rl.xrpo import Exemplar

                    self.exemplars.append(
                        Exemplar(
                            _question(unique[i]["prompt"]),
                            self.processing_class.decode(generated[1][k], skip_special_tokens=True),
                        )
                    )
            for i, got in enumerate(out):
                groups_so_far[i].extend(got)
            return out

        groups_so_far: list[list[tuple[float | None, int]]] = [[] for _ in range(n_prompts)]
        if isinstance(strategy, GRPO):
            groups = strategy.collect(n_prompts, budget, sample)
        else:  # a plain TrainerStrategy: one uniform round
            groups = sample(strategy.allocate_rollouts(n_prompts, budget))
        order = [idx for g in groups for _, idx in g]
        if len(order) != budget:
            raise ApportionError(
                f"the strategy spent {len(order)} rollouts of a budget of {budget}; "
                "TRL needs the whole generation batch (raise max_rollouts_per_prompt)"
            )
        self.allocations.append([len(gr) for gr in groups])

        rows = [r for p in parts for r in p[0]]
        generated = [self._concat([p[1][j] for p in parts]) for j in range(8)]
        rpf = torch.cat([p[2] for p in parts])
        generated = [self._take(x, order) for x in generated]
        rows = [rows[k] for k in order]
        self._cached = {"generated": tuple(generated), "rewards_per_func": rpf[order]}
        try:
            output = super()._generate_and_score_completions(rows)
        finally:
            self._cached = None

        rewards = [[r for r, _ in gr] for gr in groups]
        adv = strategy.advantages(rewards)
        if hasattr(strategy, "sharpen"):
            adv = strategy.sharpen(adv, self._grouped(self._mean_logps(output), groups))
        flat = torch.tensor(
            [a for gr in adv for a in gr], dtype=torch.float32, device=output["advantages"].device
        )
        output["advantages"] = flat
        self.last_round = {"rewards": rewards, "advantages": adv, "kept": [True] * len(groups)}
        if hasattr(strategy, "keep_groups"):
            keep = strategy.keep_groups(rewards)
            self.last_round["kept"] = keep
            rows_keep = torch.tensor(
                [k for k, gr in zip(keep, groups, strict=True) for _ in gr], device=flat.device
            )
            output["completion_mask"] = output["completion_mask"] * rows_keep.unsqueeze(1).int()
            mask = output["completion_mask"] * output.get("tool_mask", 1)
            output["num_items_in_batch"] = mask.sum()
            self._metrics[mode]["apportion/dropped_groups"].append(float(len(keep) - sum(keep)))
        informative = sum(len({r for r in gr if is_valid_reward(r)}) > 1 for gr in rewards)
        self._metrics[mode]["frac_reward_zero_std"][-1] = 1 - informative / len(groups)
        self._metrics[mode]["apportion/max_group"].append(float(max(len(gr) for gr in groups)))
        self._metrics[mode]["apportion/min_group"].append(float(min(len(gr) for gr in groups)))
        if isinstance(strategy, GRPO):
            self._metrics[mode]["apportion/excluded_rewards"].append(
                float(strategy.stats.excluded_rewards)
            )
        return output

    @staticmethod
    def _concat(values: list[Any]) -> Any:
        if all(v is None for v in values):
            return None
        if all(isinstance(v, dict) for v in values):
            keys = set().union(*values)
            return {k: [x for v in values for x in v.get(k, [])] for k in keys}
        return [x for v in values for x in (v or [])]

    @staticmethod
    def _take(value: Any, order: list[int]) -> Any:
        if value is None:
            return None
        if isinstance(value, dict):
            return {
                k: [v[i] for i in order] if isinstance(v, list) and len(v) >= len(order) else v
                for k, v in value.items()
            }
        if isinstance(value, list) and not value:
            return value
        return [value[i] for i in order]

    @staticmethod
    def _grouped(flat: list[float], groups: list[list[Any]]) -> list[list[float]]:
        out, k = [], 0
        for gr in groups:
            out.append(flat[k : k + len(gr)])
            k += len(gr)
        return out

    @torch.no_grad()
    def _mean_logps(self, output: dict[str, Any]) -> list[float]:
        """Each completion's mean token log-likelihood under the current policy."""
        mask = output["completion_mask"]
        logps = output.get("old_per_token_logps")
        if logps is None:
            ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            att = torch.cat([output["prompt_mask"], mask], dim=1)
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                ids,
                att,
                output["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
            )
        m = mask.to(logps.dtype)
        return ((logps * m).sum(-1) / m.sum(-1).clamp(min=1)).tolist()

    # ------------------------------------------------------------------------ loss

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = (
            completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        )
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1)
        )
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        loss = self.strategy.loss(
            logps, old, inputs["advantages"], mask, ref_logps=inputs.get("ref_per_token_logps")
        )
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["policy_loss"].append(loss.item())
        if mode == "train":
            loss = loss / self.current_gradient_accumulation_steps
        return loss
