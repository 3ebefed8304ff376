"""One prefill for many KV policies, and one decode batch for their caches.

A *layer-wise* KV policy (:attr:`KVPolicy.layerwise`) evicts each layer right after that
layer attended over the whole prompt, so its prefill's hidden states, logits and first token
are the full prefill's. :func:`layerwise_prefill` therefore runs the prompt once, into a
driver cache, and after each attention layer hands that layer's full keys and values to every
policy's :meth:`~KVPolicy.evict_layer`; each policy's own cache receives the entries it keeps,
and the driver's full layer is dropped. Each policy is charged the peak it would have held
alone: its kept layers so far plus one full layer in flight.

A policy whose scores need the prompt's final hidden states
(:attr:`KVPolicy.needs_prompt_hidden`) cannot evict a layer before the last one has run.
Alone, it runs the prompt twice: :func:`prompt_hidden` first (one layer's KV in flight at a
time), then the layer-wise prefill with its scores ready. In a shared prefill the driver keeps
such a policy's full layers until the forward ends, then evicts them; the policy is still
charged what it would hold alone (the two passes' peak), and its cache and answers are the
same, since both passes run the very same forward. A policy configured with ``one_pass``
runs alone this way too, and is charged every full layer held.

:func:`generate_shared` then decodes the policies' caches together, as one batch: caches of
different lengths are left-padded with masked entries, positions continue from the
uncompressed length for every row. Every row's tokens are the ones the policy would generate
alone (``tests`` check it on the real model); memory figures stay each policy's own, time
figures are the batch's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from apportion.host.kv import (
    KVPolicy,
    LayerInputs,
    PrefillOutput,
    attention_modules,
    cache_nbytes,
    drop_tail,
)


@dataclass
class LayerwiseOutput:
    """One policy's share of a layer-wise prefill."""

    cache: Any
    prefill: PrefillOutput
    peak_bytes: int  # the most it would hold alone during the prefill
    kept_bytes: int  # what it holds after the prefill
    kv_tokens: int


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _set_layer(cache: Any, idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer = cache.layers[idx]
    if not getattr(layer, "is_initialized", True):
        layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values


def _decoder(model: Any) -> Any:
    get = getattr(model, "get_decoder", None)
    return get() if callable(get) else model


def prompt_hidden(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The prompt's final hidden states (B, L, D), from the forward a layer-wise prefill runs,
    holding one layer's KV at a time (for :attr:`KVPolicy.needs_prompt_hidden` policies)."""
    out = layerwise_prefill(model, input_ids, attention_mask, [], 0, [], keep_hidden=True)
    assert isinstance(out, torch.Tensor)
    return out


def layerwise_prefill(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    policies: Sequence[KVPolicy],
    question_len: int,
    caches: Sequence[Any] | None = None,
    *,
    hidden: torch.Tensor | None = None,
    keep_hidden: bool = False,
) -> Any:
    """Prefill once for every layer-wise policy of ``policies`` (see the module docstring).

    ``caches``: each policy's cache (default: ``policy.make_cache(model)``). Returns one
    :class:`LayerwiseOutput` per policy, in order. ``hidden``: the prompt's final hidden
    states when already known (:func:`prompt_hidden`): policies that need them evict each
    layer at once instead of after the forward. ``keep_hidden``: return the final hidden
    states instead (what :func:`prompt_hidden` uses).
    """
    from transformers import DynamicCache

    not_layerwise = [type(p).__name__ for p in policies if not p.layerwise]
    if not_layerwise:
        raise TypeError(f"{not_layerwise} are not layer-wise KV policies")
    length = input_ids.shape[1]
    q = max(0, min(int(question_len), length))
    plans = [p.plan(attention_mask, q) for p in policies]
    caches = list(caches) if caches is not None else [p.make_cache(model) for p in policies]
    driver = DynamicCache(config=model.config)
    real = attention_mask.bool()
    peaks = [0] * len(policies)
    kept = [0] * len(policies)
    memo: dict[Any, Any] = {}  # what policies share for the whole prompt
    needy = [i for i, p in enumerate(policies) if p.needs_prompt_hidden and plans[i] is not None]
    if hidden is not None:
        for i in needy:
            policies[i].prepare(model, input_ids, attention_mask, hidden, memo)
        needy = []
    held: list[tuple[int, LayerInputs]] = []  # full layers kept for the needy policies
    captured: dict[str, torch.Tensor] = {}

    def evict(i: int, idx: int, inputs: LayerInputs, in_flight: int) -> None:
        k, v = policies[i].evict_layer(inputs)
        peaks[i] = max(peaks[i], kept[i] + in_flight)
        kept[i] += _nbytes(k, v)
        _set_layer(caches[i], idx, k, v)

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None or hidden.shape[1] != length:
            return  # not this prompt's prefill
        idx = int(module.layer_idx)
        layer: Any = driver.layers[idx]
        full_k, full_v = layer.keys, layer.values
        in_flight = _nbytes(full_k, full_v)
        cos, sin = kwargs["position_embeddings"]
        layer_memo: dict[Any, Any] = {}
        for i, n_keep in enumerate(plans):
            if n_keep is None:
                peaks[i] = max(peaks[i], kept[i] + in_flight)
                kept[i] += in_flight
                _set_layer(caches[i], idx, full_k, full_v)
            elif i not in needy:
                inputs = LayerInputs(
                    module, hidden, cos, sin, full_k, full_v, real, q, n_keep, layer_memo
                )
                evict(i, idx, inputs, in_flight)
        if needy:
            inputs = LayerInputs(module, hidden, cos, sin, full_k, full_v, real, q, 0, layer_memo)
            held.append((idx, inputs))
        empty = full_k.new_empty((*full_k.shape[:2], 0, full_k.shape[-1]))
        layer.keys, layer.values = empty, empty.clone()  # the driver keeps nothing

    def grab(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        last = getattr(output, "last_hidden_state", None)
        if last is None and isinstance(output, (tuple, list)):
            last = output[0]
        if isinstance(last, torch.Tensor) and last.shape[1] == length:
            captured["hidden"] = last

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    if needy or keep_hidden:
        handles.append(_decoder(model).register_forward_hook(grab, with_kwargs=True))
    try:
        logits, position_ids = KVPolicy().forward_prompt(model, input_ids, attention_mask, driver)
        if keep_hidden:
            return captured["hidden"]
        for i in needy:
            policies[i].prepare(model, input_ids, attention_mask, captured["hidden"], memo)
        remaining = sum(_nbytes(inputs.keys, inputs.values) for _, inputs in held)
        for idx, inputs in held:
            full = _nbytes(inputs.keys, inputs.values)
            for i in needy:
                inputs.n_keep = int(plans[i] or 0)
                # one pass alone holds every full layer still to evict; two passes, one
                in_flight = remaining if policies[i].one_pass else full
                evict(i, idx, inputs, in_flight)
            remaining -= full
        held.clear()
    finally:
        for h in handles:
            h.remove()
        for p in policies:
            p.release()
    out = []
    next_position = position_ids[:, -1] + 1
    for i, policy in enumerate(policies):
        n_keep = plans[i]
        if n_keep is None:
            kv_mask = None if bool(attention_mask.all()) else real
            n_keep = length
        else:
            kv_mask = policy.kept_mask(attention_mask, n_keep)
        info = {"peak_kv_bytes": peaks[i], "n_keep": n_keep, "evicted": length - n_keep}
        pre = PrefillOutput(logits=logits, kv_mask=kv_mask, next_position=next_position, info=info)
        out.append(LayerwiseOutput(caches[i], pre, max(peaks[i], kept[i]), kept[i], n_keep))
    return out


def _reserved_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A cache layer with room reserved for the decode: new entries are written into a
        preallocated buffer instead of growing the tensors by concatenation (which copies
        the whole layer at every step). ``keys``/``values`` are views of the filled part,
        so every reader sees exactly what a growing layer would hold."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
            super().__init__()
            shape = (*keys.shape[:2], max(capacity, keys.shape[-2]), keys.shape[-1])
            self._kbuf = keys.new_empty(shape)
            self._vbuf = values.new_empty(shape)
            self._n = keys.shape[-2]
            self._kbuf[..., : self._n, :] = keys
            self._vbuf[..., : self._n, :] = values
            self.lazy_initialization(keys, values)
            self._views()

        def _views(self) -> None:
            self.keys = self._kbuf[..., : self._n, :]
            self.values = self._vbuf[..., : self._n, :]

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[Any, Any]:
            m = key_states.shape[-2]
            if self._n + m > self._kbuf.shape[-2]:  # past the reservation: grow as usual
                keys: Any = self.keys
                values: Any = self.values
                self.keys = torch.cat([keys, key_states], dim=-2)
                self.values = torch.cat([values, value_states], dim=-2)
                self._kbuf, self._vbuf, self._n = self.keys, self.values, self.keys.shape[-2]
                return self.keys, self.values
            self._kbuf[..., self._n : self._n + m, :] = key_states
            self._vbuf[..., self._n : self._n + m, :] = value_states
            self._n += m
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
            self._views()

    return ReservedLayer


def reserve(cache: Any, extra: int) -> Any:
    """Give every layer of ``cache`` room for ``extra`` more entries (see ``ReservedLayer``):
    the decode then writes in place. Returns ``cache``."""
    layer_cls = _reserved_layer_class()
    for idx, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is None or layer.keys.dim() != 4:
            continue
        cache.layers[idx] = layer_cls(layer.keys, layer.values, layer.keys.shape[-2] + extra)
    return cache


def stack_caches(outputs: Sequence[LayerwiseOutput], model: Any) -> tuple[Any, PrefillOutput]:
    """One batch cache from single-row caches of possibly different lengths: each row is
    left-padded with masked zero entries to the longest. Returns (cache, PrefillOutput)."""
    from transformers import DynamicCache

    width = max(o.kv_tokens for o in outputs)
    merged = DynamicCache(config=model.config)
    n_layers = len(outputs[0].cache.layers)
    for idx in range(n_layers):
        ks, vs = [], []
        for o in outputs:
            k, v = o.cache.layers[idx].keys, o.cache.layers[idx].values
            pad = width - k.shape[-2]
            if pad:
                zeros = k.new_zeros((*k.shape[:2], pad, k.shape[-1]))
                k, v = torch.cat([zeros, k], -2), torch.cat([zeros.clone(), v], -2)
            ks.append(k)
            vs.append(v)
        _set_layer(merged, idx, torch.cat(ks, 0), torch.cat(vs, 0))
    masks = []
    for o in outputs:
        m = o.prefill.kv_mask
        if m is None:
            m = torch.ones((1, o.kv_tokens), dtype=torch.bool, device=o.prefill.logits.device)
        pad = width - m.shape[-1]
        masks.append(torch.cat([torch.zeros((1, pad), dtype=torch.bool, device=m.device), m], 1))
    kv_mask = torch.cat(masks, 0)
    pre = PrefillOutput(
        logits=torch.cat([o.prefill.logits for o in outputs], 0),
        kv_mask=None if bool(kv_mask.all()) else kv_mask,
        next_position=torch.cat([o.prefill.next_position for o in outputs], 0),
    )
    return merged, pre


def per_token_bytes(outputs: Sequence[LayerwiseOutput]) -> int:
    """KV bytes one more token costs a single-row cache (every layer's K and V)."""
    total = 0
    for layer in outputs[0].cache.layers:
        k = layer.keys
        total += 2 * k.shape[1] * k.shape[-1] * k.element_size()
    return total


@torch.inference_mode()
def generate_shared(
    host: Any,
    policies: Sequence[KVPolicy],
    prompt: Any,
    max_new_tokens: int,
    *,
    batch_size: int | None = None,
    question_in_prefill: bool = True,
) -> list[Any]:
    """Greedy answers of ``prompt`` under each of ``policies`` from one shared prefill,
    decoded at most ``batch_size`` policies at a time (default: no limit), in the batches that
    read the fewest bytes per step (:func:`decode_batches`).

    ``host`` is an :class:`apportion.host.Host` with the dense attention backend (it encodes
    the prompt and checks it fits). Returns one ``GenerationResult`` per policy, in order:
    its tokens as if run alone, its own ``kv_tokens`` and ``peak_kv_bytes``; the prefill and
    decode times of the shared work, with ``batch_size`` the decode batch.

    Policies that compress while decoding (:attr:`KVPolicy.compresses_decode`) are refused:
    their evictions would reach into the other rows of the batch, which must stay exact.

    ``question_in_prefill=False``: the context is prefilled and compressed without the
    question, which is then fed to every cache (:func:`~apportion.host.generate.feed_tokens`,
    positions continuing from the uncompressed length), as when a stored context is asked.
    """
    from apportion.host.generate import (
        GenerationResult,
        feed_tokens,
        greedy_decode,
        splice_embeds,
    )

    loaded, model = host.loaded, host.loaded.model
    compressing = [type(p).__name__ for p in policies if p.compresses_decode]
    if compressing:
        raise TypeError(
            f"{compressing} compress while decoding: their caches cannot share a decode batch "
            "(run each through Host.generate)"
        )
    enc = host.encode(prompt)
    host.check_fits(len(enc.ids), max_new_tokens)
    q = enc.question_len
    agnostic = not question_in_prefill and 0 < q < len(enc.ids)
    probes = {p.probe() for p in policies}
    if agnostic and len(probes) > 1:
        raise ValueError(f"policies with different probes cannot share a prefill: {probes}")
    probe: list[int] = []
    text = next(iter(probes)) if agnostic else None
    if text:
        probe = host.tokenizer.encode(text, add_special_tokens=False)
    ids = torch.tensor([enc.ids[:-q] + probe if agnostic else enc.ids], device=loaded.device)
    mask = torch.ones_like(ids)
    question = torch.tensor([enc.ids[-q:]], device=loaded.device) if agnostic else None
    fed = q if agnostic else 0
    for p in policies:
        p.bind(loaded)
    with contextlib.ExitStack() as installed:
        for p in policies:  # what each policy's cache needs to be read
            installed.enter_context(p.installed(model))
        t0 = time.perf_counter()
        splice = [(0, start, vectors) for start, vectors in enc.embeds]  # Prompt.embeds
        with splice_embeds(model, ids, splice):
            outputs = layerwise_prefill(model, ids, mask, policies, len(probe) if agnostic else q)
        if probe:
            for out in outputs:
                out.prefill = drop_tail(out.cache, out.prefill, len(probe))
                out.kept_bytes = cache_nbytes(out.cache)
                out.kv_tokens -= len(probe)
        prefill_s = time.perf_counter() - t0
        step = per_token_bytes(outputs)
        eos, pad_id = host._eos_ids(), int(host.tokenizer.pad_token_id)
        results: list[Any] = [None] * len(outputs)
        size = max(1, batch_size or len(outputs))
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        lengths = [o.kv_tokens for o in outputs]
        for chunk_idx in decode_batches(lengths, size, weights / max(1, step)):
            chunk = [outputs[i] for i in chunk_idx]
            if len(chunk) > 1:
                cache, pre = stack_caches(chunk, model)
            else:
                cache, pre = chunk[0].cache, chunk[0].prefill
            reserve(cache, max_new_tokens + fed)
            if question is not None:
                rows = question.expand(len(chunk), -1)
                pre = feed_tokens(model, cache, pre, rows, torch.ones_like(rows))
            decoded = greedy_decode(
                model, cache, pre, max_new_tokens, eos=eos, pad_id=pad_id, drop_finished=True
            )
            for row, out, i in zip(decoded.rows, chunk, chunk_idx, strict=True):
                tokens, finish = decoded.trim(row)
                alone_forwards = min(
                    len(tokens) if finish == "stop" else len(tokens) - 1, max_new_tokens - 1
                )
                own_kv = out.kept_bytes + (fed + max(0, alone_forwards)) * step
                results[i] = GenerationResult(
                    text=host.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                    prompt_tokens=len(enc.ids),
                    new_tokens=len(tokens),
                    kv_tokens=out.kv_tokens,
                    peak_kv_bytes=int(max(out.peak_bytes, own_kv)),
                    prefill_seconds=prefill_s,
                    decode_seconds=decoded.seconds,
                    decode_tokens_per_s=decoded.forwards * len(chunk) / decoded.seconds
                    if decoded.seconds > 0
                    else 0.0,
                    batch_size=len(chunk),
                    finish_reason=finish,
                )
        return results


def decode_batches(lengths: Sequence[int], size: int, weight_tokens: float) -> list[list[int]]:
    """Which caches to decode together: indices into ``lengths`` (each cache's entries), in
    batches of at most ``size``, chosen to read the fewest bytes per decode step.

    A step reads the weights once per batch and every row's cache padded to its batch's
    longest. With ``weight_tokens`` the weights' bytes over one cache entry's bytes, a batch
    costs ``weight_tokens + rows * longest``; the rows, sorted by length, are cut into the
    contiguous batches of least total cost (short caches beside long ones only while the
    padding costs less than another pass over the weights)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - size), end):
            cost = best[start] + weight_tokens + (end - start) * lengths[order[start]]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches: list[list[int]] = []
    end = n
    while end > 0:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


__all__ = [
    "LayerwiseOutput",
    "decode_batches",
    "generate_shared",
    "layerwise_prefill",
    "prompt_hidden",
    "stack_caches",
]
