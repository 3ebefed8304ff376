"""KVCOMM on a multi-agent workload: reuse rate, prefill time and agreement with full prefill.

A team of SmolLM2 agents (``--agents``, 3-5, each with its own role prompt) works through
``--tasks`` tasks. Each task has a retrieved document (stdlib prose with planted numbers) and
a question; in round 1 every agent reads the document under its role and writes a message,
in round 2 every agent reads the document and the others' messages and answers. Every prompt
is run twice, through ``kvcomm`` and through full prefill, on identical text (round 2 uses
full prefill's round-1 messages). The anchor pool starts empty and fills online.

Reported: reuse rate (reused shared-segment occurrences / all occurrences; an occurrence whose
first tokens were recomputed counts only as the share of its tokens that was reused), the
fraction of prompt tokens whose KV was reused, the tokens of reused occurrences recomputed,
prefill time of both (KVCOMM's includes computing each segment's base KV once, and the
embedding), answer agreement (same extracted number), exact text agreement, next-token top-1
agreement and KL(full || kvcomm) of the first token.

    uv run --no-sync python benchmarks/kvcache_kvcomm.py
    uv run --no-sync python benchmarks/kvcache_kvcomm.py --agents 5 --tasks 8
"""

from __future__ import annotations

import argparse
import json

import torch
from apportion_kvcache.kvcomm import KVCOMM, KVCOMMConfig
from apportion_kvcache.kvcomm.agents import ROLES, make_tasks, run_team, summarize

TARGET = {"reuse_rate": 0.70, "answer_agreement": 0.95}


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=4, choices=[3, 4, 5])
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--sentences", type=int, default=10, help="prose sentences per document")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from apportion.config import ModelSpec
    from apportion.host import load_model

    loaded = load_model(
        ModelSpec(
            name="smollm2", device="cuda" if torch.cuda.is_available() else "cpu", dtype="float32"
        )
    )
    policy = KVCOMM(KVCOMMConfig())
    tasks = make_tasks(a.tasks, seed=a.seed, sentences_per_doc=a.sentences)
    rows = run_team(
        loaded,
        policy,
        tasks,
        roles=list(ROLES)[: a.agents],
        max_new_tokens=a.new_tokens,
        on_result=lambda c: emit({"measure": "prompt", **c.as_dict()}),
    )
    s = summarize(rows)
    later = summarize([r for r in rows if r.task != tasks[0].id])  # once the pool has anchors
    emit(
        {
            "summary": True,
            **s,
            "prefill_time_ratio": s["prefill_s"] / s["full_prefill_s"]
            if s["full_prefill_s"]
            else None,
            "base_kv_seconds": policy.stats.base_seconds,
            "recomputed_tokens": policy.stats.recomputed_tokens,
            "after_first_task": {
                k: later[k] for k in ("reuse_rate", "answer_agreement", "top1_agreement")
            },
            "anchors": len(policy.pool),
            "anchor_bytes": policy.pool.nbytes,
            "agents": a.agents,
            "tasks": a.tasks,
            "target": TARGET,
            "met": s["reuse_rate"] >= TARGET["reuse_rate"]
            and s["answer_agreement"] >= TARGET["answer_agreement"],
        }
    )


if __name__ == "__main__":
    main()
