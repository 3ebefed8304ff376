"""KV eviction policies on niah with SmolLM2: accuracy and peak KV bytes beside ``full``.

Prints one JSON line per (policy, ratio, length) and a last ``"summary": true`` line with
the headline figures and the targets they are held against (best policy at 0.5 within
5 points of full; ``qspan`` at least as good as streaming/snapkv/h2o at 0.5 and 0.75).

    uv run --no-sync python benchmarks/kvcache_policies.py --lengths 1024 2048 4096 --samples 3

``--kvpress snapkv expected-attention`` adds kvpress presses (``kvpress:<press>`` policies, in an
environment with kvpress: ``uv run nox -s kvpress`` builds one) on the same samples, at the
same ratios, in the same JSON lines.
"""

from __future__ import annotations

import argparse
import json
import time

from apportion.config import ModelSpec
from apportion.host import Host, load_model
from apportion.plugins import get_registry

POLICIES = ["streaming", "snapkv", "h2o", "qspan"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--samples", type=int, default=3, help="samples per (length, depth)")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--kvpress",
        nargs="*",
        default=[],
        metavar="PRESS",
        help="kvpress presses to run beside the policies (snapkv, expected-attention, ...)",
    )
    args = ap.parse_args()

    reg = get_registry()
    presses = [p if p.startswith("kvpress:") else f"kvpress:{p}" for p in args.kvpress]
    for name in presses:  # unknown or unrunnable presses fail here, before the model loads
        reg.create("kv-policy", name, {"compression_ratio": args.ratios[0]})
    loaded = load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))
    strategy = reg.create("prompt-strategy", "zero-shot")
    acc: dict[tuple[str, float], list[float]] = {}
    for length in args.lengths:
        bench = reg.create(
            "benchmark",
            "niah",
            {"lengths": [length], "samples": args.samples, "depths": args.depths},
        )
        samples = list(bench.samples(loaded.tokenizer))
        compared = args.policies + presses
        runs = [("full", 0.0)] + [(p, r) for r in args.ratios for p in compared]
        for name, ratio in runs:
            opts = {"compression_ratio": ratio} if name != "full" else {}
            host = Host(loaded, kv_policy=reg.create("kv-policy", name, opts))
            scores, peak, t0 = [], 0, time.perf_counter()
            for s in samples:
                out = host.generate(
                    strategy.build(s.question, context=s.context),
                    max_new_tokens=args.max_new_tokens,
                )[0]
                scores.append(bench.score(s, out.text))
                peak = max(peak, out.peak_kv_bytes)
            row = {
                "policy": name,
                "compression_ratio": ratio,
                "length": length,
                "samples": len(samples),
                "accuracy": sum(scores) / len(scores),
                "peak_kv_bytes": peak,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            acc.setdefault((name, ratio), []).extend(scores)
            print(json.dumps(row), flush=True)
    mean = {f"{n}@{r}": sum(v) / len(v) for (n, r), v in acc.items()}
    full = mean["full@0.0"]
    summary: dict = {"summary": True, "accuracy": mean, "full": full}
    for r in args.ratios:
        best = max(args.policies, key=lambda p: mean[f"{p}@{r}"])
        summary[f"best@{r}"] = {
            "policy": best,
            "accuracy": mean[f"{best}@{r}"],
            "gap_points": round(100 * (full - mean[f"{best}@{r}"]), 1),
        }
        if presses:
            best_press = max(presses, key=lambda p: mean[f"{p}@{r}"])
            summary[f"kvpress_best@{r}"] = {
                "policy": best_press,
                "accuracy": mean[f"{best_press}@{r}"],
                "gap_points": round(100 * (full - mean[f"{best_press}@{r}"]), 1),
            }
        if "qspan" in args.policies:
            others = max(mean[f"{p}@{r}"] for p in args.policies if p != "qspan")
            summary[f"qspan_minus_best_baseline@{r}"] = round(
                100 * (mean[f"qspan@{r}"] - others), 1
            )
    summary["targets"] = {"best@0.5_gap_points_max": 5.0, "qspan_beats_baselines_at": args.ratios}
    if 0.5 in args.ratios:
        summary["met_best@0.5_within_5"] = summary["best@0.5"]["gap_points"] <= 5.0
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
