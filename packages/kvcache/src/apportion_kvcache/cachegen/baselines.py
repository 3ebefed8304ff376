"""What CacheGen is held against in the benchmarks: symmetric per-token quantization, and the
reconstruction error of a decoded KV."""

from __future__ import annotations

import math

import torch

from apportion_kvcache.kv import KV


def _fp16_scale(amax: torch.Tensor, half: int) -> torch.Tensor:
    scale = (amax / half).clamp(min=1e-8, max=60000.0).to(torch.float16)
    return scale.float()


def uniform_per_token(kv: KV, bits: int = 8) -> tuple[KV, int]:
    """Symmetric ``bits``-bit quantization with one fp16 scale per (layer, K/V, batch, head, token):
    the baseline CacheGen is held against. Returns the reconstruction and its size in bytes."""
    out, nbytes = [], 0
    half = 2 ** (bits - 1) - 1
    for k, v in kv:
        pair = []
        for x in (k, v):
            xf = x.float()
            scale = _fp16_scale(xf.abs().amax(dim=-1, keepdim=True), half)
            pair.append((torch.round(xf / scale).clamp(-half, half) * scale).to(x.dtype))
            nbytes += x.numel() * bits // 8 + scale.numel() * 2
        out.append((pair[0], pair[1]))
    return out, nbytes


def kv_error(a: KV, b: KV) -> dict[str, float]:
    """Relative RMSE and max abs error between two KVs (keys and values together)."""
    num = den = 0.0
    mx = 0.0
    for (ka, va), (kb, vb) in zip(a, b, strict=True):
        for x, y in ((ka, kb), (va, vb)):
            diff = x.float() - y.float()
            num += float((diff**2).sum())
            den += float((x.float() ** 2).sum())
            mx = max(mx, float(diff.abs().max()))
    return {"rel_rmse": math.sqrt(num / max(den, 1e-30)), "max_abs": mx}
