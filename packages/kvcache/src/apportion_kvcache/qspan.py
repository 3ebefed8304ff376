"""``qspan``: question-aware span keeping, this package's own eviction policy.

SnapKV averages the attention of a fixed observation window, which on a short question spends
half the window on context tokens and blurs a sharp peak into the mean. ``qspan`` instead:

1. scores with the *question's* queries only (the protected tail ``question_len``, at most
   ``max_question`` of them; a window of ``fallback_window`` tokens when the caller gives no
   question),
2. keeps peaks: an entry's score is the max over the question's queries (plus their mean,
   weighted by ``mean_weight``, to order the rest), so a single question token that locks onto
   the needle is enough,
3. is GQA-union: a KV head keeps what *any* of its query heads needs (max over the group),
4. keeps spans, not tokens: max-pooling over ``span`` neighbours means a selected token keeps
   its surroundings, about a sentence. The question's queries lock onto the *key* of a fact
   ("the magic number for wise-otter"); the value follows it, several tokens later (a 7-digit
   number is seven more tokens), so a span narrower than the fact loses part of the answer.
   The default of 25 keeps a whole short sentence. ``after`` makes the span one-sided: the
   question locks onto a fact's key and its value follows, so ``span`` 15 with ``after`` 12
   keeps a short fact in fewer entries than a centred 25 (tasks with several facts to keep
   within one budget, as multi-value retrieval).

Budgets, eviction and memory release are the shared ones (:mod:`apportion_kvcache.eviction`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator

from apportion_kvcache.eviction import (
    EvictionConfig,
    LayerInputs,
    ScoredEviction,
    group_heads,
    window_attention,
)
from apportion_kvcache.snapkv import pool
from apportion_kvcache.surprise import reach


class QSpanConfig(EvictionConfig):
    span: int = Field(
        25, ge=1, le=63, description="neighbourhood kept around a selected token (max-pool width)"
    )
    after: int | None = Field(
        None,
        ge=0,
        le=62,
        description="tokens of the span after a selected token, the rest before it "
        "(None: the span is centred)",
    )
    mean_weight: float = Field(
        0.5, ge=0.0, le=10.0, description="weight of the mean over question queries"
    )
    fallback_window: int = Field(
        32, ge=1, le=4096, description="query window when no question length is known"
    )
    max_question: int = Field(
        256, ge=1, le=8192, description="at most this many trailing queries score"
    )

    @model_validator(mode="after")
    def _after_within_span(self) -> QSpanConfig:
        if self.after is not None and self.after > self.span - 1:
            raise ValueError(
                f"after ({self.after}) must leave room in the span ({self.span}): at most "
                f"{self.span - 1}"
            )
        return self


class QSpan(ScoredEviction):
    name: ClassVar[str] = "qspan"
    summary: ClassVar[str] = (
        "question-aware span keeping: question-query peaks, GQA union, kept neighbourhoods"
    )
    Config = QSpanConfig

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        c = self.config
        window = inputs.question_len if inputs.question_len > 0 else c.fallback_window
        window = min(window, c.max_question)
        attn = window_attention(inputs, window)  # (B, Hq, w, L)
        scores = attn.amax(dim=2) + c.mean_weight * attn.mean(dim=2)
        scores = group_heads(scores, inputs.keys.shape[1], "max")
        if c.after is None:
            return pool(scores, c.span, "max") + 1e-3 * scores
        b, h, length = scores.shape
        lifted = reach(scores.reshape(b * h, length), c.span - 1 - c.after, c.after)
        return lifted.reshape(b, h, length) + 1e-3 * scores
