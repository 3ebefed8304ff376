"""RULER's aggregation tasks, multi-hop QA and graph tracing on the embedded SmolLM2: the full
KV cache against one compression policy, in the same run.

Runs ``apportion run``'s loop (:func:`apportion.runner.execute`) on ``cwe``, ``fwe``,
``multihop-qa`` (at each ``--hops``) and ``graph-tracing`` with two configs: ``full`` (the
baseline) and ``--policy`` at ``--ratio`` (default ``snapkv`` at 0.5, question in the
prefill; left out, with a note, when apportion-kvcache is not installed). The two share one
prefill per sample. ``graph-tracing`` runs at ``--graph-lengths`` as well as ``--lengths``:
its measure is accuracy against context length, held against the chance rate
(degree / nodes) of naming a random node.

It prints one JSON line per (config, benchmark, length) cell, accuracy with its 95% Wilson
interval (partial credit counts as fractional successes), then a ``"summary": true`` line:
per config and benchmark the accuracy, interval and ratio to ``full``; graph tracing's
accuracy per length beside the chance rate; and the targets (``full`` scores at least 0.2 on
every task but graph tracing, whose ``full`` accuracy should beat chance over all lengths).

    OMP_NUM_THREADS=2 uv run --no-sync python benchmarks/eval_ruler_rest.py \\
        --lengths 1024 2048 --samples 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from typing import Any

from apportion.config import parse_config
from apportion.plugins import get_registry
from apportion.runner import RunOptions, execute
from apportion.stats import accuracy_interval

FULL_MIN = 0.2  # a task's full-cache accuracy must reach this to be a usable baseline
GRAPH = "graph-tracing"


def interval(scores: list[float]) -> dict[str, Any]:
    acc, lo, hi, n = accuracy_interval(scores)
    return {"n": n, "accuracy": round(acc, 3), "ci95": [round(lo, 3), round(hi, 3)]}


def benchmarks(args: argparse.Namespace) -> list[dict[str, Any]]:
    common = {"lengths": args.lengths, "samples": args.samples}
    graph_lengths = sorted(set(args.graph_lengths) | set(args.lengths))
    return [
        {"name": "cwe", **common},
        {"name": "fwe", **common},
        *({"name": "multihop-qa", "hops": h, **common} for h in args.hops),
        {"name": GRAPH, "lengths": graph_lengths, "samples": args.samples},
    ]


def configs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str | None]:
    """The sweep, and a note when the compression policy is not installed."""
    sweep: list[dict[str, Any]] = [{"label": "full"}]
    if args.policy in get_registry().names("kv-policy"):
        sweep.append(
            {
                "label": f"{args.policy}-{args.ratio}",
                "kv_policy": {"name": args.policy, "compression_ratio": args.ratio},
            }
        )
        return sweep, None
    return sweep, f"kv policy {args.policy!r} is not installed (apportion-kvcache); full only"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--samples", type=int, default=10, help="samples per (benchmark, length)")
    ap.add_argument(
        "--graph-lengths",
        type=int,
        nargs="*",
        default=[256, 512],
        help="graph-tracing's extra lengths (it also runs at --lengths)",
    )
    ap.add_argument("--hops", type=int, nargs="+", default=[1, 2], help="multihop-qa hops")
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument(
        "--agnostic",
        action="store_true",
        help="compress the context before the question is fed (default: question in prefill)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="run directory (default: a fresh temp dir)")
    args = ap.parse_args()
    sweep, note = configs(args)
    cfg = parse_config(
        {
            "name": "eval-ruler-rest",
            "model": {"name": "smollm2", "device": "cpu", "dtype": "float32"},
            "seed": args.seed,
            "benchmarks": benchmarks(args),
            "sweep": sweep,
            "generation": {"question_in_prefill": not args.agnostic},
            "harness": {"report": False},
        }
    )
    out = args.out or tempfile.mkdtemp(prefix="apportion-ruler-rest-")
    t0 = time.perf_counter()
    result = execute(cfg, out, RunOptions(progress=False))
    wall = time.perf_counter() - t0

    cells: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    chance: dict[int, list[float]] = defaultdict(list)
    errors = 0
    for r in result.records:
        errors += "error" in r
        key = (r["variant"], r["benchmark"], int(r["length"]))
        cells[key].append(0.0 if "error" in r else float(r["score"]))
        if r.get("benchmark_name") == GRAPH and r["variant"] == "full":
            chance[int(r["length"])].append(float(r["meta"]["chance"]))
    for (variant, bench, length), scores in sorted(cells.items()):
        line = {"config": variant, "benchmark": bench, "length": length} | interval(scores)
        if bench == GRAPH:
            line["chance"] = round(sum(chance[length]) / max(1, len(chance[length])), 3)
        print(json.dumps(line))

    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (variant, bench, _), scores in cells.items():
        per[variant][bench] += scores
    table: dict[str, dict[str, Any]] = {}
    for variant, by_bench in per.items():
        table[variant] = {}
        for bench, scores in sorted(by_bench.items()):
            entry = interval(scores)
            full = per["full"].get(bench)
            base = sum(full) / len(full) if full else 0.0
            entry["x_full"] = round(sum(scores) / len(scores) / base, 3) if base else None
            table[variant][bench] = entry
    graph = {
        variant: {
            str(length): interval(scores)
            for (v, b, length), scores in sorted(cells.items())
            if v == variant and b == GRAPH
        }
        for variant in per
    }
    graph_chance = {str(n): round(sum(c) / len(c), 3) for n, c in sorted(chance.items())}
    all_chance = [x for c in chance.values() for x in c]
    mean_chance = sum(all_chance) / max(1, len(all_chance))
    full = table.get("full", {})
    met = {bench: entry["accuracy"] >= FULL_MIN for bench, entry in full.items() if bench != GRAPH}
    if GRAPH in full:
        met[GRAPH] = full[GRAPH]["accuracy"] > mean_chance
    summary = {
        "summary": True,
        "benchmark": "eval_ruler_rest",
        "model": "smollm2",
        "lengths": args.lengths,
        "graph_lengths": sorted(set(args.graph_lengths) | set(args.lengths)),
        "samples_per_cell": args.samples,
        "question_in_prefill": not args.agnostic,
        "configs": table,
        "graph_tracing": {"accuracy_by_length": graph, "chance_by_length": graph_chance},
        "targets": {"full_accuracy_min": FULL_MIN, GRAPH: "full accuracy above mean chance"},
        "met": met,
        "errors": errors,
        "wall_seconds": round(wall, 1),
        "run_dir": str(out),
    }
    if note:
        summary["note"] = note
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
