"""KV policies for the HF host: the base class (which *is* the ``full`` policy) and helpers.

A policy owns the prefill: it builds the cache, runs the prompt through the model and may
evict context entries while doing so (kvpress-style forward hooks, or after the fact).
The host then decodes greedily, and between two decode steps lets the policy evict again
(:meth:`KVPolicy.after_decode_step`, compression while generating). Two rules every policy
keeps:

- ``compression_ratio`` is the fraction of the *context's* KV entries removed; the last
  ``question_len`` prompt tokens (the question and chat suffix) are never evicted.
- After eviction later tokens keep their original positions: the host feeds
  ``PrefillOutput.next_position`` onwards as ``position_ids``, so RoPE stays right.

Memory must really be freed (tensors shrunk, not masked): the host measures the cache's
bytes (:meth:`KVPolicy.kv_bytes`) after every layer of the prefill, after the prefill, and
after every decode step, and reports the peak. A policy that builds the whole cache and
evicts afterwards is charged the whole cache.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import Field

from apportion.base import Component, ComponentConfig


class CompressionConfig(ComponentConfig):
    """Config shared by eviction policies."""

    compression_ratio: float = Field(
        0.5, ge=0.0, lt=1.0, description="fraction of the context's KV entries removed"
    )


@dataclass
class PrefillOutput:
    """What a prefill hands to the decode loop.

    ``logits``: (batch, vocab) logits of the last prompt position.
    ``kv_mask``: (batch, kv_len) bool, True where a cached entry is a real token (False for
    left padding that survived); ``None`` if every entry is valid.
    ``next_position``: (batch,) position id of the first generated token.
    """

    logits: torch.Tensor
    kv_mask: torch.Tensor | None
    next_position: torch.Tensor
    info: dict[str, Any] | None = None


@functools.lru_cache(maxsize=32)
def _cache_param(forward: Any) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever this transformers
    version's ``forward`` takes (it was renamed in 5.x)."""
    return {_cache_param(type(model).forward): cache}


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at each row's first real token."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def cache_nbytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of a transformers ``Cache`` (or any object with
    ``layers`` holding ``keys``/``values``, or a legacy tuple). A cache that keeps KV off the
    device (an allocator's offloaded cache) reports all of it through ``kv_nbytes()``."""
    own = getattr(cache, "kv_nbytes", None)
    if callable(own):
        return int(own())
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    if isinstance(cache, (tuple, list)):
        for item in cache:
            if isinstance(item, torch.Tensor):
                total += item.numel() * item.element_size()
            else:
                total += cache_nbytes(item)
    return total


def cache_resident_nbytes(cache: Any) -> int:
    """Bytes of ``cache``'s KV on the model's device: ``resident_kv_bytes()`` where the cache
    offloads (see :meth:`apportion.base.Allocator.kv_cache`), else all of it."""
    own = getattr(cache, "resident_kv_bytes", None)
    if callable(own):
        return int(own())
    return cache_nbytes(cache)


def kept_mask(real: torch.Tensor, n_keep: int) -> torch.Tensor | None:
    """(B, n_keep) validity of kept entries when left padding scores lowest and kept indices
    stay in position order: a row keeps ``max(0, n_keep - n_real)`` padding entries, first."""
    if bool(real.all()):
        return None
    pad_kept = (n_keep - real.sum(-1)).clamp(min=0)
    cols = torch.arange(n_keep, device=real.device)[None, :]
    return cols >= pad_kept[:, None]


def drop_tail(cache: Any, pre: PrefillOutput, n: int) -> PrefillOutput:
    """Remove the last ``n`` entries of every layer of ``cache`` (a probe's, see
    :meth:`KVPolicy.probe`); returns the prefill output as if they had never been fed.
    A layer that keeps its KV in its own layout (``ragged = True``: per-head storage, no
    4-D ``keys``) drops them itself through transformers' ``crop(-n)``."""
    if n <= 0:
        return pre
    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() == 4:
            layer.keys = keys[..., :-n, :].contiguous()
            layer.values = layer.values[..., :-n, :].contiguous()
        elif getattr(layer, "ragged", False):
            layer.crop(-n)
    kv_mask = None if pre.kv_mask is None else pre.kv_mask[:, :-n]
    if kv_mask is not None and bool(kv_mask.all()):
        kv_mask = None
    return PrefillOutput(pre.logits, kv_mask, pre.next_position - n, pre.info)


def attention_modules(model: Any) -> list[Any]:
    """The self-attention modules of a decoder, in layer order (anything with ``layer_idx``
    and ``q_proj``: Llama, Mistral, Qwen and their kin)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    if not mods:
        raise TypeError(
            f"{type(model).__name__} has no attention modules with q_proj/layer_idx; "
            "per-layer KV work supports Llama-style decoders"
        )
    return sorted(mods, key=lambda m: int(m.layer_idx))


def cache_seq_lengths(cache: Any) -> list[int]:
    """Cached sequence length of each layer (a layer offloaded or in its own layout, see
    :func:`drop_tail`, says its own through ``get_seq_length()``)."""
    out = []
    for layer in getattr(cache, "layers", []):
        length = getattr(layer, "get_seq_length", None)
        own = getattr(layer, "offloaded", False) or getattr(layer, "ragged", False)
        if own and callable(length):  # without reading it back
            out.append(int(length()))
        elif getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
            out.append(int(layer.keys.shape[-2]))
        else:
            out.append(0)
    return out


@dataclass
class LayerInputs:
    """What a layer-wise policy sees of one layer, right after that layer's prefill attended
    over the whole prompt.

    ``keys``/``values``: (B, H_kv, L, D) as cached (keys after RoPE). ``hidden``: (B, L,
    hidden), the attention module's input; ``cos``/``sin``: the layer's RoPE table.
    ``real``: (B, L) bool, False at left padding. ``question_len``: the protected tail.
    ``n_keep``: the entries each KV head keeps (the policy's :meth:`KVPolicy.plan`).
    ``memo``: shared by every policy that sees this layer in one prefill, so policies that
    score alike (one scorer at several ratios) compute the scores once.
    """

    module: Any
    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    real: torch.Tensor
    question_len: int
    n_keep: int
    memo: dict[Any, Any] = field(default_factory=dict)

    def queries(self, last: int | None = None) -> torch.Tensor:
        """Post-RoPE queries (B, H_q, n, D) of the last ``last`` prompt positions (all if None)."""
        from apportion.host.rope import project_queries

        return project_queries(self.module, self.hidden, self.cos, self.sin, last)


@dataclass
class DecodeState:
    """What the host's decode loop shows a KV policy between two steps
    (:meth:`KVPolicy.after_decode_step`), fresh for each generation.

    ``kv_mask``: (B, kv_len) bool validity of the cached entries, False where an entry is
    left padding (``None``: every entry is valid); it covers the entry of the token just
    fed. ``position``: (B,) position id the next token will be fed at: it counts every token
    of the row, whatever was evicted, so RoPE stays true. ``memo``: the policy's own, kept
    from one step to the next. ``stack``: closed by the host when the decode ends (a policy
    registers the removal of its forward hooks there).
    """

    kv_mask: torch.Tensor | None
    position: torch.Tensor
    memo: dict[Any, Any] = field(default_factory=dict)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


class KVPolicy(Component):
    """The ``full`` policy: keep every entry. Subclasses override :meth:`prefill` to evict, or
    are *layer-wise*: they set ``layerwise = True`` and implement :meth:`plan` and
    :meth:`evict_layer`.

    A layer-wise policy evicts each layer's entries right after that layer attended over the
    whole prompt, so the prefill's hidden states (and the first generated token) are a full
    prefill's; only the cache differs. One full prefill can then serve every layer-wise
    policy of a sweep (:func:`apportion.host.shared.generate_shared`), each scoring and
    gathering its own smaller cache from the same per-layer tensors.
    """

    kind: ClassVar[str] = "kv-policy"
    name: ClassVar[str] = "full"
    summary: ClassVar[str] = "keep every KV entry (no compression)"
    #: evicts per layer inside the prefill through plan/evict_layer (see the class docstring).
    #: A subclass that overrides :meth:`prefill` without setting it is not layer-wise.
    layerwise: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if ("prefill" in own or "kv_bytes" in own) and "layerwise" not in own:
            cls.layerwise = False

    #: the scores need the prompt's final hidden states (for instance the model's own
    #: surprisal of each token), which a layer-wise prefill does not have when it evicts the
    #: first layer. :func:`apportion.host.shared.layerwise_prefill` then calls
    #: :meth:`prepare` with them before this policy's :meth:`evict_layer` sees any layer.
    needs_prompt_hidden: ClassVar[bool] = False

    @property
    def one_pass(self) -> bool:
        """For :attr:`needs_prompt_hidden` policies: run alone, the prompt goes through the
        model once and every full layer is held until the forward ends (peak: the full
        cache), instead of a scoring pass first."""
        return False

    def plan(self, attention_mask: torch.Tensor, question_len: int) -> int | None:
        """Entries each layer keeps for this prompt batch, or ``None`` to keep them all."""
        return None

    def prepare(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        hidden: torch.Tensor,
        memo: dict[Any, Any],
    ) -> None:
        """Receive the prompt's final hidden states ``hidden`` (B, L, D) before any layer of
        this prompt is evicted; only called when :attr:`needs_prompt_hidden` is set.
        ``memo`` is shared by every policy of one prefill (one scorer at several ratios
        computes once). :meth:`release` follows once the prefill is done."""

    def release(self) -> None:
        """Drop whatever :meth:`prepare` kept for the prompt that was just prefilled."""

    def probe(self) -> str | None:
        """Text whose queries stand in for the question when a context is compressed before
        its question is known (query-agnostic mode), or ``None``.

        The host appends it to the context, prefills with it as the protected tail
        (``question_len``), and drops its entries from the cache afterwards, so the cache
        holds only the context's kept entries. Causal attention leaves the context's keys
        and values unchanged by the appended text. With the question in the prefill the
        probe is not used.
        """
        return None

    def evict_layer(self, inputs: LayerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The (keys, values) this policy keeps of one layer: new, smaller tensors of
        ``inputs.n_keep`` entries per KV head, in position order."""
        return inputs.keys, inputs.values

    def kept_mask(self, attention_mask: torch.Tensor, n_keep: int) -> torch.Tensor | None:
        """(B, n_keep) validity of the kept entries (``None``: all valid). The default says a
        row keeps its left padding last, so it survives only at the front (see
        :func:`kept_mask`)."""
        return kept_mask(attention_mask.bool(), n_keep)

    def make_cache(self, model: Any) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    @contextlib.contextmanager
    def installed(self, model: Any) -> Iterator[None]:
        """Install on ``model`` what this policy's cache needs to be read, for the ``with``
        block; the default installs nothing.

        The host enters it inside the attention backend's
        :meth:`~apportion.host.attention.AttentionBackend.installed` (so
        ``model.config._attn_implementation`` names the backend's function), around the
        prefill, the question fed after it and the decode. A policy whose cache is not a
        plain ``(B, H, L, D)`` tensor per layer (ragged per-head storage) registers here the
        attention function that reads it, falling back to the backend's for other layers; it
        raises :class:`~apportion.errors.ConfigError` naming the backend's function when it
        cannot stand in for it. On exit the model is as it was.
        """
        yield

    def forward_prompt(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt through the model into ``cache``; returns (last logits, position ids)."""
        position_ids = positions_from_mask(attention_mask)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
        )
        return out.logits[:, -1, :], position_ids

    def prefill(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
        *,
        question_len: int = 0,
    ) -> PrefillOutput:
        logits, position_ids = self.forward_prompt(model, input_ids, attention_mask, cache)
        kv_mask = None if bool(attention_mask.all()) else attention_mask.bool()
        return PrefillOutput(logits=logits, kv_mask=kv_mask, next_position=position_ids[:, -1] + 1)

    def kv_bytes(self, cache: Any) -> int:
        """Bytes this policy's cache holds (override if it keeps KV outside ``cache.layers``)."""
        return cache_nbytes(cache)

    @property
    def compresses_decode(self) -> bool:
        """Whether :meth:`after_decode_step` may evict while generating. Such a cache cannot
        join other policies' caches in one decode batch (:mod:`apportion.host.shared`): the
        run loop decodes it alone."""
        return False

    def after_decode_step(
        self, model: Any, cache: Any, step: int, state: DecodeState
    ) -> torch.Tensor | None:
        """Compress ``cache`` between two decode steps; the default does nothing.

        The host calls it with ``step = 0`` once the prompt is in the cache, before the first
        generated token is fed (a policy sets up here: forward hooks that watch the decode,
        whose removal goes on ``state.stack``), then after every decode forward with ``step``
        the number of generated tokens fed so far (its KV entry is the cache's last), and the
        cache's bytes already measured for that step.

        A policy that evicts replaces every layer's keys and values with new, smaller tensors
        (memory really freed), the same number of entries per layer, kept entries in their
        original order and with their RoPE untouched; it returns the new ``kv_mask`` (B,
        new_len) bool for ``state.kv_mask``'s rows (surviving left padding False). Returns
        ``None`` when it changed nothing. Positions are the host's: later tokens keep
        counting from ``state.position`` whatever was evicted.
        """
        return None
