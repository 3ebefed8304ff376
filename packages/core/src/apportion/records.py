"""A run's records: one JSON object per measured sample in ``RUN_DIR/records.jsonl``.

Each record is appended as one ``write`` of one line, then fsynced, so an interrupted run
loses at most the sample in flight and a rerun in the same directory skips every sample
already recorded. Reading is forgiving and says what it forgave: a torn last line (a crash
mid-write), a line that is not UTF-8 or not JSON, or a JSON value that is not a record (a key
field missing, or a field the summary or the report reads holding the wrong type, such as a
score that is not a number in [0, 1]) is skipped and reported; :func:`load_records` with
``repair=True`` rewrites the file without them (atomically) and keeps the rejected lines in
``records.rejected.jsonl``, so nothing is lost and nothing is read twice. Torch-free.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apportion.host.io import atomic_write

RECORDS = "records.jsonl"
REJECTED = "records.rejected.jsonl"
#: what every record has: the config it measured, the benchmark and the sample
KEY_FIELDS = ("variant", "benchmark", "sample_id")


def _number(v: Any) -> bool:
    """A JSON number a float can hold (what the summary turns every figure into)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        float(v)
    except OverflowError:  # an integer of hundreds of digits
        return False
    return True


def _score(v: Any) -> bool:
    return _number(v) and 0 <= v <= 1  # NaN compares false


def _finite(v: Any) -> bool:
    return _number(v) and math.isfinite(v)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _text(v: Any) -> bool:
    return isinstance(v, str)


def _object(v: Any) -> bool:
    return isinstance(v, dict)


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


#: what the fields that the resume, the summary and the report read must hold when a record
#: has them (``null`` is accepted wherever they read it as absent, which is everywhere but the
#: score): a line whose field holds anything else is not a record
FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "score": (_score, "a number in [0, 1]"),
    "length": (_count, "a whole number of tokens"),
    "depth": (_finite, "a finite number"),
    "prompt_tokens": (_number, "a number"),
    "peak_kv_bytes": (_number, "a number"),
    "peak_resident_kv_bytes": (_number, "a number"),
    "prefill_seconds": (_number, "a number"),
    "decode_tokens_per_s": (_number, "a number"),
    "context_chars": (_number, "a number"),
    "shared_prefill": (_count, "a whole number"),
    "batch_size": (_count, "a whole number"),
    "error": (_text, "a string"),
    "error_kind": (_text, "a string"),
    "prediction": (_text, "a string"),
    "sample_hash": (_text, "a string"),
    "model_fingerprint": (_text, "a string"),
    "question_in_prefill": (_flag, "true or false"),
    "components": (_object, "an object"),
    "tags": (_object, "an object"),
}
#: the fields that may not be ``null`` when present
NOT_NULL = frozenset({"score"})


@dataclass
class LoadedRecords:
    """Records read from a file, and the lines that were not records (with why)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    torn_tail: bool = False


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line atomically (a single ``write`` with ``O_APPEND``, then fsync)."""
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def record_problem(obj: Any) -> str | None:
    """Why ``obj`` is not a record (None if it is): a JSON object with the :data:`KEY_FIELDS`
    as strings, and every field of :data:`FIELD_CHECKS` it holds of the right type."""
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in KEY_FIELDS):
        return f"needs {', '.join(KEY_FIELDS)}"
    for key, (ok, what) in FIELD_CHECKS.items():
        if key not in obj:
            continue
        value = obj[key]
        if (value is not None or key in NOT_NULL) and not ok(value):
            shown = json.dumps(value, default=str)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            return f"{key} {shown} is not {what}"
    return None


def is_record(obj: Any) -> bool:
    return record_problem(obj) is None


def _parse(raw: bytes, lineno: int) -> tuple[dict[str, Any] | None, str | None]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, f"line {lineno}: not UTF-8"
    except (ValueError, RecursionError):
        return None, f"line {lineno}: not JSON"
    why = record_problem(obj)
    if why is not None:
        return None, f"line {lineno}: not a record ({why})"
    return obj, None


def load_records(path: Path, *, repair: bool = False) -> LoadedRecords:
    """Every record of ``path``, skipping (and reporting) lines that are not records.

    ``repair``: rewrite ``path`` without the bad lines and the torn tail, moving them to
    ``records.rejected.jsonl`` beside it. A file that does not exist holds no records.
    """
    out = LoadedRecords()
    if not path.is_file():
        return out
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    good: list[bytes] = []
    bad: list[bytes] = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        rec, why = _parse(raw, i)
        if rec is None:
            out.problems.append(str(why))
            bad.append(raw)
        else:
            out.records.append(rec)
            good.append(raw)
    if tail.strip():
        out.torn_tail = True
        out.problems.append(f"line {len(lines) + 1}: cut off (an interrupted write)")
        bad.append(tail)
    if repair and (bad or tail):
        if bad:
            with (path.parent / REJECTED).open("ab") as f:
                f.write(b"".join(b + b"\n" for b in bad))
        atomic_write(path, b"".join(g + b"\n" for g in good))
    return out


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record of ``path`` (see :func:`load_records`)."""
    return load_records(path).records


def record_key(rec: dict[str, Any]) -> tuple[str, str, str]:
    return (rec["variant"], rec["benchmark"], rec["sample_id"])


def latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record per (variant, benchmark, sample): a re-measured sample supersedes."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in records:
        if is_record(r):
            out[record_key(r)] = r
    return list(out.values())
