"""Benchmark ``niah`` (core baseline): one 7-digit needle in a haystack of stdlib prose.

The eval package ships the full RULER-style family (multi-key, multi-value, multi-query,
word/number/UUID values) and replaces this one; this baseline keeps the core runnable alone.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from pydantic import Field, field_validator

from apportion.base import Benchmark, ComponentConfig, Sample
from apportion.baselines.haystack import sentences

QUESTION = (
    "What is the special magic number for {key} mentioned in the text above? "
    "Answer with the number only."
)
NEEDLE = "The special magic number for {key} is: {value}."
KEYS = (
    "dusty-harbor",
    "silent-meadow",
    "amber-canyon",
    "frozen-lantern",
    "hollow-river",
    "crimson-orchard",
    "quiet-summit",
    "golden-marsh",
    "misty-bridge",
    "pale-comet",
)


class NeedleConfig(ComponentConfig):
    lengths: list[int] = Field([1024, 2048, 4096], description="prompt lengths in model tokens")
    depths: list[float] = Field([0.1, 0.5, 0.9], description="needle depth, 0=start 1=end")
    samples: int = Field(3, ge=1, le=1000, description="samples per (length, depth)")
    seed: int = 0

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v or any(n < 128 for n in v):
            raise ValueError("lengths must be a non-empty list of token counts >= 128")
        return v

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= d <= 1.0 for d in v):
            raise ValueError("depths must be a non-empty list of fractions in [0, 1]")
        return v


def fill_haystack(tokenizer: Any, n_tokens: int, rng: random.Random) -> list[tuple[str, int]]:
    """Sentences (with their token counts) totalling about ``n_tokens`` tokens."""
    pool = sentences()
    start = rng.randrange(len(pool))
    out: list[tuple[str, int]] = []
    total, i = 0, start
    while total < n_tokens:
        s = pool[i % len(pool)]
        n = len(tokenizer.encode(" " + s, add_special_tokens=False))
        if total + n > n_tokens and out:
            break
        out.append((s, n))
        total += n
        i += 1
    # top up with the head of the next sentence so the total lands within a few tokens
    words = pool[i % len(pool)].rstrip(".").split()
    for k in range(len(words), 0, -1):
        piece = " ".join(words[:k]) + "."
        n = len(tokenizer.encode(" " + piece, add_special_tokens=False))
        if total + n <= n_tokens:
            if k >= 3:
                out.append((piece, n))
            break
    return out


def chat_overhead(tokenizer: Any) -> int:
    """Tokens the chat template (and the blank line before the question) add to a prompt."""
    if getattr(tokenizer, "chat_template", None):
        empty = tokenizer.apply_chat_template(
            [{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False
        )
        return len(tokenizer.encode(empty, add_special_tokens=False)) + 2
    return 3


class SingleNeedle(Benchmark):
    name = "niah"
    summary = "single needle in a haystack (7-digit number) at given lengths and depths"
    Config = NeedleConfig
    config: NeedleConfig
    max_new_tokens = 32

    def samples(self, tokenizer: Any) -> Iterator[Sample]:
        cfg = self.config
        for length in cfg.lengths:
            for depth in cfg.depths:
                for k in range(cfg.samples):
                    rng = random.Random(f"{cfg.seed}:{length}:{depth}:{k}")
                    key = rng.choice(KEYS)
                    value = str(rng.randrange(1_000_000, 10_000_000))
                    needle = NEEDLE.format(key=key, value=value)
                    question = QUESTION.format(key=key)
                    reserve = (
                        len(tokenizer.encode(needle, add_special_tokens=False))
                        + len(tokenizer.encode(question, add_special_tokens=False))
                        + chat_overhead(tokenizer)
                    )
                    hay = fill_haystack(tokenizer, max(length - reserve, 16), rng)
                    total = sum(n for _, n in hay)
                    acc, at = 0, len(hay)
                    for idx, (_, n) in enumerate(hay):
                        if acc >= depth * total:
                            at = idx
                            break
                        acc += n
                    parts = [s for s, _ in hay]
                    parts.insert(at, needle)
                    yield Sample(
                        id=f"niah-{length}-{depth}-{k}",
                        context=" ".join(parts),
                        question=question,
                        answers=[value],
                        length=length,
                        depth=depth,
                        tags={"diffusion": "low", "scope": "small"},
                        meta={"key": key},
                    )
