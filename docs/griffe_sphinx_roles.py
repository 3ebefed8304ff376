"""A griffe extension used by the API reference (``mkdocs.yml``).

The tree's docstrings cross-reference with Sphinx roles (``:class:`~apportion.base.KVPolicy```).
mkdocstrings renders docstrings as markdown, where a role would show as literal text: this
extension turns each role into a code span, the last dotted part only where the target starts
with ``~`` (as Sphinx shows it).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    target = match.group(2)
    shown = target.rsplit(".", 1)[-1] if match.group(1) else target
    return f"`{shown}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring as markdown code spans."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_code, obj.docstring.value)
