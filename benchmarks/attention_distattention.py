"""DistAttention: exactness of the LSE merge and a real SmolLM2 generation over 2-4 processes.

1. Exactness (fp32): micro-attention over 2..16 shards vs single-call SDPA on SmolLM2-shaped
   tensors (9 query heads, 3 KV heads, head_dim 64), causal prefill and decode.
2. Generation: one long niah prompt, greedy, the KV spread over ``--world-sizes`` processes
   on loopback (gloo); tokens compared with single-process dense generation; each rank's
   share of the KV reported. Speed is not claimed (CPU processes on a shared machine).
3. A dead rank: how long until the launcher names it.

    uv run --no-sync python benchmarks/attention_distattention.py --length 2048 --world-sizes 2 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from apportion.base import Prompt
from apportion.baselines.niah import NeedleConfig, SingleNeedle
from apportion.host import Host, load_model
from apportion_attention.distattention import (
    DistAttentionError,
    as_bool_mask,
    distributed_generate,
    micro_attention,
)


def exactness() -> float:
    worst = 0.0
    g = torch.Generator().manual_seed(0)
    for q_len, k_len in ((512, 512), (1, 4096)):
        q = torch.randn(1, 9, q_len, 64, generator=g) * 3
        k = torch.randn(1, 3, k_len, 64, generator=g) * 3
        v = torch.randn(1, 3, k_len, 64, generator=g)
        mask = as_bool_mask(None, q_len, k_len, q.device)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        for shards in (2, 4, 16):
            err = (
                (micro_attention(q, k, v, scale=64**-0.5, mask=mask, shards=shards) - ref)
                .abs()
                .max()
                .item()
            )
            print(
                json.dumps(
                    {
                        "check": "exactness",
                        "q": q_len,
                        "k": k_len,
                        "shards": shards,
                        "max_abs_err": err,
                    }
                )
            )
            worst = max(worst, err)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()

    worst = exactness()
    loaded = load_model("smollm2")
    sample = next(
        iter(
            SingleNeedle(NeedleConfig(lengths=[args.length], depths=[0.5], samples=1)).samples(
                loaded.tokenizer
            )
        )
    )
    prompt = Prompt(
        [{"role": "user", "content": f"{sample.context}\n\n{sample.question}"}],
        question=sample.question,
    )
    host = Host(loaded)
    ids = host.encode(prompt).ids
    ref = host.generate(prompt, max_new_tokens=args.new_tokens)[0]
    print(
        json.dumps(
            {
                "check": "single-process",
                "prompt_tokens": len(ids),
                "text": ref.text,
                "prefill_s": ref.prefill_seconds,
            }
        ),
        flush=True,
    )
    matches = {}
    for ws in args.world_sizes:
        t0 = time.perf_counter()
        res = distributed_generate(
            ids,
            world_size=ws,
            max_new_tokens=args.new_tokens,
            eos_ids=sorted(host._eos_ids()),
            timeout_s=args.timeout,
        )
        same = res[0]["text"] == ref.text and all(r["tokens"] == res[0]["tokens"] for r in res)
        matches[ws] = same
        print(
            json.dumps(
                {
                    "check": "distributed",
                    "world_size": ws,
                    "text": res[0]["text"],
                    "matches_single": same,
                    "shard_entries": [r["shard_entries"] for r in res],
                    "shard_bytes": [r["shard_bytes"] for r in res],
                    "prefill_s": [round(r["prefill_seconds"], 2) for r in res],
                    "wall_s": time.perf_counter() - t0,
                }
            ),
            flush=True,
        )
    t0 = time.perf_counter()
    try:
        distributed_generate(
            ids[:64], world_size=2, max_new_tokens=2, timeout_s=args.timeout, die_on_rank=1
        )
        dead = None
    except DistAttentionError as exc:
        dead = str(exc)
    dead_s = time.perf_counter() - t0
    print(json.dumps({"check": "dead-rank", "error": dead, "seconds": dead_s}), flush=True)
    print(
        json.dumps(
            {
                "summary": True,
                "benchmark": "attention_distattention",
                "max_abs_err_fp32": worst,
                "prompt_tokens": len(ids),
                "generation_matches_single": matches,
                "dead_rank_error_s": dead_s,
                "targets": {
                    "max_abs_err_fp32": "<= 1e-5",
                    "generation": "identical tokens",
                    "dead_rank": "clear error",
                },
                "met": {
                    "exact": worst <= 1e-5,
                    "generation": all(matches.values()),
                    "dead_rank": dead is not None,
                },
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
