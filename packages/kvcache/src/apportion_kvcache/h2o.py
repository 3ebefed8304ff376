"""``h2o`` — Heavy-Hitter Oracle (Zhang et al., 2023): accumulated attention + recent tokens.

Each entry's score is the attention it received, summed over every prompt query (the "heavy
hitters"); half of the budget (``recent_fraction``) goes to the most recent entries. The scores
are computed in a forward hook from the layer's own queries and cached keys, block by block of
queries (``block_size``), so the model keeps its fast attention (SDPA or any backend) and the
memory for the scores stays O(block * L) instead of forcing eager attention on every layer.
GQA-aware: a KV head's score is the sum over its group of query heads.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from apportion.host.rope import project_queries
from pydantic import Field

from apportion_kvcache.eviction import EvictionConfig, LayerInputs, ScoredEviction


class H2OConfig(EvictionConfig):
    recent_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="share of the budget for recent tokens"
    )
    block_size: int = Field(256, ge=16, le=65536, description="queries scored per block")


class H2O(ScoredEviction):
    name: ClassVar[str] = "h2o"
    summary: ClassVar[str] = (
        "H2O: accumulated-attention heavy hitters + recent tokens, scored in a hook"
    )
    Config = H2OConfig

    def protect_tail(self, n_keep: int, question_len: int) -> int:
        return max(question_len, int(n_keep * self.config.recent_fraction))

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        """The attention each entry received, summed over every query of ``inputs.hidden``
        (each prompt query in a prefill, the decode window's while generating: the last
        cached entries' tokens) and over the query heads of its KV head. A block of queries
        reads only the keys up to its last position (the rest are causally masked anyway)."""
        keys = inputs.keys
        b, h_kv, length, d = keys.shape
        k = keys.float()
        real = inputs.real
        acc = k.new_zeros((b, h_kv, length))
        block = self.config.block_size
        padded = not bool(real.all())
        n_q = inputs.hidden.shape[1]
        offset = length - n_q  # cache position of the first query
        for start in range(0, n_q, block):
            stop = min(n_q, start + block)
            lo, hi = offset + start, offset + stop
            hid = inputs.hidden[:, start:stop]
            q = project_queries(
                inputs.module, hid, inputs.cos[..., start:stop, :], inputs.sin[..., start:stop, :]
            ).float()
            n = stop - start
            q = q.view(b, h_kv, q.shape[1] // h_kv, n, d)  # GQA: a KV head's query heads
            logits = torch.matmul(q, k[:, :, None, :hi].transpose(-1, -2))
            logits.mul_(d**-0.5)
            # causal: only the block's own keys can lie in a query's future (in place)
            future = torch.ones((n, n), dtype=torch.bool, device=k.device).triu_(1)
            logits[..., lo:hi].masked_fill_(future, float("-inf"))
            if padded:
                blind = ~real[:, None, None, None, :hi] | ~real[:, None, None, lo:hi, None]
                logits.masked_fill_(blind, float("-inf"))
            probs = torch.softmax(logits, -1)
            if padded:
                probs = probs.nan_to_num_(0.0)
            acc[..., :hi] += probs.sum(dim=(2, 3))
        return acc
