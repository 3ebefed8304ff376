"""Rotary position embedding (RoPE) helpers, in the Llama layout (``rotate_half``).

Shared by every technique that moves cached keys between positions (position remapping,
segment reuse, parallel context encoding) or recomputes a layer's queries (score-based KV
eviction). RoPE rotates each frequency pair of a vector by ``position * inv_freq``, so:

- :func:`apply` / :func:`unapply` rotate by a ``(cos, sin)`` table and back;
- :func:`rotate_by` moves an already-rotated vector by ``delta`` positions, without the
  table (one more rotation of angle ``delta * inv_freq``);
- :func:`cos_sin` asks the model's own rotary module for the table, so scaled RoPE variants
  are honoured; :func:`inv_freq` refuses scaled variants, whose positions do not compose by
  addition;
- :func:`project_queries` recomputes an attention module's post-RoPE queries from its input.
"""

from __future__ import annotations

from typing import Any

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(-x2, x1)`` for the halves ``x1, x2`` of the last axis (Llama's RoPE layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` (..., n, d) with a (cos, sin) table broadcastable to it."""
    return x * cos + rotate_half(x) * sin


def unapply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo :func:`apply` (rotate by the negative angle)."""
    return x * cos - rotate_half(x) * sin


def inv_freq(config: Any, head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The model's RoPE inverse frequencies, (head_dim / 2,) float32.

    Default RoPE only: under scaled RoPE (linear, NTK, YaRN, ...) a rotation by ``delta`` is
    not a move by ``delta`` positions, so remapping would be silently wrong; it is refused.
    """
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(
            f"position remapping supports the default RoPE only, this model uses {rope_type!r}"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return 1.0 / (theta**exponents)


def rotate_by(x: torch.Tensor, delta: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Move ``x`` (..., n, d), already rotated, by ``delta`` positions (broadcastable to
    (..., n)); ``freqs`` from :func:`inv_freq`. Computed in float32, returned in ``x``'s dtype."""
    angle = delta.to(torch.float32).unsqueeze(-1) * freqs  # (..., n, d/2)
    cos = torch.cat([angle.cos(), angle.cos()], dim=-1)
    sin = torch.cat([angle.sin(), angle.sin()], dim=-1)
    return apply(x.float(), cos, sin).to(x.dtype)


def cos_sin(
    model: Any, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (n, head_dim), for 1-D ``positions``, from the model's own rotary
    module (``model.model.rotary_emb``), so RoPE scaling variants are honoured."""
    rotary = model.model.rotary_emb
    dummy = torch.zeros(1, dtype=dtype, device=positions.device)
    cos, sin = rotary(dummy, positions[None, :])
    return cos[0], sin[0]


def project_queries(
    module: Any,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    last: int | None = None,
) -> torch.Tensor:
    """Post-RoPE queries (B, H_q, n, D) of an attention module for its input ``hidden``
    (B, L, hidden) and the layer's (cos, sin) (B, L, D).

    Llama/Mistral/Qwen layout: ``q_proj``, an optional ``q_norm``, rotate-half RoPE. Only the
    ``last`` positions are projected when given, so a scorer that reads an observation window
    never pays for the whole prompt.
    """
    if last is not None:
        hidden, cos, sin = hidden[:, -last:], cos[..., -last:, :], sin[..., -last:, :]
    b, n, _ = hidden.shape
    q = module.q_proj(hidden).view(b, n, -1, module.head_dim)
    if getattr(module, "q_norm", None) is not None:
        q = module.q_norm(q)
    return apply(q.transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))
