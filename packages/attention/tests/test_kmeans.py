"""The batched torch K-means."""

import pytest
import torch
from apportion_attention.squeezed.kmeans import kmeans


def test_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.cat([centers[i] + 0.1 * torch.randn(50, 2, generator=g) for i in range(3)])
    res = kmeans(pts[None].repeat(2, 1, 1), 3, iters=20, seed=1)
    for row in range(2):
        found = res.centroids[row][res.centroids[row][:, 0].argsort()]
        # every true center has a centroid within 0.1 and every cluster holds 50 points
        dist = torch.cdist(centers, res.centroids[row]).min(1).values
        assert bool((dist < 0.1).all()), found
        assert sorted(res.counts[row].tolist()) == [50.0, 50.0, 50.0]
    # assignments agree with the nearest centroid
    nearest = torch.cdist(pts, res.centroids[0]).argmin(1)
    assert torch.equal(nearest, res.assign[0])


def test_weights_exclude_padding_and_pull_centroids():
    x = torch.tensor([[[0.0], [1.0], [100.0], [2.0]]])
    w = torch.tensor([[1.0, 3.0, 0.0, 0.0]])
    res = kmeans(x, 1, weight=w)
    assert res.assign[0].tolist() == [0, 0, -1, -1]
    assert res.centroids[0, 0, 0].item() == pytest.approx(0.75)
    assert res.counts[0, 0].item() == 4.0


def test_deterministic_and_validates():
    x = torch.randn(3, 40, 8, generator=torch.Generator().manual_seed(2))
    a, b = kmeans(x, 5, seed=7), kmeans(x, 5, seed=7)
    assert torch.equal(a.assign, b.assign) and torch.equal(a.centroids, b.centroids)
    with pytest.raises(ValueError, match="k <= n"):
        kmeans(x, 41)
    with pytest.raises(ValueError, match="rows, n, d"):
        kmeans(x[0], 2)
    with pytest.raises(ValueError, match="weight"):
        kmeans(x, 2, weight=torch.ones(3, 39))
