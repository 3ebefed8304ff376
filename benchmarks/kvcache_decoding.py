"""Compression while generating (``decode_budget``) on ``longgen``, beside the full cache.

``longgen`` asks many small questions about one context and wants every answer in one long
response, so the cache grows through the decode. Each sample runs under ``full`` and under
each ``--policies`` with ``decode_budget`` at each ``--budget-fractions`` of the prompt
length (evicting every ``--interval`` generated tokens; a budget below the prompt length
compresses the prompt in the prefill too), all in one run, sample by sample, so the ratios
compare like with like.

Prints one JSON line per (policy, budget, length) cell: the longgen score (per-item
accuracy) and completion rate, the peak KV bytes and decode tokens/s, and their ratios to
``full`` on the same samples; then a ``"summary": true`` line with every config's figures
and the bound the option promises (peak KV bytes at most about (budget + interval) /
(prompt + new tokens) of full's).

    OMP_NUM_THREADS=2 uv run --no-sync python benchmarks/kvcache_decoding.py \\
        --lengths 1024 --samples 6 --items 16
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

from apportion.config import ModelSpec
from apportion.host import Host, load_model
from apportion.plugins import get_registry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024])
    ap.add_argument("--samples", type=int, default=6, help="samples per length")
    ap.add_argument("--items", type=int, default=16, help="longgen questions per response")
    ap.add_argument("--policies", nargs="+", default=["snapkv", "h2o"])
    ap.add_argument("--budget-fractions", type=float, nargs="+", default=[0.5, 0.75, 1.0])
    ap.add_argument("--interval", type=int, default=32, help="decode_interval")
    ap.add_argument("--window", type=int, default=16, help="decode_window")
    args = ap.parse_args()

    t0 = time.perf_counter()
    reg = get_registry()
    loaded = load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))
    strategy = reg.create("prompt-strategy", "zero-shot")
    full_host = Host(loaded)
    # (config, length) -> per-sample rows
    cells: dict[tuple[str, int], list[dict]] = defaultdict(list)
    budgets: dict[str, int] = {}
    for length in args.lengths:
        bench = reg.create(
            "benchmark",
            "longgen",
            {"lengths": [length], "samples": args.samples, "items": args.items},
        )
        hosts = {"full": full_host}
        for name in args.policies:
            for frac in args.budget_fractions:
                limit = max(1, round(frac * length))
                label = f"{name}@{frac}"
                budgets[label] = limit
                opts = {
                    "compression_ratio": 0.0,
                    "decode_budget": limit,
                    "decode_interval": args.interval,
                    "decode_window": args.window,
                }
                hosts[label] = Host(loaded, kv_policy=reg.create("kv-policy", name, opts))
        for s in bench.samples(loaded.tokenizer):
            prompt = strategy.build(s.question, context=s.context)
            for label, host in hosts.items():
                out = host.generate(prompt, max_new_tokens=s.max_new_tokens)[0]
                metrics = bench.metrics(s, out.text)
                cells[(label, length)].append(
                    {
                        "score": bench.score(s, out.text),
                        "completion_rate": metrics["completion_rate"],
                        "peak_kv_bytes": out.peak_kv_bytes,
                        "decode_seconds": out.decode_seconds,
                        "decode_tokens": out.decode_tokens_per_s * out.decode_seconds,
                        "tokens": out.prompt_tokens + out.new_tokens,
                    }
                )

    def mean(rows: list[dict], key: str) -> float:
        return sum(r[key] for r in rows) / max(1, len(rows))

    def speed(rows: list[dict]) -> float:
        secs = sum(r["decode_seconds"] for r in rows)
        return sum(r["decode_tokens"] for r in rows) / secs if secs > 0 else 0.0

    table: dict[str, dict] = {}
    for (label, length), rows in cells.items():
        full = cells[("full", length)]
        line = {
            "config": label,
            "length": length,
            "decode_budget": budgets.get(label),
            "n": len(rows),
            "score": round(mean(rows, "score"), 3),
            "completion_rate": round(mean(rows, "completion_rate"), 3),
            "tokens": round(mean(rows, "tokens"), 1),
            "peak_kv_bytes": round(mean(rows, "peak_kv_bytes")),
            # per sample, against full on the same sample
            "peak_kv_x_full": round(
                sum(
                    r["peak_kv_bytes"] / f["peak_kv_bytes"] for r, f in zip(rows, full, strict=True)
                )
                / len(rows),
                3,
            ),
            "decode_tokens_per_s": round(speed(rows), 2),
            "decode_speed_x_full": round(speed(rows) / speed(full), 3) if speed(full) else None,
        }
        if label != "full":
            bound = (budgets[label] + args.interval) / mean(rows, "tokens")
            line["peak_kv_bound"] = round(min(1.0, bound), 3)
            line["score_x_full"] = (
                round(line["score"] / mean(full, "score"), 3) if mean(full, "score") else None
            )
        table[f"{label}/{length}"] = line
        print(json.dumps(line), flush=True)
    summary = {
        "summary": True,
        "benchmark": "longgen",
        "items": args.items,
        "interval": args.interval,
        "configs": table,
        "targets": {
            "peak_kv_x_full": "<= 1.1 x (decode_budget + interval) / (prompt + new tokens)",
        },
        "met_peak_bound": all(
            t["peak_kv_x_full"] <= 1.1 * t["peak_kv_bound"]
            for t in table.values()
            if "peak_kv_bound" in t
        ),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
