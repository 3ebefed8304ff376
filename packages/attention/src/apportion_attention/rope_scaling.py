"""Position plugins: an attention component that swaps the model's rotary embedding.

:class:`RotaryPlugin` installs a rotary module whose inverse frequencies (and position
scale, and cos/sin attention factor) may depend on the sequence length, and restores the
model's own one afterwards. HoPE (:mod:`apportion_attention.hope`) is one; the RoPE-scaling
methods HoPE is compared against are the others, registered so that any run can select them
by name:

- ``rope-ntk``: dynamic NTK-aware scaling (the base grows with the length past the window);
- ``rope-yarn``: YaRN (per-frequency blend of interpolation and extrapolation + attention
  temperature), with the factor chosen dynamically from the length.

Both use transformers' own implementations (``ROPE_INIT_FUNCTIONS``) on a copy of the config.
The sequence length is taken from the prompt in :meth:`RotaryPlugin.prefill` and held for
the generation (so cached keys and new queries agree); used as a plain
``attn_implementation`` it follows ``max(position_ids) + 1``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from apportion.config import ComponentConfig
from apportion.errors import ApportionError
from apportion.host.attention import AttentionBackend
from pydantic import Field


class RotaryError(ApportionError):
    """The model has no rotary embedding this plugin knows how to replace."""


def rotary_module(model: Any) -> tuple[Any, str]:
    """(parent module, attribute name) of the model's shared rotary embedding."""
    for parent in (getattr(model, "model", None), model):
        if parent is not None and hasattr(parent, "rotary_emb"):
            return parent, "rotary_emb"
    raise RotaryError(
        f"{type(model).__name__} has no `rotary_emb` module: not a RoPE model this plugin supports"
    )


def trained_length(config: Any) -> int:
    params = getattr(config, "rope_parameters", None) or {}
    return int(params.get("original_max_position_embeddings") or config.max_position_embeddings)


def rope_base(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", 10000.0))


def head_dim(config: Any) -> int:
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


class PluggedRotary(torch.nn.Module):
    """cos/sin from ``plugin.frequencies(seq_len)``: (inv_freq, position scale, attention
    factor)."""

    def __init__(self, plugin: RotaryPlugin, config: Any):
        super().__init__()
        self.plugin, self.config = plugin, config
        self._cached: tuple[int, tuple[torch.Tensor, float, float]] | None = None

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = self.plugin.seq_len or int(position_ids.max()) + 1
        if self._cached is None or self._cached[0] != seq_len:
            self._cached = (seq_len, self.plugin.frequencies(self.config, seq_len))
        inv_freq, pos_scale, attn_factor = self._cached[1]
        freqs = (position_ids[..., None].float() * pos_scale) * inv_freq.to(x.device, torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * attn_factor).to(x.dtype), (emb.sin() * attn_factor).to(x.dtype)


class RotaryPlugin(AttentionBackend):
    """Base position plugin: the model's own RoPE (override :meth:`frequencies`)."""

    name: ClassVar[str] = "rope"
    extends_context: ClassVar[bool] = True

    def __init__(self, config: ComponentConfig | None = None):
        super().__init__(config)
        self.seq_len: int | None = None

    def frequencies(self, config: Any, seq_len: int) -> tuple[torch.Tensor, float, float]:
        """(inverse frequencies (head_dim/2,), position scale, cos/sin attention factor)."""
        d = head_dim(config)
        inv = 1.0 / (rope_base(config) ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        return inv, 1.0, 1.0

    @contextmanager
    def installed(self, model: Any) -> Iterator[None]:
        parent, attr = rotary_module(model)
        original = getattr(parent, attr)
        setattr(parent, attr, PluggedRotary(self, model.config))
        try:
            with super().installed(model):
                yield
        finally:
            setattr(parent, attr, original)

    def prefill(
        self,
        model: Any,
        input_ids: Any,
        attention_mask: Any,
        cache: Any,
        *,
        question_len: int,
        inner: Callable[..., Any],
    ) -> Any:
        self.seq_len = int(input_ids.shape[-1])  # held for the decode that follows
        return inner(model, input_ids, attention_mask, cache, question_len=question_len)


def _hf_rope(
    config: Any, rope_type: str, seq_len: int, **params: Any
) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = copy.deepcopy(config)
    cfg.rope_parameters = {"rope_type": rope_type, "rope_theta": rope_base(config), **params}
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len)


class NTKConfig(ComponentConfig):
    factor: float = Field(1.0, gt=0.0, description="transformers' dynamic-NTK factor")


class DynamicNTK(RotaryPlugin):
    """``rope-ntk``: dynamic NTK-aware scaling (base * (len/window)^(d/(d-2)) past the window)."""

    name: ClassVar[str] = "rope-ntk"
    summary: ClassVar[str] = "position plugin: dynamic NTK-aware RoPE scaling (HoPE's comparator)"
    Config = NTKConfig

    def frequencies(self, config: Any, seq_len: int) -> tuple[torch.Tensor, float, float]:
        inv, attn = _hf_rope(
            config, "dynamic", max(seq_len, trained_length(config)), factor=self.config.factor
        )
        return inv, 1.0, float(attn)


class YaRNConfig(ComponentConfig):
    beta_fast: float = Field(32.0, gt=0.0)
    beta_slow: float = Field(1.0, gt=0.0)
    min_factor: float = Field(1.0, ge=1.0, description="factor used up to the trained window")


class YaRN(RotaryPlugin):
    """``rope-yarn``: YaRN with factor = max(min_factor, length / trained window)."""

    name: ClassVar[str] = "rope-yarn"
    summary: ClassVar[str] = (
        "position plugin: YaRN RoPE scaling with a length-chosen factor (HoPE's comparator)"
    )
    Config = YaRNConfig

    def frequencies(self, config: Any, seq_len: int) -> tuple[torch.Tensor, float, float]:
        window = trained_length(config)
        factor = max(self.config.min_factor, seq_len / window)
        if factor <= 1.0:
            return super().frequencies(config, seq_len)
        inv, attn = _hf_rope(
            config,
            "yarn",
            seq_len,
            factor=factor,
            original_max_position_embeddings=window,
            beta_fast=self.config.beta_fast,
            beta_slow=self.config.beta_slow,
        )
        return inv, 1.0, float(attn)
