"""Demonstrations: what a pool holds, how it is read, and how it is laid out in a chat."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Demo:
    """One input/output demonstration. ``skills`` tag it for skill-targeted selection."""

    input: str
    output: str
    skills: tuple[str, ...] = ()
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def turns(self) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": self.input},
            {"role": "assistant", "content": self.output},
        ]


_IN = ("input", "question", "query", "text")
_OUT = ("output", "answer", "label", "target")


def as_demo(item: Any, index: int = 0) -> Demo:
    """A :class:`Demo` from a Demo, an ``(input, output)`` pair, or a mapping with
    ``input``/``question``/``query``/``text`` and ``output``/``answer``/``label``/``target``."""
    if isinstance(item, Demo):
        return item
    if hasattr(item, "as_demo"):
        return item.as_demo()
    if isinstance(item, Mapping):
        src = next((k for k in _IN if k in item), None)
        dst = next((k for k in _OUT if k in item), None)
        if src is None or dst is None:
            raise ValueError(
                f"demonstration {index} has keys {sorted(item)}; it needs one of {_IN} "
                f"and one of {_OUT}"
            )
        skills = item.get("skills", ())
        return Demo(str(item[src]), str(item[dst]), tuple(skills), str(item.get("id", index)))
    if isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
        return Demo(str(item[0]), str(item[1]), id=str(index))
    raise ValueError(
        f"demonstration {index} is a {type(item).__name__}; pass a Demo, an (input, output) "
        "pair or a mapping with input/output keys"
    )


def as_demos(items: Iterable[Any]) -> list[Demo]:
    out = []
    for i, item in enumerate(items or ()):
        d = as_demo(item, i)
        if not d.id:
            d = Demo(d.input, d.output, d.skills, str(i), d.meta)
        out.append(d)
    return out


def chat(
    query: str, context: str | None = None, demos: Sequence[Demo] = (), system: str | None = None
) -> list[dict[str, str]]:
    """Demos as prior user/assistant turns, then one user turn: the context, then the query."""
    msgs: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    for d in demos:
        msgs.extend(d.turns())
    msgs.append({"role": "user", "content": f"{context}\n\n{query}" if context else query})
    return msgs
