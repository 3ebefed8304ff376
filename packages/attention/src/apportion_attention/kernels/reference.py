"""torch reference (and CPU fast path) of the three Squeezed Attention kernels.

These are the definitions the Triton kernels are tested against, and what the ``squeezed``
backend runs on a CPU. They compute in float32 and return float32 (``sparse_decode``
returns ``q``'s dtype for the output, float32 for the log-sum-exp).
"""

from __future__ import annotations

import math

import torch

from apportion_attention.kernels.checks import check_decode, check_mask, check_scores


def centroid_scores(
    q: torch.Tensor, centroids: torch.Tensor, bias: torch.Tensor | None = None, *, scale: float | None = None
) -> torch.Tensor:
    """``scale * q @ centroids^T + bias``: (rows, G, d) x (rows, K, d) -> (rows, G, K) float32.

    ``bias`` (rows, K) is usually log(cluster size), so that a softmax over the result is
    the estimated attention mass of each cluster; -inf removes a centroid.
    """
    check_scores(q, centroids, bias)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.bmm(q.float(), centroids.float().transpose(1, 2)) * scale
    if bias is not None:
        s = s + bias.float().unsqueeze(1)
    return s


def compact(mask: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask -> index lists: (rows, n) bool -> (idx (rows, width) int32, counts (rows,) int32).

    Row ``r``'s selected positions, ascending, fill ``idx[r, :counts[r]]``; the rest is -1.
    ``width`` defaults to the largest count (at least 1); the Triton kernel uses ``n``.
    """
    check_mask(mask)
    rows, n = mask.shape
    counts = mask.sum(-1, dtype=torch.int32)
    w = max(int(counts.max()) if rows else 0, 1) if width is None else width
    if w < (int(counts.max()) if rows else 0):
        raise ValueError(f"width {w} is smaller than the largest selection {int(counts.max())}")
    r, c = mask.nonzero(as_tuple=True)
    starts = torch.cumsum(counts, 0, dtype=torch.int64) - counts
    slot = torch.arange(r.numel(), device=mask.device) - starts[r]
    idx = torch.full((rows, w), -1, dtype=torch.int32, device=mask.device)
    idx[r, slot] = c.to(torch.int32)
    return idx, counts


def sparse_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    counts: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,  # the torch path reads the selection in one piece
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of ``q`` (rows, G, d) over the keys ``idx[r, :counts[r]]`` of row ``r``.

    Returns (out (rows, G, d) in q's dtype, lse (rows, G) float32). An empty selection gives
    out 0 and lse -inf (it merges as absent, like :func:`apportion.host.lse.partial_attention`).
    """
    check_decode(q, k, v, idx, counts)
    rows, n, d = k.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    width = idx.shape[1]
    valid = torch.arange(width, device=idx.device)[None, :] < counts[:, None]
    safe = torch.where(valid, idx.long(), torch.zeros_like(idx, dtype=torch.long))
    if bool(((safe < 0) | (safe >= n)).any()):
        raise IndexError(f"idx holds positions outside [0, {n})")
    flat = (safe + torch.arange(rows, device=idx.device)[:, None] * n).reshape(-1)
    kg = k.reshape(rows * n, d).index_select(0, flat).view(rows, width, d)
    vg = v.reshape(rows * n, d).index_select(0, flat).view(rows, width, d)
    s = torch.bmm(q.float(), kg.float().transpose(1, 2)) * scale
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - finite.unsqueeze(-1))
    out = torch.bmm(p, vg.float())
    return out.to(q.dtype), lse

