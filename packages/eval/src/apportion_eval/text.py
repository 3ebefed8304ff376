"""Composing contexts to an exact token length with pieces placed at exact depths.

Every benchmark of this package builds its context the same way: stdlib prose (the core's
:mod:`apportion.baselines.haystack`) filled to the target length *in the tested model's own
tokens*, minus what the question, the inserted pieces and the chat template take; then each
piece is inserted at the sentence boundary closest to its depth (measured in tokens of the
surrounding prose). The prompt the host builds therefore lands within a few tokens of the
target, and a piece at depth 0.5 really sits in the middle.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from apportion.baselines.haystack import sentences
from apportion.baselines.niah import chat_overhead, fill_haystack
from apportion.errors import ConfigError


def n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


@dataclass
class Composed:
    """A composed context, and where each inserted piece sits (fraction of context tokens)."""

    context: str
    depths: list[float]
    filler_tokens: int


def compose(
    tokenizer: Any,
    length: int,
    question: str,
    pieces: Sequence[tuple[str, float]],
    rng: random.Random,
    *,
    what: str = "benchmark",
) -> Composed:
    """Fill stdlib prose to ``length`` prompt tokens (chat template and ``question`` included)
    and insert each ``(text, depth)`` piece at that depth.

    Pieces with equal depth keep their given order. Raises :class:`ConfigError` if the
    question and pieces alone do not leave room for any prose.
    """
    reserve = n_tokens(tokenizer, question) + chat_overhead(tokenizer)
    reserve += sum(n_tokens(tokenizer, " " + text) for text, _ in pieces)
    room = length - reserve
    if room < 16:
        raise ConfigError(
            f"{what}: length {length} is too short: the question and the inserted facts "
            f"alone take {reserve} tokens; use a larger length or fewer facts",
            [("lengths", f"{length} < {reserve + 16}")],
        )
    hay = fill_haystack(tokenizer, room, rng)
    total = sum(n for _, n in hay)
    # boundary i sits before sentence i; its depth is the share of prose tokens before it
    starts, acc = [], 0
    for _, n in hay:
        starts.append(acc)
        acc += n
    starts.append(acc)
    slots: list[list[int]] = [[] for _ in range(len(hay) + 1)]
    for k, (_, depth) in enumerate(pieces):
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth {depth} is not a fraction in [0, 1]")
        target = depth * total
        at = min(range(len(starts)), key=lambda i: (abs(starts[i] - target), i))
        slots[at].append(k)
    parts: list[str] = []
    placed: dict[int, int] = {}
    last_prose = 0
    for i in range(len(hay) + 1):
        for k in slots[i]:
            placed[k] = len(parts)
            parts.append(pieces[k][0])
        if i < len(hay):
            parts.append(hay[i][0])
            last_prose = len(parts)
    if _top_up(tokenizer, parts, last_prose, length, question, rng):
        placed = {k: at + (at >= last_prose) for k, at in placed.items()}
    context = " ".join(parts)
    prefix = [0]
    for p in parts:
        prefix.append(prefix[-1] + n_tokens(tokenizer, " " + p))
    actual = [prefix[placed[k]] / max(prefix[-1], 1) for k in range(len(pieces))]
    return Composed(context=context, depths=actual, filler_tokens=total)


def prompt_tokens(tokenizer: Any, context: str, question: str) -> int:
    """Exact prompt length as the host counts it for the zero-shot prompt: the chat-templated
    ``context + blank line + question``, the question tokenized on its own."""
    content = f"{context}\n\n{question}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = content + "\n"
    split = text.rfind(question)
    return n_tokens(tokenizer, text[:split]) + n_tokens(tokenizer, text[split:])


def _top_up(
    tokenizer: Any, parts: list[str], at: int, length: int, question: str, rng: random.Random
) -> bool:
    """Close the last few tokens of gap to ``length`` (per-sentence counts are estimates) with
    the longest head of one more prose sentence that fits, inserted (in place) at ``at``.
    Returns whether anything was inserted."""
    have = prompt_tokens(tokenizer, " ".join(parts), question)
    if have >= length - 1:
        return False
    pool = sentences()
    words = pool[rng.randrange(len(pool))].rstrip(".").split()
    lo, hi, best = 1, len(words), None
    while lo <= hi:  # largest head of the sentence that keeps the prompt within length
        mid = (lo + hi) // 2
        trial = parts[:at] + [" ".join(words[:mid]) + "."] + parts[at:]
        if prompt_tokens(tokenizer, " ".join(trial), question) <= length:
            best, lo = trial, mid + 1
        else:
            hi = mid - 1
    if best is None:
        return False
    parts[:] = best
    return True


@functools.lru_cache(maxsize=1)
def _pool_text() -> str:
    return "\n".join(sentences()).lower()


def prose_contains(text: str) -> bool:
    """Whether ``text`` occurs (case-insensitive) anywhere in the haystack pool."""
    return text.lower() in _pool_text()


def spread(rng: random.Random, n: int, placement: str = "uniform") -> list[float]:
    """``n`` sorted depths drawn from a placement distribution.

    ``uniform`` over the whole context; ``begin`` (first 30%), ``middle`` (35-65%), ``end``
    (last 30%); ``bimodal``: half in the first 20%, half in the last 20%.
    """
    ranges = {
        "uniform": [(0.0, 1.0)],
        "begin": [(0.0, 0.3)],
        "middle": [(0.35, 0.65)],
        "end": [(0.7, 1.0)],
        "bimodal": [(0.0, 0.2), (0.8, 1.0)],
    }
    if placement not in ranges:
        raise ValueError(f"placement {placement!r} is not one of {sorted(ranges)}")
    spans = ranges[placement]
    out = []
    for i in range(n):
        lo, hi = spans[i % len(spans)]
        out.append(rng.uniform(lo, hi))
    return sorted(out)
