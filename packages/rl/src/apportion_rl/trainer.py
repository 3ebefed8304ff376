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
3. ``dapo`` (dynamic sampling) then drops the groups whose rewards are all equal and samples
   new prompts of the training set in their place until the batch holds as many informative
   groups as it has prompts, within ``max_refill_rounds`` rounds
   (:meth:`~apportion_rl.dapo.DAPO.fill_batch`; one :class:`~apportion_rl.dapo.RefillReport`
   per step in ``self.refill_reports``); groups it could not replace stay in the batch masked
   out of the loss;
4. the advantages are recomputed per actual group by the strategy (``xrpo`` also sharpens
   them with each completion's likelihood);
5. the loss: for a strategy with a TRL counterpart (:meth:`~apportion_rl.grpo.GRPO.trl_args`:
   ``grpo``, ``dr-grpo``, ``dapo``, ``gspo``, and ``xrpo``, whose loss is GRPO's), TRL's own
   loss, the strategy's options (``loss_type``, ``epsilon``, ``epsilon_high``,
   ``importance_sampling_level``, ``beta``, ``scale_rewards``) replacing those of ``args``;
   otherwise the strategy's :meth:`loss`.

Reward functions are guarded (:mod:`apportion_rl.rewards`): one that raises, returns NaN or
returns the wrong number of rewards stops the run with a
:class:`~apportion_rl.errors.RewardFunctionError` naming it (``on_reward_error="raise"``, the
default), or has the affected rewards treated as unscorable, the incident recorded in
``self.reward_issues`` and counted in the ``apportion/reward_issues`` metric
(``on_reward_error="skip"``).

Limits: one process (no multi-GPU gathering of variable groups), the transformers or vLLM
generation backends (not ``rollout_func``/tools/environments), text-only prompts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from collections import deque
from typing import Any

import torch
from apportion.base import TrainerStrategy
from apportion.errors import ApportionError, ConfigError
from trl import GRPOTrainer

from apportion_rl.dapo import RefillReport
from apportion_rl.grpo import GRPO, is_valid_reward
from apportion_rl.rewards import OnRewardError, RewardIssue, guard_reward_function

logger = logging.getLogger(__name__)


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


def _with_trl_preset(args: Any, model: Any, preset: dict[str, Any], strategy: str) -> Any:
    """A copy of ``args`` (a ``trl.GRPOConfig``; TRL's default one when None) with the
    strategy's TRL options. A value the user set away from TRL's default and that the
    strategy replaces is logged."""
    from trl import GRPOConfig

    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
        args = GRPOConfig(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-GRPO")
    args = copy.copy(args)
    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    for key, value in preset.items():
        have = getattr(args, key)
        if have != value and have != defaults.get(key):
            logger.warning("strategy %r sets %s=%r (args had %r)", strategy, key, value, have)
        setattr(args, key, value)
    return args


class StrategyGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` driven by an apportion trainer strategy (see the module doc).

    ``strategy``: a registered ``trainer-strategy`` name or an instance;
    ``strategy_options``: its options when given by name; ``on_reward_error``: ``"raise"`` or
    ``"skip"`` (see the module doc). ``self.allocations`` records, per generation round, the
    group size of each prompt; ``self.refill_reports`` dynamic sampling's counts per round;
    ``self.rollouts_drawn`` every rollout generated for training, refills included;
    ``self.reward_issues`` the reward functions' incidents; ``self.strategy.stats`` counts
    excluded rewards, groups of one, dropped and refilled groups.
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        *args: Any,
        strategy: str | TrainerStrategy = "grpo",
        strategy_options: dict[str, Any] | None = None,
        on_reward_error: OnRewardError = "raise",
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
        if on_reward_error not in ("raise", "skip"):
            raise ConfigError(f"on_reward_error must be 'raise' or 'skip', got {on_reward_error!r}")
        self.strategy = strategy
        self.allocations: list[list[int]] = []
        self.refill_reports: list[RefillReport] = []
        self.rollouts_drawn = 0
        self.reward_issues: list[RewardIssue] = []
        self.exemplars: deque[Any] = deque(maxlen=256)
        self._cached: dict[str, Any] | None = None
        self._refill_order: list[int] = []
        self._refill_epoch = 0
        self.last_round: dict[str, Any] = {}  # rewards, advantages, kept groups of the last round
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        funcs = [
            guard_reward_function(f, on_reward_error, self.reward_issues)
            if callable(f) and not isinstance(f, (str, torch.nn.Module))
            else f
            for f in funcs
        ]
        reward_funcs = funcs if isinstance(reward_funcs, list) else funcs[0]
        trl_args = getattr(strategy, "trl_args", None)
        self._trl_preset = trl_args() if callable(trl_args) else None
        if self._trl_preset:  # GRPOConfig comes third positionally, as in GRPOTrainer, or by name
            name = getattr(strategy, "name", "?")
            if "args" in kwargs or not args:
                kwargs["args"] = _with_trl_preset(kwargs.get("args"), model, self._trl_preset, name)
            else:
                args = (_with_trl_preset(args[0], model, self._trl_preset, name), *args[1:])
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
        if beta and not self.beta:  # only for a strategy without TRL options
            raise ConfigError(
                f"the strategy's KL weight beta={beta} needs reference log-probs: "
                "set GRPOConfig(beta=...) non-zero as well"
            )
        if self._refills() and not hasattr(self.train_dataset, "__getitem__"):
            raise ConfigError(
                "dapo's refill draws prompts by index from train_dataset, which cannot be "
                f"indexed ({type(self.train_dataset).__name__}); use a datasets.Dataset or "
                "set max_refill_rounds=0"
            )

    def _refills(self) -> bool:
        cfg = self.strategy.config
        return (
            hasattr(self.strategy, "fill_batch")
            and bool(getattr(cfg, "dynamic_sampling", False))
            and getattr(cfg, "max_refill_rounds", 0) > 0
        )

    def _refill_rows(self, n: int) -> list[dict[str, Any]]:
        """``n`` training rows for refilling, in a seeded shuffled order of the training set
        that starts over (reshuffled) when it runs out."""
        rows = []
        for _ in range(n):
            if not self._refill_order:
                order = list(range(len(self.train_dataset)))
                random.Random(self.args.seed * 1_000_003 + self._refill_epoch).shuffle(order)
                self._refill_order = order
                self._refill_epoch += 1
            rows.append(dict(self.train_dataset[self._refill_order.pop()]))
        return rows

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
        unique = list(inputs[::g])  # TRL's RepeatSampler repeats each prompt g times in a row
        n_prompts, budget = len(unique), len(inputs)
        strategy = self.strategy
        parts: list[tuple[list[dict], tuple, torch.Tensor]] = []
        threshold = getattr(strategy.config, "success_threshold", 0.5)
        issues_before = len(self.reward_issues)

        def generate(prompt_ids: list[int], counts: list[int]) -> list[list[tuple[Any, int]]]:
            """Draw ``counts[k]`` rollouts of ``unique[prompt_ids[k]]``; per prompt, a list of
            (reward, index of the rollout among all generated this round)."""
            all_failed = getattr(strategy, "all_failed", lambda _: False)
            rows, owner = [], []
            for k, (i, c) in enumerate(zip(prompt_ids, counts, strict=True)):
                history = [r for r, _ in groups_so_far[i]]
                row = self._seed(dict(unique[i])) if history and all_failed(history) else unique[i]
                rows.extend([dict(row)] * c)
                owner.extend([k] * c)
            out: list[list[tuple[float | None, int]]] = [[] for _ in prompt_ids]
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
            for j, (k, r) in enumerate(zip(owner, rewards, strict=True)):
                out[k].append((r, base + j))
                if is_valid_reward(r) and r > threshold:
                    from apportion_rl.xrpo import Exemplar

                    self.exemplars.append(
                        Exemplar(
                            _question(unique[prompt_ids[k]]["prompt"]),
                            self.processing_class.decode(generated[1][j], skip_special_tokens=True),
                        )
                    )
            for k, got in enumerate(out):
                groups_so_far[prompt_ids[k]].extend(got)
            return out

        def sample(counts: list[int]) -> list[list[tuple[Any, int]]]:
            return generate(list(range(n_prompts)), counts)

        groups_so_far: list[list[tuple[float | None, int]]] = [[] for _ in range(n_prompts)]
        if isinstance(strategy, GRPO):
            groups = strategy.collect(n_prompts, budget, sample)
        else:  # a plain TrainerStrategy: one uniform round
            groups = sample(strategy.allocate_rollouts(n_prompts, budget))
        keep: list[bool] | None = None
        if mode == "train" and self._refills():
            sizes = {len(gr) for gr in groups}

            def draw(n: int) -> list[list[tuple[Any, int]]]:
                start = len(unique)
                unique.extend(self._refill_rows(n))
                groups_so_far.extend([] for _ in range(n))
                return generate(list(range(start, start + n)), [max(sizes)] * n)

            groups, keep, report = strategy.fill_batch(groups, draw)
            self.refill_reports.append(report)
            for key in ("drawn", "dropped", "refilled", "retries", "informative"):
                self._metrics[mode][f"apportion/refill_{key}"].append(float(getattr(report, key)))
            self._metrics[mode]["apportion/refill_reached"].append(float(report.reached))
        order = [idx for g in groups for _, idx in g]
        if len(order) != budget:
            raise ApportionError(
                f"the strategy spent {len(order)} rollouts of a budget of {budget}; "
                "TRL needs the whole generation batch (raise max_rollouts_per_prompt)"
            )
        self.allocations.append([len(gr) for gr in groups])
        if mode == "train":
            self.rollouts_drawn += sum(len(p[0]) for p in parts)
        self._metrics[mode]["apportion/reward_issues"].append(
            float(len(self.reward_issues) - issues_before)
        )

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
        if keep is None and hasattr(strategy, "keep_groups"):
            keep = strategy.keep_groups(rewards)
        self.last_round = {"rewards": rewards, "advantages": adv, "kept": [True] * len(groups)}
        if keep is not None:
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
        if self._trl_preset:  # the strategy is a preset of TRL's loss: TRL computes it
            return super()._compute_loss(model, inputs)
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
