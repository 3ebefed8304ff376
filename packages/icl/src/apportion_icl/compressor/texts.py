"""Text the compressor trains and is measured on, generated here (deterministic per seed).

Three kinds of passage, each with questions whose answers are spans of it:

- **profiles**: short fictional biographies and company profiles in the style of the
  shipped QA set (``data/qa.jsonl``), but over *other* names, cities, jobs and products, so
  that the QA set stays held out from training;
- **needles**: filler prose about everyday scenes with one or more needle facts in it,
  either a number ("The access code for the red locker is 4417302.") or a word ("The
  meeting point for the blue team is the bakery."), asked as in needle-in-a-haystack;
- **prose**: the filler alone (for reconstruction and continuation only).

Every name here is invented by the apportion authors; nothing is read from other families'
data. Use :func:`passage` for one item and :func:`needle_haystack` for a niah-like prompt of
about ``n_tokens`` tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

FIRST = [
    "Alma", "Bruno", "Celia", "Dmitri", "Edda", "Farid", "Greta", "Hugo", "Ilse", "Jasper",
    "Kaia", "Leon", "Maelle", "Niko", "Olga", "Pavel", "Rosa", "Silas", "Tilde", "Umar",
    "Vera", "Willem", "Xenia", "Yusuf",
]  # fmt: skip
LAST = [
    "Abbott", "Berglund", "Carmody", "Delacroix", "Engstrom", "Fairweather", "Galloway",
    "Holloway", "Iversen", "Jankowski", "Kowalczyk", "Larkspur", "Mendel", "Nakagawa",
    "Oyelaran", "Pellegrini", "Rasmussen", "Strand", "Thackeray", "Underhill",
]  # fmt: skip
CITIES = [
    "Amberlee", "Bellmoor", "Cinderford", "Duskwater", "Elmstead", "Fernhollow", "Glenhaven",
    "Harrowgate", "Ivywood", "Jessamy Cove", "Kingsreach", "Larkmouth", "Moorfield",
    "Northbeck", "Oakhurst", "Pinecrest",
]  # fmt: skip
JOBS = [
    "potter", "carpenter", "astronomer", "florist", "librarian", "blacksmith", "geologist",
    "tailor", "watchmaker", "ferry captain", "translator", "photographer", "dentist", "baker",
]  # fmt: skip
CO_A = [
    "Acorn", "Bramble", "Copper", "Drift", "Falcon", "Granite", "Heron", "Indigo", "Lantern",
    "Meadow", "Nimbus", "Orchid", "Pebble", "Ripple", "Summit", "Tundra",
]  # fmt: skip
CO_B = ["Systems", "Trading", "Brewing", "Mills", "Instruments", "Outfitters", "Studios"]
PRODUCTS = [
    "rubber boots", "kite strings", "copper pans", "garden hoses", "wool blankets",
    "bicycle bells", "pocket radios", "clay pots", "fishing nets", "desk lamps", "maple syrup",
    "tin whistles",
]  # fmt: skip
COLORS = ["red", "blue", "green", "yellow", "silver", "orange", "purple", "white", "black"]
THINGS = [
    "locker", "door", "suitcase", "safe", "mailbox", "cabinet", "gate", "drawer", "chest", "van",
]  # fmt: skip
TEAMS = ["team", "group", "club", "crew", "choir", "class"]
PLACES = [
    "bakery", "library", "harbour", "fountain", "museum", "station", "bridge", "garden",
    "market", "chapel", "lighthouse", "stadium",
]  # fmt: skip
# filler prose: everyday scenes, composed from parts
_SUBJ = [
    "The old ferry", "A cold wind", "The night market", "The village choir", "A thin fog",
    "The morning train", "The town council", "A stray cat", "The river", "The school bus",
    "A group of hikers", "The bakery on the corner", "The summer fair", "A heavy rain",
    "The lighthouse keeper", "The orchard", "The museum guard", "A flock of geese",
]  # fmt: skip
_VERB = [
    "moved slowly past", "waited for hours near", "drifted quietly over", "returned early to",
    "gathered around", "passed twice by", "settled for the night beside", "circled above",
    "kept watch over", "rolled along",
]  # fmt: skip
_OBJ = [
    "the empty square", "the stone bridge", "the harbour wall", "the wheat fields",
    "the narrow lanes", "the old mill", "the frozen pond", "the public garden",
    "the hill road", "the train yard", "the chapel steps", "the fish market",
]  # fmt: skip
_TAIL = [
    "while the shops were closing", "as the lamps came on", "before anyone noticed",
    "under a grey sky", "and nobody seemed to mind", "long after midnight",
    "just as the bells rang", "in the last light of the day", "without a sound",
    "as it had done for years",
]  # fmt: skip


@dataclass
class QA:
    """A question, its gold answer (a span of the passage), the kind of fact asked, and
    ``sentence``: the answer as the decoder says it (it restates the question: "Alma Abbott
    lives in Larkmouth."), the target of the question-answering objective."""

    question: str
    answer: str
    kind: str  # profile-city, profile-job, ..., needle-number, needle-word
    sentence: str = ""


@dataclass
class Passage:
    text: str
    qa: list[QA] = field(default_factory=list)
    kind: str = "prose"
    meta: dict[str, Any] = field(default_factory=dict)


def filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)} {rng.choice(_TAIL)}."


def profile(rng: random.Random) -> Passage:
    """A person and the company they founded, with five single-fact questions and a two-hop
    one (as the shipped QA set asks them)."""
    first, last = rng.choice(FIRST), rng.choice(LAST)
    person = f"{first} {last}"
    city, job = rng.choice(CITIES), rng.choice(JOBS)
    company = f"{rng.choice(CO_A)} {rng.choice(CO_B)}"
    product, year = rng.choice(PRODUCTS), str(rng.randrange(1900, 2021))
    bio = (
        f"{person} is a {job} who lives in {city}. {first} trained for many years before "
        f"opening a small workshop near the town square."
    )
    firm = (
        f"{company} was founded in {year} by {person}. The company makes {product} and sells "
        f"them in many countries."
    )
    parts = [bio, firm]
    rng.shuffle(parts)
    a = "an" if job[0] in "aeiou" else "a"
    qa = [
        QA(
            f"In which city does {person} live?", city, "profile-city", f"{person} lives in {city}."
        ),
        QA(f"What is the job of {person}?", job, "profile-job", f"{person} is {a} {job}."),
        QA(f"What does {company} make?", product, "profile-product", f"{company} makes {product}."),
        QA(
            f"In which year was {company} founded?",
            year,
            "profile-year",
            f"{company} was founded in {year}.",
        ),
        QA(
            f"Who founded {company}?",
            person,
            "profile-founder",
            f"{company} was founded by {person}.",
        ),
        QA(
            f"In which city does the founder of {company} live?",
            city,
            "profile-bridge",
            f"The founder of {company}, {person}, lives in {city}.",
        ),
    ]
    return Passage("\n\n".join(parts), qa, "profile")


def needle(rng: random.Random, digits: int = 7) -> tuple[str, QA]:
    """One needle fact and its question: a ``digits``-digit number or a place word."""
    color, team = rng.choice(COLORS), rng.choice(TEAMS)
    if rng.random() < 0.5:
        thing = rng.choice(THINGS)
        code = str(rng.randrange(10 ** (digits - 1), 10**digits))
        fact = f"The access code for the {color} {thing} is {code}."
        return fact, QA(
            f"What is the access code for the {color} {thing}?", code, "needle-number", fact
        )
    place = rng.choice(PLACES)
    fact = f"The meeting point for the {color} {team} is the {place}."
    return fact, QA(
        f"What is the meeting point for the {color} {team}?", place, "needle-word", fact
    )


def prose(rng: random.Random, n_sentences: int) -> Passage:
    return Passage(" ".join(filler_sentence(rng) for _ in range(n_sentences)))


def needle_passage(rng: random.Random, n_sentences: int, n_needles: int = 1) -> Passage:
    """Filler prose with ``n_needles`` needle facts at random depths."""
    body = [filler_sentence(rng) for _ in range(n_sentences)]
    qas = []
    for _ in range(n_needles):
        fact, qa = needle(rng)
        body.insert(rng.randrange(len(body) + 1), fact)
        qas.append(qa)
    return Passage(" ".join(body), qas, "needle")


def passage(rng: random.Random, max_sentences: int = 6) -> Passage:
    """One training passage: a profile, a short needle passage or plain prose."""
    r = rng.random()
    if r < 0.45:
        return profile(rng)
    if r < 0.85:
        return needle_passage(rng, rng.randrange(1, max_sentences), 1)
    return prose(rng, rng.randrange(2, max_sentences + 1))


def needle_haystack(
    rng: random.Random, tokenizer: Any, n_tokens: int, depth: float | None = None
) -> Passage:
    """A niah-like context of about ``n_tokens`` tokens (filler prose grown sentence by
    sentence) with one needle at ``depth`` (0 = start, 1 = end; random when ``None``)."""
    fact, qa = needle(rng)
    body: list[str] = []
    while len(tokenizer.encode(" ".join([*body, fact]), add_special_tokens=False)) < n_tokens:
        body.append(filler_sentence(rng))
    at = round((rng.random() if depth is None else depth) * len(body))
    body.insert(at, fact)
    return Passage(" ".join(body), [qa], "needle", {"depth": at / max(1, len(body) - 1)})
