"""The small datasets shipped with the package (see ``scripts/make_data.py`` for their origin:
written by the apportion authors from hand-made phrase lists; every entity is fictional).

``classification(split)`` yields :class:`Example` rows whose ``query`` lists the options;
``qa(split)`` yields single- and two-hop questions over fictional ``documents()``.
Splits: ``pool`` (demonstrations), ``train`` (controller / allocation-model fitting), ``test``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from apportion_icl.demos import Demo

SPLITS = ("pool", "train", "test", "all")


@dataclass(frozen=True)
class Example:
    id: str
    query: str
    answer: str
    task: str
    options: tuple[str, ...] = ()
    skills: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def as_demo(self) -> Demo:
        return Demo(
            self.query, self.answer, skills=self.skills, id=self.id, meta={"task": self.task}
        )


@cache
def _rows(name: str) -> tuple[dict[str, Any], ...]:
    text = (
        resources.files("apportion_icl")
        .joinpath("data", f"{name}.jsonl")
        .read_text(encoding="utf-8")
    )
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


CLASSIFY_TEMPLATE = {
    "sentiment": "Review: {text}\nIs this review positive or negative? Answer with one word.",
    "topic": (
        "Headline: {text}\nIs the topic sports, science, business or food? Answer with one word."
    ),
    "intent": (
        "Customer message: {text}\nIs the intent refund, shipping or account? Answer with one word."
    ),
}


def classification(split: str = "all") -> list[Example]:
    _check_split(split)
    out = []
    for r in _rows("classify"):
        if split != "all" and r["split"] != split:
            continue
        out.append(
            Example(
                r["id"],
                CLASSIFY_TEMPLATE[r["task"]].format(text=r["text"]),
                r["label"],
                r["task"],
                tuple(r["options"]),
                (r["task"],),
                {"text": r["text"]},
            )
        )
    return out


def documents() -> dict[str, dict[str, str]]:
    """id -> {"title", "text"} of the QA corpus (48 short documents)."""
    return {
        r["id"]: {"title": r["title"], "text": r["text"]} for r in _rows("qa") if r["type"] == "doc"
    }


def qa(split: str = "all", hop: int | None = None) -> list[Example]:
    _check_split(split)
    out = []
    for r in _rows("qa"):
        if r["type"] != "question" or (split != "all" and r["split"] != split):
            continue
        if hop is not None and r["hop"] != hop:
            continue
        meta = {
            "docs": r["docs"],
            "hop": r["hop"],
            "subquestions": r.get("subquestions", []),
            "bridge": r.get("bridge"),
        }
        out.append(
            Example(
                r["id"],
                r["question"],
                r["answer"],
                f"qa-hop{r['hop']}",
                (),
                tuple(r["skills"]),
                meta,
            )
        )
    return out


def qa_context(example: Example, n_distractors: int = 6, seed: int = 0) -> str:
    """The example's gold documents among ``n_distractors`` others, one paragraph each."""
    import random

    docs = documents()
    gold = list(example.meta["docs"])
    rng = random.Random(f"{seed}:{example.id}")
    others = rng.sample(sorted(set(docs) - set(gold)), min(n_distractors, len(docs) - len(gold)))
    chosen = gold + others
    rng.shuffle(chosen)
    return "\n\n".join(docs[d]["text"] for d in chosen)


_WORD = re.compile(r"[a-z0-9]+")


def normalize(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def score(example: Example, prediction: str) -> float:
    """1.0 if correct. Classification: the first option the prediction names is the label.
    QA: the normalized answer occurs in the normalized prediction."""
    pred = normalize(prediction)
    if example.options:
        hits = [
            (m.start(), o)
            for o in example.options
            for m in [re.search(rf"\b{re.escape(o)}\b", pred)]
            if m
        ]
        return float(bool(hits) and min(hits)[1] == example.answer)
    return float(normalize(example.answer) in pred)
