"""Natural English every machine has: the docstrings of Python's standard library.

Sentences come from a fixed list of modules in a fixed order, so a seed gives the same
haystack on the same Python. The text needs no download and carries the PSF licence.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re

MODULES = (
    "argparse",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gzip",
    "hashlib",
    "heapq",
    "html",
    "http",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "math",
    "mimetypes",
    "numbers",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "shelve",
    "shutil",
    "smtplib",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "tokenize",
    "trace",
    "typing",
    "unittest",
    "urllib",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml",
    "zipfile",
    "zoneinfo",
)

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_GOOD = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]+[.!?]$")


@functools.lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """Clean prose sentences (no code, no markup), deduplicated, in a stable order."""
    seen: set[str] = set()
    out: list[str] = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objs = [module] + [
            obj
            for _, obj in sorted(inspect.getmembers(module), key=lambda kv: kv[0])
            if (inspect.isclass(obj) or inspect.isfunction(obj))
            and getattr(obj, "__module__", "").startswith(name)
        ]
        for obj in objs:
            doc = inspect.getdoc(obj) or ""
            for para in doc.split("\n\n"):
                para = " ".join(para.split())
                for s in _SENTENCE.split(para):
                    if 40 <= len(s) <= 300 and _GOOD.match(s) and s not in seen:
                        seen.add(s)
                        out.append(s)
    return tuple(out)
