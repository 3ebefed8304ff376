"""Benchmark ``variable-tracking`` (RULER): follow chains of ``VAR X = VAR Y`` assignments.

Each chain starts ``VAR ABCDE = 48213.`` and continues ``VAR FGHIJ = VAR ABCDE.`` for
``num_hops`` hops; ``num_chains - 1`` other chains carry other values as distractors. The
statements sit at seeded random depths, each chain in order. The question gives the value
and asks for every variable that holds it; scored by string-match-all over the names.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from typing import Any

from apportion.base import Benchmark, Sample
from pydantic import Field

from apportion_eval.common import LengthsConfig, rng_for
from apportion_eval.scoring import string_match_all
from apportion_eval.text import compose, prose_contains, spread


class VariableTrackingConfig(LengthsConfig):
    num_chains: int = Field(
        1, ge=1, le=16, description="chains in the context (1 asked, rest distractors)"
    )
    num_hops: int = Field(4, ge=1, le=32, description="assignments after the first in each chain")


class VariableTracking(Benchmark):
    """RULER variable tracking: multi-hop tracing of variable assignments."""

    name = "variable-tracking"
    summary = (
        "RULER variable tracking: find every variable a chain of VAR X = VAR Y assigns a value"
    )
    Config = VariableTrackingConfig
    max_new_tokens = 40

    def samples(self, tokenizer: Any) -> Iterator[Sample]:
        cfg = self.config
        for length in cfg.lengths:
            for k in range(cfg.samples):
                rng = rng_for("vt", cfg.seed, cfg.num_chains, cfg.num_hops, length, k)
                names: set[str] = set()
                values: set[str] = set()
                chains = []
                for _ in range(cfg.num_chains):
                    chain = [self._name(rng, names) for _ in range(cfg.num_hops + 1)]
                    value = str(rng.randrange(10_000, 100_000))
                    while value in values or prose_contains(value):
                        value = str(rng.randrange(10_000, 100_000))
                    values.add(value)
                    statements = [f"VAR {chain[0]} = {value}."] + [
                        f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:], strict=False)
                    ]
                    chains.append((chain, value, statements))
                pieces = []
                for _, _, statements in chains:
                    pieces += list(zip(statements, spread(rng, len(statements)), strict=True))
                chain, value, _ = chains[0]
                question = (
                    f"Find all variables that are assigned the value {value} in the text "
                    f"above, directly or through other variables. Answer with the "
                    f"{len(chain)} variable names only."
                )
                composed = compose(
                    tokenizer, length, question, pieces, rng, what="variable-tracking"
                )
                yield Sample(
                    id=f"vt-c{cfg.num_chains}-h{cfg.num_hops}-{length}-{k}",
                    context=composed.context,
                    question=question,
                    answers=chain,
                    length=length,
                    depth=None,
                    tags={"diffusion": "high", "scope": "medium"},
                    meta={
                        "value": value,
                        "statements": chains[0][2],
                        "context_chars": len(composed.context),
                    },
                    max_new_tokens=self.max_new_tokens + 4 * cfg.num_hops,
                )

    @staticmethod
    def _name(rng: Any, taken: set[str]) -> str:
        while True:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in taken and not prose_contains(name):
                taken.add(name)
                return name

    def score(self, sample: Sample, prediction: str) -> float:
        return string_match_all(sample.answers, prediction)
