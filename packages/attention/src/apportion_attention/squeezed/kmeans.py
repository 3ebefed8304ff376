"""Batched K-means in torch: many small independent clusterings (one per layer x KV head)
in one call.

``x`` is ``(rows, n, d)``; every row is clustered on its own into ``k`` centroids. Rows may
carry a per-point ``weight`` (0 = padding, excluded; the coarse level of Squeezed Attention
clusters fine centroids weighted by their sizes). Deterministic for a given ``seed``.
Lloyd's algorithm from random distinct points, empty clusters keep their previous
centroid, iteration stops early once assignments settle. With ``max_points`` the iterations
run on a random subsample and every point is then assigned once (what large contexts need:
the assignment pass, n x k x d, is the floor). Distances are computed in blocks of points,
so memory stays bounded for any n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    """``centroids`` (rows, k, d) float32; ``assign`` (rows, n) int64, -1 where weight == 0;
    ``counts`` (rows, k) float32: total weight per cluster (0 for an empty cluster)."""

    centroids: torch.Tensor
    assign: torch.Tensor
    counts: torch.Tensor
    iterations: int


def _nearest(x: torch.Tensor, c: torch.Tensor, block_elems: int = 1 << 24) -> torch.Tensor:
    """Index of the nearest centroid, (rows, n); ||x||^2 is constant per point, so
    argmin(||c||^2 - 2 x.c) suffices. Blocks of points bound the (rows, block, k) buffer."""
    rows, n, _ = x.shape
    c2 = (c * c).sum(-1).unsqueeze(1)
    step = max(1, block_elems // max(1, rows * c.shape[1]))
    out = torch.empty(rows, n, dtype=torch.long, device=x.device)
    ct = c.transpose(1, 2)
    for a in range(0, n, step):
        out[:, a : a + step] = torch.baddbmm(c2, x[:, a : a + step], ct, alpha=-2.0).argmin(-1)
    return out


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 10,
    weight: torch.Tensor | None = None,
    seed: int = 0,
    tol: float = 1e-4,
    max_points: int | None = None,
) -> KMeansResult:
    """Cluster each row of ``x`` (rows, n, d) into ``k`` clusters.

    ``weight`` (rows, n) >= 0; points of weight 0 are ignored. ``k`` must be in [1, n].
    Rows with fewer non-zero-weight points than ``k`` leave the extra clusters empty
    (count 0). ``max_points``: fit on at most this many points per row (>= k), then assign
    all. Returns float32 results on ``x``'s device.
    """
    if x.dim() != 3:
        raise ValueError(f"kmeans expects x of shape (rows, n, d), got {tuple(x.shape)}")
    rows, n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= n, got k={k}, n={n}")
    if iters < 1:
        raise ValueError(f"kmeans needs iters >= 1, got {iters}")
    xf = x.float()
    if weight is None:
        w = torch.ones(rows, n, device=x.device)
    else:
        if weight.shape != (rows, n):
            raise ValueError(f"weight must be (rows, n) = {(rows, n)}, got {tuple(weight.shape)}")
        w = weight.float().clamp(min=0)
    valid = w > 0
    if max_points is not None and n > max_points:
        if max_points < k:
            raise ValueError(f"max_points ({max_points}) must be >= k ({k})")
        g = torch.Generator(device="cpu").manual_seed(seed + 7919)
        pick = (
            torch.rand(rows, n, generator=g)
            .to(x.device)
            .masked_fill(~valid, -1.0)
            .topk(max_points, dim=1)
            .indices
        )
        sub = kmeans(
            xf.gather(1, pick.unsqueeze(-1).expand(rows, max_points, d)),
            k,
            iters=iters,
            weight=w.gather(1, pick),
            seed=seed,
            tol=tol,
        )
        assign = torch.where(
            valid, _nearest(xf, sub.centroids), torch.full((rows, n), -1, device=x.device)
        )
        counts = torch.zeros(rows, k, device=x.device).scatter_add_(1, assign.clamp(min=0), w)
        return KMeansResult(sub.centroids, assign, counts, sub.iterations)
    # init: k distinct valid points per row, chosen by a seeded random priority
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prio = torch.rand(rows, n, generator=gen).to(x.device)
    prio = torch.where(valid, prio, torch.full_like(prio, -1.0))
    init = prio.topk(k, dim=1).indices
    centroids = xf.gather(1, init.unsqueeze(-1).expand(rows, k, d)).clone()
    assign = torch.full((rows, n), -1, dtype=torch.long, device=x.device)
    it = 0
    for it in range(1, iters + 1):  # noqa: B007 (read after the loop)
        new_assign = _nearest(xf, centroids)
        new_assign = torch.where(valid, new_assign, torch.full_like(new_assign, -1))
        changed = (new_assign != assign).float().mean().item()
        assign = new_assign
        onehot_idx = assign.clamp(min=0)
        sums = torch.zeros(rows, k, d, device=x.device).scatter_add_(
            1, onehot_idx.unsqueeze(-1).expand(rows, n, d), xf * w.unsqueeze(-1)
        )
        counts = torch.zeros(rows, k, device=x.device).scatter_add_(1, onehot_idx, w)
        nonempty = counts > 0
        centroids = torch.where(
            nonempty.unsqueeze(-1), sums / counts.clamp(min=1e-12).unsqueeze(-1), centroids
        )
        if changed <= tol:
            break
    counts = torch.zeros(rows, k, device=x.device).scatter_add_(1, assign.clamp(min=0), w)
    return KMeansResult(centroids, assign, counts, it)
