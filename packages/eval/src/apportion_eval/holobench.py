"""Benchmark ``holobench`` (after HoloBench, Maekawa et al. 2024): database queries over
table rows written as sentences, with gold answers computed by DuckDB on the same rows.

A seeded ``employees`` table (name, department, city, age, salary) is written one sentence
per row (``Ana Silva works in the Legal department in Oslo, is 41 years old and earns 72000
dollars a year.``) and mixed into stdlib prose. ``density`` is the share of the context's
tokens that are rows; ``placement`` decides where rows sit (uniform, begin, middle, end,
bimodal). Queries: ``lookup``, filtered ``count``, ``max``/``min``, ``sum``/``avg`` and
``group-by``. The gold answer of each is the result of its SQL query on exactly the rows
in the context, so the benchmark cannot disagree with its own data.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from apportion.base import Benchmark, Sample
from pydantic import Field, field_validator

from apportion_eval.common import LengthsConfig, rng_for
from apportion_eval.scoring import normalize, string_match_part
from apportion_eval.text import compose, n_tokens, spread

Query = Literal["lookup", "count", "max", "min", "sum", "avg", "group-by"]
QUERIES: tuple[str, ...] = ("lookup", "count", "max", "min", "sum", "avg", "group-by")

FIRST = (
    "Ana",
    "Ben",
    "Chloe",
    "Dmitri",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kofi",
    "Lena",
    "Mateo",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Wen",
    "Yusuf",
    "Zara",
)
LAST = (
    "Silva",
    "Okafor",
    "Novak",
    "Tanaka",
    "Berg",
    "Moreau",
    "Haddad",
    "Kowalski",
    "Reyes",
    "Lindqvist",
    "Mensah",
    "Rossi",
    "Petrov",
    "Nakamura",
    "Duarte",
    "Fischer",
    "Ibarra",
    "Janssen",
    "Kaur",
    "Larsen",
)
DEPARTMENTS = ("Sales", "Research", "Finance", "Legal", "Support", "Marketing")
CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Denver")

SCHEMA = (
    "CREATE TABLE employees "
    "(name VARCHAR, department VARCHAR, city VARCHAR, age INTEGER, salary INTEGER)"
)


@dataclass(frozen=True)
class Row:
    name: str
    department: str
    city: str
    age: int
    salary: int

    def sentence(self) -> str:
        return (
            f"{self.name} works in the {self.department} department in {self.city}, is "
            f"{self.age} years old and earns {self.salary} dollars a year."
        )


def query_sql(query: str, arg: str | None) -> tuple[str, list[Any], str]:
    """The SQL (with parameters) and the question for one query kind and its argument."""
    table = {
        "lookup": (
            "SELECT salary FROM employees WHERE name = ?",
            f"How much does {arg} earn per year? Answer with the number only.",
        ),
        "count": (
            "SELECT count(*) FROM employees WHERE department = ?",
            f"How many employees work in the {arg} department? Answer with the number only.",
        ),
        "max": (
            "SELECT max(salary) FROM employees WHERE city = ?",
            f"What is the highest yearly salary among the employees in {arg}? "
            "Answer with the number only.",
        ),
        "min": (
            "SELECT min(age) FROM employees WHERE department = ?",
            f"How old is the youngest employee of the {arg} department? "
            "Answer with the number only.",
        ),
        "sum": (
            "SELECT sum(salary) FROM employees WHERE department = ?",
            f"What is the total yearly salary of all employees in the {arg} department? "
            "Answer with the number only.",
        ),
        "avg": (
            "SELECT round(avg(age)) FROM employees WHERE city = ?",
            f"What is the average age of the employees in {arg}, rounded to a whole number? "
            "Answer with the number only.",
        ),
        "group-by": (
            "SELECT department, count(*) FROM employees GROUP BY department ORDER BY department",
            "How many employees work in each department? Answer with one line per "
            "department in the form 'Department: count'.",
        ),
    }
    if query not in table:
        raise ValueError(f"unknown query {query!r}; known: {', '.join(QUERIES)}")
    sql, question = table[query]
    return sql, ([] if query == "group-by" else [arg]), question


def gold(rows: Sequence[Row], query: str, arg: str | None = None) -> list[str]:
    """Gold answers of ``query`` by DuckDB on ``rows``: one value, or ``"Dept: n"`` per group."""
    import duckdb

    sql, params, _ = query_sql(query, arg)
    con = duckdb.connect(":memory:")
    try:
        con.execute(SCHEMA)
        if rows:
            con.executemany(
                "INSERT INTO employees VALUES (?, ?, ?, ?, ?)",
                [(r.name, r.department, r.city, r.age, r.salary) for r in rows],
            )
        result = con.execute(sql, params).fetchall()
    finally:
        con.close()
    if query == "group-by":
        return [f"{dept}: {n}" for dept, n in result]
    value = result[0][0] if result else None
    if value is None:
        raise ValueError(f"query {query!r} on {arg!r} has no answer in this table")
    return [str(int(value)) if float(value) == int(value) else str(value)]


class HoloConfig(LengthsConfig):
    queries: list[Query] = Field(list(QUERIES), description="query kinds, one sample set each")
    density: float = Field(
        0.5, gt=0.0, le=0.9, description="share of context tokens that are table rows"
    )
    placement: Literal["uniform", "begin", "middle", "end", "bimodal"] = Field(
        "uniform", description="where the rows sit in the context"
    )

    @field_validator("queries")
    @classmethod
    def _queries(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"queries must name at least one of {', '.join(QUERIES)}")
        return v


class HoloBench(Benchmark):
    """Database operations over text; gold answers by DuckDB on the same rows."""

    name = "holobench"
    summary = (
        "database queries over rows written as sentences; gold answers by DuckDB on the same rows"
    )
    Config = HoloConfig
    max_new_tokens = 32

    def samples(self, tokenizer: Any) -> Iterator[Sample]:
        cfg = self.config
        for length in cfg.lengths:
            for query in cfg.queries:
                for k in range(cfg.samples):
                    yield self._sample(tokenizer, length, query, k)

    def _rows(self, rng: Any, n: int) -> list[Row]:
        names = [f"{f} {last}" for f in FIRST for last in LAST]
        rng.shuffle(names)
        return [
            Row(
                names[i],
                rng.choice(DEPARTMENTS),
                rng.choice(CITIES),
                rng.randrange(22, 65),
                rng.randrange(30, 151) * 1000,
            )
            for i in range(min(n, len(names)))
        ]

    def _sample(self, tokenizer: Any, length: int, query: str, k: int) -> Sample:
        cfg = self.config
        rng = rng_for("holo", cfg.seed, cfg.density, cfg.placement, length, query, k)
        probe = self._rows(rng_for("holo-probe"), 8)
        per_row = sum(n_tokens(tokenizer, " " + r.sentence()) for r in probe) / len(probe)
        n_rows = max(3, int(cfg.density * length / per_row))
        rows = self._rows(rng, n_rows)
        arg = {
            "lookup": lambda: rng.choice(rows).name,
            "count": lambda: rng.choice(rows).department,
            "min": lambda: rng.choice(rows).department,
            "sum": lambda: rng.choice(rows).department,
            "max": lambda: rng.choice(rows).city,
            "avg": lambda: rng.choice(rows).city,
            "group-by": lambda: None,
        }[query]()
        _, _, question = query_sql(query, arg)
        answers = gold(rows, query, arg)
        pieces = list(
            zip([r.sentence() for r in rows], spread(rng, len(rows), cfg.placement), strict=True)
        )
        composed = compose(tokenizer, length, question, pieces, rng, what="holobench")
        relevant = (
            len(rows)
            if query in ("group-by",)
            else sum(arg in (r.name, r.department, r.city) for r in rows)
        )
        scope = "small" if query == "lookup" else "large"
        diffusion = (
            "low"
            if query == "lookup"
            else ("high" if cfg.placement in ("uniform", "bimodal") else "medium")
        )
        return Sample(
            id=f"holo-{query}-{cfg.placement}-{cfg.density}-{length}-{k}",
            context=composed.context,
            question=question,
            answers=answers,
            length=length,
            depth=None,
            tags={"diffusion": diffusion, "scope": scope},
            meta={
                "query": query,
                "arg": arg,
                "rows": len(rows),
                "relevant_rows": relevant,
                "placement": cfg.placement,
                "density": cfg.density,
                "context_chars": len(composed.context),
            },
            max_new_tokens=self.max_new_tokens + (12 * len(answers) if query == "group-by" else 0),
        )

    def score(self, sample: Sample, prediction: str) -> float:
        if sample.meta.get("query") == "group-by":
            return group_score(sample.answers, prediction)
        return string_match_part(sample.answers, prediction)


def group_score(answers: Sequence[str], prediction: str) -> float:
    """Share of ``"Group: n"`` answers whose group is followed by the right count."""
    if not answers:
        return 0.0
    text = normalize(prediction)
    hits = 0
    for a in answers:
        group, _, count = a.rpartition(":")
        m = re.search(rf"(?<![a-z]){re.escape(group.strip().lower())}\W{{0,12}}?(\d+)", text)
        hits += bool(m and m.group(1) == count.strip())
    return hits / len(answers)
