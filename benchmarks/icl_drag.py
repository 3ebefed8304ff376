"""DRAG/IterDRAG configurations on the shipped fictional QA set (SmolLM2), and the
computation-allocation model fitted on them, judged on held-out questions.

Every (k documents, m demos, n rounds) of the grid is measured twice in the same run: on the
``train`` questions, where the allocation model is fitted, and on the ``test`` questions,
where it is judged. Each context holds the gold documents among ``--distractors`` others.
Tokens are the effective context length: the final prompt plus every intermediate
IterDRAG call. For each budget (by default the train costs' quartiles), the model picks the
configuration with the best predicted accuracy whose predicted tokens fit; the summary
compares that pick's measured test accuracy with the best test accuracy of any configuration
whose measured test tokens fit the same budget (target: >= 90% of it at every budget).

    uv run --no-sync python benchmarks/icl_drag.py
    uv run --no-sync python benchmarks/icl_drag.py --grid "1,0,1;4,0,1;4,2,2" --train 10 --test 10
"""

from __future__ import annotations

import argparse
import json
import time

GRID = ";".join(f"{k},{m},{n}" for n in (1, 2) for m in (0, 2) for k in (1, 2, 4, 8))


def measure(loaded, questions, k, m, n, pool, distractors, batch_size):
    from apportion_icl import data, runtime
    from apportion_icl.drag import DRAG, DRAGConfig, IterDRAG, IterDRAGConfig

    strat = (IterDRAG(IterDRAGConfig(k=k, m=m, n=n)) if n > 1 else DRAG(DRAGConfig(k=k, m=m))).bind(
        loaded
    )
    t0 = time.perf_counter()
    prompts = [
        strat.build(
            e.query + " Answer briefly.",
            context=data.qa_context(e, distractors),
            demos=pool,
            tokenizer=loaded.tokenizer,
        )
        for e in questions
    ]
    texts = []
    for i in range(0, len(prompts), batch_size):
        texts += runtime.generate(loaded, prompts[i : i + batch_size], max_new_tokens=24)
    scores = [data.score(e, t) for e, t in zip(questions, texts, strict=True)]

    def acc(hop):
        sel = [s for e, s in zip(questions, scores, strict=True) if e.meta["hop"] == hop]
        return round(sum(sel) / len(sel), 4) if sel else None

    tokens = [
        p.accounting["prompt_tokens"] + p.accounting.get("iteration_prompt_tokens", 0)
        for p in prompts
    ]
    return {
        "k": k,
        "m": m,
        "n": n,
        "accuracy": sum(scores) / len(questions),
        "n_samples": len(questions),
        "tokens": sum(tokens) / len(questions),
        "accuracy_hop1": acc(1),
        "accuracy_hop2": acc(2),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default=GRID, help="k,m,n configurations separated by ';'")
    ap.add_argument("--train", type=int, default=None, help="train questions (default: all 30)")
    ap.add_argument("--test", type=int, default=None, help="test questions (default: all 60)")
    ap.add_argument(
        "--budgets", default=None, help="token budgets, comma-separated (default: train quartiles)"
    )
    ap.add_argument("--distractors", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--reuse",
        default=None,
        help="JSON lines of an earlier run of this script: configurations measured there "
        "(same split, question count and distractors) are read, not rerun",
    )
    args = ap.parse_args()

    from apportion.config import ModelSpec
    from apportion.host import load_model
    from apportion_icl import data
    from apportion_icl.allocation import AllocationModel

    loaded = load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))

    def split(name, limit):
        """All of a split's questions, or ``limit`` of them, half one-hop and half two-hop."""
        if limit is None:
            return data.qa(name)
        half = limit // 2
        return data.qa(name, hop=1)[: limit - half] + data.qa(name, hop=2)[:half]

    sets = {"train": split("train", args.train), "test": split("test", args.test)}
    pool = [e.as_demo() for e in data.qa("pool")]
    grid = [tuple(int(x) for x in c.split(",")) for c in args.grid.split(";")]
    t_all = time.perf_counter()
    earlier = {}
    if args.reuse:
        with open(args.reuse, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if "split" in r and r.get("distractors", args.distractors) == args.distractors:
                    earlier[(r["split"], r["k"], r["m"], r["n"], r["n_samples"])] = r
    runs: dict[str, list[dict]] = {"train": [], "test": []}
    for k, m, n in grid:
        for name, qs in sets.items():
            run = earlier.get((name, k, m, n, len(qs))) or {
                "split": name,
                "distractors": args.distractors,
                **measure(loaded, qs, k, m, n, pool, args.distractors, args.batch_size),
            }
            runs[name].append(run)
            print(json.dumps(run), flush=True)
    model = AllocationModel.fit(runs["train"])
    costs = sorted(r["tokens"] for r in runs["train"])
    budgets = (
        [float(b) for b in args.budgets.split(",")]
        if args.budgets
        else [costs[round(q * (len(costs) - 1))] for q in (0.25, 0.5, 0.75, 1.0)]
    )
    test = {(r["k"], r["m"], r["n"]): r for r in runs["test"]}
    rows = []
    for budget in budgets:
        pick = model.best(budget, among=grid)
        fitting = [r for r in runs["test"] if r["tokens"] <= budget]
        best = max(fitting, key=lambda r: (r["accuracy"], -r["tokens"])) if fitting else None
        got = test[pick]["accuracy"]
        ratio = got / best["accuracy"] if best and best["accuracy"] else None
        rows.append(
            {
                "budget_tokens": round(budget, 1),
                "predicted_best": dict(zip("kmn", pick, strict=True)),
                "predicted_accuracy": round(model.accuracy(*pick), 4),
                "predicted_tokens": round(model.tokens(*pick), 1),
                "test_accuracy_of_pick": round(got, 4),
                "test_tokens_of_pick": round(test[pick]["tokens"], 1),
                "best_test_within_budget": best
                and {
                    "k": best["k"],
                    "m": best["m"],
                    "n": best["n"],
                    "accuracy": round(best["accuracy"], 4),
                },
                "ratio_pick_vs_best": ratio and round(ratio, 4),
            }
        )
        print(json.dumps({"budget": True, **rows[-1]}), flush=True)
    ratios = [r["ratio_pick_vs_best"] for r in rows if r["ratio_pick_vs_best"] is not None]
    print(
        json.dumps(
            {
                "summary": True,
                "benchmark": "icl_drag",
                "model": "SmolLM2-135M-Instruct",
                "n_train": len(sets["train"]),
                "n_test": len(sets["test"]),
                "configurations": len(grid),
                "allocation_model": {
                    "acc_coef": [round(c, 4) for c in model.acc_coef],
                    "tok_coef": [round(c, 2) for c in model.tok_coef],
                },
                "budgets": rows,
                "min_ratio_pick_vs_best": min(ratios) if ratios else None,
                "mean_ratio_pick_vs_best": round(sum(ratios) / len(ratios), 4) if ratios else None,
                "baseline": (
                    "best measured test configuration within each budget, same run (oracle)"
                ),
                "targets": {"ratio_pick_vs_best": ">= 0.90 at every budget"},
                "met": {"ratio": bool(ratios) and min(ratios) >= 0.9},
                "seconds": round(time.perf_counter() - t_all, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
