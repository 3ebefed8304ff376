"""cwe, fwe, multihop-qa and graph-tracing: lengths in real tokens, gold answers where the
task says they are, seeded generation, and scoring on hand-written predictions."""

import math
import re
from collections import Counter

import pytest
from apportion.errors import ConfigError
from apportion.host import Host
from apportion_eval.fwe import NOISE, zeta, zipf_counts
from apportion_eval.graph_tracing import neighbours, predicted_node


def _prompt_tokens(smollm2, registry, s):
    strategy = registry.create("prompt-strategy", "zero-shot")
    return len(Host(smollm2).encode(strategy.build(s.question, context=s.context)).ids)


def _samples(smollm2, registry, name, **options):
    return list(registry.create("benchmark", name, options).samples(smollm2.tokenizer))


def _same(a, b):
    return [(s.id, s.context, s.question, s.answers) for s in a] == [
        (s.id, s.context, s.question, s.answers) for s in b
    ]


@pytest.mark.parametrize("name", ["cwe", "fwe", "multihop-qa", "graph-tracing"])
def test_seeded_and_length_in_real_tokens(smollm2, registry, name):
    opts = {"lengths": [700, 2048], "samples": 2, "seed": 5}
    a = _samples(smollm2, registry, name, **opts)
    assert _same(a, _samples(smollm2, registry, name, **opts))
    other = _samples(smollm2, registry, name, **{**opts, "seed": 6})
    assert [s.context for s in a] != [s.context for s in other]
    assert a[0].context != a[1].context  # samples of one cell differ
    for s in a:
        n = _prompt_tokens(smollm2, registry, s)
        assert abs(n - s.length) <= 0.02 * s.length, (s.id, n)
        assert set(s.tags) == {"diffusion", "scope"}


# ----------------------------------------------------------------------------------- cwe


def _entries(context):
    return re.findall(r"^\d+\. (.+)$", context, flags=re.M)


def test_cwe_common_words_are_the_most_common(smollm2, registry):
    for s in _samples(smollm2, registry, "cwe", lengths=[512, 2048], samples=2):
        entries = _entries(s.context)
        assert len(entries) == s.meta["entries"]
        numbers = [int(n) for n in re.findall(r"^(\d+)\. ", s.context, flags=re.M)]
        assert numbers == list(range(1, len(entries) + 1))
        counts = Counter(entries)
        assert len(s.answers) == 3
        assert all(counts[w] == 12 for w in s.answers), counts.most_common(4)
        assert max(c for w, c in counts.items() if w not in s.answers) <= 2
        assert len(counts) - 3 == s.meta["uncommon_words"]
    # a longer context holds more uncommon words, the common ones keep their count
    short, long = _samples(smollm2, registry, "cwe", lengths=[512, 2048], samples=1)
    assert long.meta["uncommon_words"] > 2 * short.meta["uncommon_words"]


def test_cwe_scoring_and_options(smollm2, registry):
    s = _samples(smollm2, registry, "cwe", lengths=[512], samples=1, num_common=2)[0]
    bench = registry.create("benchmark", "cwe", {"num_common": 2})
    a, b = s.answers
    assert bench.score(s, f"The most common words are {a} and {b}.") == 1.0
    assert bench.score(s, f"1. {a.upper()}\n2. nothing") == 0.5
    assert bench.score(s, f"{a}s") == 0.0  # a whole word, not a prefix
    with pytest.raises(ValueError, match="must exceed"):
        registry.create("benchmark", "cwe", {"common_freq": 3, "uncommon_freq": 3})


def test_cwe_too_short_is_a_clear_error(smollm2, registry):
    with pytest.raises(ConfigError, match="too short"):
        _samples(smollm2, registry, "cwe", lengths=[128], num_common=10, common_freq=30)


# ----------------------------------------------------------------------------------- fwe


def test_zipf_counts():
    assert zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-9)
    assert zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-9)
    counts = zipf_counts(1000, 2.0, 50)
    assert counts[:4] == [int(1000 / (r * r) / (math.pi**2 / 6)) for r in range(1, 5)]
    assert counts == sorted(counts, reverse=True)


def test_fwe_gold_are_the_top_words_after_the_noise(smollm2, registry):
    for s in _samples(smollm2, registry, "fwe", lengths=[512, 2048], samples=2):
        text = s.context.split("\n", 1)[1]
        counts = Counter(text.split())
        ranked = [w for w, _ in counts.most_common()]
        assert ranked[0] == NOISE
        assert set(ranked[1:4]) == set(s.answers)
        assert counts[s.answers[-1]] > counts[ranked[4]]  # strictly ahead of the 4th word
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in ranked[1:])
        assert sum(counts.values()) == s.meta["words"]
    steeper = _samples(smollm2, registry, "fwe", lengths=[512], samples=1, alpha=3.0)[0]
    assert steeper.meta["distinct"] < s.meta["distinct"]


def test_fwe_scoring(smollm2, registry):
    s = _samples(smollm2, registry, "fwe", lengths=[512], samples=1)[0]
    bench = registry.create("benchmark", "fwe")
    a, b, c = s.answers
    assert bench.score(s, f"{a}, {b}, {c}") == 1.0
    assert bench.score(s, f"{a}, {a}, {a}") == pytest.approx(1 / 3)
    assert bench.score(s, "...") == 0.0


# --------------------------------------------------------------------------- multihop-qa


@pytest.mark.parametrize(
    "options",
    [
        {"hops": 2},
        {"hops": 1, "distractors": 0},
        {"hops": 4, "distractors": 3, "order": "shuffled"},
        {"hops": 2, "window": 0.0},
    ],
)
def test_multihop_chain_in_the_context(smollm2, registry, options):
    for s in _samples(smollm2, registry, "multihop-qa", lengths=[1024], samples=2, **options):
        facts, city = s.meta["facts"], s.answers[0]
        assert len(facts) == options["hops"]
        assert s.meta["person"] in s.question and s.meta["person"] in facts[0]
        assert facts[-1].endswith(f" {city}.")
        for fact in facts:
            assert s.context.count(fact) == 1, fact
        assert s.context.count(city) == 1
        others = s.meta["distractor_cities"]
        assert len(others) == options.get("distractors", 2) and city not in others
        assert all(s.context.count(c) == 1 for c in others)
        at = [s.context.index(f) for f in facts]
        if options.get("order", "chain") == "chain":
            assert at == sorted(at)
        if options.get("window") == 0.0:
            assert at[-1] - at[0] < 4 * sum(map(len, facts))  # side by side, give or take
        # each hop's object is the next hop's subject
        for a, b in zip(facts, facts[1:], strict=False):
            obj = a.rstrip(".").split(" as ")[-1].split(" at ")[-1]
            assert b.startswith(obj + " "), (a, b)


def test_multihop_scoring_and_distractor_metric(smollm2, registry):
    s = _samples(smollm2, registry, "multihop-qa", lengths=[512], samples=1)[0]
    bench = registry.create("benchmark", "multihop-qa")
    city, other = s.answers[0], s.meta["distractor_cities"][0]
    assert bench.score(s, f"{s.meta['person']} works in {city}.") == 1.0
    assert bench.metrics(s, city) == {"distractor_named": False}
    assert bench.score(s, other) == 0.0
    assert bench.metrics(s, f"{other} or {city}") == {"distractor_named": True}


# -------------------------------------------------------------------------- graph-tracing


def test_graph_shapes():
    assert neighbours("ring", 5) == [[1, 4], [0, 2], [1, 3], [2, 4], [0, 3]]
    grid = neighbours("grid", 9)
    assert grid[0] == [1, 3] and grid[4] == [1, 3, 5, 7] and grid[8] == [5, 7]
    assert all(i in grid[j] for i in range(9) for j in grid[i])  # undirected


@pytest.mark.parametrize("graph,nodes", [("ring", 16), ("grid", 16), ("grid", 9)])
def test_graph_walk_is_valid_and_answers_are_neighbours(smollm2, registry, graph, nodes):
    samples = _samples(
        smollm2,
        registry,
        "graph-tracing",
        lengths=[256, 1024],
        samples=2,
        graph=graph,
        num_nodes=nodes,
    )
    for s in samples:
        words = s.meta["nodes"]
        index = {w: i for i, w in enumerate(words)}
        adj = neighbours(graph, nodes)
        walk = [index[w] for w in s.context.split(", ")]
        assert len(walk) == s.meta["steps"]
        assert all(b in adj[a] for a, b in zip(walk, walk[1:], strict=False))
        assert words[walk[-1]] == s.meta["last"]
        assert sorted(s.answers) == sorted(words[j] for j in adj[walk[-1]])
        assert s.meta["chance"] == len(s.answers) / nodes
        assert all(s.context.count(w) > 0 for w in s.answers)
    # longer contexts hold longer walks
    assert samples[-1].meta["steps"] > 3 * samples[0].meta["steps"]


def test_graph_scoring_reads_the_predicted_node(smollm2, registry):
    s = _samples(smollm2, registry, "graph-tracing", lengths=[256], samples=1)[0]
    bench = registry.create("benchmark", "graph-tracing")
    last, good = s.meta["last"], s.answers[0]
    bad = next(w for w in s.meta["nodes"] if w not in s.answers and w != last)
    assert bench.score(s, f'The word that comes next in the list above is "{good}".') == 1.0
    assert bench.score(s, f"After {last} comes {good.title()}.") == 1.0  # restated last word
    assert bench.score(s, f"{bad}, then {good}") == 0.0  # the first node named counts
    assert bench.score(s, last) == 0.0  # a self-loop is never valid
    assert bench.score(s, "I do not know.") == 0.0
    assert bench.score(s, f"{good}s") == 0.0  # whole words only
    m = bench.metrics(s, good)
    assert m == {"chance": s.meta["chance"], "predicted": good, "steps": s.meta["steps"]}
    assert predicted_node("nothing", s.meta["nodes"], last) is None


def test_graph_options_are_validated(registry):
    with pytest.raises(ValueError, match="square"):
        registry.create("benchmark", "graph-tracing", {"graph": "grid", "num_nodes": 10})
    with pytest.raises(ValueError):
        registry.create("benchmark", "graph-tracing", {"num_nodes": 99})
