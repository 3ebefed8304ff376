"""APE vs sequential encoding on multi-document QA (JSON lines; last line is the summary).

Task: ``--contexts`` documents of stdlib-docstring prose (``--doc-tokens`` each); the
question asks for one key's "special magic number" (the eval package's niah needle), held by
one document. ``--facts every`` (default): every document holds a fact of the same form
under its own key, so the other seven are near-identical distractors (niah multi-key spread
over documents). ``--facts one``: only the asked document holds a fact and the others are
plain prose, as in retrieval-augmented QA where most retrieved passages are merely
unrelated. The eval package ships no multi-document QA benchmark, so the documents are built
here from the core haystack (deterministic by seed).

Per sample, in the same run: sequential encoding (dense, the whole prompt), plain parallel
encoding (APE with T = S = 1), and APE (defaults), cold (contexts encoded now) and warm
(contexts found in the cache, as for a later query over the same documents).
Quality = answer accuracy; speed = prefill seconds, as ratios against sequential.
APE's default T and S were picked on --seed 1 (see ``APEConfig``); report --seed 0.

    uv run --no-sync python benchmarks/attention_ape.py --samples 8 --contexts 8
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from apportion.baselines.haystack import sentences
from apportion.baselines.niah import KEYS
from apportion.host import Host, load_model
from apportion.host.attention import AttentionBackend
from apportion.host.kv import KVPolicy
from apportion_attention.ape import APE, APEConfig

INSTRUCTION = "Answer the question using only the documents below."
FACT = "The special magic number for {key} is: {value}."
QUESTION = "What is the special magic number for {key}? Answer with the number only."


def documents(
    tokenizer, n_docs: int, doc_tokens: int, rng: random.Random, asked: int | None = None
) -> tuple[list[str], dict[str, str]]:
    """``n_docs`` documents and their facts (key -> value); with ``asked``, only document
    ``asked`` holds its fact (the others are returned in ``facts`` but not written)."""
    pool = sentences()
    keys = (
        rng.sample(list(KEYS), n_docs)
        if n_docs <= len(KEYS)
        else [f"{rng.choice(KEYS)}-{i}" for i in range(n_docs)]
    )
    docs, facts = [], {}
    for j, key in enumerate(keys):
        value = str(rng.randrange(1_000_000, 10_000_000))
        facts[key] = value
        body, total, i = [], 0, rng.randrange(len(pool))
        while total < doc_tokens:
            s = pool[i % len(pool)]
            body.append(s)
            total += len(tokenizer.encode(" " + s, add_special_tokens=False))
            i += 1
        at = rng.randrange(len(body) + 1)
        if asked is None or asked == j:
            body.insert(at, FACT.format(key=key, value=value))
        docs.append(" ".join(body).replace("\n", " "))
    return docs, facts


def timed_prefill(loaded, backend, text: str, question: str) -> tuple[float, dict]:
    from apportion.base import Prompt

    host = Host(loaded, backend, KVPolicy())
    enc = host.encode(Prompt([{"role": "user", "content": text}], question=question))
    ids = torch.tensor([enc.ids])
    cache = KVPolicy().make_cache(loaded.model)
    with torch.inference_mode(), backend.installed(loaded.model):
        t0 = time.perf_counter()
        out = backend.prefill(
            loaded.model,
            ids,
            torch.ones_like(ids),
            cache,
            question_len=enc.question_len,
            inner=KVPolicy().prefill,
        )
        return time.perf_counter() - t0, (out.info or {}) | {"prompt_tokens": len(enc.ids)}


def answer(loaded, backend, text: str, question: str, n: int) -> str:
    from apportion.base import Prompt

    return (
        Host(loaded, backend)
        .generate(Prompt([{"role": "user", "content": text}], question=question), max_new_tokens=n)[
            0
        ]
        .text
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=160)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=APEConfig().temperature)
    ap.add_argument("--scale", type=float, default=APEConfig().scale)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--facts",
        choices=["every", "one"],
        default="every",
        help="every document holds a same-form fact (distractors), or only the asked one",
    )
    args = ap.parse_args()

    loaded = load_model("smollm2")
    tok = loaded.tokenizer
    dense = AttentionBackend()
    modes = {
        "sequential": lambda: dense,
        "parallel": lambda: APE(APEConfig(temperature=1.0, scale=1.0, cache_entries=0)),
        "ape": lambda: APE(APEConfig(temperature=args.temperature, scale=args.scale)),
    }
    correct = {m: 0 for m in modes}
    times: dict[str, list[float]] = {"sequential": [], "ape_cold": [], "ape_warm": []}
    for k in range(args.samples):
        rng = random.Random(f"{args.seed}:{k}")
        asked = rng.randrange(args.contexts) if args.facts == "one" else None
        docs, facts = documents(tok, args.contexts, args.doc_tokens, rng, asked)
        key = rng.choice(sorted(facts)) if asked is None else list(facts)[asked]
        question = QUESTION.format(key=key)
        text = "\n\n".join([INSTRUCTION, *docs, question])
        row: dict = {"sample": k, "contexts": len(docs), "key": key}
        for mode, make in modes.items():
            backend = make()
            if mode == "sequential":
                row["sequential_prefill_s"], info = timed_prefill(loaded, backend, text, question)
                times["sequential"].append(row["sequential_prefill_s"])
                row["prompt_tokens"] = info["prompt_tokens"]
            if mode == "ape":
                cold, info = timed_prefill(loaded, backend, text, question)
                assert info.get("encoded") == len(docs), info
                # a later query over the same documents, in another order: contexts come from
                # the cache
                other = rng.choice(sorted(facts))
                q2 = QUESTION.format(key=other)
                shuffled = docs[:]
                rng.shuffle(shuffled)
                warm, info2 = timed_prefill(
                    loaded, backend, "\n\n".join([INSTRUCTION, *shuffled, q2]), q2
                )
                assert info2.get("reused") == len(docs), info2
                times["ape_cold"].append(cold)
                times["ape_warm"].append(warm)
                row |= {"ape_cold_prefill_s": cold, "ape_warm_prefill_s": warm}
            text_out = answer(loaded, backend, text, question, args.new_tokens)
            ok = facts[key] in text_out.replace(",", "")
            correct[mode] += ok
            row[f"{mode}_correct"] = ok
            row[f"{mode}_answer"] = text_out[:80]
        print(json.dumps(row), flush=True)

    n = args.samples
    acc = {m: correct[m] / n for m in modes}
    seq_t = statistics.median(times["sequential"])
    speed_cold = seq_t / statistics.median(times["ape_cold"])
    speed_warm = seq_t / statistics.median(times["ape_warm"])
    rel = acc["ape"] / acc["sequential"] if acc["sequential"] else float("nan")
    print(
        json.dumps(
            {
                "summary": True,
                "benchmark": "attention_ape",
                "facts": args.facts,
                "samples": n,
                "contexts": args.contexts,
                "doc_tokens": args.doc_tokens,
                "temperature": args.temperature,
                "scale": args.scale,
                "accuracy": acc,
                "ape_relative_quality": rel,
                "prefill_speedup_cold": speed_cold,
                "prefill_speedup_warm": speed_warm,
                "sequential_prefill_s_median": seq_t,
                "targets": {
                    "ape_relative_quality": ">= 0.90",
                    "prefill_speedup": ">= 3.0 (warm: cached contexts)",
                },
                "met": {
                    "quality": rel >= 0.9,
                    "speedup_warm": speed_warm >= 3.0,
                    "speedup_cold": speed_cold >= 3.0,
                },
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
