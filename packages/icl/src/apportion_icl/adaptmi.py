"""``adaptmi`` / ``adaptmi-plus`` (AdaptMI, 2025: adaptive skill-based in-context math
instructions for small models). Small models are *hurt* by demonstrations on questions they
already answer; so the model first answers zero-shot, and only a query judged difficult (its
answer's confidence below ``threshold``, or rejected by the verifier) gets skill-based
demonstrations. The query's skills are those of its nearest pool demonstrations.

``adaptmi``: demos covering each of the query's skills. ``adaptmi-plus``: demos for the
skills *missing from the first answer* only: a skill counts as shown when the answer is
closer to that skill's demonstrated outputs than to the other skills' outputs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from pydantic import Field

from apportion_icl.demos import Demo, chat
from apportion_icl.knn import KNN, KNNConfig


class AdaptMIConfig(KNNConfig):
    k: int = Field(2, ge=0, le=32, description="demonstrations for a difficult query")
    judge: Literal["confidence", "verifier"] = "confidence"
    threshold: float = Field(0.6, ge=0.0, le=1.0, description="confidence below this = difficult")
    verifier: str = Field("options", description="verifier for judge='verifier' (see verifiers.py)")
    neighbors: int = Field(
        5, ge=1, le=50, description="pool neighbours voting on the query's skills"
    )
    first_tokens: int = Field(16, ge=1, le=128)


class AdaptMI(KNN):
    name = "adaptmi"
    summary = (
        "AdaptMI: skill-based demos only for queries the model is unsure of "
        "(confidence or verifier)"
    )
    Config = AdaptMIConfig
    plus = False

    def skills(self, query: str, pool: list[Demo]) -> list[str]:
        votes: Counter[str] = Counter()
        for d, sim, _ in self.rank(query, pool, self.config.neighbors):
            for s in d.skills:
                votes[s] += max(sim, 0.0)
        return [s for s, _ in votes.most_common()]

    def missing(self, answer: str, wanted: list[str], pool: list[Demo]) -> list[str]:
        from apportion.host.embed import SentenceEmbedder

        by_skill = {
            s: [d.output for d in pool if s in d.skills]
            for s in {s for d in pool for s in d.skills}
        }
        if not answer or len(by_skill) < 2:
            return wanted
        emb = SentenceEmbedder.shared()
        a = emb.encode([answer])[0]
        sims = {s: float((emb.encode(outs) @ a).max()) for s, outs in by_skill.items() if outs}
        shown = max(sims, key=sims.__getitem__)
        return [s for s in wanted if s != shown] or []

    def plan(self, query, context, pool, budget, tokens):
        from apportion_icl.confidence import first_answer
        from apportion_icl.verifiers import resolve

        if not pool:
            return context, [], {"difficult": None, "reason": "empty pool: zero-shot"}
        answer, conf = first_answer(self.llm, chat(query, context), self.config.first_tokens)
        if self.config.judge == "verifier":
            ok, why = resolve(self.config.verifier)(query, answer, context)
            difficult = not ok
        else:
            difficult, why = (
                conf < self.config.threshold,
                f"confidence {conf:.3f} vs threshold {self.config.threshold}",
            )
        acc: dict[str, Any] = {
            "first_answer": answer,
            "confidence": round(conf, 4),
            "difficult": difficult,
            "judge": self.config.judge,
            "judgement": why,
        }
        if not difficult:
            return context, [], {**acc, "reason": "easy: no demonstrations"}
        skills = self.skills(query, pool)
        target = self.missing(answer, skills, pool) if self.plus else skills
        acc.update({"query_skills": skills, "target_skills": target})
        chosen: list[Demo] = []
        for s in target or skills:
            have = [d for d in pool if s in d.skills and d not in chosen]
            per = max(1, self.config.k // max(len(target or skills), 1))
            chosen += [d for d, _, _ in self.rank(query, have, per)]
            if len(chosen) >= self.config.k:
                break
        chosen = chosen[: self.config.k]
        acc["reason"] = "difficult: skill-based demonstrations" + (
            " for missing skills" if self.plus else ""
        )
        acc["selection"] = {d.id: list(d.skills) for d in chosen}
        return context, chosen, acc


class AdaptMIPlus(AdaptMI):
    name = "adaptmi-plus"
    summary = "AdaptMI+: demos targeting the skills missing from the model's first answer"
    plus = True
