"""Sentence and paragraph splitting (a regex splitter: the shipped text and the haystacks are
plain English prose; abbreviations such as "e.g." are kept joined)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ABBREV = re.compile(r"\b(?:e\.g|i\.e|etc|vs|Mr|Mrs|Ms|Dr|St|No|Fig)\.$")
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


@dataclass(frozen=True)
class Sentence:
    index: int
    paragraph: int
    text: str


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def split(text: str) -> list[Sentence]:
    out: list[Sentence] = []
    for p, para in enumerate(paragraphs(text)):
        pieces: list[str] = []
        start = 0
        for m in _BOUNDARY.finditer(para):
            head = para[start : m.start()].strip()
            if _ABBREV.search(para[: m.start()].rstrip("\"')]")):
                continue
            if head:
                pieces.append(head)
            start = m.end()
        tail = para[start:].strip()
        if tail:
            pieces.append(tail)
        base = len(out)
        out.extend(Sentence(base + i, p, s) for i, s in enumerate(pieces))
    return out


def join(sentences: list[Sentence]) -> str:
    """Sentences back into text, paragraphs separated by blank lines."""
    paras: dict[int, list[str]] = {}
    for s in sentences:
        paras.setdefault(s.paragraph, []).append(s.text)
    return "\n\n".join(" ".join(v) for _, v in sorted(paras.items()))
