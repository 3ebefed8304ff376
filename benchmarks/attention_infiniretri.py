"""Needle-in-a-haystack at 10x SmolLM2's window and beyond (>= 80K tokens) with InfiniRetri,
with the wall time of each answer.

    uv run --no-sync python benchmarks/attention_infiniretri.py --lengths 81920 --samples 1

Dense attention cannot read these prompts at all (8K window), so the comparison is the
target itself: the needle found, and what it cost.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[81920])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.5])
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--chunk-tokens", type=int, default=4096)
    ap.add_argument("--keep-tokens", type=int, default=512)
    args = ap.parse_args()

    from apportion.host import Host, load_model
    from apportion.plugins import get_registry
    from apportion_attention.infiniretri import InfiniRetri, InfiniRetriConfig

    loaded = load_model("smollm2")
    reg = get_registry()
    bench = reg.create(
        "benchmark",
        "niah",
        {"lengths": args.lengths, "depths": args.depths, "samples": args.samples},
    )
    strategy = reg.create("prompt-strategy", "zero-shot")
    scores, walls = [], []
    for s in bench.samples(loaded.tokenizer):
        backend = InfiniRetri(
            InfiniRetriConfig(chunk_tokens=args.chunk_tokens, keep_tokens=args.keep_tokens)
        )
        t0 = time.perf_counter()
        out = Host(loaded, backend).generate(
            strategy.build(s.question, context=s.context), max_new_tokens=32
        )[0]
        wall = time.perf_counter() - t0
        score = bench.score(s, out.text)
        scores.append(score)
        walls.append(wall)
        print(
            json.dumps(
                {
                    "id": s.id,
                    "length": s.length,
                    "depth": s.depth,
                    "score": score,
                    "answer": s.answers[0],
                    "text": out.text[:80],
                    "prompt_tokens": out.prompt_tokens,
                    "wall_s": round(wall, 1),
                    **backend.last_read,
                }
            ),
            flush=True,
        )
    print(
        json.dumps(
            {
                "summary": True,
                "benchmark": "attention_infiniretri",
                "lengths": args.lengths,
                "samples": len(scores),
                "accuracy": round(100.0 * sum(scores) / len(scores), 1),
                "mean_wall_s": round(sum(walls) / len(walls), 1),
                "target": "niah at >= 80K tokens (10x the 8K window), with wall time",
            }
        )
    )


if __name__ == "__main__":
    main()
