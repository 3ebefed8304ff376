"""``probe``: query-agnostic span keeping, this package's policy for contexts compressed before
their question is known.

Every reuse path (the KV store, CacheGen, the vLLM connector, APE's cached contexts) stores a
context's KV before any question arrives, so a policy there cannot score with the question's
queries. ``probe`` asks a *generic* question instead: the host appends ``probe`` (a text that
asks what the context states) after the context, prefills both, scores every context entry by
the attention the probe's queries pay it, and drops the probe's own entries before the real
question is fed (:meth:`apportion.host.kv.KVPolicy.probe`). Causal attention leaves the
context's keys and values unchanged by the appended text, so the cache is the context's,
compressed.

Scoring is ``qspan``'s (peaks over the probe's queries plus their mean, GQA union, max-pooled
spans of ``span`` tokens: a fact's key and its value survive together), with ``sink`` leading
entries always kept. When the question *is* in the prefill, the host does not append the probe
and the policy scores with the question, exactly as ``qspan`` does.

The idea of scoring with a stand-in query follows the observation-window policies (SnapKV,
Li et al., 2024) and query-agnostic evaluation in kvpress (``query_aware=False``); the
question-shaped probe is this package's own.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from apportion_kvcache.eviction import LayerInputs
from apportion_kvcache.qspan import QSpan, QSpanConfig

#: a question about the context's content, with no task in it
DEFAULT_PROBE = "What names, numbers and facts does the text above state?"


class ProbeConfig(QSpanConfig):
    probe: str = Field(
        DEFAULT_PROBE,
        min_length=1,
        max_length=2000,
        description="stand-in question whose queries score the context when the real "
        "question is not known yet",
    )
    sink: int = Field(4, ge=0, le=256, description="leading entries always kept")


class Probe(QSpan):
    name: ClassVar[str] = "probe"
    summary: ClassVar[str] = (
        "query-agnostic span keeping: a generic probe question's attention stands in for "
        "the question"
    )
    Config = ProbeConfig

    def probe(self) -> str | None:
        return self.config.probe

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        scores = super().score(inputs)
        sink = min(self.config.sink, scores.shape[-1])
        if sink:
            scores[..., :sink] = scores.amax() + 1.0
        return scores
