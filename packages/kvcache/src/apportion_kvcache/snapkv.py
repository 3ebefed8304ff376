"""``snapkv`` — SnapKV (Li et al., 2024): the observation window votes for the context.

The last ``window_size`` prompt queries attend over every key; their softmax weights, averaged
over the window and smoothed by 1-D pooling (``kernel_size``) so neighbouring tokens of a
selected one survive with it, rank the entries. GQA-aware: each KV head is scored by the mean
over its own group of query heads and keeps its own tokens. The window itself is kept.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from apportion_kvcache.eviction import (
    EvictionConfig,
    LayerInputs,
    ScoredEviction,
    group_heads,
    window_attention,
)


class SnapKVConfig(EvictionConfig):
    window_size: int = Field(
        32, ge=1, le=4096, description="observation window (last prompt tokens)"
    )
    kernel_size: int = Field(5, ge=1, le=63, description="pooling width over the token axis (odd)")
    pooling: str = Field("avg", pattern="^(avg|max)$", description="avg or max pooling")


def pool(scores: torch.Tensor, kernel: int, how: str = "avg") -> torch.Tensor:
    """Same-length 1-D pooling over the last axis of (B, H, L)."""
    if kernel <= 1:
        return scores
    kernel += 1 - kernel % 2  # odd, so the output lines up
    b, h, length = scores.shape
    x = scores.reshape(b * h, 1, length)
    fn = F.avg_pool1d if how == "avg" else F.max_pool1d
    kw = {"count_include_pad": False} if how == "avg" else {}
    return fn(x, kernel, stride=1, padding=kernel // 2, **kw).reshape(b, h, length)


class SnapKV(ScoredEviction):
    name: ClassVar[str] = "snapkv"
    summary: ClassVar[str] = "SnapKV: observation-window attention, pooled, per KV head (GQA-aware)"
    Config = SnapKVConfig

    def protect_tail(self, n_keep: int, question_len: int) -> int:
        return max(question_len, self.config.window_size)

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        attn = window_attention(inputs, self.config.window_size)  # (B, Hq, w, L)
        scores = attn.mean(dim=2)
        scores = pool(scores, self.config.kernel_size, self.config.pooling)
        return group_heads(scores, inputs.keys.shape[1], "mean")
