"""Benchmark construction: exact lengths, needles once at their depth, threads in order,
DuckDB gold answers against hand-worked expectations, longgen metrics."""

import pytest
from apportion.host import Host
from apportion_eval.holobench import Row, gold
from apportion_eval.text import n_tokens


def _prompt_tokens(smollm2, registry, s):
    strategy = registry.create("prompt-strategy", "zero-shot")
    return len(Host(smollm2).encode(strategy.build(s.question, context=s.context)).ids)


@pytest.mark.parametrize(
    "options",
    [
        {"variant": "single", "value_type": "number"},
        {"variant": "multi-value", "value_type": "uuid", "num_values": 3},
        {"variant": "multi-key", "value_type": "word", "num_keys": 6},
    ],
)
def test_niah_length_and_needle_once_at_depth(smollm2, registry, options):
    tok = smollm2.tokenizer
    bench = registry.create(
        "benchmark",
        "niah",
        {"lengths": [600, 2000], "depths": [0.0, 0.3, 0.75, 1.0], "samples": 1, **options},
    )
    for s in bench.samples(tok):
        n = _prompt_tokens(smollm2, registry, s)
        assert abs(n - s.length) <= 0.02 * s.length, (s.id, n)
        for needle in s.meta["needles"]:
            assert s.context.count(needle) == 1, needle
        for value in s.answers:
            assert s.context.count(value) == 1, value  # the value occurs only in its needle
        asked = s.meta["needles"][0]
        head, tail = (
            s.context[: s.context.index(asked)],
            s.context[s.context.index(asked) + len(asked) :],
        )
        for other in s.meta.get("all_needles", [])[1:]:  # depth is measured in prose tokens
            head, tail = head.replace(other, ""), tail.replace(other, "")
        before, after = n_tokens(tok, head), n_tokens(tok, tail)
        # the needle splits the prose at the asked depth (to within about one sentence)
        assert abs(before / (before + after) - s.depth) < 0.02 + 30 / s.length, (
            s.id,
            before,
            after,
        )


def test_niah_same_seed_same_samples_and_multi_query(smollm2, registry):
    opts = {
        "variant": "multi-query",
        "num_queries": 3,
        "lengths": [512],
        "depths": [0.5],
        "samples": 2,
    }
    a = list(registry.create("benchmark", "niah", opts).samples(smollm2.tokenizer))
    b = list(registry.create("benchmark", "niah", opts).samples(smollm2.tokenizer))
    assert [(s.context, s.answers) for s in a] == [(s.context, s.answers) for s in b]
    assert len({tuple(s.answers) for s in a}) == 2 and all(len(s.answers) == 3 for s in a)
    assert all(k in a[0].question for k in a[0].meta["keys"])


def test_too_short_length_is_a_clear_error(smollm2, registry):
    from apportion.errors import ConfigError

    bench = registry.create("benchmark", "needle-threading", {"lengths": [128], "hops": 8})
    with pytest.raises(ConfigError, match="too short"):
        list(bench.samples(smollm2.tokenizer))


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_threads_run_in_their_direction(smollm2, registry, direction):
    bench = registry.create(
        "benchmark",
        "needle-threading",
        {
            "lengths": [1500],
            "samples": 1,
            "hops": 4,
            "threads": 2,
            "direction": direction,
            "key_format": "word",
        },
    )
    (s,) = bench.samples(smollm2.tokenizer)
    assert s.meta["context_chars"] == len(s.context) and s.meta["context_tokens"] > 0
    for thread in s.meta["threads"]:
        offsets = [
            s.context.index(f"Key {a} points to {b}.")
            for a, b in zip(thread, thread[1:], strict=False)
        ]
        assert offsets == sorted(offsets, reverse=direction == "backward")
        assert s.context.count(f"Key {thread[-1]} points") == 0  # the end points nowhere
    assert s.answers == [t[-1] for t in s.meta["threads"]]


def test_variable_tracking_chain(smollm2, registry):
    bench = registry.create(
        "benchmark",
        "variable-tracking",
        {"lengths": [800], "samples": 1, "num_chains": 3, "num_hops": 3},
    )
    (s,) = bench.samples(smollm2.tokenizer)
    value = s.meta["value"]
    assert f"VAR {s.answers[0]} = {value}." in s.context and len(s.answers) == 4
    pos = [s.context.index(st) for st in s.meta["statements"]]
    assert pos == sorted(pos)  # each assignment comes after the one it reads
    assert bench.score(s, " ".join(s.answers)) == 1.0
    assert bench.score(s, " ".join(s.answers[:2])) == 0.5


ROWS = [
    Row("Ana Silva", "Sales", "Oslo", 30, 50000),
    Row("Ben Okafor", "Sales", "Lima", 41, 72000),
    Row("Chloe Novak", "Legal", "Oslo", 25, 91000),
    Row("Dmitri Tanaka", "Sales", "Oslo", 58, 64000),
    Row("Elena Berg", "Finance", "Lima", 36, 120000),
]


@pytest.mark.parametrize(
    ("query", "arg", "expected"),
    [
        ("lookup", "Chloe Novak", ["91000"]),
        ("count", "Sales", ["3"]),
        ("count", "Legal", ["1"]),
        ("max", "Oslo", ["91000"]),
        ("min", "Sales", ["30"]),
        ("sum", "Sales", ["186000"]),
        ("avg", "Lima", ["39"]),  # (41 + 36) / 2 = 38.5: DuckDB rounds half away from zero
        ("avg", "Oslo", ["38"]),  # (30 + 25 + 58) / 3 = 37.67 -> 38
        ("group-by", None, ["Finance: 1", "Legal: 1", "Sales: 3"]),
    ],
)
def test_duckdb_gold_matches_hand_worked(query, arg, expected):
    assert gold(ROWS, query, arg) == expected


def test_duckdb_gold_no_match_is_an_error():
    with pytest.raises(ValueError, match="no answer"):
        gold(ROWS, "max", "Denver")


def test_holobench_rows_density_and_placement(smollm2, registry):
    tok = smollm2.tokenizer
    dense = registry.create(
        "benchmark",
        "holobench",
        {
            "lengths": [1024],
            "samples": 1,
            "queries": ["count"],
            "density": 0.6,
            "placement": "begin",
        },
    )
    sparse = registry.create(
        "benchmark",
        "holobench",
        {"lengths": [1024], "samples": 1, "queries": ["count"], "density": 0.2, "placement": "end"},
    )
    (d,), (s,) = list(dense.samples(tok)), list(sparse.samples(tok))
    assert d.meta["rows"] > 2 * s.meta["rows"]
    # every row's sentence is in the context, and the gold answer agrees with those sentences
    n_dept = d.context.count(f"in the {d.meta['arg']} department in")
    assert d.answers == [str(n_dept)]
    first = d.context.index(" works in the ")
    last = s.context.index(" works in the ")
    assert first / len(d.context) < 0.3 < 0.6 < last / len(s.context)


def test_longgen_metrics(smollm2, registry):
    bench = registry.create("benchmark", "longgen", {"lengths": [700], "samples": 1, "items": 5})
    (s,) = bench.samples(smollm2.tokenizer)
    good = "\n".join(f"{i + 1}. locker {a}" for i, a in enumerate(s.answers))
    assert bench.metrics(s, good) == {
        "completion_rate": 1.0,
        "item_accuracy": 1.0,
        "items": 5,
        "items_answered": 5,
        "items_correct": 5,
    }
    partial = (
        "\n".join(f"{i + 1}. locker {a}" for i, a in enumerate(s.answers[:3])) + "\n4. locker 1"
    )
    m = bench.metrics(s, partial)
    assert m["completion_rate"] == 0.8 and m["item_accuracy"] == 0.6
    assert bench.score(s, partial) == 0.6
    # answers in the wrong slots do not count
    shifted = "\n".join(f"{i + 2}. locker {a}" for i, a in enumerate(s.answers))
    assert bench.metrics(s, shifted)["item_accuracy"] < 1.0
    assert s.max_new_tokens >= 5 * 12
