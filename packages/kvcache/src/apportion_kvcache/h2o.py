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
from apportion.host.kv import CompressionConfig
from pydantic import Field

from apportion_kvcache.eviction import LayerInputs, ScoredEviction, group_heads, project_queries


class H2OConfig(CompressionConfig):
    recent_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="share of the budget for recent tokens"
    )
    block_size: int = Field(512, ge=16, le=65536, description="queries scored per block")


class H2O(ScoredEviction):
    name: ClassVar[str] = "h2o"
    Config = H2OConfig

    def protect_tail(self, n_keep: int, question_len: int) -> int:
        return max(question_len, int(n_keep * self.config.recent_fraction))

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        keys = inputs.keys
        b, h_kv, length, d = keys.shape
        k = keys.float()
        real = inputs.real
        acc = None
        block = self.config.block_size
        for start in range(0, length, block):
            stop = min(length, start + block)
            hid = inputs.hidden[:, start:stop]
            q = project_queries(
                inputs.module, hid, inputs.cos[..., start:stop, :], inputs.sin[..., start:stop, :]
            ).float()
            groups = q.shape[1] // h_kv
            kk = k.repeat_interleave(groups, dim=1)
            logits = torch.matmul(q, kk.transpose(-1, -2)) * (d**-0.5)  # (B, Hq, n, L)
            q_pos = torch.arange(start, stop, device=k.device)[:, None]
            allowed = (torch.arange(length, device=k.device)[None, :] <= q_pos)[None, None]
            allowed = allowed & real[:, None, None, :] & real[:, None, start:stop, None]
            probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
            part = probs.sum(dim=2)
            acc = part if acc is None else acc + part
        return group_heads(acc, h_kv, "mean") * (acc.shape[1] // h_kv)
