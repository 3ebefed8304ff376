"""``drag`` and ``iterdrag`` (Yue et al. 2025, "Inference Scaling for Long-Context
Retrieval Augmented Generation").

The context's paragraphs are the documents. **drag** retrieves the ``k`` best documents for
the query (BM25 or embeddings) and adds ``m`` demonstrations (nearest by embedding), then
the question. **iterdrag** decomposes: for up to ``n`` rounds the model either states the
final answer or asks a follow-up sub-question; each sub-question retrieves ``k`` more
documents and gets an intermediate answer; the final prompt holds every retrieved document
once, the chain of sub-questions and answers, and the question.

The best (k, m, n) for a token budget is predicted by :mod:`apportion_icl.allocation`
(``allocation = "PATH"``: the fitted model picks the configuration at build time).

Documents are the context's paragraphs, or its sentences (``chunk = "sentence"``). With the
embedding retriever, ``embed_window`` > 0 (or ``sitemb_weights``) embeds each document in its
window of neighbours (SitEmb, Wu et al. 2025; sentence windows stay within their paragraph;
:mod:`apportion_icl.situated`), for the query and every sub-query; the document alone is
what the prompt gets.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from apportion_icl import sentences as sent
from apportion_icl.demos import Demo
from apportion_icl.knn import KNN, KNNConfig
from apportion_icl.retrieve import Retriever
from apportion_icl.situated import SituatedOptions


class DRAGConfig(KNNConfig, SituatedOptions):
    k: int = Field(4, ge=0, le=64, description="documents retrieved (per round for iterdrag)")
    m: int = Field(2, ge=0, le=32, description="demonstrations")
    retriever: Literal["bm25", "embedding"] = "bm25"
    chunk: Literal["paragraph", "sentence"] = Field(
        "paragraph", description="the retrieval unit: the context's paragraphs or sentences"
    )
    allocation: str | None = Field(
        None, description="fitted allocation model (JSON): choose (k, m, n) from the budget"
    )

    @model_validator(mode="after")
    def _situated_needs_embeddings(self) -> DRAGConfig:
        if self.retriever != "embedding" and (self.embed_window or self.sitemb_weights):
            raise ValueError(
                "embed_window and sitemb_weights shape embedding retrieval: set "
                "retriever = 'embedding'"
            )
        return self


class IterDRAGConfig(DRAGConfig):
    n: int = Field(3, ge=1, le=8, description="maximum rounds (sub-queries + the final answer)")
    sub_tokens: int = Field(
        24, ge=4, le=128, description="new tokens per sub-question / intermediate answer"
    )


def _doc_block(docs: list[str]) -> str:
    return "\n".join(f"[{i + 1}] {d}" for i, d in enumerate(docs))


class DRAG(KNN):
    name = "drag"
    summary = "DRAG: k BM25/embedding-retrieved documents + m demonstrations"
    Config = DRAGConfig
    rounds = 1

    def _choose(self, budget: int | None) -> tuple[int, int, int]:
        k, m, n = self.config.k, self.config.m, getattr(self.config, "n", 1)
        if self.config.allocation and budget is not None:
            from apportion_icl.allocation import AllocationModel

            k, m, n = AllocationModel.load(self.config.allocation).best(
                budget, iterative=self.rounds > 1
            )
        return k, m, n

    def plan(self, query, context, pool, budget, tokens):
        k, m, n = self._choose(budget)
        groups = None
        if self.config.chunk == "sentence":
            units = sent.split(context) if context else []
            docs, groups = [u.text for u in units], [u.paragraph for u in units]
        else:
            docs = sent.paragraphs(context) if context else []
        situated = self.config.situated()
        retriever = Retriever(docs, self.config.retriever, situated, groups)
        hits = retriever.search(query, k)
        demos = [d for d, _, _ in self.rank(query, pool, m)]
        chain, used, sub_tokens = self.iterate(query, docs, retriever, hits, n, demos)
        picked = [docs[i] for i in used]
        block = _doc_block(picked)
        if chain:
            block += "\n\n" + "\n".join(chain)
        acc = {
            "k": k,
            "m": m,
            "n": n,
            "retriever": self.config.retriever,
            "documents_total": len(docs),
            "documents_kept": used,
            "rounds": chain,
            "iteration_prompt_tokens": sub_tokens,
            "reason": "top-k retrieval per (sub-)query",
        }
        if self.config.chunk != "paragraph":
            acc["chunk"] = self.config.chunk
        if situated.active:
            acc.update(situated.settings())
        return (block or None), demos, acc

    def iterate(
        self,
        query: str,
        docs: list[str],
        retriever: Retriever,
        hits: list[tuple[int, float]],
        n: int,
        demos: list[Demo],
    ) -> tuple[list[str], list[int], int]:
        """The chain of sub-questions and answers, the documents used, and the prompt tokens the
        intermediate model calls read (the paper's effective context length counts them)."""
        return [], [i for i, _ in hits], 0


_FINAL = re.compile(r"final answer is:?\s*(.+)", re.I)
_FOLLOW = re.compile(r"follow[- ]up:?\s*(.+?\?)", re.I | re.S)


class IterDRAG(DRAG):
    name = "iterdrag"
    summary = "IterDRAG: sub-query decomposition with retrieval over up to n rounds"
    Config = IterDRAGConfig
    rounds = 2

    def iterate(self, query, docs, retriever, hits, n, demos):
        from apportion_icl.runtime import generate
        from apportion_icl.strategy import Tokens

        tokens = Tokens(self.llm.tokenizer)
        used = [i for i, _ in hits]
        chain: list[str] = []
        spent = 0
        for _ in range(n - 1):
            ask = [
                {
                    "role": "user",
                    "content": (
                        f"Documents:\n{_doc_block([docs[i] for i in used])}\n\n"
                        + "\n".join(chain)
                        + f"\nQuestion: {query}\nIf the documents answer the question, "
                        "reply 'So the final answer is: <answer>'. "
                        "Otherwise reply 'Follow up: <one simpler question>'."
                    ),
                }
            ]
            reply = generate(self.llm, [ask], self.config.sub_tokens)[0]
            spent += tokens.messages(ask)
            follow = _FOLLOW.search(reply)
            if _FINAL.search(reply) or not follow:
                break
            sub = follow.group(1).strip()
            new = retriever.search(sub, self.config.k, exclude=set(used))
            used += [i for i, _ in new]
            found = [docs[i] for i, _ in new] or [docs[i] for i in used]
            answer_prompt = [
                {
                    "role": "user",
                    "content": f"Documents:\n{_doc_block(found)}\n\n{sub} Answer briefly.",
                }
            ]
            answer = generate(self.llm, [answer_prompt], self.config.sub_tokens)[0]
            spent += tokens.messages(answer_prompt)
            chain += [f"Follow up: {sub}", f"Intermediate answer: {answer}"]
        return chain, used, spent
