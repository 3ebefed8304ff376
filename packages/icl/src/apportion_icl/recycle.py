"""``recycle``: context recycling. Instead of demonstrations from elsewhere, the model writes
question-answer demonstrations from paragraphs of the *same* long context (the ones most
related to the query, by embedding), each citing its paragraph id. The context is numbered
and appears once; the demos follow it, then the question (with the instruction to cite).
A generated pair whose answer is not supported by its paragraph is discarded (and counted).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field

from apportion_icl import sentences as sent
from apportion_icl.strategy import ICLStrategy, StrategyConfig
from apportion_icl.verifiers import grounded

_QA = re.compile(r"question:\s*(.+?)\s*answer:\s*(.+)", re.I | re.S)


class RecycleConfig(StrategyConfig):
    n_demos: int = Field(2, ge=0, le=16, description="demonstrations to generate")
    candidates: int = Field(3, ge=1, le=32, description="paragraphs to try (most related first)")
    gen_tokens: int = Field(40, ge=8, le=256)
    skip_most_relevant: bool = Field(
        True, description="don't quiz the paragraph that likely holds the answer"
    )


class Recycle(ICLStrategy):
    name = "recycle"
    summary = (
        "context recycling: the model writes QA demos from the context's own paragraphs (cited)"
    )
    Config = RecycleConfig
    uses_demos = False

    def plan(self, query, context, pool, budget, tokens):
        if not context:
            return context, [], {"recycled": []}
        from apportion.host.embed import SentenceEmbedder

        from apportion_icl.runtime import generate

        paras = sent.paragraphs(context)
        if len(paras) == 1:
            paras = [s.text for s in sent.split(context)]  # one paragraph: its sentences
        vecs = SentenceEmbedder.shared().encode([query] + paras)
        order = sorted(range(len(paras)), key=lambda i: -float(vecs[i + 1] @ vecs[0]))
        if self.config.skip_most_relevant and len(order) > 1:
            order = order[1:]
        tried = order[: max(self.config.candidates, self.config.n_demos)]
        asks = [
            [
                {
                    "role": "user",
                    "content": (
                        f"Paragraph: {paras[i]}\n\nWrite one short question about this "
                        "paragraph and its answer, in the form:\nQuestion: ...\nAnswer: ..."
                    ),
                }
            ]
            for i in tried
        ]
        replies = (
            generate(self.llm, asks, self.config.gen_tokens)
            if tried and self.config.n_demos
            else []
        )
        demos, rejected = [], []
        for i, reply in zip(tried, replies, strict=False):
            m = _QA.search(reply)
            if not m:
                rejected.append({"paragraph": i + 1, "why": "not in Question/Answer form"})
                continue
            q, a = m.group(1).strip(), m.group(2).strip().split("\n")[0]
            ok, why = grounded(q, a, paras[i])
            if not ok:
                rejected.append({"paragraph": i + 1, "why": why})
                continue
            demos.append({"question": q, "answer": a, "paragraph": i + 1})
            if len(demos) >= self.config.n_demos:
                break
        numbered = "\n".join(f"[P{i + 1}] {p}" for i, p in enumerate(paras))
        block = numbered
        if demos:
            block += "\n\nExamples of questions about this text:\n" + "\n".join(
                f"Q: {d['question']}\nA: {d['answer']} [P{d['paragraph']}]" for d in demos
            )
            block += "\n\nAnswer the next question the same way, citing the paragraph."
        acc: dict[str, Any] = {
            "recycled": demos,
            "rejected": rejected,
            "paragraphs": len(paras),
            "reason": "QA demonstrations generated from the context's own paragraphs",
        }
        return block, [], acc
