"""Rotating already-RoPE'd vectors to other positions (shared by the position-remapping
backends). RoPE is a rotation per frequency pair, so a key cached at position ``p`` becomes
the key at ``p + delta`` by one more rotation of angle ``delta * inv_freq``; positions can
be remapped without recomputing keys. Llama's layout (``rotate_half``) is assumed.
"""

from __future__ import annotations

from typing import Any

import torch


def inv_freq_for(config: Any, head_dim: int, device: torch.device) -> torch.Tensor:
    """The model's RoPE inverse frequencies (default RoPE only; others are refused, since
    remapping under scaled RoPE would silently be wrong)."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(
            f"position remapping supports the default RoPE only, this model uses {rope_type!r}"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., n, d) by ``delta`` positions (broadcastable to (..., n))."""
    ang = delta.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., n, d/2)
    cos = torch.cat([ang.cos(), ang.cos()], dim=-1)
    sin = torch.cat([ang.sin(), ang.sin()], dim=-1)
    xf = x.float()
    half = xf.shape[-1] // 2
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)
