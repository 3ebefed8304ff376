"""APE: adaptive parallel encoding of independent contexts (Yang, Chen & Chen, 2025).

Context-augmented prompts (RAG chunks, ICL demonstrations) are a shared prefix, several
independent contexts and a query. Sequential encoding re-reads every context, attending to
all earlier ones, for every request. APE encodes each context *on its own*, right after
the shared prefix, so all contexts reuse the same positions ``[P, P + len)``; their KV can
be computed in parallel, cached and reused by any later request that contains them, in any
order. At query time the query (and every generated token) attends to

- the prefix and the query/generated tokens (causal, as usual), and
- the contexts, with the logits divided by the **temperature** ``T`` and the contexts'
  log-sum-exp multiplied by ``S * T`` (**scaling factor** ``S``) before the two parts are
  merged: ``out = softmax([S*T*lse_ctx, lse_other]) . [out_ctx, out_other]``.

``T < 1`` sharpens attention inside the many contexts; ``S < 1`` shrinks their summed weight,
which parallel encoding inflates (N contexts all look "early" and all carry sink-like mass).
The query's positions continue after the *longest* context (the reference implementation's
``max(position) + 1``). The shared prefix is the attention sink: every context is encoded
after it (so no context grows a sink of its own) and the query reads it, with the query and
generated tokens, in the un-tempered part. The merge is the authors' released code's
(``lse_context * (scale * temperature)``); at ``T = S = 1`` it is exact attention over
[prefix | contexts | query] with the contexts at reused positions.

Cost: encoding N contexts of length L independently makes attention ``N * L * (P + L)``
instead of ``(P + N*L)^2 / 2``, but every context token still runs through every
projection and MLP, so a *cold* prefill is only a little cheaper than sequential where the
MLP dominates (short contexts). The large speed-up is *warm*: contexts already in the store
cost nothing and only the query is read.

Prompt layout for the host: the contexts are the paragraphs (``separator``, default a blank
line) of the prompt: the text before the first separator (chat header + instruction) is the
shared prefix, the text after the last one (question + chat suffix) is the query. A prompt
with fewer than ``min_contexts`` contexts is read sequentially by the KV policy as usual.

Context KV is cached and reused across queries: in the KV store ``store`` names (a directory
or ``redis://`` URL, opened through :func:`apportion.host.store.open_store`, so any installed
provider of stores serves it, e.g. apportion-kvcache), else in an in-process LRU
(:class:`MemoryContextStore`). Entries are keyed by the model's fingerprint and the tokens;
a context's entry also names the shared prefix it was encoded after (its ``variant``).

Parameters (:class:`APEConfig`): ``temperature`` T, ``scale`` S, ``separator``,
``min_contexts``, ``store``, ``cache_entries``. The model and its tokenizer come from
:meth:`APE.bind` (the host binds them); used standalone, the tokenizer is loaded once per
instance from the model's folder and the fingerprint computed once per model.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from apportion.config import ComponentConfig
from apportion.errors import ApportionError
from apportion.host.attention import AttentionBackend
from apportion.host.kv import PrefillOutput, cache_kwargs
from apportion.host.lse import merge, partial_attention
from apportion.host.store import KVStore, open_store, prefix_key
from pydantic import Field

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), (1, hkv, n, d)


class APEError(ApportionError):
    """A prompt or cache APE cannot encode (batch > 1, empty context, mismatched store entry)."""


class APEConfig(ComponentConfig):
    # The paper searches T and S per model and task (no universal default); these defaults
    # were tuned for SmolLM2-135M on benchmarks/attention_ape.py's development seed (--seed 1).
    temperature: float = Field(
        0.7, gt=0.0, le=2.0, description="attention temperature T on the contexts"
    )
    scale: float = Field(
        0.9, gt=0.0, le=2.0, description="scaling factor S on the contexts' log-sum-exp"
    )
    separator: str = Field(
        "\n\n", min_length=1, description="text separating prefix, contexts and query"
    )
    min_contexts: int = Field(2, ge=1, description="fewer contexts than this: read sequentially")
    store: str | None = Field(
        None,
        description="KV store (directory or redis:// URL, opened through apportion's "
        "open_store) for context KV; None: in-process LRU",
    )
    cache_entries: int = Field(
        512, ge=0, description="contexts kept by the in-process LRU (0: no caching)"
    )


# --------------------------------------------------------------------------- context store


class MemoryContextStore:
    """In-process LRU of context KV implementing :class:`apportion.host.store.KVStore` (used
    when no store is configured). Entries are the tensors themselves, on the model's device."""

    def __init__(self, max_entries: int = 512):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, KV] = OrderedDict()
        self.hits = self.misses = 0

    def load_kv(
        self,
        fingerprint: str,
        token_ids: Sequence[int],
        *,
        model: Any = None,
        variant: str = "",
    ) -> KV | None:
        key = prefix_key(fingerprint, token_ids, variant)
        kv = self._entries.get(key)
        if kv is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return kv

    def save_kv(
        self,
        fingerprint: str,
        token_ids: Sequence[int],
        kv: Any,
        meta: dict[str, Any] | None = None,
        *,
        variant: str = "",
    ) -> str:
        key = prefix_key(fingerprint, token_ids, variant)
        if self.max_entries == 0:
            return key
        self._entries[key] = [(k.detach(), v.detach()) for k, v in kv]
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return key

    def __len__(self) -> int:
        return len(self._entries)


def open_context_store(config: APEConfig) -> KVStore:
    """The store ``config.store`` names (through :func:`apportion.host.store.open_store`, a
    :class:`~apportion.errors.ConfigError` when no installed plugin provides it), or an
    in-process :class:`MemoryContextStore` when it names none."""
    if config.store is None:
        return MemoryContextStore(config.cache_entries)
    return open_store(config.store)


# ----------------------------------------------------------------------------- encoding


@dataclass
class APEState:
    """Where the contexts sit in the cache the query reads (set by :meth:`APE.assemble`)."""

    ctx_start: int = 0  # cache index of the first context entry (= prefix length)
    ctx_end: int = 0  # one past the last context entry
    next_position: int = 0  # position id of the first query token
    stats: dict[str, Any] = field(default_factory=dict)


def separator_token_patterns(tokenizer: Any, separator: str) -> list[list[int]]:
    """The separator's token sequences under ``tokenizer``, the between-words form first (it
    is the canonical separator a context ends with), then the separator alone."""
    alone = tokenizer.encode(separator, add_special_tokens=False)
    a = tokenizer.encode("a", add_special_tokens=False)
    between = tokenizer.encode(f"a{separator}b", add_special_tokens=False)[len(a) : -1]
    return [list(p) for p in dict.fromkeys([tuple(between), tuple(alone)]) if p]


def _sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


class APE(AttentionBackend):
    """``ape``: parallel-encoded contexts with a shared prefix, temperature and scaling factor."""

    name: ClassVar[str] = "ape"
    summary: ClassVar[str] = (
        "APE: contexts encoded in parallel after a shared prefix, cached; "
        "temperature + scale at query time"
    )
    Config = APEConfig

    def __init__(self, config: APEConfig | None = None):
        super().__init__(config)
        self.state: APEState | None = None
        self.store = open_context_store(self.config)
        self._loaded: Any = None  # the LoadedModel from bind()
        self._tokenizer: Any = None
        self._patterns: list[list[int]] | None = None

    def bind(self, loaded: Any) -> None:
        """Keep the loaded model's tokenizer (to find the separators) and fingerprint (to key
        stored context KV)."""
        self._loaded = loaded
        self._tokenizer = loaded.tokenizer
        self._patterns = None

    @contextmanager
    def installed(self, model: Any) -> Iterator[None]:
        """As the base class; the context layout of the last prefill is forgotten on exit, so
        a later forward with this backend installed is never read as an APE query."""
        try:
            with super().installed(model):
                yield
        finally:
            self.state = None

    # ------------------------------------------------------------------ attention
    def attention_function(self) -> Callable[..., Any]:
        temperature, scale_s = self.config.temperature, self.config.scale

        def attention(
            module: Any,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: Any,
            scaling: float | None = None,
            dropout: float = 0.0,
            **kwargs: Any,
        ) -> tuple[torch.Tensor, Any]:
            st = self.state
            if st is None or st.ctx_end <= st.ctx_start or key.shape[-2] < st.ctx_end:
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
            if query.shape[0] != 1:
                raise APEError("ape reads one prompt at a time (batch size 1)")
            sm = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
            b, hq, q_len, d = query.shape
            hkv = key.shape[1]
            qg = query.view(b, hkv, hq // hkv, q_len, d)
            a, z = st.ctx_start, st.ctx_end
            k_ctx, v_ctx = key[:, :, a:z].unsqueeze(2), value[:, :, a:z].unsqueeze(2)
            k_oth = torch.cat([key[:, :, :a], key[:, :, z:]], dim=-2).unsqueeze(2)
            v_oth = torch.cat([value[:, :, :a], value[:, :, z:]], dim=-2).unsqueeze(2)
            n_oth = k_oth.shape[-2]
            q_idx = torch.arange(n_oth - q_len, n_oth, device=query.device)
            causal = torch.arange(n_oth, device=query.device)[None, :] <= q_idx[:, None]
            o_ctx, lse_ctx = partial_attention(qg, k_ctx, v_ctx, scale=sm / temperature)
            o_oth, lse_oth = partial_attention(qg, k_oth, v_oth, scale=sm, mask=causal)
            out, _ = merge([o_ctx, o_oth], [lse_ctx * (scale_s * temperature), lse_oth])
            return out.reshape(b, hq, q_len, d).to(query.dtype).transpose(1, 2).contiguous(), None

        return attention

    # ------------------------------------------------------------------ encoding API
    def model_fingerprint(self, model: Any) -> str:
        """The bound model's fingerprint, or (unbound) that of ``model``."""
        from apportion.host.model import fingerprint_for

        return fingerprint_for(model, self._loaded)

    @staticmethod
    def context_variant(prefix_ids: Sequence[int]) -> str:
        """The store variant of contexts encoded after ``prefix_ids``: a context's KV depends
        on the prefix it was encoded after, so each prefix has its own entries."""
        digest = hashlib.sha256(",".join(map(str, prefix_ids)).encode()).hexdigest()[:16]
        return f"ape-after-prefix-{digest}"

    @torch.inference_mode()
    def _forward_kv(
        self, model: Any, ids: list[list[int]], past: KV | None, start: int
    ) -> list[KV]:
        """Encode right-padded rows ``ids`` after ``past`` (shared, batch 1) at positions
        ``start, start+1, ...``; returns each row's own new KV (padding cut off)."""
        from transformers import DynamicCache

        device = next(model.parameters()).device
        n, width = len(ids), max(len(r) for r in ids)
        pad = 0
        input_ids = torch.full((n, width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((n, start + width), dtype=torch.long, device=device)
        mask[:, :start] = 1
        for i, r in enumerate(ids):
            input_ids[i, : len(r)] = torch.tensor(r, device=device)
            mask[i, start : start + len(r)] = 1
        cache = DynamicCache(config=model.config)
        if past is not None:
            for layer, (k, v) in enumerate(past):
                cache.update(
                    k.expand(n, -1, -1, -1).contiguous(),
                    v.expand(n, -1, -1, -1).contiguous(),
                    layer,
                )
        positions = (start + torch.arange(width, device=device)).expand(n, -1)
        previous, self.state = self.state, None  # plain causal attention while encoding
        try:
            model(
                input_ids=input_ids,
                attention_mask=mask if n > 1 or past is not None else None,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(model, cache),
            )
        finally:
            self.state = previous
        out = []
        for i, r in enumerate(ids):
            out.append(
                [
                    (
                        layer.keys[i : i + 1, :, start : start + len(r)].clone(),
                        layer.values[i : i + 1, :, start : start + len(r)].clone(),
                    )
                    for layer in cache.layers
                ]
            )
        return out

    def encode_contexts(
        self, model: Any, prefix_ids: Sequence[int], contexts: Sequence[Sequence[int]]
    ) -> tuple[KV, list[KV], dict[str, Any]]:
        """KV of the shared prefix and of every context (from the store, or encoded in one
        parallel batch at the reused positions and stored). Returns (prefix, contexts, stats)."""
        if not prefix_ids:
            raise APEError("ape needs a non-empty shared prefix (the attention sink lives there)")
        if any(len(c) == 0 for c in contexts):
            raise APEError("ape got an empty context")
        prefix_ids = list(prefix_ids)
        fp = self.model_fingerprint(model)
        variant = self.context_variant(prefix_ids)
        t0 = time.perf_counter()
        prefix = self._load(fp, prefix_ids, model)
        if prefix is None:
            prefix = self._forward_kv(model, [prefix_ids], None, 0)[0]
            self.store.save_kv(fp, prefix_ids, prefix)
        kvs: list[KV | None] = [self._load(fp, list(c), model, variant) for c in contexts]
        missing = [i for i, kv in enumerate(kvs) if kv is None]
        if missing:
            fresh = self._forward_kv(
                model, [list(contexts[i]) for i in missing], prefix, len(prefix_ids)
            )
            for i, kv in zip(missing, fresh, strict=True):
                kvs[i] = kv
                self.store.save_kv(fp, list(contexts[i]), kv, variant=variant)
        stats = {
            "contexts": len(contexts),
            "encoded": len(missing),
            "reused": len(contexts) - len(missing),
            "encode_seconds": time.perf_counter() - t0,
        }
        return prefix, [kv for kv in kvs if kv is not None], stats

    def _load(self, fp: str, ids: list[int], model: Any, variant: str = "") -> KV | None:
        kv = self.store.load_kv(fp, ids, model=model, variant=variant)
        if kv is not None and kv[0][0].shape[-2] != len(ids):
            raise APEError(
                f"stored KV holds {kv[0][0].shape[-2]} tokens, the segment has {len(ids)}"
            )
        return kv

    def assemble(self, model: Any, cache: Any, prefix: KV, contexts: list[KV]) -> APEState:
        """Fill ``cache`` with [prefix | context 1 | ... | context N] and set the state the
        attention function reads. Returns it."""
        n_prefix = prefix[0][0].shape[-2]
        lengths = [c[0][0].shape[-2] for c in contexts]
        for layer in range(len(prefix)):
            k = torch.cat([prefix[layer][0]] + [c[layer][0] for c in contexts], dim=-2)
            v = torch.cat([prefix[layer][1]] + [c[layer][1] for c in contexts], dim=-2)
            cache.update(k, v, layer)
        self.state = APEState(
            ctx_start=n_prefix,
            ctx_end=n_prefix + sum(lengths),
            next_position=n_prefix + max(lengths),
        )
        return self.state

    @torch.inference_mode()
    def prefill_parts(
        self,
        model: Any,
        prefix_ids: Sequence[int],
        contexts: Sequence[Sequence[int]],
        query_ids: Sequence[int],
        cache: Any,
    ) -> PrefillOutput:
        """The APE prefill of (prefix, contexts, query) into ``cache`` (batch 1)."""
        if not query_ids:
            raise APEError("ape needs a non-empty query")
        prefix, kvs, stats = self.encode_contexts(model, prefix_ids, contexts)
        st = self.assemble(model, cache, prefix, kvs)
        device = next(model.parameters()).device
        positions = st.next_position + torch.arange(len(query_ids), device=device)
        t0 = time.perf_counter()
        out = model(
            input_ids=torch.tensor([list(query_ids)], device=device),
            position_ids=positions[None],
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
        )
        stats["query_seconds"] = time.perf_counter() - t0
        st.stats = stats
        return PrefillOutput(
            logits=out.logits[:, -1, :],
            kv_mask=None,
            next_position=positions[-1:].clone() + 1,
            info=stats,
        )

    # ------------------------------------------------------------------ host integration
    def separator_patterns(self, model: Any) -> list[list[int]]:
        """Token sequences the separator becomes, alone and between words (computed once per
        tokenizer). The tokenizer is the bound one; unbound, it is loaded once, on this
        instance, from ``model``'s folder."""
        if self._patterns is None:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                path = str(getattr(model, "name_or_path", ""))
                self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self._patterns = separator_token_patterns(self._tokenizer, self.config.separator)
        return [list(p) for p in self._patterns]

    @staticmethod
    def canonical(segment: list[int], patterns: list[list[int]]) -> list[int]:
        """A context's tokens with its trailing separator in canonical form: BPE spells the
        separator differently depending on the next word, and a context must have the
        same tokens (the same cache key) wherever it appears."""
        for p in patterns:
            if len(segment) > len(p) and segment[-len(p) :] == p:
                return segment[: -len(p)] + patterns[0]
        return segment + patterns[0]

    def split(
        self, ids: list[int], patterns: list[list[int]], question_len: int
    ) -> list[list[int]]:
        """Split prompt ids into [prefix, context..., query]; separators stay with the segment
        they end, so the concatenation is the original prompt."""
        segments, start, i = [], 0, 0
        while i < len(ids):
            hit = next((p for p in patterns if ids[i : i + len(p)] == p), None)
            if hit is not None:
                segments.append(ids[start : i + len(hit)])
                i += len(hit)
                start = i
            else:
                i += 1
        segments.append(ids[start:])
        segments = [s for s in segments if s]
        # the query must hold the whole question (+ chat suffix)
        while len(segments) > 1 and len(segments[-1]) < question_len:
            tail = segments.pop()
            segments[-1] = segments[-1] + tail
        return segments

    def prefill(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
        *,
        question_len: int,
        inner: Callable[..., Any],
    ) -> Any:
        self.state = None
        if input_ids.shape[0] != 1:
            raise APEError(
                "ape reads one prompt at a time; got a batch of "
                f"{input_ids.shape[0]} (run the prompts one by one)"
            )
        ids = input_ids[0][attention_mask[0].bool()].tolist()
        patterns = self.separator_patterns(model)
        segments = self.split(ids, patterns, question_len)
        if len(segments) - 2 < self.config.min_contexts:
            return inner(model, input_ids, attention_mask, cache, question_len=question_len)
        contexts = [self.canonical(c, patterns) for c in segments[1:-1]]
        return self.prefill_parts(model, segments[0], contexts, segments[-1], cache)
