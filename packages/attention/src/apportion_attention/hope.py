"""HoPE: hybrid position embedding's frequency allocation, adapted to text models.

HoPE (Li et al., 2025, "HoPE: Hybrid of Position Embedding for Length Generalization in
Vision-Language Models") analyses which RoPE frequencies carry long-range semantics. The
lowest frequencies never complete a rotation inside the trained window, so past it they
enter phases the model never saw, while high frequencies wrap around many times and have
seen every phase. HoPE therefore

1. keeps the high-frequency components as RoPE, and sets the **lowest frequencies to zero**
   (those dimensions become position-independent: no long-term decay, no unseen phases);
2. applies **dynamic scaling** of the position index: positions are multiplied by a
   factor ``gamma`` from a small set (the paper's {0.5, 0.75, 1, 1.25, 1.5}); at inference
   the factor is chosen from the length.

Text adaptation (this module): text has one position axis, so the "temporal" allocation
applies to it. A frequency is "lowest", and zeroed, when its wavelength ``2*pi/theta_i``
exceeds ``zero_threshold`` trained windows (``zero_fraction`` sets the share directly instead).
Dynamic scaling picks the largest ``gamma`` in ``scales`` that maps the sequence into the
trained window (``gamma * length <= window``), else the smallest one; inside the window it
is 1 (``dynamic_scaling=False`` keeps it 1 everywhere).

Zero-shot caveat (why ``zero_threshold`` defaults to 16, not 1). The paper trains the model
with its allocation; here HoPE is applied, untrained, to a RoPE-trained model. Zeroing a
frequency removes the phase ``theta_i * distance`` the model learned to read, and that harms
attention as soon as the phase is large inside the window: with the paper's plain rule
(wavelength > one window, ``zero_threshold=1``) SmolLM2-135M loses 12 of its 32 frequency
pairs, whose phases reach about 6 rad within the window, and its perplexity collapses inside
the trained window (see docs/families/attention.md). The default zeroes only frequencies
that turn by at most ``2*pi/16`` (0.39 rad) over the whole window (for SmolLM2, pairs 28..31:
head dims 28-31 and 60-63), which keeps in-window quality at RoPE's level; it is a smaller
change than the paper's. Set ``zero_threshold=1`` for the paper's rule (meant for a model
trained or fine-tuned with it).

Parameters (:class:`HoPEConfig`): ``zero_threshold`` or ``zero_fraction`` (which
frequencies are zeroed), ``dynamic_scaling`` and ``scales`` (the position factors).

Selectable by name: ``attention.name = "hope"``; it installs its rotary embedding into the
model for the duration of the run (:class:`~apportion_attention.rope_scaling.RotaryPlugin`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from apportion.config import ComponentConfig
from pydantic import Field, field_validator

from apportion_attention.rope_scaling import RotaryPlugin, head_dim, rope_base, trained_length


class HoPEConfig(ComponentConfig):
    zero_threshold: float = Field(
        16.0,
        gt=0.0,
        description="zero frequencies whose wavelength exceeds "
        "this many trained windows (1 = the paper's "
        "rule, which needs training: see the module)",
    )
    zero_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="zero this share of the lowest frequencies instead"
    )
    dynamic_scaling: bool = Field(True, description="scale positions past the trained window")
    scales: list[float] = Field(
        [0.5, 0.75, 1.0, 1.25, 1.5], description="HoPE's position scale set"
    )

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if not v or any(s <= 0 for s in v):
            raise ValueError("scales must be a non-empty list of positive factors")
        return sorted(v)


def hope_inv_freq(
    dim: int,
    base: float,
    window: int,
    *,
    zero_threshold: float = 16.0,
    zero_fraction: float | None = None,
) -> torch.Tensor:
    """RoPE inverse frequencies with the lowest ones set to zero (HoPE's allocation).

    Entry ``i`` rotates head dims ``i`` and ``i + dim/2`` (HF's rotate-half layout), so a zero
    here makes both of those dims position-free.
    """
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if zero_fraction is not None:
        n_zero = int(round(zero_fraction * inv.numel()))
        low = torch.zeros_like(inv, dtype=torch.bool)
        if n_zero:
            low[-n_zero:] = True  # inv_freq decreases with the index: the tail is lowest
    else:
        low = (2 * math.pi / inv) > zero_threshold * window
    return torch.where(low, torch.zeros_like(inv), inv)


class HoPE(RotaryPlugin):
    """``hope``: lowest RoPE frequencies zeroed + dynamic position scaling past the window."""

    name: ClassVar[str] = "hope"
    summary: ClassVar[str] = (
        "HoPE position plugin: lowest RoPE frequencies zeroed, "
        "dynamic position scaling past the window"
    )
    Config = HoPEConfig

    def gamma(self, seq_len: int, window: int) -> float:
        if not self.config.dynamic_scaling or seq_len <= window:
            return 1.0
        fitting = [s for s in self.config.scales if s * seq_len <= window]
        return max(fitting) if fitting else min(self.config.scales)

    def frequencies(self, config: Any, seq_len: int) -> tuple[torch.Tensor, float, float]:
        window = trained_length(config)
        inv = hope_inv_freq(
            head_dim(config),
            rope_base(config),
            window,
            zero_threshold=self.config.zero_threshold,
            zero_fraction=self.config.zero_fraction,
        )
        return inv, self.gamma(seq_len, window), 1.0
