"""Scoring predictions against gold answers (RULER's metrics, with the edge cases pinned).

- :func:`string_match_all` — the share of gold answers found in the prediction (RULER's
  ``string_match_all``: multi-value, multi-query, variable tracking).
- :func:`string_match_part` — 1.0 if any gold answer is found (RULER's
  ``string_match_part``: QA-style tasks with alternative answers).

"Found" is stricter than RULER's bare substring test, to keep the two ways it silently
miscounts out: matching is case-insensitive on Unicode-normalised text with collapsed
whitespace, a digit group written with thousands separators ("1,234,567") counts as the
plain number, and an answer must stand on its own: ``1234567`` is *not* found in
``12345678`` and ``fox`` is not found in ``foxes``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

_SPACES = re.compile(r"\s+")
_THOUSANDS = re.compile(r"(?<=\d)[,\u202f\u00a0'](?=\d{3}(?!\d))")


def normalize(text: str) -> str:
    """NFKC, lower-case, thousands separators removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _THOUSANDS.sub("", text)
    return _SPACES.sub(" ", text).strip()


def found(answer: str, prediction: str) -> bool:
    """Whether ``answer`` occurs in ``prediction`` as a whole token sequence."""
    gold = normalize(answer)
    if not gold:
        raise ValueError("an empty gold answer cannot be scored")
    pattern = rf"(?<![0-9a-z]){re.escape(gold)}(?![0-9a-z])"
    return re.search(pattern, normalize(prediction)) is not None


def string_match_all(answers: Sequence[str], prediction: str) -> float:
    """Share of ``answers`` found in ``prediction``; 0.0 for no answers."""
    if not answers:
        return 0.0
    return sum(found(a, prediction) for a in answers) / len(answers)


def string_match_part(answers: Sequence[str], prediction: str) -> float:
    """1.0 if any of ``answers`` is found in ``prediction``, else 0.0."""
    return float(any(found(a, prediction) for a in answers))


METRICS = {"all": string_match_all, "part": string_match_part}
