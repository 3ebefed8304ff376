"""Benchmark ``longgen`` (after LongGenBench, Liu et al. 2024): many small questions answered
in one long response.

The context holds ``items`` facts (``The amber-falcon is kept in locker 417.``) at seeded
depths; the question lists one small question per fact and asks for every answer in order,
one numbered line each. Scored per item (the record's ``score`` is the share of items
answered right); :meth:`LongGen.metrics` adds the completion rate (share of items with a
numbered answer line at all) so a response that stops early is told apart from one that
answers wrongly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Literal

from apportion.base import Benchmark, Sample
from pydantic import Field

from apportion_eval.common import LengthsConfig, rng_for
from apportion_eval.text import compose, spread
from apportion_eval.words import compound


class LongGenConfig(LengthsConfig):
    items: int = Field(8, ge=2, le=100, description="questions answered in one response")
    placement: Literal["uniform", "begin", "middle", "end", "bimodal"] = "uniform"
    tokens_per_item: int = Field(12, ge=4, le=64, description="answer tokens allowed per item")


def item_lines(prediction: str, items: int) -> dict[int, str]:
    """The answer of each item number ``1..items`` that the response contains: its numbered
    line (``3. locker 417``); a response without numbered lines is read as its bare
    3-digit answers in order."""
    out: dict[int, str] = {}
    for line in prediction.splitlines():
        m = re.match(r"\s*(?:\*\*)?(\d{1,3})\s*[.):\-]\s*(.*)", line)
        if m and 1 <= int(m.group(1)) <= items and int(m.group(1)) not in out:
            out[int(m.group(1))] = m.group(2)
    if not out:
        bare = re.findall(r"(?<!\d)\d{3}(?!\d)", prediction)
        out = {i + 1: v for i, v in enumerate(bare[:items])}
    return out


class LongGen(Benchmark):
    """Many small questions in one long response: completion rate and per-item accuracy."""

    name = "longgen"
    summary = "many small questions in one long response: completion rate and per-item accuracy"
    Config = LongGenConfig
    max_new_tokens = 16

    def samples(self, tokenizer: Any) -> Iterator[Sample]:
        cfg = self.config
        for length in cfg.lengths:
            for k in range(cfg.samples):
                rng = rng_for("longgen", cfg.seed, cfg.items, cfg.placement, length, k)
                taken: set[str] = set()
                things = [compound(rng, taken) for _ in range(cfg.items)]
                taken.update(things)
                lockers = rng.sample(range(100, 1000), cfg.items)
                facts = [
                    f"The {t} is kept in locker {n}." for t, n in zip(things, lockers, strict=True)
                ]
                order = list(range(cfg.items))
                rng.shuffle(order)  # questions do not follow the order of the facts
                asked = [things[i] for i in order]
                answers = [str(lockers[i]) for i in order]
                lines = "\n".join(
                    f"{j + 1}. In which locker is the {t} kept?" for j, t in enumerate(asked)
                )
                question = (
                    f"Answer all {cfg.items} questions below, in order, one line each, in the "
                    f"form '<question number>. locker <number>'.\n{lines}"
                )
                composed = compose(
                    tokenizer,
                    length,
                    question,
                    list(zip(facts, spread(rng, cfg.items, cfg.placement), strict=True)),
                    rng,
                    what="longgen",
                )
                yield Sample(
                    id=f"longgen-{cfg.items}-{cfg.placement}-{length}-{k}",
                    context=composed.context,
                    question=question,
                    answers=answers,
                    length=length,
                    depth=None,
                    tags={"diffusion": "low", "scope": "large"},
                    meta={"asked": asked, "context_chars": len(composed.context)},
                    max_new_tokens=self.max_new_tokens + cfg.tokens_per_item * cfg.items,
                )

    def metrics(self, sample: Sample, prediction: str) -> dict[str, float]:
        lines = item_lines(prediction, len(sample.answers))
        correct = sum(
            bool(re.search(rf"(?<!\d){a}(?!\d)", lines.get(i + 1, "")))
            for i, a in enumerate(sample.answers)
        )
        n = len(sample.answers)
        return {
            "completion_rate": len(lines) / n,
            "item_accuracy": correct / n,
            "items": n,
            "items_answered": len(lines),
            "items_correct": correct,
        }

    def score(self, sample: Sample, prediction: str) -> float:
        if not sample.answers:
            return 0.0
        return self.metrics(sample, prediction)["item_accuracy"]
