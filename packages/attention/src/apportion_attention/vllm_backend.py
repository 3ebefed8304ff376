"""Squeezed Attention as a vLLM attention backend (on vLLM's CPU platform).

:class:`SqueezedBackend` is vLLM's CPU backend (same paged KV layout, metadata builder and
kernels) with :class:`SqueezedImpl` as its implementation. It follows the transformers
backend (:mod:`apportion_attention.squeezed.backend`) with the whole prompt as the fixed
context (vLLM does not say where a question starts):

- Prefill steps (chunked or not) are vLLM's dense CPU attention. Meanwhile the impl keeps,
  per request and layer, the keys and values in plain ``(kv_heads, tokens, head_dim)`` order
  and the last 64 prompt queries (calibration).
- At a request's first decode step the layer's prompt keys are indexed
  (:func:`~apportion_attention.squeezed.index.build_layer_index`); that and every later
  decode token attends to the context keys its centroid lookup selects plus every token
  after the prompt, with the Squeezed kernels (torch path on CPU), and to the clusters left
  out through their centroids (``estimate_rest``, as in the transformers backend).
- A prompt shorter than ``min_context_tokens`` or a budget covering the whole context stays
  dense; a request the impl lost track of (preempted, or two requests whose block tables
  cannot be told apart) falls back to dense attention for good, logged once per reason.

Why a copy of the keys: vLLM's CPU kernels keep a block's keys transposed (``vec`` ISA) or
AMX-packed, so the paged cache cannot be read key by key outside vLLM's kernels. The copy
doubles the KV memory of sparse requests; this backend is the reference integration, not a
fast one. Requests are recognized across steps by their block-table row, since an attention
impl never sees request ids.

Registered by :func:`apportion_attention.vllm_plugin.register` (see there for selection).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from apportion_attention.squeezed.backend import SqueezedConfig
from apportion_attention.squeezed.index import LayerIndex, build_layer_index
from apportion_attention.vllm_plugin import ENV_CONFIG, NAME

log = logging.getLogger("apportion_attention.vllm")

CALIBRATION_QUERIES = 64
#: forward calls a tracked request may be absent before its state is dropped
MAX_ABSENT_STEPS = 64


def config_from_env() -> SqueezedConfig:
    raw = os.environ.get(ENV_CONFIG, "").strip()
    if not raw:
        return SqueezedConfig()
    try:
        fields = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_CONFIG} is not JSON: {exc}") from None
    return SqueezedConfig(**fields)


class _Buffer:
    """A growable ``(heads, n, d)`` tensor."""

    def __init__(self, like: torch.Tensor):
        self.data = like.new_empty((like.shape[1], max(256, 2 * like.shape[0]), like.shape[2]))
        self.n = 0

    def append(self, x: torch.Tensor) -> None:  # x (tokens, heads, d)
        need = self.n + x.shape[0]
        if need > self.data.shape[1]:
            grown = self.data.new_empty(
                (self.data.shape[0], max(need, 2 * self.data.shape[1]), self.data.shape[2])
            )
            grown[:, : self.n] = self.data[:, : self.n]
            self.data = grown
        self.data[:, self.n : need] = x.transpose(0, 1)
        self.n = need

    def view(self) -> torch.Tensor:
        return self.data[:, : self.n]


@dataclass
class _Request:
    keys: _Buffer | None = None
    values: _Buffer | None = None
    calib: torch.Tensor | None = None  # (calib tokens, heads, d), the latest prompt queries
    index: LayerIndex | None = None
    absent: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return 0 if self.keys is None else self.keys.n


class SqueezedBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend with Squeezed Attention for decode."""

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[SqueezedImpl]:
        return SqueezedImpl


class SqueezedImpl(CPUAttentionBackendImpl):
    """One per attention layer (vLLM builds an impl per layer)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.config = config_from_env()
        self._reqs: dict[tuple[int, ...], _Request] = {}
        self._logged: set[str] = set()
        self.stats = {
            "indexed": 0,
            "dense_short": 0,
            "untracked": 0,
            "sparse_tokens": 0,
            "context_keys": 0,
            "selected_keys": 0,
        }

    # ------------------------------------------------------------------ helpers
    def reset(self) -> None:
        """Forget every request (a new config applies to requests started after it)."""
        self._reqs.clear()

    def _note(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("squeezed (vLLM): %s", reason)

    def _active(self) -> bool:
        c = self.config
        return self.attn_type == AttentionType.DECODER and (
            c.budget < 1.0 or c.budget_tokens is not None
        )

    def _budget(self, n_ctx: int) -> float:
        c = self.config
        return (
            min(1.0, c.budget_tokens / max(n_ctx, 1)) if c.budget_tokens is not None else c.budget
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Any,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn_metadata is None or not self._active() or key is None or value is None:
            return super().forward(
                layer,
                query,
                key,
                value,
                kv_cache,
                attn_metadata,
                output,
                output_scale,
                output_block_scale,
            )
        sparse = self._track(query, key, value, attn_metadata, block=int(kv_cache.shape[2]))
        n_tokens = attn_metadata.num_actual_tokens
        if (
            len(sparse) < n_tokens
        ):  # some token needs dense attention: run vLLM's kernel for the batch
            super().forward(
                layer,
                query,
                key,
                value,
                kv_cache,
                attn_metadata,
                output,
                output_scale,
                output_block_scale,
            )
        for tok, req in sparse:
            output[tok] = self._decode(req, query[tok])
        return output

    def _track(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: Any, block: int
    ) -> list[tuple[int, _Request]]:
        """Update each request's state with this step's tokens; return the (token, request)
        pairs to be attended sparsely. ``block``: the paged cache's (kernel) block size, the
        unit of the metadata's block table."""
        qsl = meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens.tolist()
        table = meta.block_table
        for req in self._reqs.values():
            req.absent += 1
        sparse: list[tuple[int, _Request]] = []
        claimed: dict[tuple[int, ...], int] = {}
        rows = []
        for r in range(len(qsl) - 1):
            s, e = qsl[r], qsl[r + 1]
            if e <= s:
                continue
            total = int(seq_lens[r])
            start = total - (e - s)
            before = tuple(table[r, : -(-start // block)].tolist()) if start else ()
            claimed[before] = claimed.get(before, 0) + 1
            rows.append((r, s, e, start, total, before))
        for r, s, e, start, total, before in rows:
            if start == 0:
                req = _Request()
            else:
                req = self._reqs.pop(before, None)
                if req is None or req.n != start or claimed[before] > 1:
                    if req is not None or claimed[before] > 1:
                        self.stats["untracked"] += 1
                        self._note(
                            "a request could not be told apart from another (shared block "
                            "table) or was preempted: dense attention for it"
                        )
                    elif e - s > 1:
                        self.stats["untracked"] += 1
                        self._note(
                            "a prompt started mid-way (vLLM's prefix cache or a KV connector "
                            "supplied its first tokens, whose keys this backend never saw): dense"
                        )
                    continue
            req.absent = 0
            k, v = key[s:e], value[s:e]
            if req.keys is None:
                req.keys, req.values = _Buffer(k), _Buffer(v)
            if req.index is None and (e - s == 1) and start > 0:
                # the first decode token: the prompt before it is the context
                if start < self.config.min_context_tokens or self._budget(start) >= 1.0:
                    self.stats["dense_short"] += 1
                    self._note(
                        "a prompt shorter than min_context_tokens="
                        f"{self.config.min_context_tokens} (or a budget covering all of it): "
                        "dense attention for it"
                    )
                    continue  # stop tracking: dense from here
                req.index = self._build(req, start)
                self.stats["indexed"] += 1
            req.keys.append(k)
            req.values.append(v)
            if req.index is None:
                q = query[s:e]
                req.calib = (
                    q[-CALIBRATION_QUERIES:]
                    if req.calib is None
                    else torch.cat([req.calib, q])[-CALIBRATION_QUERIES:]
                )
            elif e - s == 1:
                sparse.append((s, req))
            else:  # several new tokens after indexing (not a plain decode): keep it exact
                self.stats["untracked"] += 1
                self._note(
                    "several tokens in one step after the prompt: dense attention for that request"
                )
                continue
            self._reqs[tuple(table[r, : -(-total // block)].tolist())] = req
        for k_, req in list(self._reqs.items()):
            if req.absent > MAX_ABSENT_STEPS:
                del self._reqs[k_]
        return sparse

    def _build(self, req: _Request, n_ctx: int) -> LayerIndex:
        c = self.config
        hkv, d = self.num_kv_heads, self.head_size
        g = self.num_heads // hkv
        keys = req.keys.view()[:, :n_ctx].float()  # type: ignore[union-attr]
        calib = req.calib  # (Qc, H, d)
        if calib is None or calib.shape[0] == 0:
            calib = keys.new_zeros((1, self.num_heads, d))
        calib = calib.float().view(calib.shape[0], hkv, g, d).permute(1, 2, 0, 3).contiguous()
        index = build_layer_index(
            keys,
            calib,
            budget=self._budget(n_ctx),
            scale=self.scale,
            cluster_size=c.cluster_size,
            coarse_ratio=c.coarse_ratio,
            coarse_keep=c.coarse_keep,
            iters=c.kmeans_iters,
            quantile=c.calibration_quantile,
            seed=c.seed,
            max_points=c.kmeans_max_points,
        )
        if c.estimate_rest and self._budget(n_ctx) > 0.0:
            index.summarize_rest(req.values.view()[:, :n_ctx].float())  # type: ignore[union-attr]
        req.calib = None
        return index

    def _decode(self, req: _Request, q: torch.Tensor) -> torch.Tensor:
        """One decode token of one request: ``q`` (heads, d) -> (heads, d)."""
        from apportion_attention.squeezed.kernels import dispatch

        index = req.index
        assert index is not None and req.keys is not None and req.values is not None
        kern = dispatch(self.config.kernels, q.device.type)
        hkv = self.num_kv_heads
        g = self.num_heads // hkv
        n = req.keys.n
        qg = q.reshape(hkv, g, -1)
        keep_f, fine = index.cluster_scores(qg, self.scale, kern)
        ctx = index.select_one(qg, self.scale, kern, keep_f=keep_f)  # (hkv, n_ctx)
        keep = torch.cat(
            [ctx, torch.ones(hkv, n - index.n_ctx, dtype=torch.bool, device=ctx.device)], dim=1
        )
        idx, counts = kern.compact(keep)
        # the buffers' whole storage (contiguous); idx only points below n
        out, lse = kern.sparse_decode(
            qg, req.keys.data, req.values.data, idx, counts, scale=self.scale
        )
        out = index.add_rest(
            out, lse, fine, keep_f
        )  # the clusters left out, as in the transformers backend
        self.stats["sparse_tokens"] += 1
        self.stats["context_keys"] += hkv * index.n_ctx
        self.stats["selected_keys"] += int(ctx.sum())
        return out.reshape(self.num_heads, -1).to(q.dtype)
