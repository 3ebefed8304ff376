"""Writes the small datasets shipped in ``apportion_icl/data`` (deterministic, seed 0).

Origin: every sentence is composed here from hand-written phrase lists by the apportion
authors; all people, companies and places in the QA set are fictional. Licence: the
package's own (Apache-2.0). Rerun with ``python packages/icl/scripts/make_data.py``.

- ``classify.jsonl``: three short classification tasks (sentiment, topic, intent), each
  query lists its options. Splits: ``pool`` (demonstrations), ``train`` (controller
  training), ``test``.
- ``qa.jsonl``: fictional biographies and company profiles (``docs``) with single-hop and
  two-hop questions whose answers are spans of those documents (for pruning, retrieval,
  recycling and iterative retrieval).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "apportion_icl" / "data"

SUBJECTS = [
    "The pasta",
    "The hotel room",
    "The concert",
    "This phone",
    "The service",
    "The movie",
    "The coffee",
    "The new album",
    "The hiking trail",
    "The rental car",
    "This laptop",
    "The museum tour",
    "The delivery",
    "The haircut",
    "The novel",
    "The museum cafe",
]
POSITIVE = [
    "was wonderful",
    "exceeded every expectation",
    "was worth every penny",
    "made my whole week",
    "was a delight from start to finish",
    "is the best I have had",
    "left me smiling",
    "was fantastic and I will be back",
    "felt like a real treat",
    "was friendly, quick and perfect",
]
NEGATIVE = [
    "was a complete waste of money",
    "was awful",
    "left me angry",
    "broke after two days",
    "was cold, late and rude",
    "is the worst I have tried",
    "made me want a refund",
    "was a letdown and I will not return",
    "was dirty and overpriced",
    "ruined the evening",
]
SUBTLE_POS = [
    "I would happily go again",
    "no complaints at all",
    "I keep recommending it to friends",
]
SUBTLE_NEG = ["I expected far more", "never again", "I wish I had stayed home"]

TOPICS = {
    "sports": [
        "{team} wins the {event} final after extra time",
        "Star striker signs with {team}",
        "{team} coach resigns after season of defeats",
        "Record crowd watches {team} clinch title",
        "Injury rules goalkeeper out of {event}",
    ],
    "science": [
        "Telescope spots water vapour on distant {thing}",
        "Researchers map the genome of a rare {thing}",
        "New battery chemistry doubles {thing} range",
        "Physicists measure {thing} with record precision",
        "Fossil of ancient {thing} found in desert",
    ],
    "business": [
        "{company} shares jump after strong quarter",
        "{company} to cut 2,000 jobs",
        "{company} agrees merger with rival",
        "Central bank holds interest rates as {company} reports losses",
        "{company} opens new factory abroad",
    ],
    "food": [
        "Ten easy recipes for {dish}",
        "Chef reveals the secret to perfect {dish}",
        "Why {dish} is the dish of the summer",
        "Street market celebrates local {dish}",
        "How to bake {dish} without an oven",
    ],
}
FILL = {
    "team": ["Riverton United", "the Harbor Hawks", "North City", "the Valley Rovers"],
    "event": ["cup", "league", "championship"],
    "thing": ["exoplanet", "comet", "orchid", "particle", "beetle", "moon"],
    "company": ["Norvex", "Talbright", "Quillon Corp", "Ashgrove Bank", "Mercato Foods"],
    "dish": ["sourdough", "ramen", "lemon tart", "paella", "dumplings", "curry"],
}

INTENTS = {
    "refund": [
        "I want my money back for order {n}",
        "Please reverse the charge on my card",
        "The item was faulty, can I get a refund?",
        "How do I return this and get reimbursed?",
        "You charged me twice, I need the money returned",
    ],
    "shipping": [
        "Where is my parcel? Order {n} has not arrived",
        "When will my package be delivered?",
        "The tracking number for order {n} shows nothing",
        "Can you ship to a different address?",
        "My delivery is a week late",
    ],
    "account": [
        "I forgot my password and cannot log in",
        "How do I change the email on my profile?",
        "Please delete my account",
        "My login code never arrives",
        "Someone else may be using my account",
    ],
}

FIRST = [
    "Mira",
    "Tomas",
    "Ines",
    "Kofi",
    "Lena",
    "Ravi",
    "Sofia",
    "Anders",
    "Yuki",
    "Dario",
    "Nadia",
    "Oskar",
    "Priya",
    "Elias",
    "Hana",
    "Marek",
    "Zara",
    "Felix",
    "Amara",
    "Jonas",
]
LAST = [
    "Osei",
    "Varga",
    "Lindqvist",
    "Moreau",
    "Tanaka",
    "Brennan",
    "Castell",
    "Novak",
    "Haddad",
    "Okafor",
    "Ferreira",
    "Adler",
    "Quint",
    "Sorensen",
    "Vallis",
    "Ibarra",
]
CITIES = [
    "Ravenport",
    "Kelmsford",
    "Dunmore Bay",
    "Astrava",
    "Millhaven",
    "Port Selene",
    "Orlen Falls",
    "Greywick",
    "Saltmere",
    "Calloway",
    "Brightwater",
    "Eskerfield",
]
JOBS = [
    "violin maker",
    "marine biologist",
    "architect",
    "pastry chef",
    "botanist",
    "pilot",
    "glassblower",
    "cartographer",
    "beekeeper",
    "surgeon",
]
CO_A = [
    "Tallow",
    "Brindle",
    "Cobalt",
    "Wren",
    "Juniper",
    "Harrow",
    "Lumen",
    "Ostrich",
    "Pylon",
    "Saffron",
    "Thistle",
    "Vantage",
    "Marrow",
    "Kestrel",
    "Quarry",
    "Ember",
]
CO_B = ["Works", "Labs", "Dynamics", "Foods", "Textiles", "Robotics", "Optics", "Press"]
PRODUCTS = [
    "wooden bicycles",
    "solar lanterns",
    "seaweed snacks",
    "weather balloons",
    "ceramic knives",
    "hearing aids",
    "paper drones",
    "canvas tents",
    "glass marbles",
    "electric kettles",
]


def classify(
    rng: random.Random,
    phrases: dict | None = None,
    per_task: int = 60,
    subtle_every: int = 5,
    start: int = 0,
    seen: set[str] | None = None,
) -> list[dict]:
    """``per_task`` rows per task from ``phrases`` (default: the first lists), shuffled,
    deduplicated against ``seen``, numbered from ``start`` and split pool/train/test."""
    p = phrases or {
        "subjects": SUBJECTS,
        "pos": POSITIVE,
        "neg": NEGATIVE,
        "subtle_pos": SUBTLE_POS,
        "subtle_neg": SUBTLE_NEG,
        "topics": TOPICS,
        "fill": FILL,
        "intents": INTENTS,
    }
    rows = []
    for i in range(per_task):
        pos = i % 2 == 0
        subj = rng.choice(p["subjects"])
        if i % subtle_every == subtle_every - 1:
            text = f"{subj}? {rng.choice(p['subtle_pos'] if pos else p['subtle_neg'])}."
        else:
            text = f"{subj} {rng.choice(p['pos'] if pos else p['neg'])}."
        rows.append(
            {
                "task": "sentiment",
                "text": text,
                "label": "positive" if pos else "negative",
                "options": ["positive", "negative"],
            }
        )
    labels = list(p["topics"])
    for i in range(per_task):
        label = labels[i % 4]
        tmpl = rng.choice(p["topics"][label])
        text = tmpl.format(**{k: rng.choice(v) for k, v in p["fill"].items()})
        rows.append({"task": "topic", "text": text, "label": label, "options": labels})
    intents = list(p["intents"])
    for i in range(per_task):
        label = intents[i % 3]
        text = rng.choice(p["intents"][label]).format(n=rng.randrange(10000, 99999))
        rows.append({"task": "intent", "text": text, "label": label, "options": intents})
    rng.shuffle(rows)
    seen = set() if seen is None else seen
    out = []
    for r in rows:
        if r["text"] in seen:
            continue
        seen.add(r["text"])
        out.append(r)
    for i, r in enumerate(out):
        r["id"] = f"c{start + i:03d}"
        r["split"] = "pool" if i % 3 == 0 else ("train" if i % 3 == 1 else "test")
    return out


# A second set of phrase lists, so that the DynaICL controller's training and test splits hold
# more than about 45 queries each. Its rows follow the first set's (ids continue after it; its
# own seed), so the first set and the QA file do not change.
SUBJECTS_2 = [
    "The breakfast buffet",
    "The yoga class",
    "The train journey",
    "This vacuum cleaner",
    "The dentist visit",
    "The sushi bar",
    "The wedding band",
    "This mattress",
    "The boat trip",
    "The bookshop",
    "The online course",
    "The bakery",
    "The campsite",
    "The headphones",
    "The theatre show",
    "The gym",
    "The tailor",
    "The ski lesson",
    "This blender",
    "The bus tour",
]
POSITIVE_2 = [
    "was a pleasure",
    "was superb",
    "was so much better than I hoped",
    "is brilliant value",
    "was calm, clean and lovely",
    "impressed the whole family",
    "was a joy",
    "deserves five stars",
    "was excellent in every way",
    "made the trip memorable",
    "works perfectly",
    "was charming and warm",
]
NEGATIVE_2 = [
    "was a disaster",
    "was terrible",
    "disappointed all of us",
    "stopped working within a week",
    "was noisy, cramped and unpleasant",
    "is a rip-off",
    "was painfully slow",
    "deserves zero stars",
    "was rude and careless",
    "spoiled our holiday",
    "fell apart immediately",
    "was a total mess",
]
SUBTLE_POS_2 = [
    "I will definitely book again",
    "worth the trip",
    "I cannot wait to go back",
    "honestly better than the reviews say",
]
SUBTLE_NEG_2 = [
    "I want those hours back",
    "not worth the trip",
    "I will be asking for my money back",
    "honestly worse than the reviews say",
]

TOPICS_2 = {
    "sports": [
        "{team} beat {team2} in a dramatic penalty shootout",
        "Marathon runner breaks course record",
        "{team} sacks manager after fifth straight loss",
        "Tennis champion retires at thirty-four",
        "Olympic swimmer wins third gold medal",
        "{team} fans celebrate promotion",
        "Cyclist crashes out of mountain stage",
        "Boxer defends world title in {city}",
    ],
    "science": [
        "Scientists discover new species of {thing} in rainforest",
        "Spacecraft lands on {thing}",
        "Study links sleep to memory in {thing} brains",
        "Quantum computer solves chemistry problem",
        "Volcano eruption studied with drones",
        "Vaccine trial shows strong immune response",
        "Astronomers detect signal from distant galaxy",
        "Climate model predicts wetter winters",
    ],
    "business": [
        "{company} profits fall as costs rise",
        "{company} chief executive steps down",
        "Stock markets slide on inflation fears",
        "{company} buys start-up for 3 billion",
        "Retail sales drop for second month",
        "{company} raises prices amid supply shortage",
        "Investors pull money from {company}",
        "Oil prices climb as output is cut",
    ],
    "food": [
        "The best {dish} in {city}, ranked",
        "Grandmother's {dish} recipe goes viral",
        "Five mistakes people make with {dish}",
        "Vegan {dish} that even meat lovers enjoy",
        "Food festival draws crowds for {dish}",
        "How to store fresh herbs for longer",
        "A quick weeknight {dish} in twenty minutes",
        "Bakers share tips for flaky pastry",
    ],
}
FILL_2 = {
    "team": [
        "Riverton United",
        "the Harbor Hawks",
        "North City",
        "the Valley Rovers",
        "Eastfield Athletic",
        "the Coastline Sharks",
    ],
    "team2": ["Millbrook", "the Iron Bears", "Southgate Town"],
    "thing": ["frog", "asteroid", "mars", "octopus", "bee", "jellyfish"],
    "company": [
        "Norvex",
        "Talbright",
        "Quillon Corp",
        "Ashgrove Bank",
        "Mercato Foods",
        "Pellwood Motors",
        "Stratus Air",
    ],
    "dish": [
        "sourdough",
        "ramen",
        "lemon tart",
        "paella",
        "dumplings",
        "curry",
        "lasagne",
        "pancakes",
        "risotto",
    ],
    "city": ["Lisbon", "Osaka", "Chicago", "Naples", "Melbourne"],
}

INTENTS_2 = {
    "refund": [
        "I returned the shoes two weeks ago and still have not been paid back",
        "Cancel order {n} and give me my money back",
        "The jacket does not fit, I would like a refund",
        "I was charged for a subscription I cancelled",
        "Can I get reimbursed for the broken lamp?",
        "Please credit my card for the missing items",
        "The refund for order {n} is not on my statement",
        "I paid for express shipping but it came late, I want that fee back",
        "Your app took payment twice for one ticket",
        "How long until my refund is processed?",
    ],
    "shipping": [
        "Has order {n} left the warehouse yet?",
        "The courier left my parcel at the wrong house",
        "Do you deliver to Canada?",
        "How much is next-day delivery?",
        "My package says delivered but I never got it",
        "Can I pick up order {n} from a store instead?",
        "The box arrived crushed, when is the replacement shipped?",
        "Please change the delivery date for order {n}",
        "Which carrier do you use for large items?",
        "Tracking has not updated for five days",
    ],
    "account": [
        "I cannot reset my password, the link has expired",
        "How do I turn on two-factor login?",
        "Please update the phone number on my profile",
        "I want to merge my two accounts",
        "My account was locked after too many attempts",
        "How do I unsubscribe from your emails?",
        "I did not sign up but I get account emails",
        "Change my username please",
        "Why can I not sign in with my Google login?",
        "Close my profile and erase my data",
    ],
}


MORE = {
    "subjects": SUBJECTS_2,
    "pos": POSITIVE_2,
    "neg": NEGATIVE_2,
    "subtle_pos": SUBTLE_POS_2,
    "subtle_neg": SUBTLE_NEG_2,
    "topics": TOPICS_2,
    "fill": FILL_2,
    "intents": INTENTS_2,
}


def qa(rng: random.Random) -> list[dict]:
    people = rng.sample([f"{f} {s}" for f in FIRST for s in LAST], 24)
    companies = rng.sample([f"{a} {b}" for a in CO_A for b in CO_B], 24)
    rows = []
    for i, (person, company) in enumerate(zip(people, companies, strict=True)):
        city, job, product = rng.choice(CITIES), rng.choice(JOBS), rng.choice(PRODUCTS)
        year = rng.randrange(1950, 2020)
        pdoc = {
            "id": f"p{i:02d}",
            "title": person,
            "text": f"{person} is a {job} who lives in {city}. {person.split()[0]} trained for "
            f"many years before opening a small studio near the old harbour.",
        }
        cdoc = {
            "id": f"k{i:02d}",
            "title": company,
            "text": f"{company} was founded in {year} by {person}. The company makes {product} "
            f"and sells them in more than twenty countries.",
        }
        rows.append({"type": "doc", **pdoc})
        rows.append({"type": "doc", **cdoc})
        first = person.split()[0]
        rows.append(
            {
                "type": "question",
                "hop": 1,
                "question": f"In which city does {person} live?",
                "answer": city,
                "docs": [pdoc["id"]],
                "skills": ["lookup"],
            }
        )
        rows.append(
            {
                "type": "question",
                "hop": 1,
                "question": f"What does {company} make?",
                "answer": product,
                "docs": [cdoc["id"]],
                "skills": ["lookup"],
            }
        )
        rows.append(
            {
                "type": "question",
                "hop": 1,
                "question": f"In which year was {company} founded?",
                "answer": str(year),
                "docs": [cdoc["id"]],
                "skills": ["lookup", "number"],
            }
        )
        rows.append(
            {
                "type": "question",
                "hop": 2,
                "question": f"In which city does the founder of {company} live?",
                "answer": city,
                "docs": [cdoc["id"], pdoc["id"]],
                "skills": ["bridge", "lookup"],
                "subquestions": [f"Who founded {company}?", f"In which city does {person} live?"],
                "bridge": person,
            }
        )
        rows.append(
            {
                "type": "question",
                "hop": 2,
                "question": f"What is the job of the person who founded {company}?",
                "answer": job,
                "docs": [cdoc["id"], pdoc["id"]],
                "skills": ["bridge", "lookup"],
                "subquestions": [f"Who founded {company}?", f"What is the job of {person}?"],
                "bridge": person,
            }
        )
        del first
    qs = [r for r in rows if r["type"] == "question"]
    for i, r in enumerate(qs):
        r["id"] = f"q{i:03d}"
        r["split"] = "pool" if i % 4 == 0 else ("train" if i % 4 == 1 else "test")
    return rows


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    first = classify(rng)
    more = classify(
        random.Random(1),
        MORE,
        per_task=100,
        subtle_every=4,
        start=len(first),
        seen={r["text"] for r in first},
    )
    for name, rows in (("classify", first + more), ("qa", qa(rng))):
        path = OUT / f"{name}.jsonl"
        path.write_text(
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8"
        )
        print(path, len(rows))


if __name__ == "__main__":
    main()
