"""``streaming`` — StreamingLLM (Xiao et al., 2023): attention sinks + a recent window.

The first ``n_sink`` real tokens of each row (the "attention sinks") and the most recent
entries are kept; everything in between is evicted. Positions are untouched: kept keys keep
the RoPE of their original position and the host continues ``position_ids`` from the
uncompressed length, so relative distances stay exact after eviction.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from apportion_kvcache.eviction import EvictionConfig, LayerInputs, ScoredEviction


class StreamingConfig(EvictionConfig):
    n_sink: int = Field(
        4, ge=0, le=1024, description="initial tokens always kept (attention sinks)"
    )


class StreamingLLM(ScoredEviction):
    name: ClassVar[str] = "streaming"
    summary: ClassVar[str] = "StreamingLLM: attention sinks + recent window (positions kept exact)"
    Config = StreamingConfig

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        b, h, length, _ = inputs.keys.shape
        real = inputs.real
        pos = (real.long().cumsum(-1) - 1).float()  # position among the row's real tokens
        scores = pos.clone()
        scores[(pos < self.config.n_sink) & real] = float("inf")
        return scores[:, None, :].expand(b, h, length).clone()
