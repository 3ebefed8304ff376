"""Exact attention over KV shards: partial attention with its log-sum-exp, and the merge.

Shared by every technique that splits keys across places (DistAttention across ranks,
DistKV across instances, split-K decode kernels): each shard returns its normalised output
and the log-sum-exp of its scores, and :func:`merge` combines them into exactly the
attention over all keys.
"""

from __future__ import annotations

import math

import torch


def partial_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` (..., q, d) over one shard ``key``/``value`` (..., k, d).

    ``mask``: bool (..., q, k), True = attend. Returns (output (..., q, d), lse (..., q)) in
    float32. A row with no visible key gets output 0 and lse ``-inf`` (it merges as absent).
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe.unsqueeze(-1))
    out = torch.matmul(probs, value.float())
    return out, lse


def merge(
    outputs: list[torch.Tensor], lses: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-shard (output, lse) pairs into the attention over the union of the shards.

    ``outputs[i]``: (..., q, d) as returned by :func:`partial_attention` (normalised within the
    shard); ``lses[i]``: (..., q). Returns (output, lse) over all shards.
    """
    if not outputs or len(outputs) != len(lses):
        raise ValueError(
            f"merge needs matching non-empty lists, got {len(outputs)} and {len(lses)}"
        )
    lse_all = torch.logsumexp(torch.stack(lses), dim=0)
    safe = torch.where(torch.isfinite(lse_all), lse_all, torch.zeros_like(lse_all))
    out = torch.zeros_like(outputs[0], dtype=torch.float32)
    for o, lse in zip(outputs, lses, strict=True):
        weight = torch.exp(lse - safe).unsqueeze(-1)
        out = out + weight * o.float()
    return out, lse_all
