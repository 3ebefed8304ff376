"""Provence-style pruning vs the unpruned context (SmolLM2), on niah and the shipped QA set.

Each sample is answered twice in the same run, unpruned (the baseline, zero-shot) and
pruned; one JSON line per answer, then a summary holding accuracy difference, fraction of
context removed and the time cost (pruning seconds, and pruned / unpruned wall time),
against the targets (accuracy within 2 points, >= 50% of the context removed).

    uv run --no-sync python benchmarks/icl_prune.py --lengths 512,1024 --samples 2 --qa 12
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="512,1024")
    ap.add_argument("--depths", default="0.2,0.5,0.8")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--qa", type=int, default=12, help="QA questions (test split)")
    ap.add_argument("--scorer", default="embedding", choices=["embedding", "attention", "both"])
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    from apportion.base import PromptStrategy
    from apportion.config import ModelSpec
    from apportion.host import Host, load_model
    from apportion.plugins import get_registry
    from apportion_icl import data
    from apportion_icl.prune import Prune, PruneConfig

    loaded = load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))
    host, tok = Host(loaded), loaded.tokenizer
    reg = get_registry()
    niah = reg.create(
        "benchmark",
        "niah",
        {
            "lengths": [int(x) for x in args.lengths.split(",")],
            "depths": [float(x) for x in args.depths.split(",")],
            "samples": args.samples,
        },
    )
    items = [
        ("niah", s.id, s.context, s.question, partial(niah.score, s), 32) for s in niah.samples(tok)
    ]
    for ex in data.qa("test")[: args.qa]:
        items.append(
            (
                "qa",
                ex.id,
                data.qa_context(ex),
                ex.query + " Answer briefly.",
                partial(data.score, ex),
                24,
            )
        )
    base, pruner = PromptStrategy(), Prune(PruneConfig(scorer=args.scorer)).bind(loaded)
    agg: dict[str, dict[str, float]] = {}
    t_all = time.perf_counter()
    for i in range(0, len(items), args.batch_size):
        batch = items[i : i + args.batch_size]
        new = max(b[5] for b in batch)
        t0 = time.perf_counter()
        full = host.generate(
            [base.build(q, context=c) for _, _, c, q, _, _ in batch], max_new_tokens=new
        )
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        pruned = [pruner.build(q, context=c, tokenizer=tok) for _, _, c, q, _, _ in batch]
        t_prune = time.perf_counter() - t0
        res = host.generate(pruned, max_new_tokens=new)
        t_pruned = time.perf_counter() - t0
        for (bench, sid, _, _, score, _), f, p, r in zip(batch, full, pruned, res, strict=True):
            a = p.accounting
            row = {
                "benchmark": bench,
                "id": sid,
                "score_full": score(f.text),
                "score_pruned": score(r.text),
                "context_tokens": a["context_tokens_before"],
                "kept_tokens": a["context_tokens_after"],
                "removed_fraction": a["removed_fraction"],
                "rerank_score": a["rerank_score"],
                "prompt_tokens_full": f.prompt_tokens,
                "prompt_tokens_pruned": r.prompt_tokens,
                "prune_seconds": a["prune_seconds"],
                "prediction_full": f.text,
                "prediction_pruned": r.text,
            }
            print(json.dumps(row), flush=True)
            g = agg.setdefault(bench, {"n": 0, "full": 0.0, "pruned": 0.0, "ctx": 0, "kept": 0})
            g["n"] += 1
            g["full"] += row["score_full"]
            g["pruned"] += row["score_pruned"]
            g["ctx"] += row["context_tokens"]
            g["kept"] += row["kept_tokens"]
        for k, v in (("wall_full", t_full), ("wall_pruned", t_pruned), ("prune", t_prune)):
            agg.setdefault("_time", {}).setdefault(k, 0.0)
            agg["_time"][k] += v
    times = agg.pop("_time")
    per = {
        b: {
            "n": g["n"],
            "accuracy_full": round(g["full"] / g["n"], 4),
            "accuracy_pruned": round(g["pruned"] / g["n"], 4),
            "delta_points": round(100 * (g["pruned"] - g["full"]) / g["n"], 2),
            "removed_fraction": round(1 - g["kept"] / g["ctx"], 4),
        }
        for b, g in agg.items()
    }
    n = sum(g["n"] for g in agg.values())
    delta = 100 * sum(g["pruned"] - g["full"] for g in agg.values()) / n
    removed = 1 - sum(g["kept"] for g in agg.values()) / sum(g["ctx"] for g in agg.values())
    print(
        json.dumps(
            {
                "summary": True,
                "benchmark": "icl_prune",
                "model": "SmolLM2-135M-Instruct",
                "scorer": args.scorer,
                "baseline": "unpruned context, zero-shot, same run",
                "by_benchmark": per,
                "accuracy_delta_points": round(delta, 2),
                "removed_fraction": round(removed, 4),
                "prune_seconds_total": round(times["prune"], 2),
                "wall_seconds_full": round(times["wall_full"], 2),
                "wall_seconds_pruned_incl_pruning": round(times["wall_pruned"], 2),
                "time_ratio_pruned_vs_full": round(times["wall_pruned"] / times["wall_full"], 3),
                "targets": {"accuracy_delta_points": ">= -2.0", "removed_fraction": ">= 0.50"},
                "met": {"accuracy": delta >= -2.0, "removed": removed >= 0.5},
                "seconds": round(time.perf_counter() - t_all, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
