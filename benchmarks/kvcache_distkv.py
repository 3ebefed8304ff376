"""DistKV: the longest context one request can be served with across N processes vs one.

Every instance (the home included) has the same KV budget, ``--capacity`` tokens. With one
instance a request fits only that budget; with N, the home lends the overflow from the other
N-1 ranks (torch.distributed, started by torch's launcher, gloo on loopback) and attention
over the lent blocks is computed on those ranks and merged exactly by log-sum-exp. For each N the
benchmark serves the longest prompt the budget allows (a single-needle haystack) and checks
the answer and the first-token logits against dense attention over the whole prompt in one
process with no budget; one block more than the budget must be refused (KVCapacityError).

    uv run --no-sync python benchmarks/kvcache_distkv.py                       # N = 1, 2, 4
    uv run --no-sync python benchmarks/kvcache_distkv.py --capacity 512 --ranks 1,2,3
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from apportion.base import Prompt
from apportion.host import Host
from apportion.host.kv import KVPolicy
from apportion_kvcache.distkv import DistKV, DistKVConfig, KVCapacityError
from apportion_kvcache.distkv.ranks import Cluster

QUESTION = "What is the secret code mentioned above? Answer with the code only."
FACT = "The secret code is 4417-BLUE."
TARGET = {"context_ratio_at_4": 3.5, "exact": True}


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def haystack_prompt(host: Host, tokens: int) -> Prompt:
    from apportion.baselines.haystack import sentences

    pool = list(sentences())
    body: list[str] = []
    i = 0
    while True:
        body.append(pool[i % len(pool)])
        i += 1
        text = " ".join(body[: len(body) // 3] + [FACT] + body[len(body) // 3 :])
        p = Prompt([{"role": "user", "content": f"{text}\n\n{QUESTION}"}], question=QUESTION)
        if len(host.encode(p).ids) > tokens:
            body.pop()
            text = " ".join(body[: len(body) // 3] + [FACT] + body[len(body) // 3 :])
            return Prompt([{"role": "user", "content": f"{text}\n\n{QUESTION}"}], question=QUESTION)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--capacity", type=int, default=1024, help="KV tokens per instance")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=300.0)
    a = ap.parse_args()

    from apportion.config import ModelSpec
    from apportion.host import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))
    ref_host = Host(loaded, kv_policy=KVPolicy())
    served = {}
    all_exact = True
    for n in [int(x) for x in a.ranks.split(",")]:
        budget = n * a.capacity - a.new_tokens - 8  # room for the answer
        prompt = haystack_prompt(ref_host, budget)
        enc = ref_host.encode(prompt)
        cfg = DistKVConfig(block_size=a.block_size, local_capacity_tokens=a.capacity)
        cluster = (
            Cluster(n, capacity_blocks=a.capacity // a.block_size, timeout_s=a.timeout)
            if n > 1
            else None
        )
        try:
            policy = DistKV(cfg, instances=cluster.instances if cluster else [])
            t0 = time.perf_counter()
            got = Host(loaded, kv_policy=policy).generate(prompt, max_new_tokens=a.new_tokens)[0]
            dist_s = time.perf_counter() - t0
            # one block more than the whole budget is refused, not crashed
            over = torch.ones(1, policy.capacity_tokens() + a.block_size, dtype=torch.long)
            try:
                policy.prefill(
                    loaded.model, over, torch.ones_like(over), policy.make_cache(loaded.model)
                )
                refused = False
            except KVCapacityError:
                refused = True
        finally:
            codes = cluster.close() if cluster else []
        t0 = time.perf_counter()
        ref = ref_host.generate(prompt, max_new_tokens=a.new_tokens)[0]
        ref_s = time.perf_counter() - t0
        exact = got.text == ref.text
        all_exact &= exact
        served[n] = len(enc.ids)
        emit(
            {
                "measure": "served",
                "ranks": n,
                "capacity_per_rank": a.capacity,
                "prompt_tokens": len(enc.ids),
                "answer": got.text,
                "reference": ref.text,
                "exact": exact,
                "found_needle": "4417" in got.text,
                "over_budget_refused": refused,
                "seconds": dist_s,
                "reference_seconds": ref_s,
                "worker_exit_codes": codes,
            }
        )
    one = served.get(1) or min(served.values())
    ratios = {str(n): served[n] / one for n in served}
    top = max(served)
    emit(
        {
            "summary": True,
            "longest_context": {str(n): served[n] for n in served},
            "context_ratio": ratios,
            "exact_outputs": all_exact,
            "target": TARGET,
            "met": all_exact and (4 not in served or ratios["4"] >= TARGET["context_ratio_at_4"]),
            "ranks_max": top,
        }
    )


if __name__ == "__main__":
    main()
