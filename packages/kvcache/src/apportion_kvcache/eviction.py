"""Score-based KV eviction: the small base class every eviction policy of this package shares.

A policy only says how important each cached entry is (:meth:`ScoredEviction.score`); the base
class does the rest, the same way for every policy (kvpress's ``ScorerPress`` in spirit):

- it hooks every attention module during the prefill; right after a layer has attended over
  the whole prompt, that layer's cache entries are scored and all but the top ``n_keep`` per KV
  head are dropped. The kept keys/values are gathered into *new, smaller* tensors, so the memory
  really goes away (nothing is masked);
- ``n_keep = ceil(context_len * (1 - compression_ratio)) + question_len``: the
  ``compression_ratio`` is the fraction of the *context's* entries removed and the last
  ``question_len`` tokens (the question and the chat suffix) are always kept;
- every KV head keeps its own tokens (GQA-aware): the kept tensors are ``(B, H_kv, n_keep, D)``;
- left padding scores ``-inf``, so a row keeps padding only once all of its real tokens are
  kept; the padding that survives sits at the front, and :class:`PrefillOutput` reports it in
  ``kv_mask`` so the decode never attends to it;
- positions are not touched: the host continues ``position_ids`` from the uncompressed length.

The same machinery works in plain transformers, around ``model.generate``::

    with policy.patch(model):
        out = model.generate(input_ids, max_new_tokens=32)

(:meth:`ScoredEviction.patch` also rewrites the decode steps' ``position_ids`` and attention
mask, which transformers would otherwise derive from the shorter cache).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from apportion.host.kv import (
    CompressionConfig,
    KVPolicy,
    LayerInputs,
    PrefillOutput,
    attention_modules,
    kept_mask,
    positions_from_mask,
)
from apportion.host.shared import layerwise_prefill


def window_attention(inputs: LayerInputs, window: int) -> torch.Tensor:
    """Softmax attention probabilities (B, H_q, w, L) of the last ``w`` queries over every key,
    causal inside the window and blind to padding; computed in float32."""
    keys = inputs.keys
    b, h_kv, length, d = keys.shape
    w = max(1, min(window, length))
    q = inputs.queries(w).float()
    groups = q.shape[1] // h_kv
    k = keys.float().repeat_interleave(groups, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * (d**-0.5)
    q_pos = torch.arange(length - w, length, device=keys.device)[:, None]
    k_pos = torch.arange(length, device=keys.device)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & inputs.real[:, None, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def group_heads(scores: torch.Tensor, h_kv: int, reduce: str = "mean") -> torch.Tensor:
    """(B, H_q, L) per-query-head scores -> (B, H_kv, L), reducing each GQA group."""
    b, h_q, length = scores.shape
    grouped = scores.view(b, h_kv, h_q // h_kv, length)
    return grouped.amax(2) if reduce == "max" else grouped.mean(2)


def budget(context_len: int, question_len: int, ratio: float) -> int:
    """Entries kept per KV head: the budget every policy of this package uses."""
    return math.ceil(context_len * (1.0 - ratio)) + question_len


class ScoredEviction(KVPolicy):
    """Base of the eviction policies: subclasses implement :meth:`score`.

    ``protect_tail`` (a class attribute or a method override) is how many trailing entries beyond
    the question a policy insists on keeping (its recent window); they count against the budget.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[CompressionConfig]] = CompressionConfig
    #: one full prefill can serve several of these (apportion.host.shared)
    layerwise: ClassVar[bool] = True

    # ------------------------------------------------------------------ to override
    def score(self, inputs: LayerInputs) -> torch.Tensor:
        """Importance (B, H_kv, L) of each cached entry of one layer; higher is kept."""
        raise NotImplementedError

    def protect_tail(self, n_keep: int, question_len: int) -> int:
        """Trailing entries that are always kept (at least the question)."""
        return question_len

    # ------------------------------------------------------------------ machinery
    def plan(self, attention_mask: torch.Tensor, question_len: int) -> int | None:
        """``n_keep`` for this prompt batch, or None when nothing would be evicted."""
        length = attention_mask.shape[1]
        q = max(0, min(int(question_len), length))
        n_keep = budget(length - q, q, float(self.config.compression_ratio))
        if self.config.compression_ratio <= 0.0 or n_keep >= length:
            return None
        return max(n_keep, 1)

    def evict_layer(self, inputs: LayerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the top ``n_keep`` entries per KV head; returns new (keys, values)."""
        keys, values, n_keep = inputs.keys, inputs.values, inputs.n_keep
        length = keys.shape[-2]
        # one scorer at several ratios in a shared prefill scores once
        key = (type(self), self.config.model_dump_json(exclude={"compression_ratio"}))
        if key not in inputs.memo:
            inputs.memo[key] = self.score(inputs).float()
        scores = inputs.memo[key].clone()
        if scores.shape != keys.shape[:3]:
            raise RuntimeError(
                f"{type(self).__name__}.score returned {tuple(scores.shape)}, "
                f"expected {tuple(keys.shape[:3])}"
            )
        tail = min(max(self.protect_tail(n_keep, inputs.question_len), inputs.question_len), n_keep)
        scores = scores.nan_to_num(0.0)
        if tail > 0:
            scores[..., length - tail :] = float("inf")
        scores = scores.masked_fill(~inputs.real[:, None, :], float("-inf"))
        idx = scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values
        gather = idx[..., None].expand(-1, -1, -1, keys.shape[-1])
        return keys.gather(2, gather).contiguous(), values.gather(2, gather).contiguous()

    @contextlib.contextmanager
    def _hooks(
        self, model: Any, cache: Any, real: torch.Tensor, question_len: int, n_keep: int
    ) -> Iterator[None]:
        handles = []

        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is None or hidden.shape[1] != real.shape[1]:
                return  # not the prefill of this prompt
            layer = cache.layers[module.layer_idx]
            cos, sin = kwargs["position_embeddings"]
            inputs = LayerInputs(
                module, hidden, cos, sin, layer.keys, layer.values, real, question_len, n_keep
            )
            layer.keys, layer.values = self.evict_layer(inputs)

        for module in attention_modules(model):
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def prefill(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
        *,
        question_len: int = 0,
    ) -> PrefillOutput:
        """The prompt through the model, each layer evicted as soon as it attended (core's
        :func:`~apportion.host.shared.layerwise_prefill` with this policy alone)."""
        if self.plan(attention_mask, question_len) is None:
            return super().prefill(
                model, input_ids, attention_mask, cache, question_len=question_len
            )
        out = layerwise_prefill(model, input_ids, attention_mask, [self], question_len, [cache])
        return out[0].prefill

    # ------------------------------------------------------------------ plain transformers
    @contextlib.contextmanager
    def patch(self, model: Any, question_len: int = 0) -> Iterator[None]:
        """Compress every prefill that runs inside the block (``model.generate`` or plain calls).

        Decode steps get their original ``position_ids`` back and an attention mask as long as
        the compressed cache (transformers would otherwise derive both from the shorter cache
        and shift RoPE). ``question_len`` trailing tokens of each prompt are kept.
        """
        state: dict[str, Any] = {}
        inner = contextlib.ExitStack()

        def pre(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            ids = kwargs.get("input_ids", args[0] if args else None)
            cache = _find_cache(kwargs)
            if ids is None or cache is None:
                return args, kwargs
            mask = kwargs.get("attention_mask")
            if mask is None or mask.dim() != 2:
                mask = torch.ones(ids.shape, dtype=torch.long, device=ids.device)
            if cache.get_seq_length() == 0 and ids.shape[1] > 1:  # a prefill
                state.clear()
                n_keep = self.plan(mask, question_len)
                if n_keep is None:
                    return args, kwargs
                real = mask.bool()
                state.update(
                    n_keep=n_keep,
                    real=real,
                    length=ids.shape[1],
                    next=positions_from_mask(mask)[:, -1] + 1,
                )
                inner.enter_context(
                    self._hooks(model, cache, real, max(0, min(question_len, ids.shape[1])), n_keep)
                )
                kwargs["position_ids"] = positions_from_mask(mask)
                state["hooked"] = True
                return args, kwargs
            if not state:
                return args, kwargs
            steps = ids.shape[1]
            past = cache.get_seq_length()
            kept = kept_mask(state["real"], state["n_keep"])
            if kept is None:  # no padding: every kept entry is valid
                kept = torch.ones(
                    (ids.shape[0], state["n_keep"]), dtype=torch.bool, device=ids.device
                )
            extra = past + steps - kept.shape[1]
            kwargs["attention_mask"] = torch.cat(
                [
                    kept.long(),
                    torch.ones((kept.shape[0], extra), dtype=torch.long, device=kept.device),
                ],
                1,
            )
            start = state["next"] + (past - state["n_keep"])
            kwargs["position_ids"] = start[:, None] + torch.arange(steps, device=ids.device)[None]
            kwargs.pop("cache_position", None)
            return args, kwargs

        def post(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            if state.pop("hooked", False):
                inner.close()

        h1 = model.register_forward_pre_hook(pre, with_kwargs=True)
        h2 = model.register_forward_hook(post, with_kwargs=True)
        try:
            yield
        finally:
            h1.remove()
            h2.remove()
            inner.close()


def _find_cache(kwargs: dict) -> Any:
    for key in ("cache", "past_key_values"):
        c = kwargs.get(key)
        if c is not None and hasattr(c, "layers"):
            return c
    return None
