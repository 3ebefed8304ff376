"""Needle-in-a-haystack accuracy of Squeezed Attention at a key budget beside dense attention,
on the same samples, with SmolLM2 (the embedded model).

    uv run --no-sync python benchmarks/attention_niah_squeezed.py                 # 1K-4K, 10%
    uv run --no-sync python benchmarks/attention_niah_squeezed.py --lengths 1024 --samples 2

Prints one JSON line per (sample, backend), then a summary: accuracy of each backend, the
difference in points, and the target (squeezed within 5 points of dense).
"""

from __future__ import annotations

import argparse
import json
import time

TARGET_POINTS = 5.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--question-share",
        type=float,
        default=None,
        help="SqueezedConfig.question_share (default: the config's; 0 = per-step selection only)",
    )
    ap.add_argument(
        "--question-reduce",
        choices=["sum", "max"],
        default=None,
        help="SqueezedConfig.question_reduce",
    )
    ap.add_argument(
        "--question-before", type=int, default=None, help="SqueezedConfig.question_before"
    )
    ap.add_argument(
        "--question-after", type=int, default=None, help="SqueezedConfig.question_after"
    )
    args = ap.parse_args()

    from apportion.host import Host, load_model
    from apportion.host.attention import AttentionBackend
    from apportion.plugins import get_registry
    from apportion_attention.squeezed import Squeezed, SqueezedConfig

    loaded = load_model("smollm2")
    reg = get_registry()
    bench = reg.create(
        "benchmark",
        "niah",
        {"lengths": args.lengths, "depths": args.depths, "samples": args.samples},
    )
    strategy = reg.create("prompt-strategy", "zero-shot")
    opts: dict[str, float | int | str] = {"budget": args.budget}
    if args.question_share is not None:
        opts["question_share"] = args.question_share
    for name in ("question_reduce", "question_before", "question_after"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    cfg = SqueezedConfig(**opts)  # type: ignore[arg-type]
    scores: dict[str, list[float]] = {"dense": [], "squeezed": []}
    fractions = []
    for s in bench.samples(loaded.tokenizer):
        prompt = strategy.build(s.question, context=s.context)
        for name, backend in (
            ("dense", AttentionBackend()),
            ("squeezed", Squeezed(cfg.model_copy())),
        ):
            t0 = time.perf_counter()
            out = Host(loaded, backend).generate(prompt, max_new_tokens=args.max_new_tokens)[0]
            score = bench.score(s, out.text)
            scores[name].append(score)
            row = {
                "id": s.id,
                "length": s.length,
                "depth": s.depth,
                "backend": name,
                "score": score,
                "answer": s.answers[0],
                "text": out.text[:80],
                "wall_s": round(time.perf_counter() - t0, 2),
            }
            if name == "squeezed":
                row["selected_fraction"] = backend.selected_fraction()
                if row["selected_fraction"] is not None:
                    fractions.append(row["selected_fraction"])
            print(json.dumps(row), flush=True)
    acc = {k: 100.0 * sum(v) / len(v) for k, v in scores.items() if v}
    diff = acc["dense"] - acc["squeezed"]
    print(
        json.dumps(
            {
                "summary": True,
                "benchmark": "attention_niah_squeezed",
                "budget": args.budget,
                "question_share": cfg.question_share,
                "question_reduce": cfg.question_reduce,
                "question_before": cfg.question_before,
                "question_after": cfg.question_after,
                "samples": len(scores["dense"]),
                "lengths": args.lengths,
                "dense_accuracy": round(acc["dense"], 1),
                "squeezed_accuracy": round(acc["squeezed"], 1),
                "points_below_dense": round(diff, 1),
                "target_max_points_below": TARGET_POINTS,
                "mean_selected_fraction": round(sum(fractions) / len(fractions), 4)
                if fractions
                else None,
                "met": diff <= TARGET_POINTS,
            }
        )
    )


if __name__ == "__main__":
    main()
