"""The run loop's own speed: one shared prefill and a batched decode against one config at a time.

A sweep of ``full`` and four eviction policies (streaming, snapkv, h2o, qspan at the same
compression ratio) runs twice through :func:`apportion.runner.execute` on the same niah
samples and the same loaded model, in one process:

- **alone**: every config runs by itself (``share_prefill = false``, batch size 1), as a
  harness that loops over configs does;
- **shared**: the configs of a sample share one prefill and decode as one batch.

It prints one JSON line per mode (records, wall seconds, samples per minute) and a summary
with the speed-up in samples per minute (target at least 4x) and whether every record's
prediction, cached tokens and peak KV bytes are identical between the modes.

    OMP_NUM_THREADS=2 uv run --no-sync python benchmarks/eval_throughput.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from apportion.config import ModelSpec, parse_config
from apportion.host import load_model
from apportion.runner import RunOptions, execute

POLICIES = ("streaming", "snapkv", "h2o", "qspan")
TARGET = 4.0
FIELDS = ("prediction", "score", "kv_tokens", "peak_kv_bytes", "new_tokens")


def config(args: argparse.Namespace, share: bool) -> dict:
    sweep = [{"label": "full"}] + [
        {"label": f"{p}-{args.ratio}", "kv_policy": {"name": p, "compression_ratio": args.ratio}}
        for p in POLICIES
    ]
    return {
        "name": "throughput",
        "benchmarks": [
            {
                "name": "niah",
                "lengths": args.lengths,
                "depths": args.depths,
                "samples": args.samples,
            }
        ],
        "sweep": sweep,
        "generation": {
            "share_prefill": share,
            "batch_size": len(sweep) if share else 1,
            "max_new_tokens": args.new_tokens,
        },
        "harness": {"report": False},
    }


def run_mode(args: argparse.Namespace, loaded, share: bool, root: Path) -> tuple[list, float]:
    cfg = parse_config(config(args, share))
    t0 = time.perf_counter()
    run = execute(
        cfg, root / ("shared" if share else "alone"), RunOptions(progress=False), loaded=loaded
    )
    return run.records, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.75])
    ap.add_argument("--samples", type=int, default=1, help="samples per (length, depth)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    loaded = load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))
    root = Path(tempfile.mkdtemp(prefix="apportion-throughput-"))
    figures = {}
    for share in (False, True):
        records, wall = run_mode(args, loaded, share, root)
        mode = "shared" if share else "alone"
        samples = len({r["sample_id"] for r in records})
        figures[mode] = {"records": records, "wall": wall}
        print(
            json.dumps(
                {
                    "mode": mode,
                    "records": len(records),
                    "samples": samples,
                    "wall_seconds": round(wall, 1),
                    "samples_per_minute": round(60 * samples / wall, 3),
                    "records_per_minute": round(60 * len(records) / wall, 3),
                }
            )
        )
    key = lambda r: (r["variant"], r["sample_id"])  # noqa: E731
    alone = {key(r): r for r in figures["alone"]["records"]}
    shared = {key(r): r for r in figures["shared"]["records"]}
    differ = [
        {"record": list(k), "field": f, "alone": alone[k].get(f), "shared": shared[k].get(f)}
        for k in sorted(alone)
        for f in FIELDS
        if k in shared and alone[k].get(f) != shared[k].get(f)
    ]
    for d in differ:
        print(json.dumps({"difference": d}))
    speedup = figures["alone"]["wall"] / figures["shared"]["wall"]
    print(
        json.dumps(
            {
                "summary": True,
                "benchmark": "eval_throughput",
                "configs": 1 + len(POLICIES),
                "lengths": args.lengths,
                "samples": len({k[1] for k in alone}),
                "speedup_samples_per_minute": round(speedup, 3),
                "identical": not differ and set(alone) == set(shared),
                "target": {"speedup_min": TARGET},
                "met": speedup >= TARGET and not differ,
            }
        )
    )


if __name__ == "__main__":
    main()
