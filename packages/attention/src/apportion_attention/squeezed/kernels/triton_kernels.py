"""Triton kernels of Squeezed Attention's online stage (same contracts as :mod:`.reference`).

Each kernel is short and works on one row (batch x KV head) per program; the ``G`` query
heads of a GQA group are processed together so every key is read once. Arithmetic is
float32 whatever the storage dtype. Set ``TRITON_INTERPRET=1`` before importing this module
to run the kernels on CPU tensors (that is how the tests compare them to the references).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from apportion_attention.squeezed.kernels.checks import check_decode, check_mask, check_scores


def _pow2(n: int, at_least: int = 1) -> int:
    return max(triton.next_power_of_2(max(int(n), 1)), at_least)


# ----------------------------------------------------------------------------- centroid scoring
@triton.jit
def _centroid_scores_kernel(
    q_ptr,
    c_ptr,
    b_ptr,
    out_ptr,
    G,
    K,
    D,
    scale,
    sq_r,
    sq_g,
    sc_r,
    sc_k,
    sb_r,
    so_r,
    so_g,
    HAS_BIAS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    kb = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    # -- load the row's G queries and a block of centroids
    q = tl.load(
        q_ptr + row * sq_r + offs_g[:, None] * sq_g + offs_d[None, :],
        mask=(offs_g[:, None] < G) & (offs_d[None, :] < D),
        other=0.0,
    ).to(tl.float32)
    c = tl.load(
        c_ptr + row * sc_r + offs_k[:, None] * sc_k + offs_d[None, :],
        mask=(offs_k[:, None] < K) & (offs_d[None, :] < D),
        other=0.0,
    ).to(tl.float32)
    # -- (G, 1, D) * (1, K, D) summed over D: G is a handful, so no tensor-core padding
    s = tl.sum(q[:, None, :] * c[None, :, :], axis=2) * scale
    if HAS_BIAS:
        b = tl.load(b_ptr + row * sb_r + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        s = s + b[None, :]
    tl.store(
        out_ptr + row * so_r + offs_g[:, None] * so_g + offs_k[None, :],
        s,
        mask=(offs_g[:, None] < G) & (offs_k[None, :] < K),
    )


def centroid_scores(
    q: torch.Tensor,
    centroids: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton version of :func:`.reference.centroid_scores`."""
    check_scores(q, centroids, bias)
    rows, G, D = q.shape
    K = centroids.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q = q.contiguous()
    centroids = centroids.contiguous()
    out = torch.empty(rows, G, K, dtype=torch.float32, device=q.device)
    if rows == 0 or K == 0:
        return out
    b = bias.contiguous().float() if bias is not None else out  # dummy pointer when absent
    BLOCK_K = 32
    grid = (rows, triton.cdiv(K, BLOCK_K))
    _centroid_scores_kernel[grid](
        q,
        centroids,
        b,
        out,
        G,
        K,
        D,
        scale,
        q.stride(0),
        q.stride(1),
        centroids.stride(0),
        centroids.stride(1),
        b.stride(0),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_G=_pow2(G),
        BLOCK_K=BLOCK_K,
        BLOCK_D=_pow2(D),
    )
    return out


# ----------------------------------------------------------------------------- index compaction
@triton.jit
def _compact_kernel(mask_ptr, idx_ptr, cnt_ptr, N, sm_r, si_r, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = 0
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = tl.load(mask_ptr + row * sm_r + offs, mask=offs < N, other=0).to(tl.int32)
        # an inclusive prefix sum gives each selected position its slot in the output
        slot = base + tl.cumsum(m, axis=0) - 1
        tl.store(idx_ptr + row * si_r + slot, offs.to(tl.int32), mask=m > 0)
        base += tl.sum(m, axis=0)
    tl.store(cnt_ptr + row, base)


def compact(mask: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`.reference.compact`. The index lists are ``n`` wide (a caller
    may slice them to ``counts.max()``)."""
    check_mask(mask)
    rows, n = mask.shape
    idx = torch.full((rows, max(n, 1)), -1, dtype=torch.int32, device=mask.device)
    counts = torch.zeros(rows, dtype=torch.int32, device=mask.device)
    if rows and n:
        m8 = mask.contiguous().view(torch.uint8)
        _compact_kernel[(rows,)](m8, idx, counts, n, m8.stride(0), idx.stride(0), BLOCK=1024)
    if width is not None:
        if width < int(counts.max() if rows else 0):
            raise ValueError(
                f"width {width} is smaller than the largest selection {int(counts.max())}"
            )
        idx = (
            idx[:, :width]
            if width <= idx.shape[1]
            else torch.nn.functional.pad(idx, (0, width - idx.shape[1]), value=-1)
        )
    return idx, counts


# ----------------------------------------------------------------------------- sparse decode
@triton.jit
def _sparse_decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    cnt_ptr,
    o_ptr,
    lse_ptr,
    G,
    D,
    N,
    per_split,
    scale,
    sq_r,
    sq_g,
    sk_r,
    sk_n,
    sv_r,
    sv_n,
    si_r,
    so_r,
    so_s,
    so_g,
    sl_r,
    sl_s,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    count = tl.load(cnt_ptr + row)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, count)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    gd_mask = (offs_g[:, None] < G) & (offs_d[None, :] < D)
    q = tl.load(
        q_ptr + row * sq_r + offs_g[:, None] * sq_g + offs_d[None, :], mask=gd_mask, other=0.0
    )
    q = q.to(tl.float32) * scale
    # -- online softmax over this split's slice of the index list
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        pos = tl.load(idx_ptr + row * si_r + offs_n, mask=n_mask, other=0).to(tl.int64)
        pos = tl.where((pos >= 0) & (pos < N), pos, 0)
        kv_mask = n_mask[:, None] & (offs_d[None, :] < D)
        k = tl.load(
            k_ptr + row * sk_r + pos[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0
        ).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(
            v_ptr + row * sv_r + pos[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0
        ).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    # -- normalised partial output and its log-sum-exp (-inf for an empty split)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(
        o_ptr + row * so_r + split * so_s + offs_g[:, None] * so_g + offs_d[None, :],
        out,
        mask=gd_mask,
    )
    tl.store(lse_ptr + row * sl_r + split * sl_s + offs_g, lse, mask=offs_g < G)


@triton.jit
def _lse_merge_kernel(
    o_ptr,
    lse_ptr,
    out_ptr,
    lse_out_ptr,
    S,
    G,
    D,
    so_r,
    so_s,
    so_g,
    sl_r,
    sl_s,
    sr_r,
    sr_g,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(
        lse_ptr + row * sl_r + offs_s[:, None] * sl_s + offs_g[None, :],
        mask=(offs_s[:, None] < S) & (offs_g[None, :] < G),
        other=float("-inf"),
    )
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    w = tl.exp(lse - m_safe[None, :])  # (S, G); 0 for empty splits
    total = tl.sum(w, axis=0)
    o = tl.load(
        o_ptr
        + row * so_r
        + offs_s[:, None, None] * so_s
        + offs_g[None, :, None] * so_g
        + offs_d[None, None, :],
        mask=(offs_s[:, None, None] < S)
        & (offs_g[None, :, None] < G)
        & (offs_d[None, None, :] < D),
        other=0.0,
    )
    out = tl.sum(w[:, :, None] * o, axis=0) / tl.where(total > 0, total, 1.0)[:, None]
    lse_all = tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(
        out_ptr + row * sr_r + offs_g[:, None] * sr_g + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=(offs_g[:, None] < G) & (offs_d[None, :] < D),
    )
    tl.store(lse_out_ptr + row * G + offs_g, lse_all, mask=offs_g < G)


def sparse_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    counts: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`.reference.sparse_decode`: split-K over the index list
    (``num_splits`` programs per row, default enough to fill the GPU), then a log-sum-exp
    merge kernel. Indices outside ``[0, n)`` read key 0 rather than fault
    (the torch reference raises on them)."""
    check_decode(q, k, v, idx, counts)
    rows, G, D = q.shape
    N = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    width = idx.shape[1]
    if num_splits is None:
        num_splits = max(1, min(64, triton.cdiv(width, 256)))
    num_splits = max(1, min(int(num_splits), max(width, 1)))
    per_split = max(1, triton.cdiv(width, num_splits))
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    q = q.contiguous()
    idx = idx.contiguous()
    counts = counts.to(torch.int32).contiguous()
    o_part = torch.empty(rows, num_splits, G, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(rows, num_splits, G, dtype=torch.float32, device=q.device)
    out = torch.empty(rows, G, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(rows, G, dtype=torch.float32, device=q.device)
    if rows == 0:
        return out, lse
    BLOCK_G, BLOCK_D = _pow2(G), _pow2(D)
    _sparse_decode_split_kernel[(rows, num_splits)](
        q,
        k,
        v,
        idx,
        counts,
        o_part,
        lse_part,
        G,
        D,
        N,
        per_split,
        scale,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        idx.stride(0),
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        lse_part.stride(0),
        lse_part.stride(1),
        BLOCK_G=BLOCK_G,
        BLOCK_N=32,
        BLOCK_D=BLOCK_D,
    )
    _lse_merge_kernel[(rows,)](
        o_part,
        lse_part,
        out,
        lse,
        num_splits,
        G,
        D,
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        lse_part.stride(0),
        lse_part.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_S=_pow2(num_splits),
        BLOCK_G=BLOCK_G,
        BLOCK_D=BLOCK_D,
    )
    return out, lse
