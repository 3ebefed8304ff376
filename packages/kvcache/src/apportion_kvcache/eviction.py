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

Compression while generating (kvpress's ``DecodingPress`` in spirit): with ``decode_budget``
set, a long output cannot grow the cache without bound. The prefill already keeps at most
``decode_budget`` entries per KV head (by the policy's own rule over the prompt); while
generating, once a layer holds ``decode_budget + decode_interval`` entries it is cut back to
``decode_budget``, i.e. an eviction every ``decode_interval`` generated tokens. The scores
come from :meth:`ScoredEviction.decode_score`: by default the policy's own :meth:`score`, fed
with the queries of the last ``decode_window`` generated tokens (captured by forward hooks on
the attention modules during the decode) in place of the prompt's, the way SnapKV's
observation window votes. Those tokens (and the policy's own recent window) are always kept.
Positions stay true (the host keeps counting every generated token) and the validity mask of
a left-padded batch is re-derived after each eviction (:meth:`KVPolicy.after_decode_step`).

The same machinery works in plain transformers, around ``model.generate``::

    with policy.patch(model):
        out = model.generate(input_ids, max_new_tokens=32)

(:meth:`ScoredEviction.patch` also rewrites the decode steps' ``position_ids`` and attention
mask, which transformers would otherwise derive from the shorter cache).
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from apportion.errors import ConfigError
from apportion.host.kv import (
    CompressionConfig,
    DecodeState,
    KVPolicy,
    LayerInputs,
    PrefillOutput,
    attention_modules,
    cache_seq_lengths,
    kept_mask,
    positions_from_mask,
)
from apportion.host.shared import layerwise_prefill, prompt_hidden
from pydantic import Field


class EvictionConfig(CompressionConfig):
    """Config shared by the score-based eviction policies: the prefill's ``compression_ratio``
    and the options of compression while generating."""

    decode_budget: int | None = Field(
        None,
        ge=1,
        le=1 << 24,
        description="entries per KV head the cache is kept at while generating "
        "(None: no compression while decoding)",
    )
    decode_interval: int = Field(
        32,
        ge=1,
        le=65536,
        description="entries the cache may grow past decode_budget before an eviction cuts it "
        "back: one eviction every this many generated tokens",
    )
    decode_window: int = Field(
        16,
        ge=1,
        le=4096,
        description="latest generated tokens whose queries score the cache at a decode-time "
        "eviction (always kept)",
    )


def window_attention(inputs: LayerInputs, window: int) -> torch.Tensor:
    """Softmax attention probabilities (B, H_q, w, L) of the last ``w`` queries over every key,
    causal inside the window and blind to padding; computed in float32. The queries are the
    last ``w`` of ``inputs.hidden``, whose tokens are the last ``w`` cached entries (the
    prompt's in a prefill, the decode window's while generating)."""
    keys = inputs.keys
    b, h_kv, length, d = keys.shape
    w = max(1, min(window, length, inputs.hidden.shape[1]))
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


def recent_attention(inputs: LayerInputs) -> torch.Tensor:
    """(B, H_kv, L) mean attention each entry gets from every query of ``inputs.hidden`` (the
    SnapKV vote, without pooling), averaged over each KV head's query heads: the decode-time
    score of a policy whose own score cannot run there."""
    attn = window_attention(inputs, inputs.hidden.shape[1])
    return group_heads(attn.mean(dim=2), inputs.keys.shape[1], "mean")


def budget(context_len: int, question_len: int, ratio: float) -> int:
    """Entries kept per KV head: the budget every policy of this package uses."""
    return math.ceil(context_len * (1.0 - ratio)) + question_len


class ScoredEviction(KVPolicy):
    """Base of the eviction policies: subclasses implement :meth:`score`.

    ``protect_tail`` (a class attribute or a method override) is how many trailing entries beyond
    the question a policy insists on keeping (its recent window); they count against the budget.

    With ``decode_budget`` set (:class:`EvictionConfig`) the policy also compresses while
    generating (see the module docstring); a budget smaller than the tail every decode-time
    eviction keeps (the decode window, or the policy's own recent window) is a
    :class:`~apportion.errors.ConfigError`.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[CompressionConfig]] = EvictionConfig
    #: one full prefill can serve several of these (apportion.host.shared)
    layerwise: ClassVar[bool] = True

    def __init__(self, config: CompressionConfig | None = None) -> None:
        super().__init__(config)
        decode = self._decode_options()
        if decode is not None:
            limit, _, window = decode
            tail = max(self.protect_tail(limit, window), window)
            if limit < tail:
                raise ConfigError(
                    f"{self.name or type(self).__name__}: decode_budget={limit} is smaller than "
                    f"the {tail} recent entries every eviction while decoding keeps "
                    f"(decode_window={window} and the policy's own recent window); "
                    f"give decode_budget >= {tail}",
                    [("decode_budget", f"must be >= {tail}")],
                )

    # ------------------------------------------------------------------ to override
    def score(self, inputs: LayerInputs) -> torch.Tensor:
        """Importance (B, H_kv, L) of each cached entry of one layer; higher is kept."""
        raise NotImplementedError

    def protect_tail(self, n_keep: int, question_len: int) -> int:
        """Trailing entries that are always kept (at least the question)."""
        return question_len

    def decode_score(self, inputs: LayerInputs) -> torch.Tensor:
        """Importance (B, H_kv, L) of each cached entry at an eviction while generating.

        ``inputs.hidden``/``cos``/``sin`` are the attention inputs of the last generated
        tokens (the decode window: ``inputs.question_len`` of them, the cache's last entries),
        ``keys``/``values`` every cached entry, ``real`` their validity. The default is
        :meth:`score`, which every policy of this package computes from whichever trailing
        queries it is given; a policy whose scores need the prompt's final hidden states
        (:attr:`needs_prompt_hidden`) falls back to :func:`recent_attention`.
        """
        if self.needs_prompt_hidden:
            return recent_attention(inputs)
        return self.score(inputs)

    # ------------------------------------------------------------------ machinery
    def _decode_options(self) -> tuple[int, int, int] | None:
        """(decode_budget, decode_interval, decode_window), or None when off (or when the
        policy's config has no such options)."""
        limit = getattr(self.config, "decode_budget", None)
        if limit is None:
            return None
        interval = int(getattr(self.config, "decode_interval", 32))
        return int(limit), interval, int(getattr(self.config, "decode_window", 16))

    def plan(self, attention_mask: torch.Tensor, question_len: int) -> int | None:
        """``n_keep`` for this prompt batch, or None when nothing would be evicted. With a
        ``decode_budget`` the prompt keeps at most that many entries."""
        length = attention_mask.shape[1]
        q = max(0, min(int(question_len), length))
        ratio = float(self.config.compression_ratio)
        n_keep = budget(length - q, q, ratio) if ratio > 0.0 else length
        decode = self._decode_options()
        if decode is not None:
            n_keep = min(n_keep, decode[0])
        if n_keep >= length:
            return None
        return max(n_keep, 1)

    def evict_layer(self, inputs: LayerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the top ``n_keep`` entries per KV head; returns new (keys, values)."""
        # one scorer at several ratios in a shared prefill scores once
        key = (type(self), self.config.model_dump_json(exclude={"compression_ratio"}))
        if key not in inputs.memo:
            inputs.memo[key] = self.score(inputs).float()
        return self._keep_top(inputs, inputs.memo[key].clone())

    def _keep_top(
        self, inputs: LayerInputs, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top ``inputs.n_keep`` entries per KV head by ``scores`` (B, H_kv, L), the
        protected tail and before any padding, gathered in position order."""
        keys, values, n_keep = inputs.keys, inputs.values, inputs.n_keep
        length = keys.shape[-2]
        if scores.shape != keys.shape[:3]:
            raise RuntimeError(
                f"{type(self).__name__} scored {tuple(scores.shape)}, "
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
        hidden = None
        if self.needs_prompt_hidden and not self.one_pass:
            # a first pass for the scores, one layer's KV at a time; with one_pass the
            # layer-wise prefill holds every full layer and evicts after its forward
            hidden = prompt_hidden(model, input_ids, attention_mask)
        out = layerwise_prefill(
            model, input_ids, attention_mask, [self], question_len, [cache], hidden=hidden
        )
        return out[0].prefill

    # ------------------------------------------------------------------ while generating
    @property
    def compresses_decode(self) -> bool:
        return self._decode_options() is not None

    def after_decode_step(
        self, model: Any, cache: Any, step: int, state: DecodeState
    ) -> torch.Tensor | None:
        """With ``decode_budget``: at step 0, start watching the decode (the attention inputs
        of the last ``decode_window`` generated tokens, per layer); afterwards, once the
        cache holds ``decode_budget + decode_interval`` entries, cut every layer back to
        ``decode_budget`` by :meth:`decode_score` and return the re-derived validity mask."""
        decode = self._decode_options()
        if decode is None:
            return None
        limit, interval, window = decode
        if step == 0:
            self._watch(model, cache, state, window)
            return None
        lengths = cache_seq_lengths(cache)
        if not lengths or max(lengths) < limit + interval:
            return None
        if min(lengths) != max(lengths):
            raise RuntimeError(
                f"{self.name}: evicting while decoding needs every layer at one length, "
                f"the cache holds {min(lengths)}..{max(lengths)} entries"
            )
        return self._evict_decoded(model, cache, state, limit, window)

    def _watch(self, model: Any, cache: Any, state: DecodeState, window: int) -> None:
        if callable(getattr(cache, "kv_nbytes", None)) or callable(
            getattr(cache, "resident_kv_bytes", None)
        ):
            raise ConfigError(
                f"{self.name}: decode_budget evicts from a cache held whole on the model's "
                f"device; {type(cache).__name__} places its KV itself (an allocator that "
                "offloads the cache): drop decode_budget or the allocator's KV budget"
            )
        seen: dict[int, deque[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

        def grab(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            rope = kwargs.get("position_embeddings")
            if hidden is None or rope is None:
                return
            buf = seen.setdefault(int(module.layer_idx), deque(maxlen=window))
            buf.append((hidden, rope[0], rope[1]))

        for module in attention_modules(model):
            state.stack.callback(module.register_forward_hook(grab, with_kwargs=True).remove)
        state.memo["decode_window"] = seen

    def _evict_decoded(
        self, model: Any, cache: Any, state: DecodeState, limit: int, window: int
    ) -> torch.Tensor:
        seen = state.memo.get("decode_window")
        if not seen:
            raise RuntimeError(
                f"{self.name}: no decode step was watched; the host calls "
                "after_decode_step(step=0) before the first generated token"
            )
        first = cache.layers[0].keys
        rows, length = first.shape[0], first.shape[-2]
        if state.kv_mask is None:
            real = torch.ones((rows, length), dtype=torch.bool, device=first.device)
        else:
            real = state.kv_mask.bool()
        if tuple(real.shape) != (rows, length):
            raise RuntimeError(f"kv_mask {tuple(real.shape)} does not match the cache")
        for module in attention_modules(model):
            idx = int(module.layer_idx)
            layer = cache.layers[idx]
            steps = list(seen[idx])
            hidden = torch.cat([h for h, _, _ in steps], 1)[:, -window:]
            cos = torch.cat([c for _, c, _ in steps], -2)[..., -window:, :]
            sin = torch.cat([s for _, _, s in steps], -2)[..., -window:, :]
            inputs = LayerInputs(
                module, hidden, cos, sin, layer.keys, layer.values, real, hidden.shape[1], limit
            )
            layer.keys, layer.values = self._keep_top(inputs, self.decode_score(inputs).float())
        kept = kept_mask(real, limit)
        if kept is None:
            return torch.ones((rows, limit), dtype=torch.bool, device=first.device)
        return kept

    # ------------------------------------------------------------------ plain transformers
    @contextlib.contextmanager
    def patch(self, model: Any, question_len: int = 0) -> Iterator[None]:
        """Compress every prefill that runs inside the block (``model.generate`` or plain calls).

        Decode steps get their original ``position_ids`` back and an attention mask as long as
        the compressed cache (transformers would otherwise derive both from the shorter cache
        and shift RoPE). ``question_len`` trailing tokens of each prompt are kept.
        """
        if self.needs_prompt_hidden:
            raise TypeError(
                f"{self.name!r} scores with the prompt's final hidden states and cannot evict "
                "inside model.generate; run it through apportion.host.Host or its prefill()"
            )
        if self.compresses_decode:
            raise TypeError(
                f"{self.name!r} with decode_budget compresses while generating, which "
                "model.generate cannot follow; run it through apportion.host.Host"
            )
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
