"""Needle-in-a-haystack past SmolLM2's trained window (8K): LongHeads beside dense attention
on the same samples (dense is allowed past its window here, to show how it degrades).

    uv run --no-sync python benchmarks/attention_longheads.py --lengths 16384 32768 --samples 1

Dense attention over 32K tokens on a CPU is slow (minutes per sample): keep counts small.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.5])
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--no-dense", action="store_true", help="skip dense (the slow one)")
    ap.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="LongHeadsConfig.chunk_size (default: the config's)",
    )
    ap.add_argument("--top-k", type=int, default=None, help="LongHeadsConfig.top_k")
    ap.add_argument("--prefill-block", type=int, default=None, help="LongHeadsConfig.prefill_block")
    ap.add_argument(
        "--chunk-score", choices=["max", "mean"], default=None, help="LongHeadsConfig.chunk_score"
    )
    ap.add_argument(
        "--question-chunks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LongHeadsConfig.question_chunks",
    )
    args = ap.parse_args()

    from apportion.host import Host, load_model
    from apportion.host.attention import AttentionBackend
    from apportion.plugins import get_registry
    from apportion_attention.longheads import LongHeads, LongHeadsConfig

    class DenseUnbounded(AttentionBackend):
        """Dense SDPA allowed past the trained window (the comparison, not a technique)."""

        extends_context = True

    opts = {
        k: v
        for k, v in (
            ("chunk_size", args.chunk_size),
            ("top_k", args.top_k),
            ("prefill_block", args.prefill_block),
            ("chunk_score", args.chunk_score),
            ("question_chunks", args.question_chunks),
        )
        if v is not None
    }
    cfg = LongHeadsConfig(**opts)  # type: ignore[arg-type]
    loaded = load_model("smollm2")
    reg = get_registry()
    bench = reg.create(
        "benchmark",
        "niah",
        {"lengths": args.lengths, "depths": args.depths, "samples": args.samples},
    )
    strategy = reg.create("prompt-strategy", "zero-shot")
    acc: dict[str, dict[int, list[float]]] = {"dense": {}, "longheads": {}}
    wall: dict[str, dict[int, list[float]]] = {"dense": {}, "longheads": {}}
    for s in bench.samples(loaded.tokenizer):
        prompt = strategy.build(s.question, context=s.context)
        backends = [("longheads", LongHeads(cfg.model_copy()))] + (
            [] if args.no_dense else [("dense", DenseUnbounded())]
        )
        for name, backend in backends:
            t0 = time.perf_counter()
            out = Host(loaded, backend).generate(prompt, max_new_tokens=32)[0]
            score = bench.score(s, out.text)
            seconds = time.perf_counter() - t0
            acc[name].setdefault(s.length, []).append(score)
            wall[name].setdefault(s.length, []).append(seconds)
            print(
                json.dumps(
                    {
                        "id": s.id,
                        "length": s.length,
                        "depth": s.depth,
                        "backend": name,
                        "score": score,
                        "answer": s.answers[0],
                        "text": out.text[:80],
                        "prompt_tokens": out.prompt_tokens,
                        "wall_s": round(seconds, 1),
                    }
                ),
                flush=True,
            )
    summary = {
        "summary": True,
        "benchmark": "attention_longheads",
        "samples_per_length": args.samples * len(args.depths),
        "target": "longheads answers past 8K where dense degrades",
        "longheads_config": cfg.model_dump(),
        "window": cfg.window(),
    }
    for name, by_len in acc.items():
        for n, v in by_len.items():
            summary[f"{name}_accuracy_{n}"] = round(100.0 * sum(v) / len(v), 1)
            summary[f"{name}_mean_wall_s_{n}"] = round(sum(wall[name][n]) / len(v), 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
