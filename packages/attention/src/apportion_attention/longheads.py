"""LongHeads (Lu et al., 2024): every attention head reads its own few chunks of a long
prompt, so each head stays inside the trained window while the heads together cover it.

No training. The cached keys are split into chunks of ``chunk_size`` tokens; a chunk is
represented by the mean of its keys with RoPE removed. For a block of queries each *query
head* ranks the chunks by ``q . rep`` (RoPE removed from the queries too) and attends to:
the first chunk (always: attention sinks and the prompt head), its ``top_k`` best chunks,
and the local window (the previous ``chunk_size`` tokens and the block itself, causal).
Positions are remapped: the selected chunks sit back to back from position 0 in their
original order, followed by the local window, so no relative distance exceeds
``(top_k + 2) * chunk_size + prefill_block``, inside the trained window. Keys are re-rotated
(:mod:`apportion_attention.rope`), never recomputed.

While the whole cache fits the window, attention is exactly dense. The host's prompt is fed
in blocks of ``prefill_block`` tokens (the selection is made per block, from the block's
mean query), so prompts far past the model's window are read with bounded memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from apportion.config import ComponentConfig
from apportion.errors import ConfigError
from apportion.host.attention import AttentionBackend
from apportion.host.kv import KVPolicy, PrefillOutput, cache_kwargs
from pydantic import Field, model_validator

from apportion_attention.rope import inv_freq_for, rotate


class LongHeadsConfig(ComponentConfig):
    chunk_size: int = Field(256, ge=16, description="tokens per chunk")
    top_k: int = Field(6, ge=1, description="chunks each head selects besides the first chunk and the local window")
    prefill_block: int = Field(1024, ge=16, description="prompt tokens fed per forward pass while reading")

    @model_validator(mode="after")
    def _block(self) -> LongHeadsConfig:
        if self.prefill_block % self.chunk_size:
            raise ValueError(f"prefill_block ({self.prefill_block}) must be a multiple of chunk_size ({self.chunk_size})")
        return self

    def window(self) -> int:
        """The largest relative distance any query sees."""
        return (self.top_k + 2) * self.chunk_size + self.prefill_block


class LongHeads(AttentionBackend):
    """Per-head top-k chunk selection with positions remapped into the trained window."""

    name: ClassVar[str] = "longheads"
    Config = LongHeadsConfig
    extends_context: ClassVar[bool] = True

    def __init__(self, config: LongHeadsConfig | None = None):
        super().__init__(config)
        self._reps: dict[int, torch.Tensor] = {}  # layer -> (B, Hkv, chunks, d) RoPE-free means
        self._inv_freq: torch.Tensor | None = None
        #: chunks selected per (layer, head) at the last call: for inspection and tests
        self.last_selection: dict[int, torch.Tensor] = {}

    def attention_function(self) -> Callable[..., Any]:
        return self._attend

    # ------------------------------------------------------------------ prefill: read in blocks
    def prefill(self, model, input_ids, attention_mask, cache, *, question_len, inner):
        inner_fn = getattr(inner, "__func__", None)
        if inner_fn is not None and inner_fn is not KVPolicy.prefill:
            raise ConfigError("longheads reads the prompt itself and composes only with the 'full' KV policy")
        if not bool(attention_mask.all()):
            raise ConfigError("longheads does not support padded batches: run prompts one at a time")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and self.config.window() > limit:
            raise ConfigError(f"longheads window {(self.config.window())} (= (top_k + 2) * chunk_size + "
                              f"prefill_block) exceeds the model's {limit} positions")
        self._reps.clear()
        L = input_ids.shape[1]
        logits = None
        block = self.config.prefill_block
        for start in range(0, L, block):
            ids = input_ids[:, start:start + block]
            pos = torch.arange(start, start + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            out = model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
            logits = out.logits[:, -1, :]
        nxt = torch.full((input_ids.shape[0],), L, dtype=torch.long, device=input_ids.device)
        return PrefillOutput(logits=logits, kv_mask=None, next_position=nxt)

    # ------------------------------------------------------------------ attention
    def _chunk_reps(self, layer: int, key: torch.Tensor, n_hist: int, inv_freq: torch.Tensor) -> torch.Tensor:
        """RoPE-free mean key of each chunk of ``key[:, :, :n_hist]`` (B, Hkv, chunks, d);
        complete chunks are computed once per layer and kept, a partial last one each call."""
        c = self.config.chunk_size
        full = n_hist // c
        have = self._reps.get(layer)
        n_have = 0 if have is None else have.shape[2]
        if n_have > full:  # a shorter cache than before: a new prompt
            have, n_have = None, 0
        if n_have < full:
            seg = key[:, :, n_have * c: full * c]
            raw = rotate(seg, -torch.arange(n_have * c, full * c, device=key.device), inv_freq).float()
            new = raw.view(*raw.shape[:2], full - n_have, c, raw.shape[-1]).mean(3)
            have = new if have is None else torch.cat([have, new], dim=2)
            self._reps[layer] = have
        if n_hist % c == 0:
            return have
        seg = key[:, :, full * c: n_hist]
        part = rotate(seg, -torch.arange(full * c, n_hist, device=key.device), inv_freq).float().mean(2, keepdim=True)
        return part if have is None else torch.cat([have, part], dim=2)

    def _attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        B, H, Q, d = query.shape
        Hkv, N = key.shape[1], key.shape[2]
        c, k = self.config.chunk_size, self.config.top_k
        P0 = N - Q  # position of the first query (the cache holds every token, unpadded)
        local_start = max(0, P0 - c)
        n_hist = local_start
        # short enough to be dense: every head sees every key inside the window
        if n_hist <= (k + 1) * c or getattr(module, "layer_idx", None) is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        layer = module.layer_idx
        if self._inv_freq is None or self._inv_freq.device != query.device or self._inv_freq.numel() != d // 2:
            self._inv_freq = inv_freq_for(module.config, d, query.device)
        inv_freq = self._inv_freq
        scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
        G = H // Hkv
        reps = self._chunk_reps(layer, key, n_hist, inv_freq)  # (B, Hkv, C, d)
        n_chunks = reps.shape[2]
        # -- each query head ranks the chunks after the first by its block's mean RoPE-free query
        q_raw = rotate(query, -torch.arange(P0, N, device=query.device), inv_freq).float().mean(2)  # (B, H, d)
        reps_h = reps.repeat_interleave(G, dim=1)  # (B, H, C, d)
        scores = torch.einsum("bhd,bhcd->bhc", q_raw, reps_h)[:, :, 1:]
        sel = scores.topk(min(k, n_chunks - 1), dim=-1).indices + 1
        chunks = torch.cat([torch.zeros_like(sel[..., :1]), sel.sort(-1).values], dim=-1)  # (B, H, S)
        self.last_selection[layer] = chunks
        S = chunks.shape[-1]
        # -- gather the chunks' keys/values per query head
        offs = torch.arange(c, device=query.device)
        orig = (chunks[..., None] * c + offs).reshape(B, H, S * c)  # original positions
        in_hist = orig < n_hist
        orig_safe = orig.clamp(max=n_hist - 1)
        kv_row = (torch.arange(B, device=query.device)[:, None] * Hkv + torch.arange(H, device=query.device)[None, :] // G)
        flat = (kv_row[..., None] * N + orig_safe).reshape(-1)
        kg = key.reshape(B * Hkv * N, d).index_select(0, flat).view(B, H, S * c, d)
        vg = value.reshape(B * Hkv * N, d).index_select(0, flat).view(B, H, S * c, d)
        # -- remap: slot s holds positions [s*c, (s+1)*c); the local window follows at S*c.
        # Queries and local keys keep their relative distances, so only chunk keys rotate,
        # by (new - original) - (shift of the local window)
        new = torch.arange(S * c, device=query.device)
        shift_local = S * c - local_start
        kg = rotate(kg, (new - orig) - shift_local, inv_freq)
        k_all = torch.cat([kg, key[:, :, local_start:].repeat_interleave(G, dim=1)], dim=2)
        v_all = torch.cat([vg, value[:, :, local_start:].repeat_interleave(G, dim=1)], dim=2)
        n_local = N - local_start
        q_idx = torch.arange(P0, N, device=query.device)[:, None]
        local_vis = torch.arange(local_start, N, device=query.device)[None, :] <= q_idx  # (Q, n_local)
        mask = torch.cat([in_hist[:, :, None, :].expand(B, H, Q, S * c), local_vis.expand(B, H, Q, n_local)], dim=-1)
        out = torch.nn.functional.scaled_dot_product_attention(query, k_all, v_all, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).contiguous(), None
