"""The kvpress presses installed here, named without importing kvpress (nor torch).

``apportion plugins`` registers one ``kvpress:<press>`` KV policy per press that the installed
kvpress exports, and must stay torch-free: the names are read from the text of kvpress's
``__init__.py`` (its ``from kvpress.presses.<module> import <Class>`` lines), found through
``importlib.util.find_spec``. A press is named after its module: ``snapkv_press`` ->
``kvpress:snapkv``, ``expected_attention_press`` -> ``kvpress:expected-attention``; a module
that exports several presses names each by its class (``CriticalKVPress`` ->
``kvpress:criticalkv``).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

PREFIX = "kvpress:"
INSTALL_HINT = "pip install kvpress"
#: base classes kvpress exports beside its presses; they compress nothing by themselves
BASES = {"BasePress", "ScorerPress"}

_IMPORT = re.compile(r"^from kvpress\.presses\.(\w+) import ([\w, ]+)$", re.MULTILINE)


def press_classes() -> dict[str, str]:
    """``{"kvpress:<press>": "<Class>"}`` for every press the installed kvpress exports; empty
    when kvpress is not installed (or its ``__init__.py`` cannot be read)."""
    try:
        spec = importlib.util.find_spec("kvpress")
    except (ImportError, ValueError):
        return {}
    if spec is None or not spec.origin:
        return {}
    try:
        text = Path(spec.origin).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    out: dict[str, str] = {}
    for module, names in _IMPORT.findall(text):
        classes = [n.strip() for n in names.split(",")]
        classes = [c for c in classes if c.endswith("Press") and c not in BASES]
        for cls in classes:
            if len(classes) == 1:
                stem = module.removesuffix("_press").replace("_", "-")
            else:
                stem = cls.removesuffix("Press").lower()
            out[PREFIX + stem] = cls
    return out
