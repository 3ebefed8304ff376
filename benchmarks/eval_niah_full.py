"""Full-cache SmolLM2 on single-needle niah at 1K, 2K and 4K tokens, against a 90% goal.

Runs ``apportion run``'s loop (:func:`apportion.runner.execute`; full KV cache, dense
attention) on ``niah`` single, 7-digit values, at each length over several depths, then
prints one JSON line per length (accuracy, and what the model said where it missed) and a
last ``"summary": true`` line holding the accuracy per length against the 90% goal. Records
and report.html go to ``--out``.

    uv run --no-sync python benchmarks/eval_niah_full.py --samples 2 --out runs/niah-full
"""

from __future__ import annotations

import argparse
import json
import time

from apportion.config import parse_config
from apportion.runner import RunOptions, execute

GOAL = 0.90


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--samples", type=int, default=2, help="samples per (length, depth)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/eval-niah-full")
    args = ap.parse_args()
    cfg = parse_config(
        {
            "name": "eval-niah-full",
            "model": {"name": "smollm2", "device": "cpu", "dtype": "float32"},
            "seed": args.seed,
            "benchmarks": [
                {
                    "name": "niah",
                    "variant": "single",
                    "value_type": "number",
                    "lengths": args.lengths,
                    "depths": args.depths,
                    "samples": args.samples,
                }
            ],
        }
    )
    t0 = time.perf_counter()
    result = execute(cfg, args.out, RunOptions(progress=False))
    wall = time.perf_counter() - t0
    by_length: dict[int, list[dict]] = {}
    for r in result.records:
        by_length.setdefault(int(r["length"]), []).append(r)
    summary = {}
    for length in sorted(by_length):
        rs = by_length[length]
        acc = sum(r["score"] for r in rs) / len(rs)
        summary[str(length)] = round(acc, 4)
        misses = [
            {
                "depth": r["depth"],
                "gold": r["answers"][0],
                "said": r.get("prediction", r.get("error")),
            }
            for r in rs
            if r["score"] < 1
        ]
        print(
            json.dumps(
                {
                    "length": length,
                    "n": len(rs),
                    "accuracy": round(acc, 4),
                    "prompt_tokens_mean": round(
                        sum(r.get("prompt_tokens", 0) for r in rs) / len(rs), 1
                    ),
                    "prefill_seconds_mean": round(
                        sum(r.get("prefill_seconds", 0) for r in rs) / len(rs), 3
                    ),
                    "misses": misses,
                }
            )
        )
    print(
        json.dumps(
            {
                "summary": True,
                "benchmark": "eval_niah_full",
                "model": "smollm2",
                "kv_policy": "full",
                "attention": "dense",
                "accuracy_by_length": summary,
                "target": {"accuracy_each_length": GOAL},
                "met": {k: v >= GOAL for k, v in summary.items()},
                "n_per_length": {str(k): len(v) for k, v in sorted(by_length.items())},
                "report": str(result.report),
                "wall_seconds": round(wall, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
