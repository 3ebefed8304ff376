"""External verifiers: ``fn(query, answer, context) -> (ok, reason)``.

Built in: ``options`` (the answer names exactly one of the options the query lists, as in
"positive or negative?"), ``grounded`` (the answer's content words occur in the context),
``nonempty``. Any ``"module:attr"`` callable with the same signature can be named instead
(e.g. one that checks against gold answers: only a sound verifier helps, Stechly et al. 2024).
"""

from __future__ import annotations

import re
from collections.abc import Callable

Verdict = tuple[bool, str]
_OPTIONS = re.compile(r"((?:[\w-]+, )*[\w-]+,? or [\w-]+)\?")


def listed_options(query: str) -> list[str]:
    found = list(_OPTIONS.finditer(query))
    if not found:
        return []
    m = found[-1]
    return [o.strip() for o in re.split(r",\s*|\s+or\s+", m.group(1)) if o.strip()]


def options(query: str, answer: str, context: str | None) -> Verdict:
    opts = listed_options(query)
    if not opts:
        return True, "the query lists no options"
    named = [o for o in opts if re.search(rf"\b{re.escape(o.lower())}\b", answer.lower())]
    if len(named) == 1:
        return True, f"names the option {named[0]!r}"
    if not named:
        return False, f"it names none of the options ({', '.join(opts)})"
    return False, f"it names several options ({', '.join(named)}); choose one"


def grounded(query: str, answer: str, context: str | None) -> Verdict:
    from apportion_icl.retrieve import words

    if not context:
        return bool(answer.strip()), "no context to check against"
    have = set(words(context))
    asked = set(words(query))
    claim = [w for w in words(answer) if w not in asked and w != "_"]
    if not claim:
        return False, "it only restates the question; give the answer itself"
    missing = [w for w in claim if w not in have]
    if len(missing) > len(claim) / 2:
        return False, f"these words are not in the text: {', '.join(missing[:6])}"
    return True, "supported by the text"


def nonempty(query: str, answer: str, context: str | None) -> Verdict:
    return (True, "non-empty") if answer.strip() else (False, "the answer is empty")


BUILTIN: dict[str, Callable[[str, str, str | None], Verdict]] = {
    "options": options,
    "grounded": grounded,
    "nonempty": nonempty,
}


def resolve(name: str) -> Callable[[str, str, str | None], Verdict]:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" in name:
        from apportion.registry import resolve as load

        return load(name)
    raise ValueError(f"unknown verifier {name!r}; use one of {sorted(BUILTIN)} or 'module:attr'")
