"""CacheGen codec on SmolLM2's real KV: size vs fp16 and vs 8-bit per-token quantization,
reconstruction error, encode/decode MB/s (CPU), and niah accuracy after a decode round trip.

One JSON line per (level) measurement and per niah run, then a ``"summary": true`` line held
against the targets (>= 3.5x smaller than fp16 with a niah drop <= 2 points; >= 1.3x smaller
than 8-bit uniform at equal or lower error).

    uv run --no-sync python benchmarks/kvcache_cachegen.py --length 1024 --samples 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from apportion.config import ModelSpec
from apportion.host import Host, load_model
from apportion.host.kv import KVPolicy
from apportion.plugins import get_registry
from apportion_kvcache.cachegen import CacheGenCodec, kv_error, kv_from_cache, uniform_per_token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=2048, help="context tokens of the KV measured")
    ap.add_argument("--niah-lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument(
        "--niah-levels", type=int, nargs="*", default=None, help="levels run through niah"
    )
    args = ap.parse_args()

    reg = get_registry()
    loaded = load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))
    codec = CacheGenCodec()
    bench = reg.create(
        "benchmark", "niah", {"lengths": [args.length], "samples": 1, "depths": [0.5]}
    )
    sample = next(iter(bench.samples(loaded.tokenizer)))
    ids = torch.tensor([Host(loaded).encode(sample.context).ids])
    cache = KVPolicy().make_cache(loaded.model)
    with torch.inference_mode():
        KVPolicy().prefill(loaded.model, ids, torch.ones_like(ids), cache)
    kv = [(k.clone(), v.clone()) for k, v in kv_from_cache(cache)]
    fp16 = sum(k.numel() * 2 * 2 for k, _ in kv)
    fp32_mb = sum(k.numel() * 4 * 2 for k, _ in kv) / 1e6
    u8, u8_bytes = uniform_per_token(kv, 8)
    u8_err = kv_error(kv, u8)
    print(
        json.dumps(
            {
                "codec": "uniform-8bit-per-token",
                "tokens": ids.shape[1],
                "bytes": u8_bytes,
                "x_vs_fp16": fp16 / u8_bytes,
                **u8_err,
            }
        ),
        flush=True,
    )
    levels = []
    for level in range(codec.n_levels):
        t0 = time.perf_counter()
        bs = codec.encode(kv, fingerprint=loaded.fingerprint, level=level)
        t1 = time.perf_counter()
        out = codec.decode(bs, fingerprint=loaded.fingerprint)
        t2 = time.perf_counter()
        err = kv_error(kv, out)
        row = {
            "codec": "cachegen",
            "level": level,
            "bins": codec.config.levels[level],
            "tokens": ids.shape[1],
            "bytes": len(bs),
            "x_vs_fp16": fp16 / len(bs),
            "x_vs_uniform8": u8_bytes / len(bs),
            **err,
            "error_vs_uniform8": err["rel_rmse"] / u8_err["rel_rmse"],
            "encode_MBps_cpu": fp32_mb / (t1 - t0),
            "decode_MBps_cpu": fp32_mb / (t2 - t1),
        }
        levels.append(row)
        print(json.dumps(row), flush=True)

    # niah after a round trip, at the levels asked (default: the smallest level >= 3.5x)
    niah_levels = args.niah_levels
    if niah_levels is None:
        fit = [r["level"] for r in levels if r["x_vs_fp16"] >= 3.5]
        niah_levels = [fit[0] if fit else codec.n_levels - 1]
    strategy = reg.create("prompt-strategy", "zero-shot")
    nb = reg.create(
        "benchmark",
        "niah",
        {"lengths": args.niah_lengths, "samples": args.samples, "depths": args.depths},
    )
    samples = list(nb.samples(loaded.tokenizer))
    accs = {}
    for name, opts in [("full", {})] + [("cachegen", {"level": lv}) for lv in niah_levels]:
        host = Host(loaded, kv_policy=reg.create("kv-policy", name, opts))
        scores = []
        for s in samples:
            out = host.generate(strategy.build(s.question, context=s.context), max_new_tokens=32)[0]
            scores.append(nb.score(s, out.text))
        label = name if name == "full" else f"cachegen@level{opts['level']}"
        accs[label] = sum(scores) / len(scores)
        print(
            json.dumps(
                {
                    "niah": label,
                    "lengths": args.niah_lengths,
                    "samples": len(samples),
                    "accuracy": accs[label],
                }
            ),
            flush=True,
        )

    best_35 = [r for r in levels if r["x_vs_fp16"] >= 3.5]
    eq_err = [r for r in levels if r["rel_rmse"] <= u8_err["rel_rmse"]]
    summary = {
        "summary": True,
        "x_vs_fp16_by_level": [round(r["x_vs_fp16"], 2) for r in levels],
        "x_vs_uniform8_by_level": [round(r["x_vs_uniform8"], 2) for r in levels],
        "rel_rmse_by_level": [round(r["rel_rmse"], 4) for r in levels],
        "uniform8_rel_rmse": round(u8_err["rel_rmse"], 4),
        "x_vs_uniform8_at_equal_or_lower_error": round(
            max((r["x_vs_uniform8"] for r in eq_err), default=0.0), 2
        ),
        "niah_accuracy": accs,
        "niah_drop_points": {
            k: round(100 * (accs["full"] - v), 1) for k, v in accs.items() if k != "full"
        },
        "encode_MBps_cpu": round(sum(r["encode_MBps_cpu"] for r in levels) / len(levels), 1),
        "decode_MBps_cpu": round(sum(r["decode_MBps_cpu"] for r in levels) / len(levels), 1),
        "targets": {
            "x_vs_fp16_min": 3.5,
            "niah_drop_points_max": 2.0,
            "x_vs_uniform8_min_at_equal_error": 1.3,
        },
        "met_3.5x_fp16": bool(best_35),
        "met_1.3x_uniform8_at_equal_error": any(r["x_vs_uniform8"] >= 1.3 for r in eq_err),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
