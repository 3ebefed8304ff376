"""Compress once, ask many: one long context, many questions, against a full prefill per question.

Each context is a niah multi-key haystack (``--length`` tokens, ``--needles`` needles with
different keys), asked one question per needle. Measured in the same run, on the same
questions:

(a) ``full``: one full prefill and decode per question (the wall-time baseline);
(b) ``qspan`` query-aware at ``--ratio``: one prefill per question, the question inside it
    (the accuracy reference);
(c) ``--policy`` (``probe`` or ``surprise``) query-agnostic: the context compressed once
    (:func:`apportion_kvcache.reuse.compress_context`), stored in ``--store`` (a directory or
    ``redis://`` URL; optionally CacheGen-coded at ``--codec-level``), loaded back and asked
    every question (:func:`apportion_kvcache.reuse.ask`, ``--batch-size`` rows at a time).
    Its wall time includes the compression and the store round trip.

One JSON line per (context, config), then a ``"summary": true`` line: the wall ratio (c)/(a)
(target <= 0.35) and the accuracy of (c) against (b) (target: within 5 points).

    OMP_NUM_THREADS=2 uv run --no-sync python benchmarks/kvcache_ask_many.py \\
        --length 4096 --needles 8 --contexts 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

from apportion.config import ModelSpec
from apportion.host import Host, load_model
from apportion.plugins import get_registry
from apportion.stats import accuracy_interval
from apportion_kvcache.reuse import ask, compress_context, load_context

TARGET_WALL_RATIO = 0.35
TARGET_GAP_POINTS = 5.0


def contexts(reg, loaded, args: argparse.Namespace) -> tuple[list, object]:
    """([(sample, [(question, value)] one per needle)] for each context, the benchmark)."""
    opts = {"lengths": [args.length], "depths": [0.5], "samples": args.contexts}
    opts |= {"variant": "multi-key", "num_keys": args.needles} if args.needles > 1 else {}
    bench = reg.create("benchmark", "niah", opts)
    out = []
    for sample in bench.samples(loaded.tokenizer):
        asked = []
        for key, needle in zip(sample.meta["keys"], sample.meta["all_needles"], strict=True):
            value = needle.rsplit(": ", 1)[1].rstrip(".")
            question = (
                f"What is the special magic number for {key} mentioned in the text above? "
                "Answer with the number only."
            )
            asked.append((question, value))
        out.append((sample, asked))
    return out, bench


def score(bench, sample, value: str, text: str) -> float:
    return float(bench.score(dataclasses.replace(sample, answers=[value]), text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096, help="context tokens")
    ap.add_argument("--needles", type=int, default=8, help="needles = questions per context")
    ap.add_argument("--contexts", type=int, default=1, help="contexts (more samples)")
    ap.add_argument("--ratio", type=float, default=0.5, help="compression ratio of (b) and (c)")
    ap.add_argument("--policy", choices=["probe", "surprise"], default="probe")
    ap.add_argument("--store", default=None, help="directory or redis:// URL (default: temp)")
    ap.add_argument("--codec-level", type=int, default=None, help="CacheGen level (default off)")
    ap.add_argument("--batch-size", type=int, default=8, help="questions asked as rows at once")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of --policy (JSON value), e.g. -o before=8",
    )
    ap.add_argument(
        "--one-pass",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="surprise: score and evict in one forward (peak: the full cache) instead of a "
        "scoring pass first",
    )
    args = ap.parse_args()
    if args.needles < 1 or args.contexts < 1:
        ap.error("--needles and --contexts must be at least 1")

    reg = get_registry()
    loaded = load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))
    store = args.store or tempfile.mkdtemp(prefix="apportion-ask-many-")
    strategy = reg.create("prompt-strategy", "zero-shot")
    items, bench = contexts(reg, loaded, args)
    full_host = Host(loaded)
    aware_host = Host(
        loaded, kv_policy=reg.create("kv-policy", "qspan", {"compression_ratio": args.ratio})
    )
    options: dict = {"compression_ratio": args.ratio}
    if args.policy == "surprise":
        options["one_pass"] = args.one_pass
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--option {item!r} must look like key=value")
        options[key] = json.loads(value)
    scores: dict[str, list[float]] = {"full": [], "qspan": [], args.policy: []}
    wall: dict[str, float] = {"full": 0.0, "qspan": 0.0, args.policy: 0.0}
    n = args.max_new_tokens
    for sample, asked in items:
        prompts = [strategy.build(q, context=sample.context) for q, _ in asked]
        for label, host in (("full", full_host), ("qspan", aware_host)):
            t0 = time.perf_counter()
            texts = [host.generate(p, max_new_tokens=n)[0].text for p in prompts]
            took = time.perf_counter() - t0
            got = [score(bench, sample, v, t) for (_, v), t in zip(asked, texts, strict=True)]
            scores[label] += got
            wall[label] += took
            row = {"context": sample.id, "config": label, "questions": len(asked)}
            print(json.dumps(row | {"accuracy": sum(got) / len(got), "wall_s": round(took, 2)}))
        t0 = time.perf_counter()
        handle = compress_context(
            loaded,
            sample.context,
            args.policy,
            store,
            options=options,
            codec_level=args.codec_level,
        )
        t1 = time.perf_counter()
        stored = load_context(loaded, handle)
        t2 = time.perf_counter()
        results = ask(
            loaded, stored, [q for q, _ in asked], max_new_tokens=n, batch_size=args.batch_size
        )
        took = time.perf_counter() - t0
        got = [score(bench, sample, v, r.text) for (_, v), r in zip(asked, results, strict=True)]
        scores[args.policy] += got
        wall[args.policy] += took
        row = {
            "context": sample.id,
            "config": f"{args.policy}-once",
            "questions": len(asked),
            "accuracy": sum(got) / len(got),
            "wall_s": round(took, 2),
            "compress_s": round(t1 - t0, 2),
            "load_s": round(t2 - t1, 2),
            "ask_s": round(took - (t2 - t0), 2),
            "context_tokens": handle.meta["context_tokens"],
            "kept_tokens": handle.meta["kept_tokens"],
            "stored_bytes": handle.stats["stored_bytes"],
            "kv_bytes": handle.stats["kv_bytes"],
        }
        print(json.dumps(row), flush=True)

    table = {}
    for label, got in scores.items():
        acc, lo, hi, count = accuracy_interval(got)
        table[label] = {
            "n": count,
            "accuracy": round(acc, 3),
            "ci95": [round(lo, 3), round(hi, 3)],
            "wall_s": round(wall[label], 2),
        }
    ratio = wall[args.policy] / wall["full"] if wall["full"] else None
    gap = 100 * (table["qspan"]["accuracy"] - table[args.policy]["accuracy"])
    summary = {
        "summary": True,
        "length": args.length,
        "needles": args.needles,
        "contexts": args.contexts,
        "ratio": args.ratio,
        "policy": args.policy,
        "policy_options": options,
        "codec_level": args.codec_level,
        "store": "redis" if str(store).startswith(("redis://", "rediss://", "unix://")) else "dir",
        "batch_size": args.batch_size,
        "configs": table,
        "wall_ratio_vs_full": None if ratio is None else round(ratio, 3),
        "accuracy_gap_points_vs_qspan": round(gap, 1),
        "targets": {
            "wall_ratio_vs_full_max": TARGET_WALL_RATIO,
            "accuracy_gap_points_vs_qspan_max": TARGET_GAP_POINTS,
        },
        "met_wall": ratio is not None and ratio <= TARGET_WALL_RATIO,
        "met_accuracy": gap <= TARGET_GAP_POINTS,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
