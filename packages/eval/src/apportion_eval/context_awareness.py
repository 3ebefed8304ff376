"""Benchmark ``context-awareness``: counterfactual needles against the model's own beliefs.

Wang et al. (2024), "On the Loss of Context-awareness in General Instruction Fine-tuning"
(arXiv 2411.02688), show that instruction-tuned models read the user's context less well
once the chat template is applied, and answer from what they already believe instead. This
benchmark measures that directly: a needle states a fact that contradicts a well-known one
(``In this story, the capital of France is Lyon.``), hidden at a depth in stdlib prose (the
same composition as ``niah``: :func:`apportion_eval.text.compose`, lengths in the tested
model's tokens), and the question asks for it (``What is the capital of France?``). A model
that reads its context answers Lyon; one that does not falls back on Paris.

The facts are built in (:data:`FACTS`): (category, subject, question, prior answer,
counterfactual answers), about 60 facts that SmolLM2-135M-Instruct answers correctly
without any context (capitals, languages, currencies, landmarks, authors, colours...). Each
sample draws a fact (a seeded permutation, so a run's cells use distinct facts while any are
left) and one of its counterfactual answers; prose containing either answer is redrawn.

Score: 1 if the counterfactual answer is found in the prediction and the prior is not
(:func:`apportion_eval.scoring.found`: case-insensitive, whole words), else 0. The metrics
record both findings: ``prior`` is the "fell back on prior" rate.

Splits: ``split="dev"`` keeps every fourth fact (for tuning a method), ``"test"`` the
others, ``"all"`` every fact, so tuning and evaluation never share a fact.

The benchmark is scored the same way with and without the chat template: set
``generation.chat_template = false`` in the run config (or ``Host(chat_template=False)``)
to read the prompt as plain text. Lengths are composed for the templated prompt; the plain
prompt is shorter by the template's tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from apportion.base import Benchmark, Sample
from pydantic import Field, field_validator

from apportion_eval.common import DepthsConfig, rng_for
from apportion_eval.scoring import found
from apportion_eval.text import compose, prose_contains


@dataclass(frozen=True)
class Fact:
    """A fact the model believes, and answers that contradict it."""

    category: str
    subject: str  # "the capital of France": the needle states "In this story, <subject> is X."
    question: str  # "What is the capital of France?"
    prior: str  # "Paris"
    counterfactuals: tuple[str, ...]  # ("Lyon", "Marseille", "Nice")


def _capital(country: str, prior: str, *others: str) -> Fact:
    return Fact(
        "capital",
        f"the capital of {country}",
        f"What is the capital of {country}?",
        prior,
        others,
    )


_LANGUAGES = ("Dutch", "Swedish", "Greek", "Polish", "Turkish", "Finnish", "Korean", "Hindi")


def _language(country: str, prior: str) -> Fact:
    pool = tuple(x for x in _LANGUAGES if x != prior)[:4]
    return Fact(
        "language",
        f"the language spoken in {country}",
        f"What language is spoken in {country}?",
        prior,
        pool,
    )


#: The built-in facts (each answered correctly by SmolLM2-135M-Instruct with no context).
FACTS: tuple[Fact, ...] = (
    _capital("France", "Paris", "Lyon", "Marseille", "Nice"),
    _capital("Japan", "Tokyo", "Osaka", "Kyoto", "Nagoya"),
    _capital("Italy", "Rome", "Milan", "Naples", "Florence"),
    _capital("Germany", "Berlin", "Munich", "Hamburg", "Cologne"),
    _capital("Spain", "Madrid", "Seville", "Valencia", "Bilbao"),
    _capital("England", "London", "Manchester", "Liverpool", "Bristol"),
    _capital("Russia", "Moscow", "Kazan", "Novosibirsk", "Omsk"),
    _capital("China", "Beijing", "Shanghai", "Wuhan", "Chengdu"),
    _capital("Greece", "Athens", "Sparta", "Patras", "Larissa"),
    _capital("Portugal", "Lisbon", "Porto", "Braga", "Faro"),
    _capital("Austria", "Vienna", "Salzburg", "Graz", "Linz"),
    _capital("Ireland", "Dublin", "Cork", "Galway", "Limerick"),
    _capital("Norway", "Oslo", "Bergen", "Trondheim", "Stavanger"),
    _capital("Sweden", "Stockholm", "Uppsala", "Malmo", "Gothenburg"),
    _capital("Denmark", "Copenhagen", "Aarhus", "Odense", "Aalborg"),
    _capital("Hungary", "Budapest", "Debrecen", "Szeged", "Pecs"),
    _capital("the Netherlands", "Amsterdam", "Utrecht", "Rotterdam", "Eindhoven"),
    _capital("the Czech Republic", "Prague", "Brno", "Ostrava", "Pilsen"),
    _capital("Thailand", "Bangkok", "Phuket", "Chiang Mai", "Pattaya"),
    _capital("South Korea", "Seoul", "Busan", "Incheon", "Daegu"),
    _capital("Kenya", "Nairobi", "Mombasa", "Kisumu", "Nakuru"),
    _capital("Argentina", "Buenos Aires", "Cordoba", "Rosario", "Mendoza"),
    _capital("Chile", "Santiago", "Valparaiso", "Concepcion", "Antofagasta"),
    _capital("Mexico", "Mexico City", "Guadalajara", "Monterrey", "Puebla"),
    _capital("Cuba", "Havana", "Holguin", "Camaguey", "Trinidad"),
    _capital("Iran", "Tehran", "Isfahan", "Shiraz", "Tabriz"),
    _capital("Iraq", "Baghdad", "Basra", "Mosul", "Erbil"),
    _capital("Afghanistan", "Kabul", "Kandahar", "Herat", "Jalalabad"),
    _capital("the Philippines", "Manila", "Cebu", "Davao", "Iloilo"),
    _capital("Canada", "Ottawa", "Toronto", "Vancouver", "Montreal"),
    _capital("Australia", "Canberra", "Sydney", "Melbourne", "Perth"),
    _capital("Scotland", "Edinburgh", "Glasgow", "Aberdeen", "Dundee"),
    _capital("Romania", "Bucharest", "Cluj", "Iasi", "Timisoara"),
    _capital("Pakistan", "Islamabad", "Karachi", "Lahore", "Peshawar"),
    _capital("Brazil", "Brasilia", "Salvador", "Recife", "Fortaleza"),
    _language("France", "French"),
    _language("Germany", "German"),
    _language("Spain", "Spanish"),
    _language("Italy", "Italian"),
    _language("Japan", "Japanese"),
    _language("Brazil", "Portuguese"),
    _language("Russia", "Russian"),
    _language("China", "Chinese"),
    Fact(
        "currency",
        "the currency of Japan",
        "What currency is used in Japan?",
        "yen",
        ("peso", "rand", "krona"),
    ),
    Fact(
        "currency",
        "the currency of the United Kingdom",
        "What currency is used in the United Kingdom?",
        "pound",
        ("peso", "rupee", "krona"),
    ),
    Fact(
        "currency",
        "the currency of the United States",
        "What currency is used in the United States?",
        "dollar",
        ("peso", "rupee", "franc"),
    ),
    Fact(
        "colour",
        "the colour of grass",
        "What colour is grass?",
        "green",
        ("purple", "orange", "pink"),
    ),
    Fact(
        "colour",
        "the colour of coal",
        "What colour is coal?",
        "black",
        ("pink", "orange", "purple"),
    ),
    Fact(
        "colour",
        "the colour of the sky",
        "What colour is the sky?",
        "blue",
        ("green", "orange", "purple"),
    ),
    Fact(
        "author",
        "the author of Hamlet",
        "Who wrote Hamlet?",
        "Shakespeare",
        ("Dickens", "Tolstoy", "Hemingway"),
    ),
    Fact(
        "author",
        "the author of Romeo and Juliet",
        "Who wrote Romeo and Juliet?",
        "Shakespeare",
        ("Dickens", "Tolstoy", "Cervantes"),
    ),
    Fact(
        "landmark",
        "the country of the pyramids of Giza",
        "In which country are the pyramids of Giza?",
        "Egypt",
        ("Mexico", "Peru", "Sudan"),
    ),
    Fact(
        "landmark",
        "the city of the Eiffel Tower",
        "In which city is the Eiffel Tower?",
        "Paris",
        ("Rome", "Berlin", "Vienna"),
    ),
    Fact(
        "landmark",
        "the country of the Great Wall",
        "In which country is the Great Wall?",
        "China",
        ("Japan", "India", "Mongolia"),
    ),
    Fact(
        "landmark",
        "the city of the Statue of Liberty",
        "In which city is the Statue of Liberty?",
        "New York",
        ("Boston", "Chicago", "Philadelphia"),
    ),
    Fact(
        "science",
        "the largest ocean on Earth",
        "What is the largest ocean on Earth?",
        "Pacific",
        ("Atlantic", "Arctic", "Indian"),
    ),
    Fact(
        "science",
        "the tallest mountain in the world",
        "What is the tallest mountain in the world?",
        "Everest",
        ("Kilimanjaro", "Mont Blanc", "Denali"),
    ),
    Fact(
        "science",
        "the chemical symbol for gold",
        "What is the chemical symbol for gold?",
        "Au",
        ("Ag", "Gd", "Fe"),
    ),
    Fact(
        "science",
        "the gas plants absorb from the air",
        "What gas do plants absorb from the air?",
        "carbon dioxide",
        ("helium", "neon", "argon"),
    ),
    Fact(
        "science",
        "what bees make",
        "What do bees make?",
        "honey",
        ("butter", "vinegar", "cheese"),
    ),
)

CATEGORIES = tuple(sorted({f.category for f in FACTS}))


def split_facts(split: str, categories: list[str] | None = None) -> list[Fact]:
    """The facts of ``split`` ("all", "dev": every fourth fact, "test": the rest), restricted
    to ``categories`` when given."""
    chosen = [f for i, f in enumerate(FACTS) if split == "all" or (split == "dev") == (i % 4 == 0)]
    if categories:
        chosen = [f for f in chosen if f.category in categories]
    return chosen


class ContextAwarenessConfig(DepthsConfig):
    lengths: list[int] = Field([512, 1024], description="prompt lengths in model tokens")
    depths: list[float] = Field(
        [0.25, 0.5, 0.75], description="where the counterfactual sits, 0=start 1=end"
    )
    samples: int = Field(4, ge=1, le=1000, description="samples per (length, depth) cell")
    split: Literal["all", "dev", "test"] = Field(
        "all", description="'dev': every fourth fact (for tuning), 'test': the rest, or all"
    )
    categories: list[str] = Field(
        default_factory=list,
        description=f"only facts of these categories ({', '.join(CATEGORIES)}); empty: all",
    )
    instruction: str = Field(
        "",
        max_length=200,
        description="appended to every question, e.g. 'Answer in one word.' (empty: the bare "
        "question, as a user would ask it)",
    )

    @field_validator("categories")
    @classmethod
    def _categories(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in CATEGORIES]
        if bad:
            raise ValueError(f"unknown categories {bad}; use some of {list(CATEGORIES)}")
        return v


class ContextAwareness(Benchmark):
    """Counterfactual needles whose answer contradicts the model's prior (Wang et al. 2024)."""

    name = "context-awareness"
    summary = (
        "counterfactual needles against the model's prior (capital of France is Lyon): "
        "context awareness with and without the chat template"
    )
    Config = ContextAwarenessConfig
    config: ContextAwarenessConfig
    max_new_tokens = 16

    def facts(self) -> list[Fact]:
        return split_facts(self.config.split, self.config.categories)

    def samples(self, tokenizer: Any) -> Iterator[Sample]:
        cfg = self.config
        facts = self.facts()
        order = list(range(len(facts)))
        rng_for("context-awareness-order", cfg.seed, cfg.split).shuffle(order)
        n = 0
        for length in cfg.lengths:
            for depth in cfg.depths:
                for k in range(cfg.samples):
                    fact = facts[order[n % len(order)]]
                    n += 1
                    yield self._sample(tokenizer, fact, length, depth, k)

    def _sample(self, tokenizer: Any, fact: Fact, length: int, depth: float, k: int) -> Sample:
        cfg = self.config
        rng = rng_for("context-awareness", cfg.seed, fact.subject, length, depth, k)
        usable = [c for c in fact.counterfactuals if not prose_contains(c)]
        answer = rng.choice(usable or list(fact.counterfactuals))
        needle = f"In this story, {fact.subject} is {answer}."
        question = f"{fact.question} {cfg.instruction}".strip()
        for _ in range(20):  # prose that happens to name either answer is drawn again
            composed = compose(
                tokenizer, length, question, [(needle, depth)], rng, what="context-awareness"
            )
            rest = composed.context.replace(needle, " ")
            if not found(fact.prior, rest) and not found(answer, rest):
                break
        slug = "".join(ch if ch.isalnum() else "-" for ch in fact.subject.lower())
        return Sample(
            id=f"context-awareness-{length}-{depth}-{k}-{slug}",
            context=composed.context,
            question=question,
            answers=[answer],
            length=length,
            depth=depth,
            tags={"diffusion": "low", "scope": "small"},
            meta={
                "category": fact.category,
                "subject": fact.subject,
                "prior": fact.prior,
                "needle": needle,
                "needle_depth": composed.depths[0],
                "context_chars": len(composed.context),
            },
            max_new_tokens=self.max_new_tokens,
        )

    def score(self, sample: Sample, prediction: str) -> float:
        """1 if the counterfactual answer is given and the prior is not, else 0."""
        prior = str(sample.meta.get("prior", ""))
        said_prior = bool(prior) and found(prior, prediction)
        return float(found(sample.answers[0], prediction) and not said_prior)

    def metrics(self, sample: Sample, prediction: str) -> dict[str, Any]:
        """``counterfactual``: the context's answer was given; ``prior``: the model's own
        belief was given (it fell back on its prior); ``category``: the fact's."""
        prior = str(sample.meta.get("prior", ""))
        return {
            "counterfactual": float(found(sample.answers[0], prediction)),
            "prior": float(bool(prior) and found(prior, prediction)),
            "category": sample.meta.get("category", ""),
        }
