"""Squeezed Attention's Triton decode path against dense decode on one GPU (made for an H200;
runs in a few minutes). Exits cleanly, with a message and a ``"skipped"`` summary, where
there is no CUDA device.

Shapes are a Llama-3-8B layer (32 query heads, 8 KV heads, head_dim 128, fp16), batch 4, at
32K and 128K keys and 5/10/20% budgets. For each case it times (triton.testing.do_bench,
median):

- dense decode: torch SDPA (``enable_gqa``; its flash/mem-efficient kernel), and
  FlashAttention's ``flash_attn_with_kvcache`` when the package is installed;
- squeezed: the three kernels in sequence (coarse + fine centroid scoring, mask, index
  compaction, split-K sparse decode with its log-sum-exp merge), the backend's own decode
  path, and the sparse decode kernel alone.

Bandwidth: bytes actually read / time. Dense reads every key and value; the sparse kernel
reads the selected keys and values, their indices and the queries; the full squeezed step
adds the centroids and the key->cluster map. Reported as GB/s and as a fraction of the
card's peak (``--peak-tbs``, 4.8 TB/s for an H200). Targets: squeezed >= 4x faster
than dense decode at 10%, sparse kernel >= 60% of peak bandwidth.

    python benchmarks/gpu/attention_decode_gpu.py            # prints JSON lines
"""

# ruff: noqa: B023  (every closure is benchmarked in the iteration that made it)
from __future__ import annotations

import argparse
import json
import sys

TARGETS = {"min_speedup_10pct": 4.0, "min_bandwidth_fraction": 0.6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument(
        "--estimate-rest",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the step with SqueezedConfig.estimate_rest (the default) or without",
    )
    ap.add_argument(
        "--peak-tbs", type=float, default=4.8, help="the card's peak memory bandwidth, TB/s"
    )
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        msg = (
            "no CUDA device: the Triton decode benchmark needs a GPU "
            "(the CPU comparison is benchmarks/attention_decode.py)"
        )
        print(msg, file=sys.stderr)
        print(
            json.dumps(
                {"summary": True, "benchmark": "attention_decode_gpu", "skipped": msg, **TARGETS}
            )
        )
        return 0
    import triton
    from apportion_attention.squeezed import Squeezed, SqueezedConfig, build_layer_index
    from apportion_attention.squeezed.kernels import triton_kernels as tk
    from triton.testing import do_bench

    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        flash_attn_with_kvcache = None
    dev, dt = torch.device("cuda"), torch.float16
    B, H, HKV, D = args.batch, args.heads, args.kv_heads, args.head_dim
    G, rows, scale = H // HKV, B * HKV, D**-0.5
    peak = args.peak_tbs * 1e12
    esize = torch.finfo(dt).bits // 8
    name = torch.cuda.get_device_name()
    rows_out = []
    for n in args.lengths:
        g = torch.Generator(device=dev).manual_seed(n)
        n_centers = max(8, n // 256)
        centers = torch.randn(rows, n_centers, D, device=dev, generator=g) * 2
        which = torch.randint(0, n_centers, (rows, n), device=dev, generator=g)
        keys = (
            centers.gather(1, which[..., None].expand(rows, n, D))
            + torch.randn(rows, n, D, device=dev, generator=g)
        ).to(dt)
        values = torch.randn(rows, n, D, device=dev, generator=g, dtype=dt)
        focus = torch.randint(0, n_centers, (rows, 17, 4), device=dev, generator=g)
        qs = (
            centers.gather(1, focus.view(rows, -1, 1).expand(rows, 68, D))
            .view(rows, 17, 4, D)
            .mean(2)
        )
        qs = qs[:, None].expand(rows, G, 17, D) + 0.5 * torch.randn(
            rows, G, 17, D, device=dev, generator=g
        )
        calib, q = qs[:, :, :16].float(), qs[:, :, 16].to(dt)  # q: (rows, G, D)
        query = q.view(B, HKV * G, 1, D)
        k4, v4 = keys.view(B, HKV, n, D), values.view(B, HKV, n, D)
        dense_sdpa = do_bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(
                query, k4, v4, scale=scale, enable_gqa=True
            )
        )
        dense_fa = None
        if flash_attn_with_kvcache is not None:
            kf, vf = k4.transpose(1, 2).contiguous(), v4.transpose(1, 2).contiguous()
            qf = query.transpose(1, 2).contiguous()
            dense_fa = do_bench(lambda: flash_attn_with_kvcache(qf, kf, vf, softmax_scale=scale))
        dense_ms = min(x for x in (dense_sdpa, dense_fa) if x is not None)
        dense_bytes = 2 * rows * n * D * esize
        for budget in args.budgets:
            index = build_layer_index(
                keys.float(), calib, budget=budget, scale=scale, cluster_size=32, iters=4
            )
            if (
                args.estimate_rest
            ):  # the backend's default: the clusters left out, via their centroids
                index.summarize_rest(values.float())
            backend = Squeezed(
                SqueezedConfig(
                    budget=budget,
                    kernels="triton",
                    cluster_size=32,
                    estimate_rest=args.estimate_rest,
                )
            )

            def step(index=index, backend=backend, n=n, query=query, k4=k4, v4=v4):
                index.last_n = n - 1
                return backend._decode(index, query, k4, v4, None, scale)

            step()
            sel = index.select_one(q, scale, tk)
            idx, counts = tk.compact(sel)
            width = int(counts.max())
            idx_w = idx[:, : max(width, 1)].contiguous()
            splits = max(1, min(128, triton.cdiv(width, 512)))
            sparse_ms = do_bench(
                lambda idx_w=idx_w, counts=counts, splits=splits: tk.sparse_decode(
                    q, keys, values, idx_w, counts, scale=scale, num_splits=splits
                )
            )
            full_ms = do_bench(step)
            selected = int(counts.sum())
            sparse_bytes = 2 * selected * D * esize + selected * 4 + rows * G * D * esize
            index_bytes = (
                index.fine_c.numel() + index.coarse_c.numel()
            ) * 4 + index.assign.numel() * 8
            out_ref = torch.nn.functional.scaled_dot_product_attention(
                query, k4, v4, scale=scale, enable_gqa=True
            )
            out_sq = step()[0].transpose(1, 2)
            row = {
                "gpu": name,
                "n_keys": n,
                "budget": budget,
                "batch": B,
                "estimate_rest": args.estimate_rest,
                "selected_fraction": round(selected / (rows * n), 4),
                "dense_sdpa_ms": round(dense_sdpa, 4),
                "dense_flash_ms": dense_fa and round(dense_fa, 4),
                "squeezed_step_ms": round(full_ms, 4),
                "sparse_kernel_ms": round(sparse_ms, 4),
                "speedup_step": round(dense_ms / full_ms, 3),
                "speedup_kernel": round(dense_ms / sparse_ms, 3),
                "dense_gbs": round(dense_bytes / dense_ms / 1e6, 1),
                "sparse_kernel_gbs": round(sparse_bytes / sparse_ms / 1e6, 1),
                "sparse_kernel_peak_fraction": round(sparse_bytes / sparse_ms / 1e-3 / peak, 3),
                "step_gbs": round((sparse_bytes + index_bytes) / full_ms / 1e6, 1),
                "rel_err_vs_dense": round(
                    ((out_sq.float() - out_ref.float()).norm() / out_ref.float().norm()).item(), 4
                ),
            }
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    head = [r for r in rows_out if r["budget"] == 0.1]
    summary = {
        "summary": True,
        "benchmark": "attention_decode_gpu",
        "gpu": name,
        **TARGETS,
        "speedup_step_10pct": {r["n_keys"]: r["speedup_step"] for r in head},
        "sparse_kernel_peak_fraction_10pct": {
            r["n_keys"]: r["sparse_kernel_peak_fraction"] for r in head
        },
    }
    summary["met"] = bool(head) and all(
        r["speedup_step"] >= TARGETS["min_speedup_10pct"]
        and r["sparse_kernel_peak_fraction"] >= TARGETS["min_bandwidth_fraction"]
        for r in head
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
