"""Benchmark ``passkey``: the classic pass-key retrieval test (Mohtashami & Jaggi, 2023).

A pass key hides in filler text of a target length (in the model's own tokens); the model
must repeat it. Deterministic for a seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from apportion.base import Benchmark, ComponentConfig, Sample
from pydantic import Field

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? Answer with the number only."


class PasskeyConfig(ComponentConfig):
    lengths: list[int] = Field([512, 1024], description="prompt lengths in model tokens")
    samples: int = Field(2, ge=1)
    seed: int = 0


class Passkey(Benchmark):
    name = "passkey"
    summary = "find a 5-digit pass key hidden in repeated filler text"
    Config = PasskeyConfig
    max_new_tokens = 24

    def samples(self, tokenizer: Any) -> Iterator[Sample]:
        filler_tokens = len(tokenizer.encode(" " + FILLER, add_special_tokens=False))
        for length in self.config.lengths:
            for k in range(self.config.samples):
                rng = random.Random(f"{self.config.seed}:{length}:{k}")
                key = str(rng.randrange(10_000, 100_000))
                needle = f"The pass key is {key}. Remember it. {key} is the pass key."
                n = max(1, (length - 80) // filler_tokens)
                parts = [FILLER] * n
                parts.insert(rng.randrange(n + 1), needle)
                yield Sample(
                    id=f"passkey-{length}-{k}",
                    context=" ".join(parts),
                    question=QUESTION,
                    answers=[key],
                    length=length,
                    depth=None,
                    tags={"diffusion": "low", "scope": "small"},
                )
