"""Benchmark ``needle-threading`` (Roberts et al. 2024, "Needle Threading"): follow a thread
of key -> key pointers through the context to its end.

A thread is ``hops`` statements ``Key <k0> points to <k1>.``, ``Key <k1> points to <k2>.`` ...
scattered through stdlib prose: **forward** threads run with the text (each next link sits
later), **backward** threads against it. ``threads > 1`` asks for several threads at once
(multi-threading); ``distractors`` adds unrelated pointers. Keys are UUIDs (as in the paper)
or adjective-noun words. Every sample reports its context length in characters and tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from apportion.base import Benchmark, Sample
from pydantic import Field

from apportion_eval.common import LengthsConfig, rng_for, uuid4
from apportion_eval.scoring import string_match_all
from apportion_eval.text import compose, n_tokens, prose_contains, spread
from apportion_eval.words import compound


class ThreadingConfig(LengthsConfig):
    threads: int = Field(1, ge=1, le=16, description="1: single thread; more: multi-threading")
    hops: int = Field(3, ge=1, le=32, description="links per thread")
    direction: Literal["forward", "backward"] = Field(
        "forward", description="links run with or against the text"
    )
    distractors: int = Field(2, ge=0, le=256, description="unrelated pointers in the context")
    key_format: Literal["uuid", "word"] = Field(
        "uuid", description="UUID keys (paper) or adjective-noun words"
    )


class NeedleThreading(Benchmark):
    """Needle threading: follow key -> key pointers (single or multi-thread, either direction)."""

    name = "needle-threading"
    summary = (
        "follow key -> key pointers through the context (single/multi-thread, forward/backward)"
    )
    Config = ThreadingConfig
    max_new_tokens = 48

    def _key(self, rng: Any, taken: set[str]) -> str:
        while True:
            key = uuid4(rng) if self.config.key_format == "uuid" else compound(rng, taken)
            if key not in taken and not prose_contains(key):
                taken.add(key)
                return key

    def samples(self, tokenizer: Any) -> Iterator[Sample]:
        cfg = self.config
        for length in cfg.lengths:
            for k in range(cfg.samples):
                rng = rng_for(
                    "threading",
                    cfg.seed,
                    cfg.threads,
                    cfg.hops,
                    cfg.direction,
                    cfg.distractors,
                    cfg.key_format,
                    length,
                    k,
                )
                taken: set[str] = set()
                threads = [
                    [self._key(rng, taken) for _ in range(cfg.hops + 1)] for _ in range(cfg.threads)
                ]
                pieces = []
                for thread in threads:
                    links = [
                        f"Key {a} points to {b}." for a, b in zip(thread, thread[1:], strict=False)
                    ]
                    depths = spread(rng, len(links))
                    if cfg.direction == "backward":
                        depths = depths[::-1]
                    pieces += list(zip(links, depths, strict=True))
                for _ in range(cfg.distractors):
                    pieces.append(
                        (
                            f"Key {self._key(rng, taken)} points to {self._key(rng, taken)}.",
                            rng.random(),
                        )
                    )
                starts = [t[0] for t in threads]
                if cfg.threads == 1:
                    question = (
                        f"Start at key {starts[0]} and follow the pointers in the text above "
                        f'("Key A points to B" means go from A to B) until you reach a key that '
                        f"points nowhere. Which key is that? Answer with the key only."
                    )
                else:
                    question = (
                        f"For each of the keys {', '.join(starts)}, follow the pointers in the "
                        f'text above ("Key A points to B" means go from A to B) until you reach '
                        f"a key that points nowhere. Answer with the {cfg.threads} final keys "
                        f"only, in the same order."
                    )
                composed = compose(
                    tokenizer, length, question, pieces, rng, what="needle-threading"
                )
                per_key = 26 if cfg.key_format == "uuid" else 6
                yield Sample(
                    id=f"thread-{cfg.direction}-t{cfg.threads}-h{cfg.hops}-{length}-{k}",
                    context=composed.context,
                    question=question,
                    answers=[t[-1] for t in threads],
                    length=length,
                    depth=None,
                    tags={"diffusion": "high", "scope": "small" if cfg.threads == 1 else "medium"},
                    meta={
                        "threads": threads,
                        "direction": cfg.direction,
                        "context_chars": len(composed.context),
                        "context_tokens": n_tokens(tokenizer, composed.context),
                    },
                    max_new_tokens=self.max_new_tokens + per_key * (cfg.threads - 1),
                )

    def score(self, sample: Sample, prediction: str) -> float:
        return string_match_all(sample.answers, prediction)
