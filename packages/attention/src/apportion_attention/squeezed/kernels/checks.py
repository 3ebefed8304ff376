"""Input validation shared by the torch and Triton paths: bad shapes, dtypes or devices get
an error that names the argument, never a kernel crash or a silent broadcast."""

from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_rows(name: str, t: torch.Tensor, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")


def check_scores(q: torch.Tensor, centroids: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_rows("q", q, 3)
    check_rows("centroids", centroids, 3)
    if q.dtype not in FLOATS or centroids.dtype not in FLOATS:
        raise TypeError(f"q/centroids must be float32/16/bf16, got {q.dtype} and {centroids.dtype}")
    if q.shape[0] != centroids.shape[0] or q.shape[2] != centroids.shape[2]:
        raise ValueError(
            f"q (rows, G, d) = {tuple(q.shape)} and centroids (rows, K, d) = "
            f"{tuple(centroids.shape)} disagree"
        )
    if q.device != centroids.device:
        raise ValueError(f"q is on {q.device} but centroids on {centroids.device}")
    if bias is not None:
        check_rows("bias", bias, 2)
        if bias.shape != centroids.shape[:2]:
            raise ValueError(
                f"bias must be (rows, K) = {tuple(centroids.shape[:2])}, got {tuple(bias.shape)}"
            )
        if bias.device != q.device:
            raise ValueError(f"bias is on {bias.device} but q on {q.device}")


def check_mask(mask: torch.Tensor) -> None:
    check_rows("mask", mask, 2)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be torch.bool, got {mask.dtype}")


def check_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor
) -> None:
    check_rows("q", q, 3)
    check_rows("k", k, 3)
    check_rows("v", v, 3)
    check_rows("idx", idx, 2)
    check_rows("counts", counts, 1)
    if q.dtype not in FLOATS:
        raise TypeError(f"q must be float32/16/bf16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    rows = q.shape[0]
    if k.shape[0] != rows or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"q (rows, G, d) = {tuple(q.shape)} and k (rows, n, d) = {tuple(k.shape)} disagree"
        )
    if idx.shape[0] != rows or counts.shape[0] != rows:
        raise ValueError(
            f"idx {tuple(idx.shape)} / counts {tuple(counts.shape)} must have {rows} rows"
        )
    if idx.dtype not in (torch.int32, torch.int64) or counts.dtype not in (
        torch.int32,
        torch.int64,
    ):
        raise TypeError(f"idx/counts must be int32 or int64, got {idx.dtype} and {counts.dtype}")
    devices = {t.device for t in (q, k, v, idx, counts)}
    if len(devices) != 1:
        raise ValueError(
            f"q, k, v, idx, counts must be on one device, got {sorted(map(str, devices))}"
        )


def check_lists(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, counts: list[int]
) -> None:
    """:func:`check_decode` for ragged position lists (``counts`` a host-side list)."""
    check_rows("q", q, 3)
    check_rows("positions", positions, 1)
    rows = q.shape[0]
    if len(counts) != rows or sum(counts) != positions.numel() or min(counts, default=0) < 0:
        raise ValueError(
            f"counts must be {rows} non-negative entries summing to positions' "
            f"{positions.numel()}, got {len(counts)} summing to {sum(counts)}"
        )
    check_decode(
        q,
        k,
        v,
        positions.view(1, -1).expand(rows, -1),
        torch.zeros(rows, dtype=positions.dtype, device=positions.device),
    )
