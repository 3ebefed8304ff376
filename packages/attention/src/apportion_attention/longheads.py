"""LongHeads (Lu et al., 2024): every attention head reads its own few chunks of a long
prompt, so each head stays inside the trained window while the heads together cover it.

No training. The cached keys are split into chunks of ``chunk_size`` tokens; a chunk is
scored against a query by its best key, ``max_j q . k_j`` with RoPE removed from both
(``chunk_score="max"``; ``"mean"`` scores the chunk's mean key). For a block of queries each
*query head* ranks the chunks by its RoPE-free mean query and attends to:
the first chunk (always: attention sinks and the prompt head), its ``top_k`` best chunks,
and the local window (the previous ``chunk_size`` tokens and the block itself, causal).
Positions are remapped: the selected chunks sit back to back from position 0 in their
original order, followed by the local window, so no relative distance exceeds
``(top_k + 2) * chunk_size + prefill_block``, inside the trained window. Keys are re-rotated
(:func:`apportion.host.rope.rotate_by`), never recomputed.

While the whole cache fits the window, attention is exactly dense. The host's prompt is fed
in blocks of ``prefill_block`` tokens (the selection is made per block, from the block's
mean query; the question tail is its own block), so prompts far past the model's window are
read with bounded memory. While generating, every new token selects afresh; with
``question_chunks`` each head also keeps reading the chunks it chose for the question.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from apportion.config import ComponentConfig
from apportion.errors import ConfigError
from apportion.host import rope
from apportion.host.attention import AttentionBackend
from apportion.host.kv import KVPolicy, PrefillOutput, cache_kwargs
from pydantic import Field, model_validator


class LongHeadsConfig(ComponentConfig):
    chunk_size: int = Field(256, ge=16, description="tokens per chunk")
    top_k: int = Field(
        6, ge=1, description="chunks each head selects besides the first chunk and the local window"
    )
    prefill_block: int = Field(
        1024, ge=16, description="prompt tokens fed per forward pass while reading"
    )
    chunk_score: Literal["max", "mean"] = Field(
        "max",
        description="how a chunk is scored against a query: its best key ('max') "
        "or its mean key ('mean')",
    )
    question_chunks: bool = Field(
        False,
        description="while generating, each head also reads the chunks it selected for the "
        "question (the prompt's question tail), besides the ones the new token selects",
    )

    @model_validator(mode="after")
    def _block(self) -> LongHeadsConfig:
        if self.prefill_block % self.chunk_size:
            raise ValueError(
                f"prefill_block ({self.prefill_block}) must be a multiple of "
                f"chunk_size ({self.chunk_size})"
            )
        return self

    def window(self) -> int:
        """The largest relative distance any query sees."""
        selected = 2 * self.top_k if self.question_chunks else self.top_k
        return (selected + 2) * self.chunk_size + self.prefill_block


class LongHeads(AttentionBackend):
    """Per-head top-k chunk selection with positions remapped into the trained window."""

    name: ClassVar[str] = "longheads"
    summary: ClassVar[str] = (
        "LongHeads: per-head top-k chunks, positions remapped into the trained window"
    )
    Config = LongHeadsConfig
    extends_context: ClassVar[bool] = True

    def __init__(self, config: LongHeadsConfig | None = None):
        super().__init__(config)
        self._raw: dict[int, torch.Tensor] = {}  # layer -> (B, Hkv, n, d) RoPE-free keys
        self._inv_freq: torch.Tensor | None = None
        #: chunks selected per (layer, head) at the last call: for inspection and tests
        self.last_selection: dict[int, torch.Tensor] = {}
        self._question_at: int | None = None  # position of the question tail's first token
        self._question_sel: dict[int, torch.Tensor] = {}  # layer -> the question's chunks (B, H, S)

    def attention_function(self) -> Callable[..., Any]:
        return self._attend

    # ------------------------------------------------------------------ prefill: read in blocks
    def prefill(self, model, input_ids, attention_mask, cache, *, question_len, inner):
        inner_fn = getattr(inner, "__func__", None)
        if inner_fn is not None and inner_fn is not KVPolicy.prefill:
            raise ConfigError(
                "longheads reads the prompt itself and composes only with the 'full' KV policy"
            )
        if not bool(attention_mask.all()):
            raise ConfigError(
                "longheads does not support padded batches: run prompts one at a time"
            )
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and self.config.window() > limit:
            raise ConfigError(
                f"longheads window {(self.config.window())} (= (top_k + 2) * chunk_size + "
                f"prefill_block) exceeds the model's {limit} positions"
            )
        self._raw.clear()
        self._question_sel.clear()
        L = input_ids.shape[1]
        logits = None
        spans = self.blocks(L, question_len)
        self._question_at = (
            spans[-1][0]
            if 0 < question_len <= self.config.prefill_block and len(spans) > 1
            else None
        )
        for start, end in spans:
            ids = input_ids[:, start:end]
            pos = torch.arange(start, end, device=ids.device).expand(ids.shape[0], -1)
            out = model(
                input_ids=ids,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(model, cache),
            )
            logits = out.logits[:, -1, :]
        nxt = torch.full((input_ids.shape[0],), L, dtype=torch.long, device=input_ids.device)
        return PrefillOutput(logits=logits, kv_mask=None, next_position=nxt)

    def blocks(self, n: int, question_len: int) -> list[tuple[int, int]]:
        """The ``[start, end)`` spans the prompt is read in: ``prefill_block`` tokens at a time,
        except that a question tail (``0 < question_len <= prefill_block``) is read as its own
        last span, so its chunk selection is made from the question's queries alone rather
        than diluted by the context before it."""
        block = self.config.prefill_block
        q = question_len if 0 < question_len <= block and question_len < n else 0
        spans = [(s, min(s + block, n - q)) for s in range(0, n - q, block)]
        return spans + ([(n - q, n)] if q else [])

    # ------------------------------------------------------------------ attention
    def _raw_keys(
        self, layer: int, key: torch.Tensor, n: int, inv_freq: torch.Tensor
    ) -> torch.Tensor:
        """``key[:, :, :n]`` with RoPE removed (float32, (B, Hkv, n, d)); kept per layer and
        extended as the cache grows, so each key is un-rotated once."""
        have = self._raw.get(layer)
        n_have = 0 if have is None else have.shape[2]
        if n_have > n:  # a shorter cache than before: a new prompt
            have, n_have = None, 0
        if n_have < n:
            new = rope.rotate_by(
                key[:, :, n_have:n], -torch.arange(n_have, n, device=key.device), inv_freq
            ).float()
            have = new if have is None else torch.cat([have, new], dim=2)
            self._raw[layer] = have
        assert have is not None
        return have[:, :, :n]

    def _chunk_scores(
        self,
        layer: int,
        q_raw: torch.Tensor,
        key: torch.Tensor,
        n_hist: int,
        inv_freq: torch.Tensor,
    ) -> torch.Tensor:
        """Score every chunk of ``key[:, :, :n_hist]`` for each query head: (B, H, chunks).

        ``q_raw`` (B, H, d) is the RoPE-free query. ``chunk_score="max"``: a chunk scores its
        best key, ``max_j q . k_j`` (RoPE removed from both), so one matching token (a needle)
        lifts its chunk. ``"mean"``: ``q . mean_j k_j``, the chunk's mean key."""
        c = self.config.chunk_size
        raw = self._raw_keys(layer, key, n_hist, inv_freq)  # (B, Hkv, n_hist, d)
        B, H, d = q_raw.shape
        Hkv = raw.shape[1]
        G = H // Hkv
        qg = q_raw.view(B, Hkv, G, d)
        n_chunks = -(-n_hist // c)
        if self.config.chunk_score == "max":
            tok = torch.einsum("bkgd,bknd->bkgn", qg, raw)  # (B, Hkv, G, n_hist)
            pad = n_chunks * c - n_hist
            if pad:
                tok = torch.nn.functional.pad(tok, (0, pad), value=float("-inf"))
            return tok.view(B, Hkv, G, n_chunks, c).amax(-1).reshape(B, H, n_chunks)
        sums = (
            torch.nn.functional.pad(raw, (0, 0, 0, n_chunks * c - n_hist))
            .view(B, Hkv, n_chunks, c, d)
            .sum(3)
        )
        counts = torch.full((n_chunks,), float(c), device=raw.device)
        counts[-1] = n_hist - (n_chunks - 1) * c
        means = sums / counts[:, None]
        return torch.einsum("bkgd,bkcd->bkgc", qg, means).reshape(B, H, n_chunks)

    def _select(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        P0: int,
        n_hist: int,
        inv_freq: torch.Tensor,
    ) -> torch.Tensor:
        """Chunks each query head reads, ascending, the first chunk always first: (B, H, S).
        The query is the RoPE-free mean of the call's queries (one query while decoding, so
        the selection is remade at every generated token)."""
        q_raw = (
            rope.rotate_by(
                query, -torch.arange(P0, P0 + query.shape[2], device=query.device), inv_freq
            )
            .float()
            .mean(2)
        )
        scores = self._chunk_scores(layer, q_raw, key, n_hist, inv_freq)[:, :, 1:]
        sel = scores.topk(min(self.config.top_k, scores.shape[-1]), dim=-1).indices + 1
        return torch.cat([torch.zeros_like(sel[..., :1]), sel.sort(-1).values], dim=-1)

    def _attend(
        self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
    ):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        B, H, Q, d = query.shape
        Hkv, N = key.shape[1], key.shape[2]
        c, k = self.config.chunk_size, self.config.top_k
        P0 = N - Q  # position of the first query (the cache holds every token, unpadded)
        local_start = max(0, P0 - c)
        n_hist = local_start
        # short enough to be dense: every head sees every key inside the window
        if n_hist <= (k + 1) * c or getattr(module, "layer_idx", None) is None:
            return sdpa_attention_forward(
                module,
                query,
                key,
                value,
                attention_mask,
                scaling=scaling,
                dropout=dropout,
                **kwargs,
            )
        layer = module.layer_idx
        if (
            self._inv_freq is None
            or self._inv_freq.device != query.device
            or self._inv_freq.numel() != d // 2
        ):
            self._inv_freq = rope.inv_freq(module.config, d, query.device)
        inv_freq = self._inv_freq
        scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
        G = H // Hkv
        chunks = self._select(layer, query, key, P0, n_hist, inv_freq)  # (B, H, S)
        fresh = None  # (B, H, S) False for a chunk already in an earlier slot
        if Q > 1 and P0 == self._question_at:
            self._question_sel[layer] = chunks
        elif Q == 1 and self.config.question_chunks and layer in self._question_sel:
            chunks = torch.cat([self._question_sel[layer], chunks], dim=-1).sort(-1).values
            fresh = torch.ones_like(chunks, dtype=torch.bool)
            fresh[..., 1:] = chunks[..., 1:] != chunks[..., :-1]
        self.last_selection[layer] = chunks
        S = chunks.shape[-1]
        # -- gather the chunks' keys/values per query head
        offs = torch.arange(c, device=query.device)
        orig = (chunks[..., None] * c + offs).reshape(B, H, S * c)  # original positions
        in_hist = orig < n_hist
        if fresh is not None:  # a chunk in two slots is read once
            in_hist = in_hist & fresh[..., None].expand(B, H, S, c).reshape(B, H, S * c)
        orig_safe = orig.clamp(max=n_hist - 1)
        kv_row = (
            torch.arange(B, device=query.device)[:, None] * Hkv
            + torch.arange(H, device=query.device)[None, :] // G
        )
        flat = (kv_row[..., None] * N + orig_safe).reshape(-1)
        kg = key.reshape(B * Hkv * N, d).index_select(0, flat).view(B, H, S * c, d)
        vg = value.reshape(B * Hkv * N, d).index_select(0, flat).view(B, H, S * c, d)
        # -- remap: slot s holds positions [s*c, (s+1)*c); the local window follows at S*c.
        # Queries and local keys keep their relative distances, so only chunk keys rotate,
        # by (new - original) - (shift of the local window)
        new = torch.arange(S * c, device=query.device)
        shift_local = S * c - local_start
        kg = rope.rotate_by(kg, (new - orig) - shift_local, inv_freq)
        k_all = torch.cat([kg, key[:, :, local_start:].repeat_interleave(G, dim=1)], dim=2)
        v_all = torch.cat([vg, value[:, :, local_start:].repeat_interleave(G, dim=1)], dim=2)
        n_local = N - local_start
        q_idx = torch.arange(P0, N, device=query.device)[:, None]
        local_vis = (
            torch.arange(local_start, N, device=query.device)[None, :] <= q_idx
        )  # (Q, n_local)
        mask = torch.cat(
            [in_hist[:, :, None, :].expand(B, H, Q, S * c), local_vis.expand(B, H, Q, n_local)],
            dim=-1,
        )
        out = torch.nn.functional.scaled_dot_product_attention(
            query, k_all, v_all, attn_mask=mask, scale=scale
        )
        return out.transpose(1, 2).contiguous(), None
