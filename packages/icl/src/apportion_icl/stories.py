"""Retrieval examples for situated embeddings (``apportion_icl.situated``), built from the
shipped fictional QA set (:mod:`apportion_icl.data`).

Two renderings of the same facts (a person: job and city; a company: year, founder and
product):

- ``"shipped"``: the shipped documents as they are. Every fact sentence names its subject
  ("Ravi Moreau is a cartographer who lives in Dunmore Bay."), so a sentence embedded alone
  is already retrievable; windows barely matter there.
- ``"story"``: a harder, seeded rewrite in which only a paragraph's first sentence names its
  subject and the facts follow as pronoun sentences ("He lives in Dunmore Bay now.", "Its
  founder is Ravi Moreau."). Such a sentence means something only in its context: every
  person's "He lives in ..." looks alike to an embedder that reads it alone. This is the
  situation SitEmb (Wu et al. 2025) targets.

Every example is one (sub-)query over a haystack: the gold paragraphs among distractor
paragraphs, split into sentences (the chunks; a chunk's *group* is its paragraph), with the
indices of the gold chunks.

Held-out split: the **evaluation** pairs (person + company) are those that any ``test``
question of the shipped set asks about; the two-hop ``test`` questions over them are the
evaluation questions. **Training** uses only the other shipped pairs and synthetic pairs
recombined from the shipped vocabulary (names, jobs, cities, products) and rendered in the
shipped documents' template as well as the story one; no synthetic person or company name
occurs in the shipped set, so nothing trained on is about an entity the evaluation asks
about. (In the shipped set every pair has some ``test`` question, so training is synthetic.)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

from apportion_icl import data
from apportion_icl import sentences as sent

Form = Literal["shipped", "story"]
FORMS: tuple[Form, ...] = ("shipped", "story")

_PERSON = re.compile(r"^(?P<person>.+?) is an? (?P<job>.+?) who lives in (?P<city>.+?)\. ")
_COMPANY = re.compile(
    r"^(?P<company>.+?) was founded in (?P<year>\d{4}) by (?P<person>.+?)\. "
    r"The company makes (?P<product>.+?) and sells"
)
# pronouns of the first names the shipped set draws from (scripts/make_data.py)
_SHE = frozenset("Mira Ines Lena Sofia Yuki Nadia Priya Hana Zara Amara".split())


@dataclass(frozen=True)
class Pair:
    """A person and the company they founded, with the facts the questions ask about."""

    id: str
    person: str
    job: str
    city: str
    company: str
    year: str
    product: str


@dataclass(frozen=True)
class Example:
    """One retrieval query over a haystack: ``chunks`` (sentences, in order), ``groups`` (each
    chunk's paragraph), ``gold`` (the supporting chunks' indices, one per hop), ``hops`` (the
    sub-query of each hop, in the order of ``gold``) and ``context`` (the haystack as text:
    ``sentences.split(context)`` gives back ``chunks``)."""

    id: str
    query: str
    answer: str
    context: str
    chunks: tuple[str, ...]
    groups: tuple[int, ...]
    gold: tuple[int, ...]
    hops: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


@cache
def shipped_pairs() -> tuple[Pair, ...]:
    """The 24 person/company pairs of the shipped QA set, parsed from its documents."""
    docs = data.documents()
    out = []
    for pid in sorted(d for d in docs if d.startswith("p")):
        i = pid[1:]
        p, k = _PERSON.match(docs[pid]["text"]), _COMPANY.match(docs[f"k{i}"]["text"])
        if p is None or k is None or p["person"] != k["person"]:
            raise ValueError(f"the shipped documents p{i}/k{i} do not parse as a pair")
        out.append(Pair(i, p["person"], p["job"], p["city"], k["company"], k["year"], k["product"]))
    return tuple(out)


@cache
def eval_pair_ids() -> frozenset[str]:
    """The pairs some ``test`` question of the shipped set asks about (held out)."""
    return frozenset(d[1:] for e in data.qa("test") for d in e.meta["docs"])


def synthetic_pairs(n: int, seed: int = 0) -> list[Pair]:
    """``n`` new pairs recombined from the shipped vocabulary (first and last names, company
    words, jobs, cities, products); no person or company name equals a shipped one."""
    shipped = shipped_pairs()
    firsts = sorted({p.person.split()[0] for p in shipped})
    lasts = sorted({p.person.split(maxsplit=1)[1] for p in shipped})
    co_a = sorted({p.company.split()[0] for p in shipped})
    co_b = sorted({p.company.split(maxsplit=1)[1] for p in shipped})
    taken_p = {p.person for p in shipped}
    taken_c = {p.company for p in shipped}
    people = [f"{f} {s}" for f in firsts for s in lasts if f"{f} {s}" not in taken_p]
    companies = [f"{a} {b}" for a in co_a for b in co_b if f"{a} {b}" not in taken_c]
    rng = random.Random(f"sitemb-synthetic:{seed}")
    n = min(n, len(people), len(companies))
    jobs = sorted({p.job for p in shipped})
    cities = sorted({p.city for p in shipped})
    products = sorted({p.product for p in shipped})
    return [
        Pair(
            f"s{i:03d}",
            person,
            rng.choice(jobs),
            rng.choice(cities),
            company,
            str(rng.randrange(1950, 2020)),
            rng.choice(products),
        )
        for i, (person, company) in enumerate(
            zip(rng.sample(people, n), rng.sample(companies, n), strict=True)
        )
    ]


def _pronouns(person: str) -> tuple[str, str]:
    return ("she", "her") if person.split()[0] in _SHE else ("he", "his")


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def paragraphs(pair: Pair, form: Form, seed: int = 0) -> dict[str, list[str]]:
    """The pair's two paragraphs as sentence lists, keyed by role, each sentence tagged by
    the fact it states: ``{"person": [...], "company": [...]}`` and, in ``facts``, the index
    of each fact's sentence (``city``, ``job``, ``founder``, ``product``, ``year``)."""
    if form == "shipped":
        docs = data.documents()
        if f"p{pair.id}" in docs:
            texts = docs[f"p{pair.id}"]["text"], docs[f"k{pair.id}"]["text"]
        else:  # a synthetic pair, in the shipped documents' template (scripts/make_data.py)
            texts = (
                f"{pair.person} is a {pair.job} who lives in {pair.city}. "
                f"{pair.person.split()[0]} trained for many years before opening a small "
                "studio near the old harbour.",
                f"{pair.company} was founded in {pair.year} by {pair.person}. The company "
                f"makes {pair.product} and sells them in more than twenty countries.",
            )
        person, company = ([s.text for s in sent.split(t)] for t in texts)
        return {"person": person, "company": company}
    rng = random.Random(f"sitemb-story:{seed}:{pair.id}:{pair.person}")
    he, his = _pronouns(pair.person)
    p_intro = rng.choice(
        [
            f"{pair.person} grew up on a farm far from the coast.",
            f"{pair.person} was the youngest of four children.",
            f"{pair.person} spent {his} childhood moving from town to town.",
            f"{pair.person} learned to read from {his} grandmother.",
        ]
    )
    city = rng.choice(
        [
            f"{_cap(he)} lives in {pair.city} now.",
            f"These days {he} lives in {pair.city}.",
            f"{_cap(he)} has lived in {pair.city} for a decade.",
        ]
    )
    job = rng.choice(
        [
            f"{_cap(he)} works as a {pair.job}.",
            f"{_cap(he)} earns a living as a {pair.job}.",
            f"By trade {he} is a {pair.job}.",
        ]
    )
    p_tail = rng.choice(
        [
            f"{_cap(he)} trained for many years before opening a small studio.",
            f"{_cap(he)} spends most weekends walking in the hills.",
        ]
    )
    c_intro = rng.choice(
        [
            f"{pair.company} opened its doors in {pair.year}.",
            f"{pair.company} began in a rented garage in {pair.year}.",
        ]
    )
    founder = rng.choice(
        [
            f"Its founder is {pair.person}.",
            f"It was set up by {pair.person}.",
            f"The firm was started by {pair.person}.",
        ]
    )
    product = rng.choice(
        [
            f"The company makes {pair.product} and sells them in twenty countries.",
            f"Today it makes {pair.product}.",
        ]
    )
    c_tail = rng.choice(
        [
            f"It employs about {rng.randrange(20, 400)} people.",
            "Its head office sits beside a railway station.",
        ]
    )
    p_facts, c_facts = [city, job], [founder, product]
    rng.shuffle(p_facts)
    rng.shuffle(c_facts)
    return {"person": [p_intro, *p_facts, p_tail], "company": [c_intro, *c_facts, c_tail]}


# where each fact stands in the shipped documents
_SHIPPED_FACTS = {
    "city": ("person", 0),
    "job": ("person", 0),
    "founder": ("company", 0),
    "year": ("company", 0),
    "product": ("company", 1),
}


def fact_sentence(pair: Pair, form: Form, fact: str, seed: int = 0) -> tuple[str, int]:
    """(role, sentence index within that paragraph) of the sentence stating ``fact``."""
    if form == "shipped":
        return _SHIPPED_FACTS[fact]
    paras = paragraphs(pair, form, seed)
    needle = {
        "city": pair.city,
        "job": pair.job,
        "founder": pair.person,
        "product": pair.product,
        "year": pair.year,
    }[fact]
    role = "person" if fact in ("city", "job") else "company"
    hits = [i for i, s in enumerate(paras[role]) if needle in s and (i or fact == "year")]
    return role, hits[0]


def haystack(
    gold: Pair, world: list[Pair], form: Form, n_distractors: int, key: str, seed: int = 0
) -> tuple[str, list[tuple[str, str]]]:
    """The gold pair's two paragraphs among ``n_distractors`` paragraphs of other pairs of
    ``world``, shuffled (seeded by ``key``): the context text and each paragraph's
    (pair id, role)."""
    rng = random.Random(f"sitemb-haystack:{seed}:{key}")
    others = [(p.id, role) for p in world if p.id != gold.id for role in ("person", "company")]
    picked = [(gold.id, "person"), (gold.id, "company")] + rng.sample(
        others, min(n_distractors, len(others))
    )
    rng.shuffle(picked)
    by_id = {p.id: p for p in world} | {gold.id: gold}
    texts = [" ".join(paragraphs(by_id[i], form, seed)[role]) for i, role in picked]
    return "\n\n".join(texts), picked


def _example(
    eid: str,
    query: str,
    answer: str,
    pair: Pair,
    facts: list[str],
    hops: list[str],
    world: list[Pair],
    form: Form,
    n_distractors: int,
    seed: int,
) -> Example:
    context, layout = haystack(pair, world, form, n_distractors, f"{form}:{eid}", seed)
    chunks = sent.split(context)
    starts: dict[tuple[str, str], int] = {}
    for s in chunks:
        starts.setdefault(layout[s.paragraph], s.index)
    gold = []
    for fact in facts:
        role, offset = fact_sentence(pair, form, fact, seed)
        gold.append(starts[(pair.id, role)] + offset)
    return Example(
        eid,
        query,
        answer,
        context,
        tuple(s.text for s in chunks),
        tuple(s.paragraph for s in chunks),
        tuple(gold),
        tuple(hops),
        {"form": form, "pair": pair.id},
    )


def eval_examples(form: Form, n_distractors: int = 12, seed: int = 0) -> list[Example]:
    """The held-out two-hop questions (the shipped ``test`` split's), each over a haystack of
    the evaluation world (all shipped pairs), with both hops' gold chunks (the founder's
    sentence, then the person's city or job sentence) and the gold sub-questions."""
    pairs = {p.id: p for p in shipped_pairs()}
    world = list(pairs.values())
    out = []
    for ex in data.qa("test", hop=2):
        pair = pairs[ex.meta["docs"][0][1:]]
        fact = "city" if ex.answer == pair.city else "job"
        out.append(
            _example(
                ex.id,
                ex.query,
                ex.answer,
                pair,
                ["founder", fact],
                list(ex.meta["subquestions"]),
                world,
                form,
                n_distractors,
                seed,
            )
        )
    return out


# training queries per fact: the shipped set's phrasing and paraphrases of it
_QUERIES = {
    "founder": ["Who founded {company}?", "Who started {company}?", "Who set up {company}?"],
    "city": [
        "In which city does {person} live?",
        "Where does {person} live?",
        "Which city is home to {person}?",
    ],
    "job": [
        "What is the job of {person}?",
        "What does {person} do for a living?",
        "What is {person}'s profession?",
    ],
    "product": ["What does {company} make?", "What product does {company} sell?"],
    "year": ["In which year was {company} founded?", "When was {company} founded?"],
}
_ANSWER = {"founder": "person", "city": "city", "job": "job", "product": "product", "year": "year"}


def train_pairs(synthetic: int = 48, seed: int = 0) -> list[Pair]:
    """Shipped pairs that no ``test`` question asks about, then ``synthetic`` new pairs."""
    held = eval_pair_ids()
    return [p for p in shipped_pairs() if p.id not in held] + synthetic_pairs(synthetic, seed)


def train_examples(
    synthetic: int = 48,
    seed: int = 0,
    n_distractors: int = 12,
    forms: tuple[Form, ...] = FORMS,
) -> list[Example]:
    """Single-hop retrieval examples over the training pairs only (see the module docstring):
    for every pair, fact and form, one query (a phrasing drawn per pair). Synthetic pairs in
    the ``"shipped"`` form follow the shipped documents' template. Distractors come from the
    training pairs too."""
    world = train_pairs(synthetic, seed)
    held = eval_pair_ids()
    out = []
    for form in forms:
        for pair in world:
            if pair.id in held:  # never: train_pairs leaves them out; kept as a guard
                raise AssertionError(f"pair {pair.id} is held out for evaluation")
            rng = random.Random(f"sitemb-query:{seed}:{form}:{pair.id}")
            for fact, phrasings in _QUERIES.items():
                query = rng.choice(phrasings).format(person=pair.person, company=pair.company)
                answer = getattr(pair, _ANSWER[fact])
                out.append(
                    _example(
                        f"{form}:{pair.id}:{fact}",
                        query,
                        answer,
                        pair,
                        [fact],
                        [query],
                        world,
                        form,
                        n_distractors,
                        seed,
                    )
                )
    return out
