"""Squeezed Attention's offline stage: a two-level centroid index over one layer's context
keys, with thresholds calibrated on sample queries.

Estimated attention mass. A cluster ``c`` of ``n_c`` keys with centroid ``mu_c`` stands in
for its keys: ``log m_c = scale * q . mu_c + log n_c - LSE_coarse(q)``, where ``LSE_coarse``
is the same expression's log-sum-exp over the *coarse* clusters (an estimate of the
softmax denominator that needs no fine-level pass). A query head group (GQA) keeps a
cluster if any of its heads does: masses are reduced with ``max`` over the group.

Calibration. For each calibration query, the clusters are ranked by estimated mass and the
threshold that would select ``budget`` of the context's keys is read off; the layer/head's
threshold is a quantile (default the median) of those per-query thresholds. The coarse level
is calibrated the same way to keep ``coarse_keep x budget`` of the keys (it only prunes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from apportion_attention.squeezed.kmeans import kmeans


@dataclass
class LayerIndex:
    """The index over one layer's context keys (rows = batch x KV heads).

    ``n_ctx``: context keys (positions ``[0, n_ctx)`` of the cache). ``assign`` (rows, n_ctx)
    fine cluster of each key, -1 for padding. ``fine_c``/``fine_bias`` (rows, K2, d)/(rows, K2)
    centroids and log sizes (-inf for empty), ``parent`` (rows, K2) their coarse cluster;
    ``coarse_c``/``coarse_bias`` likewise (rows, K1). ``t_fine``/``t_coarse`` (rows,) are
    log-mass thresholds (+inf selects nothing). ``last_n`` is the cache length seen at the
    last call, so a cache changed behind the index's back is detected.

    ``order``/``starts`` (built with the index, else on first use by :meth:`by_cluster`): the
    valid key positions of each row grouped by fine cluster, ascending within a cluster, as
    (rows, n_ctx) int64 (padding keys at the end), and where each cluster's run begins
    (rows, K2 + 1), so that a decode step selects whole clusters without a pass over every key.

    ``sticky`` (rows, n_ctx) bool or None (set with :meth:`set_sticky`): context keys every
    query selects in addition to its own centroid selection (the keys the question picked,
    see :func:`question_votes`, :func:`top_voted`). Every selection method returns the union.

    ``rest_v``/``rest_shift`` (set with :meth:`summarize_rest`, else None): each fine
    cluster's mean value and ``log(rest count) - fine_bias`` over its keys that are not
    sticky, so that :meth:`estimate_rest` can stand in for the keys a query did not select.
    """

    n_ctx: int
    assign: torch.Tensor
    fine_c: torch.Tensor
    fine_bias: torch.Tensor
    parent: torch.Tensor
    coarse_c: torch.Tensor
    coarse_bias: torch.Tensor
    t_fine: torch.Tensor
    t_coarse: torch.Tensor
    last_n: int = 0
    order: torch.Tensor | None = field(default=None, repr=False)
    starts: torch.Tensor | None = field(default=None, repr=False)
    sticky: torch.Tensor | None = field(default=None, repr=False)
    _sticky_rows: torch.Tensor | None = field(default=None, repr=False)
    _sticky_pos: torch.Tensor | None = field(default=None, repr=False)
    rest_v: torch.Tensor | None = field(default=None, repr=False)
    rest_shift: torch.Tensor | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return self.assign.shape[0]

    def by_cluster(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order, starts)``: key positions grouped by fine cluster (see the class doc)."""
        if self.order is None or self.starts is None:
            k2 = self.fine_c.shape[1]
            a = torch.where(self.assign >= 0, self.assign, k2)  # padding sorts last, in no cluster
            self.order = torch.argsort(a, dim=-1, stable=True)
            sizes = torch.zeros(self.rows, k2 + 1, dtype=torch.long, device=a.device)
            sizes.scatter_add_(1, a, torch.ones_like(a))
            self.starts = torch.cat(
                [torch.zeros_like(sizes[:, :1]), sizes[:, :k2].cumsum(-1)], dim=-1
            )
        return self.order, self.starts

    def set_sticky(self, keep: torch.Tensor | None) -> None:
        """Make the context keys ``keep`` (rows, n_ctx) bool always selected (None: none).
        Padding keys (``assign < 0``) are never selected."""
        self.rest_v = self.rest_shift = None  # the summaries exclude sticky keys: recompute them
        if keep is None:
            self.sticky = self._sticky_rows = self._sticky_pos = None
            return
        if keep.shape != self.assign.shape:
            raise ValueError(
                f"sticky must be (rows, n_ctx)={tuple(self.assign.shape)}, got {tuple(keep.shape)}"
            )
        self.sticky = keep.to(torch.bool) & (self.assign >= 0)
        self._sticky_rows, self._sticky_pos = self.sticky.nonzero(as_tuple=True)

    def _clusters(
        self, q: torch.Tensor, scale: float, scores_fn
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept fine clusters and fine scores for queries ``q`` (rows, G, Q, d): (bool (rows,
        Q, K2), float (rows, G, Q, K2) = ``scale * q . mu_c + log n_c``). A head group keeps a
        cluster if any of its heads does, and only under a kept coarse parent."""
        rows, G, Q, d = q.shape
        flat = q.reshape(rows, G * Q, d)
        coarse = scores_fn(flat, self.coarse_c.to(q.dtype), self.coarse_bias, scale=scale).view(
            rows, G, Q, -1
        )
        lse = torch.logsumexp(coarse, dim=-1, keepdim=True)
        keep_c = (coarse - lse).amax(1) >= self.t_coarse[:, None, None]  # (rows, Q, K1)
        keep_parent = keep_c.gather(2, self.parent[:, None, :].expand(rows, Q, -1))  # (rows, Q, K2)
        fine = scores_fn(flat, self.fine_c.to(q.dtype), self.fine_bias, scale=scale).view(
            rows, G, Q, -1
        )
        keep_f = ((fine - lse).amax(1) >= self.t_fine[:, None, None]) & keep_parent
        return keep_f, fine

    def select(self, q: torch.Tensor, scale: float, scores_fn=None, *, with_clusters: bool = False):
        """Context-key selection for queries ``q`` (rows, G, Q, d) -> bool (rows, Q, n_ctx).

        ``with_clusters``: return ``(selection, keep_f, fine)`` as well, the kept fine
        clusters (rows, Q, K2) and the fine scores (rows, G, Q, K2) that :meth:`estimate_rest`
        takes."""
        if scores_fn is None:
            from apportion_attention.squeezed.kernels.reference import centroid_scores as scores_fn
        keep_f, fine = self._clusters(q, scale, scores_fn)
        assign = self.assign.clamp(min=0)[:, None, :].expand(self.rows, q.shape[2], -1)
        sel = keep_f.gather(2, assign) & (self.assign >= 0)[:, None, :]
        sel = sel if self.sticky is None else sel | self.sticky[:, None, :]
        return (sel, keep_f, fine) if with_clusters else sel

    def cluster_scores(
        self, q: torch.Tensor, scale: float, kernels
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fine clusters one query group keeps and the fine scores: ``q`` (rows, G, d) ->
        (keep_f bool (rows, K2), fine (rows, G, K2)), with the kernels' centroid scoring."""
        keep_f, fine = self._clusters(q[:, :, None], scale, kernels.centroid_scores)
        return keep_f[:, 0], fine[:, :, 0]

    def select_clusters(self, q: torch.Tensor, scale: float, kernels) -> torch.Tensor:
        """The fine clusters one query group keeps: ``q`` (rows, G, d) -> bool (rows, K2)."""
        return self.cluster_scores(q, scale, kernels)[0]

    def select_one(
        self, q: torch.Tensor, scale: float, kernels, keep_f: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode fast path: ``q`` (rows, G, d) -> bool (rows, n_ctx), with the scoring kernel
        (or the clusters ``keep_f`` already chosen for ``q``)."""
        keep_f = self.select_clusters(q, scale, kernels) if keep_f is None else keep_f
        sel = keep_f.gather(1, self.assign.clamp(min=0)) & (self.assign >= 0)
        return sel if self.sticky is None else sel | self.sticky

    # ------------------------------------------------------------------ the rest's estimate
    def summarize_rest(self, values: torch.Tensor) -> None:
        """Summarise each fine cluster's keys that are not sticky: their mean value and their
        count. ``values`` (rows, n_ctx, d) are the context's values (call after
        :meth:`set_sticky`, which clears the summaries)."""
        rows, n_ctx, d = values.shape
        if n_ctx != self.n_ctx or rows != self.rows:
            raise ValueError(
                f"values must be (rows={self.rows}, n_ctx={self.n_ctx}, d), "
                f"got {tuple(values.shape)}"
            )
        rest = self.assign >= 0
        if self.sticky is not None:
            rest = rest & ~self.sticky
        k2 = self.fine_c.shape[1]
        a = self.assign.clamp(min=0)
        w = rest.to(torch.float32)
        count = torch.zeros(rows, k2, device=values.device).scatter_add_(1, a, w)
        total = torch.zeros(rows, k2, d, device=values.device).scatter_add_(
            1, a[..., None].expand(rows, n_ctx, d), values.float() * w[..., None]
        )
        self.rest_v = total / count.clamp(min=1.0)[..., None]
        log_n = torch.where(
            count > 0, count.clamp(min=1.0).log(), torch.full_like(count, float("-inf"))
        )
        # fine scores carry + log n_c (all keys); swap it for log(rest count). An empty
        # cluster has fine_bias -inf and no rest: keep -inf rather than form -inf - -inf.
        self.rest_shift = torch.where(
            count > 0, log_n - self.fine_bias, torch.full_like(count, float("-inf"))
        )

    def estimate_rest(
        self, fine: torch.Tensor, keep_f: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over the context keys a query did not select, each cluster's rest
        standing in as one key (its centroid) of weight ``rest count`` carrying the rest's
        mean value: exact when a cluster's keys are equal, an estimate otherwise.

        ``fine`` (rows, G, [Q,] K2): the fine scores of :meth:`cluster_scores` /
        :meth:`select`; ``keep_f`` (rows, [Q,] K2): the clusters selected (read exactly).
        Returns (out (rows, G, [Q,] d), lse (rows, G, [Q])) float32, to be merged with the
        selected keys' attention (:func:`apportion.host.lse.merge`); lse ``-inf`` where
        nothing is left out."""
        if self.rest_v is None or self.rest_shift is None:
            raise RuntimeError("estimate_rest needs summarize_rest() first")
        multi = fine.dim() == 4
        shift = self.rest_shift[:, None, None, :] if multi else self.rest_shift[:, None, :]
        logits = fine.float() + shift
        logits = logits.masked_fill(keep_f.unsqueeze(1), float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        probs = torch.exp(logits - safe.unsqueeze(-1))
        rows, k2, d = self.rest_v.shape
        out = torch.matmul(probs.reshape(rows, -1, k2), self.rest_v).reshape(*probs.shape[:-1], d)
        return out, lse

    def add_rest(
        self, out: torch.Tensor, lse: torch.Tensor, fine: torch.Tensor, keep_f: torch.Tensor
    ) -> torch.Tensor:
        """The selected keys' attention ``out`` (rows, G, [Q,] d) with log-sum-exp ``lse``,
        merged with :meth:`estimate_rest` when the index has summaries (else ``out`` as is)."""
        if self.rest_v is None:
            return out
        from apportion.host.lse import merge

        o_rest, lse_rest = self.estimate_rest(fine, keep_f)
        return merge([out, o_rest], [lse, lse_rest])[0]

    def select_positions(
        self, q: torch.Tensor, scale: float, kernels, keep_f: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """The same selection as :meth:`select_one`, as position lists built cluster by cluster.

        Returns ``(positions, counts)``: ``positions`` int64, row 0's selected context
        positions then row 1's, ...; each row's grouped by cluster (ascending within a
        cluster), ``counts[r]`` of them. Its cost follows the selected keys, not ``n_ctx``.
        With sticky keys, each row's sticky positions come first, then its clusters' other keys.
        """
        keep_f = self.select_clusters(q, scale, kernels) if keep_f is None else keep_f
        order, starts = self.by_cluster()
        rows, n_ctx = order.shape
        r, c = keep_f.nonzero(as_tuple=True)  # row-major: row 0's clusters first
        first = starts[r, c]
        sizes = starts[r, c + 1] - first
        counts = (
            torch.zeros(rows, dtype=torch.long, device=q.device).index_add_(0, r, sizes).tolist()
        )
        total = sum(counts)
        # entry j of kept run s is order.flat[r_s * n_ctx + first_s + j], and it is output
        # entry cum_s + j (cum_s: the runs before s): flat = output entry + (start - cum_s)
        shift = torch.repeat_interleave(
            first + r * n_ctx - (sizes.cumsum(0) - sizes), sizes, output_size=total
        )
        flat = shift.add_(torch.arange(total, device=q.device))
        pos = order.reshape(-1).index_select(0, flat)
        if self.sticky is None or self._sticky_rows is None or self._sticky_pos is None:
            return pos, counts
        row_of = torch.repeat_interleave(r, sizes, output_size=total)
        fresh = ~self.sticky[row_of, pos]  # cluster keys not already sticky
        row_all = torch.cat([self._sticky_rows, row_of[fresh]])
        pos_all = torch.cat([self._sticky_pos, pos[fresh]])
        by_row = torch.argsort(row_all, stable=True)
        counts = torch.bincount(row_all, minlength=rows).tolist()
        return pos_all.index_select(0, by_row), counts


def _log_sizes(counts: torch.Tensor) -> torch.Tensor:
    return torch.where(
        counts > 0, counts.clamp(min=1e-12).log(), torch.full_like(counts, float("-inf"))
    )


def _calibrate(
    log_mass: torch.Tensor, sizes: torch.Tensor, target: torch.Tensor, quantile: float
) -> torch.Tensor:
    """Per row: the log-mass threshold selecting ``target`` keys, a quantile over queries.

    ``log_mass`` (rows, Qc, K), ``sizes`` (rows, K), ``target`` (rows,) keys to select.
    """
    order = log_mass.sort(dim=-1, descending=True)
    cum = sizes[:, None, :].expand_as(log_mass).gather(2, order.indices).cumsum(-1)
    # first rank at which the cumulative key count reaches the target
    reach = (cum < target[:, None, None]).sum(-1, keepdim=True).clamp(max=log_mass.shape[-1] - 1)
    per_query = order.values.gather(2, reach).squeeze(-1)  # (rows, Qc)
    t = torch.quantile(per_query.float().clamp(min=-1e30), quantile, dim=-1)
    return torch.where(target > 0, t, torch.full_like(t, float("inf")))


@torch.no_grad()
def question_votes(
    keys: torch.Tensor,
    question_q: torch.Tensor,
    *,
    scale: float,
    valid: torch.Tensor | None = None,
    reduce: str = "sum",
) -> torch.Tensor:
    """Observation-window votes (as in SnapKV): ``keys`` (rows, n_ctx, d), ``question_q``
    (rows, G, Qq, d) -> float32 (rows, n_ctx). A key's vote is its exact softmax attention
    probability (softmax over the valid context keys), reduced over the question's queries
    and the head group: ``"sum"`` (a row's votes sum to ``G * Qq``) or ``"max"`` (the
    largest probability any one query gave it). Padding keys get 0."""
    rows, n_ctx, d = keys.shape
    if question_q.dim() != 4 or question_q.shape[0] != rows or question_q.shape[-1] != d:
        raise ValueError(
            f"question_q must be (rows={rows}, G, Qq, d={d}), got {tuple(question_q.shape)}"
        )
    flat = question_q.float().reshape(rows, -1, d)
    logits = torch.bmm(flat, keys.float().transpose(1, 2)) * scale  # (rows, G * Qq, n_ctx)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    return probs.sum(1) if reduce == "sum" else probs.amax(1)


def top_voted(
    votes: torch.Tensor,
    n_keep: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    before: int = 0,
    after: int = 0,
) -> torch.Tensor:
    """The ``n_keep[r]`` best-voted keys of each row: ``votes`` (rows, n_ctx) >= 0 -> bool
    (rows, n_ctx) (fewer keys where a row has fewer valid ones).

    Votes are spread first: key ``p`` takes the largest vote among keys ``p - after ..
    p + before``, so the ``before`` keys preceding and the ``after`` keys following a
    strongly read key (the rest of its sentence, e.g. the value after a needle's name, which
    decoding copies token by token) rank with it; ties go to the key with the larger own vote.
    """
    if before < 0 or after < 0:
        raise ValueError(f"before/after must be >= 0, got {before}/{after}")
    rows, n_ctx = votes.shape
    keep = torch.zeros(rows, n_ctx, dtype=torch.bool, device=votes.device)
    k_max = min(int(n_keep.max()) if rows else 0, n_ctx)
    if k_max <= 0:
        return keep
    spread = votes.float()
    if before or after:  # votes >= 0: zero padding never wins
        padded = torch.nn.functional.pad(spread[:, None], (after, before))
        spread = torch.nn.functional.max_pool1d(padded, before + after + 1, stride=1)[:, 0]
    peak = spread.amax(-1, keepdim=True).clamp(min=1e-30)
    rank = spread / peak + 1e-3 * votes.float() / peak  # own vote breaks ties within a spread run
    if valid is not None:
        rank = rank.masked_fill(~valid, float("-inf"))
    top = rank.topk(k_max, dim=-1)
    rank_ok = torch.arange(k_max, device=votes.device)[None, :] < n_keep[:, None]
    keep.scatter_(1, top.indices, rank_ok & (top.values > float("-inf")))
    return keep


def tail_only_index(rows: int, n_ctx: int, d: int, device: torch.device) -> LayerIndex:
    """An index that selects no context key (budget 0): attention sees only the tail."""
    z = torch.zeros(rows, 1, d, device=device)
    zb = torch.zeros(rows, 1, device=device)
    inf = torch.full((rows,), float("inf"), device=device)
    index = LayerIndex(
        n_ctx,
        torch.zeros(rows, n_ctx, dtype=torch.long, device=device),
        z,
        zb,
        torch.zeros(rows, 1, dtype=torch.long, device=device),
        z.clone(),
        zb.clone(),
        inf,
        inf.clone(),
    )
    index.by_cluster()
    return index


@torch.no_grad()
def build_layer_index(
    keys: torch.Tensor,
    calib_q: torch.Tensor,
    *,
    budget: float,
    scale: float,
    valid: torch.Tensor | None = None,
    cluster_size: int = 16,
    coarse_ratio: int = 8,
    coarse_keep: float = 4.0,
    iters: int = 8,
    quantile: float = 0.5,
    seed: int = 0,
    max_points: int | None = 16384,
    sticky: torch.Tensor | None = None,
) -> LayerIndex:
    """Cluster ``keys`` (rows, n_ctx, d) and calibrate on ``calib_q`` (rows, G, Qc, d).

    ``budget`` in [0, 1]: the fraction of each row's (valid) context keys a query should
    select. ``valid`` (rows, n_ctx) bool marks real keys (False: left padding).
    ``max_points``: the fine K-means is fitted on at most this many keys per row (every key
    is then assigned), bounding the offline cost of very long contexts.
    ``sticky`` (rows, n_ctx) bool: keys every query selects anyway (set on the index with
    :meth:`LayerIndex.set_sticky`); ``budget`` then counts them, and the fine thresholds are
    calibrated to select the budget's *remaining* keys among the others, so the union fills
    the budget instead of spending part of it on keys already selected.
    """
    rows, n_ctx, d = keys.shape
    if calib_q.dim() != 4 or calib_q.shape[0] != rows or calib_q.shape[-1] != d:
        raise ValueError(f"calib_q must be (rows={rows}, G, Qc, d={d}), got {tuple(calib_q.shape)}")
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be in [0, 1], got {budget}")
    if budget == 0.0:
        return tail_only_index(rows, n_ctx, d, keys.device)
    weight = None if valid is None else valid.float()
    k2 = max(1, min(n_ctx, math.ceil(n_ctx / cluster_size)))
    fit = None if max_points is None else max(max_points, k2)
    fine = kmeans(keys.float(), k2, iters=iters, weight=weight, seed=seed, max_points=fit)
    k1 = max(1, min(k2, math.ceil(k2 / coarse_ratio)))
    coarse = kmeans(fine.centroids, k1, iters=iters, weight=fine.counts, seed=seed + 1)
    parent = coarse.assign.clamp(min=0)  # empty fine clusters hang under cluster 0, bias -inf
    fine_bias, coarse_bias = _log_sizes(fine.counts), _log_sizes(coarse.counts)
    n_valid = fine.counts.sum(-1)
    # -- calibrate: estimated masses of the calibration queries, max over the head group
    rows_, G, Qc, _ = calib_q.shape
    flat = calib_q.float().reshape(rows, G * Qc, d)
    cs = (torch.bmm(flat, coarse.centroids.transpose(1, 2)) * scale + coarse_bias[:, None, :]).view(
        rows, G, Qc, -1
    )
    lse = torch.logsumexp(cs, -1, keepdim=True)
    coarse_lm = (cs - lse).amax(1)
    fs = (torch.bmm(flat, fine.centroids.transpose(1, 2)) * scale + fine_bias[:, None, :]).view(
        rows, G, Qc, -1
    )
    fine_lm = (fs - lse).amax(1)
    t_coarse = _calibrate(
        coarse_lm, coarse.counts, (n_valid * min(1.0, coarse_keep * budget)).ceil(), quantile
    )
    fine_sizes, fine_target = fine.counts, (n_valid * budget).ceil()
    if sticky is not None:
        if sticky.shape != (rows, n_ctx):
            raise ValueError(
                f"sticky must be (rows, n_ctx)={(rows, n_ctx)}, got {tuple(sticky.shape)}"
            )
        stuck = sticky.to(torch.bool) & (fine.assign >= 0)
        fine_sizes = fine.counts - torch.zeros_like(fine.counts).scatter_add_(
            1, fine.assign.clamp(min=0), stuck.to(fine.counts.dtype)
        )
        fine_target = (fine_target - stuck.sum(-1).to(fine_target.dtype)).clamp(min=0)
    t_fine = _calibrate(fine_lm, fine_sizes, fine_target, quantile)
    if budget >= 1.0:
        t_coarse = torch.full_like(t_coarse, float("-inf"))
        t_fine = torch.full_like(t_fine, float("-inf"))
    index = LayerIndex(
        n_ctx,
        fine.assign,
        fine.centroids,
        fine_bias,
        parent,
        coarse.centroids,
        coarse_bias,
        t_fine,
        t_coarse,
    )
    index.by_cluster()  # the per-cluster key lists decode selects from
    if sticky is not None:
        index.set_sticky(sticky)
    return index
