"""How much a contributor must hold in their head: size and coupling figures of the tree.

Prints one JSON object per figure, then a summary: the core's source lines, functions longer
than 60 lines (per package), imports of one family package by another (the target is none).
Static: it parses the sources with ``ast`` and imports nothing.

    python benchmarks/architecture.py [--root PATH]
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

FAMILIES = ["attention", "kvcache", "offload", "rl", "icl", "eval"]
LONG = 60


def sources(root: Path, package: str) -> list[Path]:
    return sorted((root / "packages" / package / "src").rglob("*.py"))


def long_functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > LONG:
                out.append((node.name, n))
    return out


def family_imports(path: Path, own: str) -> list[str]:
    """Imports of another family's package (``apportion_<family>``) from ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top.startswith("apportion_") and top != f"apportion_{own}":
                found.append(f"{path.name}: {name}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    root = args.root
    core_files = sources(root, "core")
    core_lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in core_files)
    print(
        json.dumps({"figure": "core_source_lines", "value": core_lines, "files": len(core_files)})
    )
    long_total = 0
    for pkg in ["core", *FAMILIES]:
        longs = [(p.name, f, n) for p in sources(root, pkg) for f, n in long_functions(p)]
        long_total += len(longs)
        print(
            json.dumps(
                {
                    "figure": "functions_over_60_lines",
                    "package": pkg,
                    "value": len(longs),
                    "functions": [f"{a}:{b} ({n})" for a, b, n in longs],
                }
            )
        )
    cross = []
    for fam in FAMILIES:
        cross += [f"{fam}/{x}" for p in sources(root, fam) for x in family_imports(p, fam)]
    print(json.dumps({"figure": "imports_between_families", "value": len(cross), "imports": cross}))
    print(
        json.dumps(
            {
                "summary": True,
                "benchmark": "architecture",
                "core_source_lines": core_lines,
                "functions_over_60_lines": long_total,
                "imports_between_families": len(cross),
                "targets": {"imports_between_families": 0},
            }
        )
    )


if __name__ == "__main__":
    main()
