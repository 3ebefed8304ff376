"""SSA: sparse attention trained with bidirectional alignment to full attention.

SSA ("Sparse Sparse Attention by aligning full and sparse attention outputs in feature
space", 2025) observes that sparse-attention training gives the *excluded* keys no gradient,
so full attention never learns to be sparse and sparse inference keeps losing what it drops.
It trains both paths at once: every layer computes the full output ``O_f`` and the
block-sparse output ``O_s`` from the same queries/keys/values, the step propagates one of them
(chosen per step), and an alignment term pulls them together in both directions:

    L = CE(propagated path) + lambda * mean_layers[ d(O_s, sg(O_f)) + d(sg(O_s), O_f) ]

``d(O_s, sg(O_f))`` teaches the sparse path to reproduce full attention; ``d(sg(O_s), O_f)``
pushes full attention towards what the sparse path can express, i.e. makes it sparser.

- :class:`SSALoss`: the loss, usable from any training loop (HF ``Trainer.compute_loss``, TRL,
  a plain loop): ``loss = SSALoss(cfg)(model, input_ids, labels)``; ``loss.components``
  has the parts.
- ``ssa`` (attention component, :class:`SSAAttention`): block-sparse inference with the same
  selector (per query, the ``top_blocks`` key blocks whose mean key scores highest, plus
  the sink block and the local blocks).
- :func:`attention_sparsity`: the share of full attention's mass that falls in the blocks the
  selector keeps (1.0: sparse attention loses nothing).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from apportion.config import ComponentConfig
from apportion.host.attention import AttentionBackend, register_attention
from pydantic import Field

from apportion_attention.distattention import as_bool_mask


class SSAConfig(ComponentConfig):
    block_size: int = Field(16, ge=1, le=4096, description="keys per block")
    top_blocks: int = Field(8, ge=1, description="blocks each query selects by score")
    sink_blocks: int = Field(1, ge=0, description="leading blocks always kept")
    local_blocks: int = Field(1, ge=0, description="blocks ending at the query always kept")
    align_weight: float = Field(1.0, ge=0.0, description="lambda: weight of the alignment term")
    sparse_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="chance a training step propagates sparse"
    )


# -------------------------------------------------------------------------- selection


def sparse_mask(
    query: torch.Tensor, key: torch.Tensor, causal: torch.Tensor | None, cfg: SSAConfig
) -> torch.Tensor:
    """Block-sparse keep mask (b, hq, q, k): per query, ``top_blocks`` blocks by q . mean(K_block)
    among visible blocks, plus sink and local blocks; intersected with ``causal`` (b|1, 1, q, k)."""
    b, hq, q_len, d = query.shape
    hkv, k_len = key.shape[1], key.shape[-2]
    bs = cfg.block_size
    n_blocks = math.ceil(k_len / bs)
    pad = n_blocks * bs - k_len
    kp = F.pad(key, (0, 0, 0, pad)).view(b, hkv, n_blocks, bs, d)
    counts = torch.full((n_blocks,), float(bs), device=key.device)
    counts[-1] = bs - pad
    centroids = kp.sum(3) / counts[:, None]  # (b, hkv, nb, d)
    centroids = centroids.repeat_interleave(hq // hkv, dim=1)  # (b, hq, nb, d)
    scores = torch.matmul(query.float(), centroids.float().transpose(-1, -2))  # (b, hq, q, nb)
    q_pos = torch.arange(k_len - q_len, k_len, device=query.device)  # queries are the last keys
    q_block = q_pos // bs
    blocks = torch.arange(n_blocks, device=query.device)
    visible = blocks[None, :] <= q_block[:, None]  # (q, nb)
    forced = (blocks[None, :] < cfg.sink_blocks) | (
        (blocks[None, :] > q_block[:, None] - cfg.local_blocks) & visible
    )
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(forced, float("inf"))
    k_sel = min(n_blocks, cfg.top_blocks + cfg.sink_blocks + cfg.local_blocks)
    top = scores.topk(k_sel, dim=-1).indices
    keep_blocks = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & visible
    keep = keep_blocks.repeat_interleave(bs, dim=-1)[..., :k_len]
    if causal is not None:
        keep = keep & causal
    return keep


def _causal(attention_mask: Any, q_len: int, k_len: int, device: Any) -> torch.Tensor:
    mask = as_bool_mask(attention_mask, q_len, k_len, device)
    if mask is None:  # one query: every key visible
        return torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    return mask


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale, enable_gqa=True
    )


# ----------------------------------------------------------------------------- inference


class SSAAttention(AttentionBackend):
    """``ssa``: block-sparse attention with SSA's selector (the inference side of SSA).

    Approximate by design: a query reads only its selected blocks, so even short prompts
    (longer than the kept blocks) differ from dense; the contract's logit check is skipped.
    """

    name: ClassVar[str] = "ssa"
    summary: ClassVar[str] = (
        "SSA block-sparse attention (top-k key blocks + sink + local); train it with ssa.SSALoss"
    )
    Config = SSAConfig

    def attention_function(self) -> Callable[..., Any]:
        cfg = self.config

        def attention(
            module: Any,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: Any,
            scaling: float | None = None,
            dropout: float = 0.0,
            **kwargs: Any,
        ) -> tuple[torch.Tensor, None]:
            scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
            causal = _causal(attention_mask, query.shape[-2], key.shape[-2], query.device)
            keep = sparse_mask(query, key, causal, cfg)
            out = _attend(query, key, value, keep, scale)
            return out.transpose(1, 2).contiguous(), None

        return attention


# --------------------------------------------------------------------------------- loss


@dataclass
class _Recorder:
    mode: str = "full"  # which output the layer propagates: "full" | "sparse"
    align: list[torch.Tensor] = field(default_factory=list)
    mass: list[torch.Tensor] = field(default_factory=list)  # kept share of full attention mass
    measure: bool = False


def _training_attention(cfg: SSAConfig, rec: _Recorder) -> Callable[..., Any]:
    def attention(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        causal = _causal(attention_mask, query.shape[-2], key.shape[-2], query.device)
        with torch.no_grad():
            keep = sparse_mask(query.detach(), key.detach(), causal, cfg)
        if rec.measure:
            g = query.shape[1] // key.shape[1]
            kk = key.repeat_interleave(g, dim=1)
            logits = torch.matmul(query.float(), kk.float().transpose(-1, -2)) * scale
            probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
            rec.mass.append((probs * keep).sum(-1).mean().detach())
        full = _attend(query, key, value, causal, scale)
        sparse = _attend(query, key, value, keep, scale)
        if torch.is_grad_enabled():
            rec.align.append(
                F.smooth_l1_loss(sparse, full.detach()) + F.smooth_l1_loss(full, sparse.detach())
            )
        out = sparse if rec.mode == "sparse" else full
        return out.transpose(1, 2).contiguous(), None

    return attention


class SSALoss:
    """The SSA objective for any trainer. ``loss = SSALoss(cfg)(model, input_ids, labels)``.

    ``labels``: like transformers' (``-100`` = ignored; shifted inside). ``mode``: force
    "full" or "sparse" propagation; default draws sparse with ``sparse_prob``. The returned
    scalar has ``.components`` = {"ce", "align", "mode"}.
    """

    def __init__(self, config: SSAConfig | None = None, *, seed: int = 0):
        self.config = config or SSAConfig()
        self.rng = random.Random(seed)

    @contextmanager
    def installed(self, model: Any, rec: _Recorder) -> Iterator[None]:
        key = register_attention("apportion-ssa-train", _training_attention(self.config, rec))
        previous = model.config._attn_implementation
        model.set_attn_implementation(key)
        try:
            yield
        finally:
            model.set_attn_implementation(previous)

    def __call__(
        self,
        model: Any,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        mode: str | None = None,
    ) -> torch.Tensor:
        if mode not in (None, "full", "sparse"):
            raise ValueError(f"mode must be 'full', 'sparse' or None, got {mode!r}")
        if input_ids.shape != labels.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ"
            )
        rec = _Recorder(
            mode=mode or ("sparse" if self.rng.random() < self.config.sparse_prob else "full")
        )
        with self.installed(model, rec):
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits[:, :-1].float()
        target = labels[:, 1:]
        if not bool((target != -100).any()):
            raise ValueError("labels mask every token (-100 everywhere): nothing to learn from")
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
        )
        align = torch.stack(rec.align).mean() if rec.align else ce.new_zeros(())
        loss = ce + self.config.align_weight * align
        loss.components = {
            "ce": float(ce.detach()),
            "align": float(align.detach()),
            "mode": rec.mode,
        }  # type: ignore[attr-defined]
        return loss


@torch.no_grad()
def attention_sparsity(
    model: Any, input_ids: torch.Tensor, config: SSAConfig | None = None
) -> float:
    """Mean share (over layers, heads, queries) of full attention's probability mass that
    lands in the blocks SSA's selector keeps. Higher = sparser full attention."""
    loss = SSALoss(config)
    rec = _Recorder(mode="full", measure=True)
    with loss.installed(model, rec):
        model(input_ids=input_ids, use_cache=False)
    return float(torch.stack(rec.mass).mean())
