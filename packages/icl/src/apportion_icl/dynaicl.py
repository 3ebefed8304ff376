"""``dynaicl``: DynaICL (Zhou et al. 2023). A trained meta-controller predicts how many
demonstrations each query needs; the demos themselves are the nearest ones (as ``knn``).

Per query (``build``): the smallest k on the controller's ladder whose predicted accuracy
is within ``tolerance`` of the best predicted one. Across a batch (``build_batch``): every
query starts at its cheapest level and the upgrade with the highest predicted accuracy gain
per token is taken while the total budget allows, never beyond a query's own choice.

Without a controller artifact this raises an error telling how to train one
(``apportion icl train-controller``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from apportion.base import Prompt
from pydantic import Field

from apportion_icl.demos import Demo, as_demos, chat
from apportion_icl.errors import BudgetError
from apportion_icl.knn import KNN, KNNConfig
from apportion_icl.strategy import Tokens


class DynaICLConfig(KNNConfig):
    controller: str | None = Field(
        None, description="controller JSON path (default: the user cache)"
    )
    tolerance: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="accept a k whose predicted accuracy is this close to the best",
    )
    k: int = Field(
        8,
        ge=0,
        le=64,
        description="upper bound on demonstrations (the ladder's top is used if lower)",
    )
    mmr_lambda: float = 1.0


@lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> Any:
    from apportion_icl.controller import Controller

    return Controller.load(path)


def load_controller(path: str | None) -> Any:
    from pathlib import Path

    from apportion_icl.controller import Controller, _paths, default_path

    meta, _ = _paths(path or default_path())
    if not Path(meta).is_file():
        return Controller.load(meta)  # raises ControllerMissingError with the training hint
    return _load(str(meta), Path(meta).stat().st_mtime)


class DynaICL(KNN):
    name = "dynaicl"
    summary = (
        "DynaICL: a trained controller predicts how many demos each query needs; batch token budget"
    )
    Config = DynaICLConfig

    def predict(self, queries: Sequence[str]) -> tuple[Any, list[int]]:
        """Predicted accuracy per (query, k) and the controller's ladder (capped at ``k``)."""
        from apportion.host.embed import SentenceEmbedder

        ctl = load_controller(self.config.controller)
        probs = ctl.predict(SentenceEmbedder.shared().encode(list(queries)))
        ladder = [k for k in ctl.k_values if k <= self.config.k] or [ctl.k_values[0]]
        return probs[:, : len(ladder)], ladder

    def _need(self, probs: Sequence[float]) -> int:
        best = max(probs)
        return next(i for i, p in enumerate(probs) if p >= best - self.config.tolerance)

    def plan(self, query, context, pool, budget, tokens):
        if not pool:
            return context, [], {"k_chosen": 0, "reason": "empty pool"}
        probs, ladder = self.predict([query])
        row = [float(p) for p in probs[0]]
        level = self._need(row)
        k = ladder[level]
        ranked = self.rank(query, pool, k)
        acc = {
            "k_chosen": k,
            "k_ladder": ladder,
            "predicted_accuracy": dict(
                zip(map(str, ladder), (round(p, 4) for p in row), strict=True)
            ),
            "reason": f"smallest k within {self.config.tolerance} of the best predicted accuracy",
            "selection": {
                d.id: {"similarity": round(s, 4), "rank": r} for r, (d, s, _) in enumerate(ranked)
            },
        }
        return context, [d for d, _, _ in ranked], acc

    def build_batch(
        self,
        queries: Sequence[str],
        *,
        contexts: Sequence[str | None] | None = None,
        demos: Sequence[Any] = (),
        total_budget: int | None = None,
        tokenizer: Any = None,
    ) -> list[Prompt]:
        """Prompts for a batch whose prompt tokens sum to at most ``total_budget``."""
        contexts = list(contexts) if contexts is not None else [None] * len(queries)
        if len(contexts) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(contexts)} contexts")
        pool = as_demos(demos)
        if not pool or total_budget is None:
            return [
                self.build(q, context=c, demos=pool, tokenizer=tokenizer)
                for q, c in zip(queries, contexts, strict=True)
            ]
        tokens = Tokens(tokenizer)
        probs, ladder = self.predict(queries)
        levels_cost: list[list[int]] = []
        ranked_all: list[list[Demo]] = []
        for q, c in zip(queries, contexts, strict=True):
            ranked = [d for d, _, _ in self.rank(q, pool, ladder[-1])]
            ranked_all.append(ranked)
            levels_cost.append([tokens.messages(chat(q, c, ranked[:k])) for k in ladder])
        base = sum(cost[0] for cost in levels_cost)
        if base > total_budget:
            raise BudgetError(
                f"the batch budget of {total_budget} tokens is smaller than its "
                f"{len(queries)} prompts at {ladder[0]} demos ({base} tokens)"
            )
        target = [self._need([float(p) for p in row]) for row in probs]
        level = [0] * len(queries)
        spent = base
        while True:
            best, best_i = 0.0, -1
            for i, row in enumerate(probs):
                if level[i] >= target[i]:
                    continue
                extra = levels_cost[i][level[i] + 1] - levels_cost[i][level[i]]
                gain = float(row[level[i] + 1] - row[level[i]]) + 1e-6  # ties: cheapest first
                if spent + extra <= total_budget and gain / max(extra, 1) > best:
                    best, best_i = gain / max(extra, 1), i
            if best_i < 0:
                break
            i = best_i
            spent += levels_cost[i][level[i] + 1] - levels_cost[i][level[i]]
            level[i] += 1
        out = []
        for i, (q, c) in enumerate(zip(queries, contexts, strict=True)):
            k = ladder[level[i]]
            acc = {
                "k_chosen": k,
                "k_wanted": ladder[target[i]],
                "batch_budget": total_budget,
                "batch_tokens": spent,
                "predicted_accuracy": dict(
                    zip(map(str, ladder), (round(float(p), 4) for p in probs[i]), strict=True)
                ),
                "reason": (
                    "batch allocation: highest predicted gain per token under the total budget"
                ),
            }
            out.append(self.finish(q, c, ranked_all[i][:k], pool, None, tokens, acc))
        return out
