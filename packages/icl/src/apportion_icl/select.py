"""Similarity selection shared by ``knn``, ``latent``, ``dynaicl`` and ``adaptmi``:
maximal marginal relevance (Carbonell & Goldstein, 1998) over unit vectors."""

from __future__ import annotations

from typing import Any


def mmr(query: Any, candidates: Any, k: int, lam: float = 0.7) -> list[tuple[int, float, float]]:
    """Pick ``k`` rows of ``candidates`` (unit vectors, N x D) for ``query`` (D).

    Each step takes argmax ``lam * sim(q, c) - (1 - lam) * max_{s chosen} sim(c, s)``;
    ``lam=1`` is plain nearest neighbours. Returns ``(index, similarity, mmr_score)`` in
    order of choice.
    """
    import torch

    n = candidates.shape[0]
    k = max(0, min(k, n))
    if k == 0:
        return []
    sim_q = candidates @ query
    sim_c = candidates @ candidates.T
    chosen: list[tuple[int, float, float]] = []
    redundancy = torch.full((n,), float("-inf")) if lam < 1 else torch.zeros(n)
    free = torch.ones(n, dtype=torch.bool)
    for _ in range(k):
        red = torch.where(torch.isinf(redundancy), torch.zeros_like(redundancy), redundancy)
        score = lam * sim_q - (1 - lam) * red
        score = torch.where(free, score, torch.full_like(score, float("-inf")))
        i = int(score.argmax())
        chosen.append((i, float(sim_q[i]), float(score[i])))
        free[i] = False
        redundancy = torch.maximum(redundancy, sim_c[i])
    return chosen
