"""``structurize``: restructure the context into a hierarchy before answering (in the spirit
of StructRAG / "structure then answer"). Sentences are grouped by meaning (agglomerative
clustering of their embeddings, merging while the closest pair of groups is more similar
than ``merge_threshold``), each group becomes a titled section (title: its most distinctive
words, or a title written by the model), and sections are ordered by relevance to the query,
so the model reads an outline instead of a flat text. Sections that don't fit the budget
are dropped, least relevant first (and accounted)."""

from __future__ import annotations

from collections import Counter
from typing import Literal

from pydantic import Field

from apportion_icl import sentences as sent
from apportion_icl.retrieve import words
from apportion_icl.strategy import ICLStrategy, StrategyConfig


class StructurizeConfig(StrategyConfig):
    merge_threshold: float = Field(
        0.35, ge=-1.0, le=1.0, description="stop merging below this similarity"
    )
    max_sections: int = Field(12, ge=1, le=100)
    titles: Literal["keywords", "model"] = "keywords"


def cluster(vecs, threshold: float, max_groups: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering over unit vectors."""
    groups = [[i] for i in range(vecs.shape[0])]
    sims = vecs @ vecs.T
    while len(groups) > 1:
        best, pair = -2.0, (0, 1)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                s = float(sims[groups[a]][:, groups[b]].mean())
                if s > best:
                    best, pair = s, (a, b)
        if best < threshold and len(groups) <= max_groups:
            break
        a, b = pair
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return groups


class Structurize(ICLStrategy):
    name = "structurize"
    summary = (
        "restructures the context into titled sections of related sentences before the question"
    )
    Config = StructurizeConfig
    uses_demos = False

    def plan(self, query, context, pool, budget, tokens):
        if not context:
            return context, [], {"sections": []}
        from apportion.host.embed import SentenceEmbedder

        from apportion_icl.runtime import generate

        sentences = sent.split(context)
        vecs = SentenceEmbedder.shared().encode([query] + [s.text for s in sentences])
        groups = cluster(vecs[1:], self.config.merge_threshold, self.config.max_sections)
        rel = [float((vecs[1:][g] @ vecs[0]).max()) for g in groups]
        order = sorted(range(len(groups)), key=lambda i: -rel[i])
        df = Counter(w for g in groups for w in {w for i in g for w in words(sentences[i].text)})
        titles = []
        for g in groups:
            tf = Counter(w for i in g for w in words(sentences[i].text) if not w.isdigit())
            top = sorted(tf, key=lambda w: (-tf[w] / df[w], -tf[w], w))[:3]
            titles.append(", ".join(top) or "misc")
        if self.config.titles == "model":
            asks = [
                [
                    {
                        "role": "user",
                        "content": "Give a title of at most five words for this text:\n"
                        + " ".join(sentences[i].text for i in g),
                    }
                ]
                for g in groups
            ]
            titles = [
                t.strip().strip('"').split("\n")[0][:60] or k
                for t, k in zip(generate(self.llm, asks, 12), titles, strict=True)
            ]
        sections = [(titles[i], [sentences[j].text for j in groups[i]], rel[i]) for i in order]

        def render(secs):
            return "\n\n".join(
                f"## {n}. {t}\n" + "\n".join(f"- {s}" for s in body)
                for n, (t, body, _) in enumerate(secs, 1)
            )

        dropped = []
        if budget is not None:
            while (
                len(sections) > 1
                and tokens.messages(
                    [{"role": "user", "content": render(sections) + "\n\n" + query}]
                )
                > budget
            ):
                dropped.append(sections.pop()[0])
        acc = {
            "sections": [
                {"title": t, "sentences": len(b), "relevance": round(r, 4)} for t, b, r in sections
            ],
            "sections_dropped_for_budget": dropped,
            "sentences_total": len(sentences),
        }
        return (
            "# Outline of the text (most relevant sections first)\n\n" + render(sections),
            [],
            acc,
        )
