"""The ``squeezed`` attention backend: Squeezed Attention's online stage inside transformers.

How it runs inside a forward pass (one transformers attention call per layer):

- A fresh prompt (``q_len == kv_len``) is the fixed context followed by ``question_len``
  question tokens (the host tells :meth:`Squeezed.prefill`; plain transformers use treats
  the whole prompt as context). The context's queries attend densely (causal SDPA); the
  layer's context keys are then indexed (:func:`.index.build_layer_index`, calibrated on the
  question's queries, or on the last context queries without a question), and the question
  queries attend to the keys their centroid lookup selects plus the question itself.
- A later call on the same cache (decode, or a further question chunk) attends to the
  selected context keys plus every key after the context. Decode (one query) runs the
  kernels: centroid scoring, index compaction, sparse split-K decode (Triton on CUDA, the
  torch path on CPU: see :mod:`apportion_attention.squeezed.kernels`). The torch path compacts by
  cluster (:meth:`.index.LayerIndex.select_positions`: the kept clusters' precomputed key
  lists, no pass over every key) and reads the keys after the context in place.
- A cache changed behind the index (a KV policy evicted entries) is detected by length and
  that layer falls back to dense attention, with a logged reason.

The keys left out (``estimate_rest``, on by default): sparse attention renormalises over
the selected keys, so whatever mass dense attention spreads over the rest of the context
lands on them instead. Each fine cluster that a query did not select therefore takes part
as one key, its centroid, weighted by the number of its (non-sticky) keys and carrying their
mean value; its log-sum-exp merges with the selected keys' (:func:`apportion.host.lse.merge`).
It reuses the fine centroid scores the selection computed anyway, so it costs one small
matmul over the clusters per step, and it is exact when a cluster's keys are equal. Without
it, the renormalisation loses needles even when their keys are selected.

Question-selected keys (``question_share`` > 0, a prompt with a question): at the question's
prefill, ``question_share`` of the budget goes to the context keys the question's queries
attend to most (:func:`.index.question_votes`: exact attention votes summed over the question
window, as SnapKV's observation window, spread to neighbouring keys and ranked by
:func:`.index.top_voted`); they stay selected for the question and every later
step (decode included), united with each step's own centroid selection, whose thresholds are
calibrated to select the rest of the budget among the keys that are not already sticky (so
the union fills the budget; calibrating to ``(1 - question_share)`` of all keys left it
about a fifth short, as the centroid selection overlaps the question's keys). The per-step
centroid lookup alone failed on needle retrieval: a generated token's query need not point
at the needle's cluster even though the question's did. ``question_share=0`` is the paper's
per-step selection only.

Budget semantics (``budget``, or ``budget_tokens`` when set): the calibrated fraction (or
count) of the context's keys a query selects, on average over calibration queries (the
question-selected keys included; keys both sticky and selected count once).
``0`` selects no context key (queries see only the question and generated tokens);
``>= 1.0`` (or ``budget_tokens >=`` the context) is exact dense attention. A context
shorter than ``min_context_tokens`` is not clustered: dense attention, logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from apportion.config import ComponentConfig
from apportion.host.attention import AttentionBackend
from pydantic import Field

from apportion_attention.squeezed.index import (
    LayerIndex,
    build_layer_index,
    question_votes,
    top_voted,
)

log = logging.getLogger("apportion_attention.squeezed")


class SqueezedConfig(ComponentConfig):
    budget: float = Field(
        0.1, ge=0.0, le=1.0, description="fraction of the context's keys each query selects"
    )
    budget_tokens: int | None = Field(
        None, ge=0, description="absolute key budget; overrides budget when set"
    )
    cluster_size: int = Field(
        16, ge=1, description="mean keys per fine cluster (K2 = n_ctx / cluster_size)"
    )
    coarse_ratio: int = Field(8, ge=1, description="fine clusters per coarse cluster")
    coarse_keep: float = Field(
        4.0, ge=1.0, description="the coarse level keeps coarse_keep x budget of the keys"
    )
    kmeans_iters: int = Field(8, ge=1, le=100)
    kmeans_max_points: int | None = Field(
        16384, ge=1, description="fit the fine K-means on at most this many keys"
    )
    calibration_quantile: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="quantile of the per-query thresholds taken as the threshold",
    )
    min_context_tokens: int = Field(
        256, ge=1, description="shorter contexts are not clustered (dense, logged)"
    )
    kernels: Literal["auto", "torch", "triton"] = Field(
        "auto", description="auto: Triton on CUDA, torch elsewhere"
    )
    question_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="share of the budget given to the keys the question selected (kept at every "
        "later step); the rest is each step's own centroid selection. 0: the paper's per-step "
        "selection only. Used only when the prompt has a question (question_len > 0)",
    )
    question_reduce: Literal["sum", "max"] = Field(
        "max",
        description="a context key's question vote: its attention probability summed over the "
        "question's queries and heads (sum) or the largest one (max)",
    )
    question_before: int = Field(
        15, ge=0, description="a question-selected key brings this many keys before it"
    )
    question_after: int = Field(
        15,
        ge=0,
        description="a question-selected key brings this many keys after it "
        "(its sentence's continuation, e.g. a needle's value)",
    )
    estimate_rest: bool = Field(
        True,
        description="the context keys a query did not select still take part, each cluster's "
        "rest as one key (centroid, weight = its size) with the rest's mean value; False: they get "
        "no attention at all (the paper's sparse attention)",
    )
    seed: int = 0


def _sdpa(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kw: Any
):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask, **kw)


def _bool_mask(attention_mask: Any, q_len: int, kv_len: int) -> torch.Tensor | None:
    """transformers' 4D mask as bool (True = attend), or None when there is none."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        m = attention_mask
    else:
        m = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return m[..., -q_len:, -kv_len:]


class Squeezed(AttentionBackend):
    """Squeezed Attention: K-means centroid lookup picks the context keys each query reads."""

    name: ClassVar[str] = "squeezed"
    summary: ClassVar[str] = (
        "Squeezed Attention: K-means key clusters, two-level centroid lookup, "
        "sparse decode (Triton)"
    )
    Config = SqueezedConfig
    extends_context: ClassVar[bool] = False

    def __init__(self, config: SqueezedConfig | None = None):
        super().__init__(config)
        self._layers: dict[int, LayerIndex | None] = {}
        self._question_len: int | None = None
        self._logged: set[str] = set()
        #: running totals over sparse calls: context keys available / selected (for reports);
        #: kept as tensors so that the decode path never waits on the device
        self.stats: dict[str, Any] = {"steps": 0, "context_keys": 0, "selected_keys": 0}

    # ------------------------------------------------------------------ transformers hooks
    def attention_function(self) -> Callable[..., Any]:
        return self._attend

    def mask_function(self) -> Callable[..., Any] | None:
        return None  # SDPA's mask builder: the function reads the usual 4D bool mask

    def reset(self) -> None:
        """Forget every layer's index (the next prompt starts fresh anyway)."""
        self._layers.clear()

    def selected_fraction(self) -> float | None:
        """Mean fraction of context keys selected per decode step so far (None before any)."""
        s = self.stats
        return float(s["selected_keys"]) / s["context_keys"] if s["context_keys"] else None

    def prefill(self, model, input_ids, attention_mask, cache, *, question_len, inner):
        self._layers.clear()
        self._question_len = int(question_len)
        try:
            return inner(model, input_ids, attention_mask, cache, question_len=question_len)
        finally:
            self._question_len = None

    def _note(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("squeezed: %s", reason)

    def _budget_fraction(self, n_ctx: int) -> float:
        c = self.config
        if c.budget_tokens is not None:
            return min(1.0, c.budget_tokens / max(n_ctx, 1))
        return c.budget

    # ------------------------------------------------------------------ the attention function
    def _attend(
        self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
    ):
        layer = getattr(module, "layer_idx", None)
        if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
            raise ValueError(
                f"squeezed: expected query (B, H, Q, d) and key/value (B, Hkv, N, d), got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if query.shape[1] % key.shape[1]:
            raise ValueError(
                f"squeezed: {query.shape[1]} query heads is not a multiple of "
                f"{key.shape[1]} KV heads"
            )
        if layer is None:
            return _sdpa(
                module,
                query,
                key,
                value,
                attention_mask,
                scaling=scaling,
                dropout=dropout,
                **kwargs,
            )
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        q_len, kv_len = query.shape[2], key.shape[2]
        if q_len == kv_len:
            return self._fresh(
                module, layer, query, key, value, attention_mask, scale, dropout, kwargs
            )
        index = self._layers.get(layer)
        if index is None:
            return _sdpa(
                module,
                query,
                key,
                value,
                attention_mask,
                scaling=scaling,
                dropout=dropout,
                **kwargs,
            )
        if kv_len != index.last_n + q_len:
            self._layers[layer] = None
            self._note(
                f"layer {layer}: cache length {kv_len} != {index.last_n} + {q_len} (entries were "
                "evicted or replaced after indexing); dense attention from here"
            )
            return _sdpa(
                module,
                query,
                key,
                value,
                attention_mask,
                scaling=scaling,
                dropout=dropout,
                **kwargs,
            )
        index.last_n = kv_len
        if q_len == 1 and query.shape[0] * key.shape[1] == index.rows:
            return self._decode(index, query, key, value, attention_mask, scale)
        return self._masked(index, query, key, value, attention_mask, scale)

    def _fresh(self, module, layer, query, key, value, attention_mask, scale, dropout, kwargs):
        self._layers[layer] = None
        q_len = query.shape[2]
        qlen = self._question_len or 0
        n_ctx = q_len - qlen

        def dense():
            return _sdpa(
                module, query, key, value, attention_mask, scaling=scale, dropout=dropout, **kwargs
            )

        if n_ctx < self.config.min_context_tokens:
            self._note(
                f"context of {n_ctx} tokens is shorter than min_context_tokens="
                f"{self.config.min_context_tokens}: too short to cluster, dense attention"
            )
            return dense()
        budget = self._budget_fraction(n_ctx)
        if budget >= 1.0:
            self._note(f"budget covers the whole context ({n_ctx} tokens): dense attention")
            return dense()
        B, H, _, d = query.shape
        Hkv = key.shape[1]
        G = H // Hkv
        rows = B * Hkv
        mask = _bool_mask(attention_mask, q_len, q_len)
        valid = None
        if mask is not None:  # left padding: a key nobody (not even the last query) may see
            valid = mask[:, 0, -1, :n_ctx].unsqueeze(1).expand(B, Hkv, n_ctx).reshape(rows, n_ctx)
        calib = query[:, :, n_ctx:] if qlen > 0 else query[:, :, max(0, n_ctx - 64) : n_ctx]
        calib = calib.reshape(B, Hkv, G, calib.shape[2], d).reshape(rows, G, calib.shape[2], d)
        c = self.config
        share = c.question_share if qlen > 0 else 0.0
        ctx_keys = key[:, :, :n_ctx].reshape(rows, n_ctx, d)
        sticky = None
        if share > 0.0:
            n_valid = (
                torch.full((rows,), n_ctx, device=key.device) if valid is None else valid.sum(-1)
            ).float()
            n_keep = (n_valid * budget * share).ceil().long()
            votes = question_votes(
                ctx_keys, calib, scale=scale, valid=valid, reduce=c.question_reduce
            )
            sticky = top_voted(
                votes, n_keep, valid=valid, before=c.question_before, after=c.question_after
            )
        # the centroid thresholds are calibrated to the budget's keys that are not sticky
        index = build_layer_index(
            ctx_keys,
            calib,
            budget=budget,
            scale=scale,
            valid=valid,
            sticky=sticky,
            cluster_size=c.cluster_size,
            coarse_ratio=c.coarse_ratio,
            coarse_keep=c.coarse_keep,
            iters=c.kmeans_iters,
            quantile=c.calibration_quantile,
            seed=c.seed + layer,
            max_points=c.kmeans_max_points,
        )
        if c.estimate_rest and budget > 0.0:
            index.summarize_rest(value[:, :, :n_ctx].reshape(rows, n_ctx, d))
        index.last_n = q_len
        self._layers[layer] = index
        if qlen == 0:
            return dense()
        # context queries: dense causal over the context; question queries: selected keys
        ctx_mask = None if attention_mask is None else attention_mask[..., :n_ctx, :n_ctx]
        out_ctx, _ = _sdpa(
            module,
            query[:, :, :n_ctx],
            key[:, :, :n_ctx],
            value[:, :, :n_ctx],
            ctx_mask,
            scaling=scale,
            dropout=dropout,
            is_causal=True if ctx_mask is None else None,
        )
        out_q, _ = self._masked(index, query[:, :, n_ctx:], key, value, attention_mask, scale)
        return torch.cat([out_ctx, out_q], dim=1), None

    def _masked(self, index: LayerIndex, query, key, value, attention_mask, scale):
        """Several queries at the end of the cache: attention under a bool mask equal to
        "selected context keys + causal over the rest" (exactly the sparse attention), merged
        with the estimate of the keys left out when the index has one."""
        B, H, Q, d = query.shape
        Hkv, N = key.shape[1], key.shape[2]
        G = H // Hkv
        n_ctx = index.n_ctx
        qg = query.reshape(B, Hkv, G, Q, d).reshape(B * Hkv, G, Q, d)
        estimate = index.rest_v is not None
        if estimate:
            sel, keep_f, fine = index.select(qg, scale, with_clusters=True)  # sel: (rows, Q, n_ctx)
        else:
            sel = index.select(qg, scale)
        self._count(sel.sum(), sel.numel())
        sel = sel.view(B, Hkv, 1, Q, n_ctx).expand(B, Hkv, G, Q, n_ctx).reshape(B, H, Q, n_ctx)
        q_pos = torch.arange(N - Q, N, device=query.device)
        tail = (
            torch.arange(n_ctx, N, device=query.device)[None, :] <= q_pos[:, None]
        )  # (Q, N - n_ctx)
        full = torch.cat([sel, tail.expand(B, H, Q, N - n_ctx)], dim=-1)
        base = _bool_mask(attention_mask, Q, N)
        if base is not None:
            full = full & base
        if not estimate:
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=full, scale=scale, enable_gqa=G > 1
            )
            return out.transpose(1, 2).contiguous(), None
        from apportion.host.lse import partial_attention

        o_sel, lse_sel = partial_attention(
            query.reshape(B * Hkv, G, Q, d),
            key.reshape(B * Hkv, 1, N, d),
            value.reshape(B * Hkv, 1, N, d),
            scale=scale,
            mask=full.view(B * Hkv, G, Q, N),
        )
        out = index.add_rest(o_sel, lse_sel, fine, keep_f)  # (rows, G, Q, d)
        return out.view(B, H, Q, d).to(query.dtype).transpose(1, 2).contiguous(), None

    def _decode(self, index: LayerIndex, query, key, value, attention_mask, scale):
        from apportion_attention.squeezed.kernels import dispatch, reference

        kern = dispatch(self.config.kernels, query.device.type)
        B, H, _, d = query.shape
        Hkv, N = key.shape[1], key.shape[2]
        G, rows = H // Hkv, B * Hkv
        q = query.reshape(rows, G, d)
        base = _bool_mask(attention_mask, 1, N)
        k, v = key.reshape(rows, N, d), value.reshape(rows, N, d)
        keep_f, fine = index.cluster_scores(q, scale, kern)
        if kern is reference and (base is None or bool(base.all())):
            # torch path: whole clusters' key lists, and the keys after the context in place
            pos, counts = index.select_positions(q, scale, kern, keep_f=keep_f)
            self._count(sum(counts), rows * index.n_ctx)
            out, lse = kern.sparse_decode_lists(
                q, k, v, pos, counts, scale=scale, tail_start=index.n_ctx
            )
        else:
            ctx = index.select_one(q, scale, kern, keep_f=keep_f)  # (rows, n_ctx)
            self._count(ctx.sum(), ctx.numel())
            keep = torch.cat(
                [ctx, torch.ones(rows, N - index.n_ctx, dtype=torch.bool, device=ctx.device)], dim=1
            )
            if base is not None:  # padding columns of each batch row
                keep = keep & base[:, 0, 0, :].unsqueeze(1).expand(B, Hkv, N).reshape(rows, N)
            idx, counts_t = kern.compact(keep)
            out, lse = kern.sparse_decode(q, k, v, idx, counts_t, scale=scale)
        out = index.add_rest(out, lse, fine, keep_f).to(query.dtype)
        return out.view(B, H, 1, d).transpose(1, 2).contiguous(), None

    def _count(self, selected: torch.Tensor, total: int) -> None:
        self.stats["steps"] += 1
        self.stats["selected_keys"] = self.stats["selected_keys"] + selected
        self.stats["context_keys"] += int(total)
