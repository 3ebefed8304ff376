"""torch reference (and CPU fast path) of the three Squeezed Attention kernels.

These are the definitions the Triton kernels are tested against, and what the ``squeezed``
backend runs on a CPU. They compute in float32 and return float32 (``sparse_decode``
returns ``q``'s dtype for the output, float32 for the log-sum-exp).
:func:`sparse_decode_lists` (torch only) is ``sparse_decode`` over ragged per-row lists, which
``sparse_decode`` itself runs on and the CPU decode path calls directly.
"""

from __future__ import annotations

import math

import torch

from apportion_attention.squeezed.kernels.checks import (
    check_decode,
    check_lists,
    check_mask,
    check_scores,
)


def centroid_scores(
    q: torch.Tensor,
    centroids: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
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
    n = k.shape[1]
    valid = torch.arange(idx.shape[1], device=idx.device)[None, :] < counts[:, None]
    positions = idx[valid].long()  # row 0's entries, then row 1's, ...
    if positions.numel() and bool(((positions < 0) | (positions >= n)).any()):
        raise IndexError(f"idx holds positions outside [0, {n})")
    return sparse_decode_lists(q, k, v, positions, valid.sum(-1).tolist(), scale=scale)


def sparse_decode_lists(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    counts: list[int],
    *,
    scale: float | None = None,
    tail_start: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sparse_decode` over ragged lists: row ``r`` attends to the ``counts[r]`` key
    positions that follow row ``r - 1``'s in ``positions`` (int, distinct, in any order),
    plus, with ``tail_start``, to every key from ``tail_start`` on (read in place).

    This is what the CPU decode path runs: each row gathers only its own selection (no
    padding to the longest row) and the keys after the context are not gathered at all.
    Returns (out (rows, G, d) in q's dtype, lse (rows, G) float32), as :func:`sparse_decode`.
    """
    check_lists(q, k, v, positions, counts)
    rows, G, d = q.shape
    n = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if tail_start is not None and not 0 <= tail_start <= n:
        raise ValueError(f"tail_start must be in [0, {n}], got {tail_start}")
    if positions.numel():
        lo, hi = torch.aminmax(positions)
        if int(lo) < 0 or int(hi) >= (n if tail_start is None else tail_start):
            raise IndexError(f"positions outside [0, {n if tail_start is None else tail_start})")
    out = torch.empty(rows, G, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(rows, G, dtype=torch.float32, device=q.device)
    tail = (
        None
        if tail_start is None or tail_start == n
        else torch.arange(tail_start, n, device=q.device)
    )
    for r, part in enumerate(positions.split(counts)):
        ids = part if tail is None else torch.cat([part.to(tail.dtype), tail])
        kr, vr = k[r].index_select(0, ids).float(), v[r].index_select(0, ids).float()
        s = torch.mm(q[r].float(), kr.t()).mul_(scale)  # (G, selected)
        if s.shape[1] == 0:  # nothing selected: out 0, lse -inf
            out[r], lse[r] = 0.0, float("-inf")
            continue
        m = s.amax(dim=-1, keepdim=True)  # one exp pass: p = exp(s - max), normalised after p @ v
        p = s.sub_(m).exp_()
        total = p.sum(dim=-1, keepdim=True)
        out[r] = torch.mm(p, vr).div_(total)
        lse[r] = (m + total.log()).squeeze(-1)
    return out, lse
