"""Benchmark ``multihop-qa``: questions that need several facts, each hidden at its own depth
in haystack prose (after the multi-hop tasks of HotpotQA, Yang et al. 2018, and RULER's
"qa_2", Hsieh et al. 2024, but generated here: no dataset, no leak from pre-training).

**Contract.** A chain of ``hops`` facts links a person to a city; only the whole chain
answers "In which city does <person> work?":

- ``hops = 1``: ``Nora Quinn works in Lisbon.``
- ``hops = 2``: ``Nora Quinn works at Falcon Labs.`` ``Falcon Labs is located in Lisbon.``
- ``hops = h > 2``: ``h - 2`` links ``Nora Quinn works at the same company as Omar Reyes.``
  ``Omar Reyes works at the same company as ...`` lead to the person who ``works at`` the
  company.

``distractors`` more chains of the same shape, over other people, companies and cities, sit
in the same context, so every kind of fact occurs several times and each city named there is
a plausible answer. The facts of each chain spread over a seeded stretch of the context
(``window``: 1 anywhere, 0 side by side), in chain order or shuffled (``order``). Scored by
string match on the gold city; :meth:`metrics` also says whether the answer named a
distractor's city.

**Parameters.** ``hops`` (default 2), ``distractors`` (default 2), ``window``, ``order``.
SmolLM2-135M-Instruct answers one hop at 1K tokens about 40% of the time but two hops rarely
(about one in ten, facts side by side or not, whatever the phrasing tried): it names the
company, the first hop, and stops. Use ``hops = 1`` for a baseline that small models clear.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, Literal

from apportion.base import Benchmark, Sample
from pydantic import Field

from apportion_eval.common import LengthsConfig, rng_for
from apportion_eval.scoring import found, string_match_all
from apportion_eval.text import compose, prose_contains
from apportion_eval.words import NOUNS

FIRST_NAMES = (
    "Ada Alma Anton Bea Boris Carla Cyrus Dana Dario Edith Elias Farah Felix Greta Hugo Ines "
    "Ivan Jonas Kara Lena Luca Maya Milo Nadia Nora Oscar Otto Petra Quentin Rosa Rufus Selma "
    "Tariq Uma Vera Viktor Wanda Yara Yusuf Zora"
).split()
SURNAMES = (
    "Abbott Bauer Castillo Dalton Eriksen Fischer Galloway Haddad Ibarra Jansen Kowalski "
    "Lindqvist Moreau Nakamura Okafor Petrov Quinn Reyes Sandoval Takeda Umarov Varga "
    "Whitlock Xiong Yilmaz Zimmer Holloway Brennan Marsh Novak"
).split()
CITIES = (
    "Lisbon Oslo Denver Nairobi Lima Dublin Helsinki Kyoto Austin Toronto Madrid Vienna Prague "
    "Seattle Cairo Sydney Munich Warsaw Athens Zurich Montreal Melbourne Osaka Manila Santiago "
    "Havana Dakar Accra Hanoi Jakarta Istanbul Stockholm Copenhagen Brussels Amsterdam Hamburg "
    "Budapest Bucharest Glasgow Edinburgh Marseille Valencia Krakow Tallinn Riga Vilnius"
).split()
COMPANY_SUFFIXES = ("Industries", "Labs", "Systems", "Group", "Holdings", "Works", "Partners")


class MultiHopConfig(LengthsConfig):
    hops: int = Field(2, ge=1, le=8, description="facts chained from the person to the city")
    distractors: int = Field(2, ge=0, le=16, description="other chains of the same shape")
    window: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of the context each chain's facts spread over, at a seeded place "
        "(1: anywhere; 0: side by side)",
    )
    order: Literal["chain", "shuffled"] = Field(
        "chain", description="facts in chain order through the text, or shuffled"
    )


class _Names:
    """Fresh people, companies and cities that occur nowhere in the haystack pool."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.taken: set[str] = set()

    def _fresh(self, draw: Any) -> str:
        for _ in range(10_000):
            name = draw()
            if name not in self.taken and not prose_contains(name):
                self.taken.add(name)
                return name
        raise ValueError("ran out of fresh names")  # pragma: no cover - thousands of names

    def person(self) -> str:
        return self._fresh(lambda: f"{self.rng.choice(FIRST_NAMES)} {self.rng.choice(SURNAMES)}")

    def company(self) -> str:
        return self._fresh(
            lambda: f"{self.rng.choice(NOUNS).title()} {self.rng.choice(COMPANY_SUFFIXES)}"
        )

    def city(self) -> str:
        return self._fresh(lambda: self.rng.choice(CITIES))


def chain(names: _Names, hops: int) -> tuple[str, list[str], str]:
    """(person asked about, the facts in chain order, the city)."""
    people = [names.person() for _ in range(max(1, hops - 1))]
    city = names.city()
    if hops == 1:
        return people[0], [f"{people[0]} works in {city}."], city
    company = names.company()
    facts = [
        f"{a} works at the same company as {b}." for a, b in zip(people, people[1:], strict=False)
    ]
    facts += [f"{people[-1]} works at {company}.", f"{company} is located in {city}."]
    return people[0], facts, city


class MultiHopQA(Benchmark):
    """Multi-hop QA: chain person -> (colleagues) -> company -> city through facts in prose."""

    name = "multihop-qa"
    summary = "multi-hop QA: chained facts (person -> company -> city) hidden in haystack prose"
    Config = MultiHopConfig
    max_new_tokens = 32

    def samples(self, tokenizer: Any) -> Iterator[Sample]:
        cfg = self.config
        for length in cfg.lengths:
            for k in range(cfg.samples):
                yield self._sample(tokenizer, length, k)

    def _sample(self, tokenizer: Any, length: int, k: int) -> Sample:
        cfg = self.config
        rng = rng_for(
            "multihop", cfg.seed, cfg.hops, cfg.distractors, cfg.window, cfg.order, length, k
        )
        names = _Names(rng)
        chains = [chain(names, cfg.hops) for _ in range(1 + cfg.distractors)]
        pieces: list[tuple[str, float]] = []
        for _, facts, _ in chains:
            start = rng.uniform(0.0, 1.0 - cfg.window)
            depths = sorted(start + rng.uniform(0.0, cfg.window) for _ in facts)
            if cfg.order == "shuffled":
                rng.shuffle(depths)
            pieces += list(zip(facts, depths, strict=True))
        person, facts, city = chains[0]
        question = f"In which city does {person} work? Answer with the city only."
        composed = compose(tokenizer, length, question, pieces, rng, what="multihop-qa")
        return Sample(
            id=f"multihop-h{cfg.hops}-d{cfg.distractors}-{cfg.order}-{length}-{k}",
            context=composed.context,
            question=question,
            answers=[city],
            length=length,
            depth=None,
            tags={"diffusion": "high" if cfg.hops > 1 else "low", "scope": "small"},
            meta={
                "person": person,
                "facts": facts,
                "fact_depths": composed.depths[: len(facts)],
                "distractor_cities": [c for _, _, c in chains[1:]],
                "context_chars": len(composed.context),
            },
            max_new_tokens=self.max_new_tokens,
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return string_match_all(sample.answers, prediction)

    def metrics(self, sample: Sample, prediction: str) -> dict[str, Any]:
        """``distractor_named``: the answer names a distractor chain's city."""
        others = sample.meta.get("distractor_cities", [])
        return {"distractor_named": any(found(c, prediction) for c in others)}
