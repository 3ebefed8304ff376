"""Benchmark ``graph-tracing``: in-context learning of a graph's structure from a random walk
(Park et al. 2025, "ICLR: In-Context Learning of Representations").

**Contract.** A small graph, a ``ring`` of ``num_nodes`` nodes or a square ``grid`` of them,
gets one familiar word per node (``apple``, ``bird``, ``sand``..., drawn per sample from
:data:`apportion_eval.words.GRAPH_WORDS`, so no sample's graph matches another's). The
context is a random walk over it, one word per step, as long as the target length allows;
nothing in the context says what the graph is. The question asks for the word that comes
next, and the sample scores 1 when the word the answer names is a neighbour of the walk's
last node: the paper's "accuracy of valid next node". ``answers`` lists those neighbours.

The measure is accuracy against context length: the paper finds that, with enough context,
models predict moves that respect the graph (and their representations of the words
re-organise into the graph's shape). Run it over several ``lengths``; each sample's steps are
in ``meta["steps"]``, and :meth:`metrics` reports the chance rate (``degree / num_nodes``,
what naming a uniformly random node scores) beside the predicted node.

**Prompt shape.** The paper reads the next-token distribution of a base model fed the raw,
space-separated walk. The harness sends a chat prompt (context, blank line, question), so the
walk is written as a comma-separated list (``separator``) and the question asks "Which word
should come next in the list above?". Measured on SmolLM2-135M-Instruct at 512 tokens, this
shape gets a node word back nearly every time ("The word that comes next ... is "bird"");
a space-separated walk drew fragments ("s", "SHE"), and naming the last word in the question
made the model echo it. The 135M model stays near chance here (its raw next-token guess is
not much better): the benchmark is for models that have the ability; the chance rate says
where "none" lies. The predicted node is the first node word the answer names other than
the walk's last word (an answer that restates "after sand comes bird" reads as "bird"); an
answer that names only the last word (a self-loop, never valid) or no node scores 0.

**Parameters.** ``graph`` (``ring`` or ``grid``), ``num_nodes`` (a square for ``grid``;
the paper's grid is 4x4; default: a ring of 16), ``separator``, ``lengths`` in prompt tokens
(default 256 to 2048; the walk fills them, about one step per token and separator).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any, Literal

from apportion.base import Benchmark, Sample
from pydantic import Field, model_validator

from apportion_eval.common import LengthsConfig, rng_for
from apportion_eval.fit import fit_count
from apportion_eval.words import GRAPH_WORDS

QUESTION = "Which word should come next in the list above? Answer with one word."


class GraphTracingConfig(LengthsConfig):
    lengths: list[int] = Field(
        [256, 512, 1024, 2048], description="prompt lengths in model tokens (the walk fills them)"
    )
    graph: Literal["ring", "grid"] = Field("ring", description="a ring or a square grid")
    separator: str = Field(
        ", ", min_length=1, description="text between the walk's words (paper: a space)"
    )
    num_nodes: int = Field(
        16,
        ge=4,
        le=len(GRAPH_WORDS),
        description=f"nodes (a square for grid), at most {len(GRAPH_WORDS)}",
    )

    @model_validator(mode="after")
    def _square(self) -> GraphTracingConfig:
        if self.graph == "grid" and math.isqrt(self.num_nodes) ** 2 != self.num_nodes:
            raise ValueError(
                f"grid needs a square num_nodes (4, 9, 16, 25, 36), not {self.num_nodes}"
            )
        return self


def neighbours(graph: str, n: int) -> list[list[int]]:
    """Adjacency lists of a ring of ``n`` nodes or a ``sqrt(n)`` x ``sqrt(n)`` grid."""
    if graph == "ring":
        return [sorted({(i - 1) % n, (i + 1) % n}) for i in range(n)]
    side = math.isqrt(n)
    out = []
    for i in range(n):
        r, c = divmod(i, side)
        steps = ((-1, 0), (0, -1), (0, 1), (1, 0))
        out.append(
            [
                (r + dr) * side + c + dc
                for dr, dc in steps
                if 0 <= r + dr < side and 0 <= c + dc < side
            ]
        )
    return out


def predicted_node(prediction: str, nodes: list[str], last: str) -> str | None:
    """The first node word the prediction names other than ``last``; ``last`` when it names
    only that; None when it names no node."""
    pattern = r"(?<![a-z])(" + "|".join(map(re.escape, nodes)) + r")(?![a-z])"
    named = re.findall(pattern, prediction.lower())
    others = [w for w in named if w != last]
    if others:
        return str(others[0])
    return last if named else None


class GraphTracing(Benchmark):
    """In-context graph tracing: continue a random walk with a valid neighbour."""

    name = "graph-tracing"
    summary = "ICLR graph tracing: continue a random walk over a word graph (ring or grid)"
    Config = GraphTracingConfig
    max_new_tokens = 24  # the model's answer sentence runs ~14 tokens before the word

    def samples(self, tokenizer: Any) -> Iterator[Sample]:
        cfg = self.config
        for length in cfg.lengths:
            for k in range(cfg.samples):
                yield self._sample(tokenizer, length, k)

    def _sample(self, tokenizer: Any, length: int, k: int) -> Sample:
        cfg = self.config
        rng = rng_for("graph-tracing", cfg.seed, cfg.graph, cfg.num_nodes, length, k)
        words = rng.sample(GRAPH_WORDS, cfg.num_nodes)
        adj = neighbours(cfg.graph, cfg.num_nodes)
        walk = [rng.randrange(cfg.num_nodes)]
        for _ in range(length):  # every step takes at least one token
            walk.append(rng.choice(adj[walk[-1]]))

        def render(steps: int) -> str:
            return cfg.separator.join(words[i] for i in walk[:steps])

        steps, context = fit_count(
            tokenizer, length, QUESTION, render, 2, len(walk), what="graph-tracing"
        )
        last = walk[steps - 1]
        valid = sorted(words[j] for j in adj[last])
        return Sample(
            id=f"graph-{cfg.graph}{cfg.num_nodes}-{length}-{k}",
            context=context,
            question=QUESTION,
            answers=valid,
            length=length,
            depth=None,
            tags={"diffusion": "high", "scope": "large"},
            meta={
                "graph": cfg.graph,
                "nodes": words,
                "last": words[last],
                "steps": steps,
                "degree": len(adj[last]),
                "chance": len(adj[last]) / cfg.num_nodes,
                "context_chars": len(context),
            },
            max_new_tokens=self.max_new_tokens,
        )

    def _predicted(self, sample: Sample, prediction: str) -> str | None:
        return predicted_node(prediction, sample.meta["nodes"], sample.meta["last"])

    def score(self, sample: Sample, prediction: str) -> float:
        return float(self._predicted(sample, prediction) in sample.answers)

    def metrics(self, sample: Sample, prediction: str) -> dict[str, Any]:
        """``chance``: the score of naming a uniformly random node (degree / nodes);
        ``predicted``: the node the answer names (None: none); ``steps``: the walk's steps."""
        return {
            "chance": sample.meta["chance"],
            "predicted": self._predicted(sample, prediction),
            "steps": sample.meta["steps"],
        }
