"""Sizing a context made of repeated items (a word list, a walk) to a prompt length.

:func:`apportion_eval.text.compose` fills *prose* to a length; the aggregation tasks
(``cwe``, ``fwe``) and ``graph-tracing`` have no prose: their whole context is a list of
items, and it is the number of items that is sized. :func:`fit_count` finds the largest
count whose chat-templated prompt still fits the target, so the prompt lands within about
one item's tokens of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from apportion.errors import ConfigError

from apportion_eval.text import prompt_tokens


def fit_count(
    tokenizer: Any,
    length: int,
    question: str,
    render: Callable[[int], str],
    lo: int,
    hi: int,
    *,
    what: str,
) -> tuple[int, str]:
    """The largest ``n`` in ``[lo, hi]`` whose ``render(n)`` context keeps the prompt (chat
    template and ``question`` included, as :func:`~apportion_eval.text.prompt_tokens` counts
    it) within ``length`` tokens, and that context.

    ``render`` must grow with ``n`` (a longer walk, more list entries). Raises
    :class:`ConfigError` when even ``render(lo)`` does not fit (the length is too short for
    the task's fixed part) or when ``render(hi)`` still falls more than 2% short (the task
    cannot fill the length).
    """
    first = render(lo)
    have = prompt_tokens(tokenizer, first, question)
    if have > length:
        raise ConfigError(
            f"{what}: length {length} is too short: the question and the smallest context "
            f"alone take {have} tokens; use a larger length or a smaller task",
            [("lengths", f"{length} < {have}")],
        )
    best, text = lo, first
    a, b = lo + 1, hi
    while a <= b:
        mid = (a + b) // 2
        trial = render(mid)
        if prompt_tokens(tokenizer, trial, question) <= length:
            best, text, a = mid, trial, mid + 1
        else:
            b = mid - 1
    if best == hi:
        have = prompt_tokens(tokenizer, text, question)
        if have < 0.98 * length:
            raise ConfigError(
                f"{what}: cannot fill {length} tokens: the largest context ({hi} items) "
                f"makes a {have}-token prompt; use a shorter length",
                [("lengths", f"{length} > {have}")],
            )
    return best, text
