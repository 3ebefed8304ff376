"""records.jsonl: a line is a record only if every field the resume, the summary and the
report read holds what they expect; any other line is set aside, said, and never crashes them.
Real files, the core's own summary."""

from __future__ import annotations

import io
import json

import pytest
from apportion.records import FIELD_CHECKS, REJECTED, latest, load_records
from apportion.runner import render_table, summarize

#: a record as the runner writes it
GOOD = {
    "variant": "baseline",
    "benchmark": "niah",
    "sample_id": "niah-256-0",
    "sample_hash": "ab12",
    "model_fingerprint": "cd34",
    "question_in_prefill": True,
    "length": 256,
    "depth": 0.5,
    "answers": ["42"],
    "tags": {"diffusion": "low", "scope": "small"},
    "components": {"kv_policy": "full"},
    "prediction": "The code is 42.",
    "score": 1.0,
    "prompt_tokens": 250,
    "peak_kv_bytes": 1 << 20,
    "peak_resident_kv_bytes": 1 << 20,
    "prefill_seconds": 0.5,
    "decode_tokens_per_s": 12.5,
    "context_chars": 900,
    "batch_size": 1,
    "shared_prefill": 2,
}

#: (field, a value it must not hold, whether the core's summary itself fails on it)
BAD = [
    ("score", "x", True),
    ("score", None, True),
    ("score", 7.0, False),  # a silently wrong accuracy of 700%
    ("score", float("nan"), False),
    ("length", "abc", True),
    ("length", 2.5, False),
    ("length", -1, False),
    ("depth", "deep", False),
    ("depth", float("inf"), False),
    ("prompt_tokens", [1], True),
    ("peak_kv_bytes", "1 MiB", True),
    ("peak_kv_bytes", 10**400, True),
    ("peak_resident_kv_bytes", {"a": 1}, True),
    ("prefill_seconds", "fast", True),
    ("decode_tokens_per_s", True, False),
    ("context_chars", "many", False),
    ("shared_prefill", "two", False),
    ("batch_size", 1.5, False),
    ("error", 3, False),
    ("error_kind", ["x"], False),
    ("prediction", {"text": "42"}, False),
    ("sample_hash", ["unhashable"], False),
    ("model_fingerprint", 7, False),
    ("question_in_prefill", "yes", False),
    ("components", "full", False),
    ("tags", ["low"], False),
]


def test_every_checked_field_has_a_bad_case():
    assert {f for f, _, _ in BAD} == set(FIELD_CHECKS)


def _table(records) -> str:
    from rich.console import Console

    out = io.StringIO()
    render_table(summarize(records), Console(file=out, width=200), title="t")
    return out.getvalue()


@pytest.mark.parametrize(("field", "value", "crashes"), BAD, ids=lambda v: repr(v)[:20])
def test_a_record_with_a_wrong_field_is_set_aside(tmp_path, field, value, crashes):
    bad = {**GOOD, field: value}
    if crashes:  # what reading it as a record did to the summary
        with pytest.raises((TypeError, ValueError, OverflowError)):
            summarize([bad])
    path = tmp_path / "records.jsonl"
    other = {**GOOD, "sample_id": "niah-256-1", "score": 0.0}
    line = json.dumps(bad)  # NaN and Infinity as Python's json writes them
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(other) + "\n")
    loaded = load_records(path, repair=True)
    assert [r["sample_id"] for r in loaded.records] == ["niah-256-0", "niah-256-1"]
    (problem,) = loaded.problems
    assert problem.startswith("line 2: not a record (") and f"{field} " in problem
    assert (tmp_path / REJECTED).read_text() == line + "\n"
    assert len(path.read_text().splitlines()) == 2
    table = _table(latest(loaded.records))
    assert "50.0%" in table  # one of two samples right


def test_null_reads_as_absent_but_a_null_score_is_refused(tmp_path):
    path = tmp_path / "records.jsonl"
    nulls = {k: None for k in FIELD_CHECKS if k != "score"}
    rows = [{**GOOD, **nulls}, {**GOOD, "sample_id": "s2", "score": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_records(path)
    assert [r["sample_id"] for r in loaded.records] == ["niah-256-0"]
    assert loaded.problems == ["line 2: not a record (score null is not a number in [0, 1])"]
    assert "100.0%" in _table(loaded.records)
