"""DynaICL vs fixed-k demonstrations on apportion-icl's shipped classification set (SmolLM2).

Trains the controller on the ``train`` split (the model's own correctness with each k of the
ladder), then answers the ``test`` split twice in the same run: with a fixed k of nearest
demos (the baseline) and with the controller's per-query k. Prints one JSON line per query
and configuration, then a summary: prompt-token saving and accuracy difference, held
against the targets (>= 40% fewer tokens, accuracy within 1 point).

    uv run --no-sync python benchmarks/icl_dynaicl.py --train-limit 30 --test-limit 24
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixed-k", type=int, default=4)
    ap.add_argument("--ladder", default="0,1,2,4")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--controller", default=None, help="reuse this artifact instead of training")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    from apportion.config import ModelSpec
    from apportion.host import load_model
    from apportion_icl import data, runtime
    from apportion_icl.controller import train
    from apportion_icl.dynaicl import DynaICL, DynaICLConfig
    from apportion_icl.knn import KNN, KNNConfig

    loaded = load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))
    t0 = time.perf_counter()
    path = args.controller
    if path is None:
        ctl, path = train(
            "/tmp/apportion-bench-dynaicl/controller.json",
            k_values=[int(k) for k in args.ladder.split(",")],
            limit=args.train_limit,
            loaded=loaded,
        )
        print(
            json.dumps(
                {
                    "phase": "train",
                    "n_train": ctl.meta["n_train"],
                    "accuracy_by_k": ctl.meta["accuracy_by_k"],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            ),
            flush=True,
        )
    pool = [e.as_demo() for e in data.classification("pool")]
    tests = data.classification("test")[: args.test_limit]
    fixed = KNN(KNNConfig(k=args.fixed_k, mmr_lambda=1.0)).bind(loaded)
    dyn = DynaICL(DynaICLConfig(controller=str(path), k=args.fixed_k)).bind(loaded)
    jobs = []
    for ex in tests:
        for label, strat in (("fixed-k", fixed), ("dynaicl", dyn)):
            jobs.append((ex, label, strat.build(ex.query, demos=pool, tokenizer=loaded.tokenizer)))
    totals = {"fixed-k": [0, 0.0], "dynaicl": [0, 0.0]}
    for i in range(0, len(jobs), args.batch_size):
        batch = jobs[i : i + args.batch_size]
        texts = runtime.generate(loaded, [p for _, _, p in batch], max_new_tokens=8)
        for (ex, label, p), text in zip(batch, texts, strict=True):
            s = data.score(ex, text)
            totals[label][0] += p.accounting["prompt_tokens"]
            totals[label][1] += s
            print(
                json.dumps(
                    {
                        "id": ex.id,
                        "task": ex.task,
                        "config": label,
                        "k": p.accounting["demos_kept"],
                        "prompt_tokens": p.accounting["prompt_tokens"],
                        "correct": s,
                        "prediction": text,
                    }
                ),
                flush=True,
            )
    n = len(tests)
    acc_f, acc_d = totals["fixed-k"][1] / n, totals["dynaicl"][1] / n
    saving = 1 - totals["dynaicl"][0] / totals["fixed-k"][0]
    print(
        json.dumps(
            {
                "summary": True,
                "benchmark": "icl_dynaicl",
                "model": "SmolLM2-135M-Instruct",
                "n_test": n,
                "baseline": f"fixed k={args.fixed_k} nearest demos",
                "tokens_fixed_k": totals["fixed-k"][0],
                "tokens_dynaicl": totals["dynaicl"][0],
                "token_saving": round(saving, 4),
                "accuracy_fixed_k": round(acc_f, 4),
                "accuracy_dynaicl": round(acc_d, 4),
                "accuracy_delta_points": round(100 * (acc_d - acc_f), 2),
                "targets": {"token_saving": ">= 0.40", "accuracy_delta_points": ">= -1.0"},
                "met": {"token_saving": saving >= 0.40, "accuracy": 100 * (acc_d - acc_f) >= -1.0},
                "seconds": round(time.perf_counter() - t0, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
