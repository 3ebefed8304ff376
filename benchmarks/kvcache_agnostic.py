"""Query-agnostic KV compression: the context is compressed before its question is known.

Every reuse path (KV store, CacheGen, the vLLM connector) stores a context's KV before the
questions arrive. This benchmark runs niah single-needle samples through
:func:`apportion.runner.execute` with ``generation.question_in_prefill = false``: each policy
compresses the context, then the question is fed (positions continuing from the uncompressed
length). Beside ``full`` it measures ``streaming``, ``snapkv``, ``h2o``, ``qspan`` (which falls
back to its recent window without a question) and the candidates of this package's
query-agnostic ``probe`` policy (one per probe text), at every ``--ratios``. With
``--aware`` the same sweep also runs query-aware, for reference.

It prints one JSON line per (mode, config, length) cell, then a summary: each config's
accuracy with its 95% Wilson interval, its ratio to ``full`` in the same run, and the targets
(best query-agnostic policy >= 0.80x full at ratio 0.5 and >= 0.65x at 0.75, ahead of
streaming, snapkv and h2o in every cell).

    OMP_NUM_THREADS=2 uv run --no-sync python benchmarks/kvcache_agnostic.py \\
        --lengths 1024 2048 4096 --samples 9
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from apportion.config import ModelSpec, parse_config
from apportion.host import load_model
from apportion.runner import RunOptions, execute
from apportion.stats import accuracy_interval

PEERS = ("streaming", "snapkv", "h2o", "qspan")
#: this package's query-agnostic candidates: ``surprise``, and ``probe`` with its default
#: question about the context's content and two alternative probes
OURS = {
    "surprise": {"name": "surprise"},
    "probe": {"name": "probe"},
    "probe-repeat": {"name": "probe", "probe": "Repeat the text above, word for word."},
    "probe-summary": {"name": "probe", "probe": "Summarize the text above."},
}
TARGETS = {0.5: 0.80, 0.75: 0.65}


def sweep(ratios: list[float], ours: list[str], peers: list[str]) -> list[dict]:
    out = [{"label": "full"}]
    for ratio in ratios:
        for name in peers:
            out.append(
                {
                    "label": f"{name}-{ratio}",
                    "kv_policy": {"name": name, "compression_ratio": ratio},
                }
            )
        for label in ours:
            opts = OURS[label] | {"compression_ratio": ratio}
            out.append({"label": f"{label}-{ratio}", "kv_policy": opts})
    return out


def config(args: argparse.Namespace, aware: bool) -> dict:
    return {
        "name": "agnostic",
        "benchmarks": [
            {
                "name": "niah",
                "lengths": args.lengths,
                "depths": args.depths,
                "samples": args.samples,
            }
        ],
        "sweep": sweep(args.ratios, args.ours, args.peers),
        "generation": {"question_in_prefill": aware, "batch_size": 8},
        "harness": {"report": False},
    }


def cells(records: list[dict]) -> dict[tuple[str, int], list[float]]:
    out: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in records:
        out[(r["variant"], int(r["length"]))].append(0.0 if "error" in r else float(r["score"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.37, 0.63, 0.9])
    ap.add_argument("--samples", type=int, default=9, help="samples per (length, depth)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--ours", nargs="+", default=list(OURS), choices=list(OURS))
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    ap.add_argument("--aware", action="store_true", help="also run the query-aware sweep")
    args = ap.parse_args()
    loaded = load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))
    root = Path(tempfile.mkdtemp(prefix="apportion-agnostic-"))
    summary: dict = {"lengths": args.lengths, "samples_per_cell": args.samples * len(args.depths)}
    for aware in [False, True] if args.aware else [False]:
        mode = "aware" if aware else "agnostic"
        t0 = time.perf_counter()
        run = execute(
            parse_config(config(args, aware)),
            root / mode,
            RunOptions(progress=False),
            loaded=loaded,
        )
        wall = time.perf_counter() - t0
        by_cell = cells(run.records)
        for (variant, length), scores in sorted(by_cell.items()):
            acc, lo, hi, _ = accuracy_interval(scores)
            line = {"mode": mode, "config": variant, "length": length, "n": len(scores)}
            print(
                json.dumps(line | {"accuracy": round(acc, 3), "ci95": [round(lo, 3), round(hi, 3)]})
            )
        per_config: dict[str, list[float]] = defaultdict(list)
        for (variant, _), scores in by_cell.items():
            per_config[variant] += scores
        full = sum(per_config["full"]) / max(1, len(per_config["full"]))
        table = {}
        for variant, scores in per_config.items():
            acc, lo, hi, _ = accuracy_interval(scores)
            table[variant] = {
                "n": len(scores),
                "accuracy": round(acc, 3),
                "ci95": [round(lo, 3), round(hi, 3)],
                "x_full": round(acc / full, 3) if full else None,
            }
        checks = {}
        for ratio in args.ratios:
            ours = {
                v: t
                for v, t in table.items()
                if v.rsplit("-", 1)[0] in OURS and v.endswith(f"-{ratio}")
            }
            if not ours:
                continue
            best = max(ours, key=lambda v: ours[v]["accuracy"])
            ahead = all(
                sum(by_cell[(best, n)]) > sum(by_cell[(f"{p}-{ratio}", n)])
                for p in ("streaming", "snapkv", "h2o")
                if p in args.peers
                for n in args.lengths
            )
            checks[str(ratio)] = {
                "best": best,
                "x_full": table[best]["x_full"],
                "target_x_full": TARGETS.get(ratio),
                "meets_target": bool(
                    TARGETS.get(ratio) is not None and table[best]["x_full"] >= TARGETS[ratio]
                ),
                "ahead_of_streaming_snapkv_h2o_in_every_cell": ahead,
            }
        summary[mode] = {"wall_seconds": round(wall, 1), "configs": table, "checks": checks}
    print(json.dumps({"summary": summary}, indent=1))


if __name__ == "__main__":
    main()
