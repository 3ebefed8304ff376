"""The main job, timed: ``apportion run`` with no arguments (examples/default.toml).

Runs the CLI as a user would, in a fresh run directory (a fresh process, so start-up,
plugin loading and the model load are inside the wall time; with ``--fresh-cache`` the
embedded model is converted again, as on a new machine), then prints one JSON line per
config (samples measured, accuracy with its 95% interval, mean peak KV bytes relative to
the full-cache baseline measured in the same run) and a last ``"summary": true`` line: the
wall time against the 600 s target, and whether every config reached 36 samples.

    uv run --no-sync python benchmarks/eval_default_run.py --fresh-cache
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from apportion.records import latest, read_records
from apportion.stats import wilson

TARGET_S = 600
TARGET_SAMPLES = 36


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="run directory (default: a fresh temp dir)")
    ap.add_argument(
        "--fresh-cache",
        action="store_true",
        help="convert the embedded model again (a new machine's first run)",
    )
    args = ap.parse_args()
    args.out = args.out or tempfile.mkdtemp(prefix="apportion-default-")
    env = dict(os.environ)
    if args.fresh_cache:
        env["APPORTION_CACHE_DIR"] = tempfile.mkdtemp(prefix="apportion-cache-")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "apportion.cli", "run", "--out", args.out, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(
            json.dumps(
                {"summary": True, "error": proc.stderr[-2000:], "wall_seconds": round(wall, 1)}
            )
        )
        sys.exit(1)
    plan = re.search(r"(\d+) configs x (\d+) samples: (\d+) to run", proc.stdout)
    left = re.search(r"(\d+) samples left", proc.stdout)
    records = latest(read_records(Path(args.out) / "records.jsonl"))
    base = [r for r in records if r["variant"] == "baseline" and "error" not in r]
    base_kv = {(r["benchmark"], r["sample_id"]): r["peak_kv_bytes"] for r in base}
    configs: dict[str, list[dict]] = {}
    for r in records:
        configs.setdefault(r["variant"], []).append(r)
    for variant, rs in configs.items():
        ok = [r for r in rs if "error" not in r]
        pairs = [
            (r["peak_kv_bytes"], base_kv[(r["benchmark"], r["sample_id"])])
            for r in ok
            if (r["benchmark"], r["sample_id"]) in base_kv
        ]
        print(
            json.dumps(
                {
                    "config": variant,
                    "samples": len(rs),
                    "errors": len(rs) - len(ok),
                    "accuracy": round(sum(r["score"] for r in rs) / len(rs), 4),
                    "interval_95": [
                        round(x, 3) for x in wilson(sum(r["score"] for r in rs), len(rs))
                    ],
                    "peak_kv_vs_full": round(sum(a for a, _ in pairs) / sum(b for _, b in pairs), 4)
                    if pairs
                    else None,
                    "lengths": sorted({r["length"] for r in rs}),
                }
            )
        )
    print(
        json.dumps(
            {
                "summary": True,
                "benchmark": "eval_default_run",
                "wall_seconds": round(wall, 1),
                "target": {"wall_seconds_max": TARGET_S},
                "met": wall <= TARGET_S,
                "configs": int(plan.group(1)) if plan else len(configs),
                "samples_per_config": int(plan.group(2)) if plan else None,
                "measured": len(records),
                "samples_by_config": {v: len(rs) for v, rs in configs.items()},
                "every_config_reached": all(len(rs) >= TARGET_SAMPLES for rs in configs.values()),
                "target_samples_per_config": TARGET_SAMPLES,
                "fresh_cache": args.fresh_cache,
                "left_for_rerun": int(left.group(1)) if left else 0,
                "report": str(Path(args.out) / "report.html"),
            }
        )
    )


if __name__ == "__main__":
    main()
