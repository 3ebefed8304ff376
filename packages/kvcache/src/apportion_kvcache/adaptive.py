"""``adakv``: adaptive budgets over a scored policy, per KV head and per layer.

A uniform policy keeps the same ``n_keep`` entries in every KV head of every layer. Heads and
layers do not need the same: some heads attend to a few entries, others spread wide, and the
first layers attend broadly while the deep ones concentrate. This wrapper keeps the same total
and lets them differ. The entries are ranked by an inner, scored, layer-wise policy
(``policy``: ``probe``, ``qspan``, ``snapkv``, ``h2o``, ``streaming``, ``surprise``: any
:class:`~apportion_kvcache.eviction.ScoredEviction`), whose options go in
``policy_options``; ``compression_ratio`` is the wrapper's, and so is the budget.

``allocation``:

- ``"heads"`` (AdaKV, Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive
  Budget Allocation"): in each layer the scores of every KV head are pooled and the layer's
  budget, ``H * n_keep``, goes to the top entries across heads. ``alpha_safeguard`` is AdaKV's
  floor: each head keeps at least that share of ``n_keep``, its own top entries.
- ``"layers"`` (PyramidKV, Cai et al., 2024): the budget per head decreases linearly with
  depth. The deepest layer keeps the protected tail plus ``1 / pyramid_beta`` of the rest of
  ``n_keep``; the layers before it keep ``n_keep`` on average and the last keeps what the
  schedule gives it (at most ``n_keep``), so the total is at most the uniform one and the
  prefill never holds more than a uniform policy's: its kept layers plus one full layer in
  flight, with the full layer in flight last.
- ``"both"``: the layer schedule, then the head allocation within each layer.

Every head keeps the protected tail (the question, or the probe, and the inner policy's own
recent window). With ``"heads"`` the total kept entries are exactly the uniform policy's.
In a left-padded batch each row gets the budget it would get alone (its own length),
never more than the batch's uniform budget, and is scored alone, so it answers as it would
alone.

The memory really goes: each layer is compressed into a :class:`~apportion_kvcache.ragged.
RaggedLayer` right after it attended over the whole prompt (the peak is the kept layers plus
one full layer), holding exactly the kept entries, flat, with a count per row and head; the
host's measured bytes fall with the budget. The ragged layers are read by this package's
attention function (:func:`~apportion_kvcache.ragged.ragged_attention`), which the policy
installs around the prefill and the decode (:meth:`apportion.host.kv.KVPolicy.installed`); it
therefore cannot run beside an attention backend that installs its own function. Positions
are untouched: later tokens continue from the uncompressed length.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from apportion.host.kv import (
    CompressionConfig,
    KVPolicy,
    LayerInputs,
    PrefillOutput,
    attention_modules,
)
from pydantic import Field, ValidationInfo, field_validator

from apportion_kvcache.eviction import ScoredEviction, budget

#: attention backends that install their own attention function (see ``incompatible_with``)
_OWN_ATTENTION = ["squeezed", "longheads", "infiniretri", "distattention", "ape", "ssa"]


class AdaptiveConfig(CompressionConfig):
    policy: str = Field(
        "probe",
        min_length=1,
        max_length=200,
        description="the scored, layer-wise KV policy whose scores rank the entries",
    )
    policy_options: dict[str, Any] = Field(
        default_factory=dict,
        description="options of the inner policy (its compression_ratio is this one's)",
    )
    allocation: Literal["heads", "layers", "both"] = Field(
        "heads",
        description="heads: AdaKV's budget across the KV heads of a layer; layers: PyramidKV's "
        "budget decreasing with depth; both",
    )
    alpha_safeguard: float = Field(
        0.2, ge=0.0, le=1.0, description="share of a layer's per-head budget every head keeps"
    )
    pyramid_beta: float = Field(
        20.0,
        ge=1.0,
        le=10000.0,
        description="the deepest layer keeps the protected tail plus 1/beta of the rest",
    )

    @field_validator("policy")
    @classmethod
    def _scored(cls, name: str) -> str:
        _scored_spec(name)
        return name

    @field_validator("policy_options")
    @classmethod
    def _inner_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "policy" in info.data and "compression_ratio" in info.data:  # both valid
            _build_inner(info.data["policy"], options, info.data["compression_ratio"])
        return options


def _scored_spec(name: str) -> Any:
    """The registry's spec of ``name``, a scored, layer-wise eviction policy; ``ValueError``
    naming it (and the candidates) otherwise."""
    from apportion import get_registry
    from apportion.errors import UnknownComponentError

    registry = get_registry()
    try:
        spec = registry.get("kv-policy", name)
    except UnknownComponentError as exc:
        raise ValueError(str(exc)) from None
    cls = spec.component_class()
    if not (isinstance(cls, type) and issubclass(cls, ScoredEviction) and cls.layerwise):
        raise ValueError(
            f"kv-policy {name!r} is not a scored, layer-wise eviction policy: adakv shares a "
            "budget by per-entry scores, which only a ScoredEviction gives; scored policies: "
            f"{', '.join(_scored_names(registry)) or 'none installed'}"
        )
    return spec


def _build_inner(name: str, options: dict[str, Any], ratio: float) -> ScoredEviction:
    spec = _scored_spec(name)
    if "compression_ratio" in options:
        raise ValueError(
            f"compression_ratio is adakv's own option; set it there, not on the inner policy "
            f"{name!r}"
        )
    config = spec.validate_options({**options, "compression_ratio": ratio}, where=name)
    inner = spec.create(config)
    if getattr(inner, "compresses_decode", False):
        raise ValueError(
            f"adakv does not compress while decoding; drop decode_budget from the options of "
            f"{name!r}"
        )
    return inner


def inner_policy(config: AdaptiveConfig) -> ScoredEviction:
    """The inner policy ``config`` names, built through the registry
    (``apportion.get_registry().create``) with the wrapper's ``compression_ratio``."""
    return _build_inner(config.policy, dict(config.policy_options), config.compression_ratio)


def _scored_names(registry: Any) -> list[str]:
    out = []
    for spec in registry.specs("kv-policy"):
        try:
            cls = spec.component_class()
        except Exception:  # a broken plugin's component: not a candidate
            continue
        if isinstance(cls, type) and issubclass(cls, ScoredEviction) and cls.layerwise:
            out.append(spec.name)
    return sorted(out)


# ----------------------------------------------------------------------------- allocation


def allocate_heads(scores: torch.Tensor, n_keep: int, floor: int) -> torch.Tensor:
    """AdaKV's selection in one layer of one row: ``scores`` ``(H, L)`` (higher kept, ``inf``
    for entries that must stay), ``H * n_keep`` entries in all, each head at least its own
    top ``floor``. Returns the flat indices ``head * L + position`` kept, sorted (so grouped
    by head, each head in position order)."""
    h, length = scores.shape
    s = scores.clone()
    floor = max(0, min(floor, length))
    if floor:
        s.scatter_(-1, s.topk(floor, dim=-1).indices, float("inf"))
    return s.flatten().topk(min(h * n_keep, h * length)).indices.sort().values


def uniform_heads(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The top ``n_keep`` entries of every head, as :func:`allocate_heads` returns them."""
    h, length = scores.shape
    idx = scores.topk(min(n_keep, length), dim=-1).indices.sort(dim=-1).values
    return (idx + torch.arange(h, device=idx.device)[:, None] * length).flatten()


def layer_budgets(n_layers: int, mean: int, low: int, high: int, beta: float) -> list[int]:
    """PyramidKV's schedule: entries per head for each layer, decreasing linearly with depth.

    The first ``n_layers - 1`` layers sum to ``(n_layers - 1) * mean``, each within
    ``[low, high]``; the deepest of them keeps about ``low + (mean - low) / beta``. The last
    layer keeps the same as the one before it (at most ``mean``), so the total never exceeds
    ``n_layers * mean`` and the running total never exceeds a uniform schedule's before the
    last layer."""
    low, high = max(0, min(low, mean)), max(high, mean)
    if n_layers <= 2 or low >= mean or mean >= high:
        return [mean] * n_layers
    m = n_layers - 1
    top = low + (mean - low) / beta
    bottom = 2 * mean - top
    target = [bottom + (top - bottom) * i / (m - 1) for i in range(m)]

    def total(shift: float) -> float:
        return sum(min(high, max(low, t + shift)) for t in target)

    lo, hi = -float(high), float(high)  # total(lo) <= m*mean <= total(hi)
    for _ in range(100):
        mid = (lo + hi) / 2
        if total(mid) < m * mean:
            lo = mid
        else:
            hi = mid
    exact = [min(high, max(low, t + hi)) for t in target]
    out = [math.floor(x) for x in exact]
    short = m * mean - sum(out)
    order = sorted(range(m), key=lambda i: exact[i] - out[i], reverse=True)
    for i in order:
        if short <= 0:
            break
        if out[i] < high:
            out[i] += 1
            short -= 1
    for i in range(m):  # whatever rounding left over
        while short > 0 and out[i] < high:
            out[i] += 1
            short -= 1
    return out + [min(out[-1], mean)]


@dataclass
class _Row:
    start: int  # first real position (left padding before it)
    real: int  # real tokens
    question: int  # protected question tail
    n_keep: int  # the uniform budget per head of this row alone
    tail: int  # protected tail (question and the inner policy's window)
    budgets: list[int]  # entries per head of each layer


# ----------------------------------------------------------------------------- the policy


class AdaKV(KVPolicy):
    name: ClassVar[str] = "adakv"
    summary: ClassVar[str] = (
        "adaptive budgets over a scored policy: across KV heads (AdaKV) and/or layers "
        "(PyramidKV), same total, ragged per-head storage"
    )
    Config = AdaptiveConfig
    layerwise: ClassVar[bool] = False
    incompatible_with: ClassVar[dict[str, list[str]]] = {"attention": _OWN_ATTENTION}

    def __init__(self, config: AdaptiveConfig | None = None) -> None:
        super().__init__(config)
        self.inner = inner_policy(self.config)

    def bind(self, loaded: Any) -> None:
        self.inner.bind(loaded)

    def probe(self) -> str | None:
        return self.inner.probe()

    def plan(self, attention_mask: torch.Tensor, question_len: int) -> int | None:
        return self.inner.plan(attention_mask, question_len)

    def make_cache(self, model: Any) -> Any:
        from apportion_kvcache.ragged import RaggedCache

        return RaggedCache(config=model.config)

    @contextmanager
    def installed(self, model: Any) -> Iterator[None]:
        from apportion_kvcache.ragged import ragged_attention_installed

        with ragged_attention_installed(model, self.name):
            yield

    # ------------------------------------------------------------------ budgets
    def _rows(self, attention_mask: torch.Tensor, question_len: int, n_layers: int) -> list[_Row]:
        c = self.config
        length = attention_mask.shape[1]
        rows = []
        for real in attention_mask.bool().sum(-1).tolist():
            q = min(question_len, real)
            n_keep = min(real, max(1, budget(real - q, q, float(c.compression_ratio))))
            tail = min(max(self.inner.protect_tail(n_keep, q), q), n_keep)
            if c.allocation == "heads":
                budgets = [n_keep] * n_layers
            else:
                budgets = layer_budgets(n_layers, n_keep, tail, real, float(c.pyramid_beta))
            rows.append(_Row(length - real, real, q, n_keep, tail, budgets))
        return rows

    def _select(self, scores: torch.Tensor, row: _Row, n_layer: int) -> torch.Tensor:
        """Flat indices (head * real + position) this row keeps of one layer."""
        s = scores.float().nan_to_num(0.0)
        tail = min(row.tail, n_layer)
        if tail:
            s[:, row.real - tail :] = float("inf")
        if self.config.allocation == "layers":
            return uniform_heads(s, n_layer)
        return allocate_heads(s, n_layer, int(self.config.alpha_safeguard * n_layer))

    # ------------------------------------------------------------------ prefill
    def _scores(self, inputs: LayerInputs, rows: list[_Row]) -> list[torch.Tensor]:
        """Each row's scores ``(H, real)`` over its real entries. A left-padded row is scored
        alone (its own slice), as it would be without the batch."""
        keys = inputs.keys
        padded = any(r.start for r in rows)
        if not padded or getattr(self.inner, "needs_prompt_hidden", False):
            scores = self.inner.score(inputs)
            if scores.shape != keys.shape[:3]:
                raise RuntimeError(
                    f"{type(self.inner).__name__}.score returned {tuple(scores.shape)}, "
                    f"expected {tuple(keys.shape[:3])}"
                )
            return [scores[b, :, r.start :] for b, r in enumerate(rows)]
        out = []
        for b, r in enumerate(rows):
            cos, sin = (t[b : b + 1] if t.shape[0] > 1 else t for t in (inputs.cos, inputs.sin))
            alone = LayerInputs(
                inputs.module,
                inputs.hidden[b : b + 1, r.start :],
                cos[..., r.start :, :],
                sin[..., r.start :, :],
                keys[b : b + 1, :, r.start :],
                inputs.values[b : b + 1, :, r.start :],
                inputs.real[b : b + 1, r.start :],
                r.question,
                r.n_keep,
            )
            scores = self.inner.score(alone)
            if scores.shape != alone.keys.shape[:3]:
                raise RuntimeError(
                    f"{type(self.inner).__name__}.score returned {tuple(scores.shape)}, "
                    f"expected {tuple(alone.keys.shape[:3])}"
                )
            out.append(scores[0])
        return out

    def compress_layer(
        self, inputs: LayerInputs, rows: list[_Row], layer: int, width: int, config: Any = None
    ) -> Any:
        """The :class:`~apportion_kvcache.ragged.RaggedLayer` this policy keeps of one layer
        (``inputs`` as a layer-wise policy sees it)."""
        from apportion_kvcache.ragged import RaggedLayer

        keys, values = inputs.keys, inputs.values
        h = keys.shape[1]
        kept_k, kept_v, counts = [], [], []
        for b, (row, scores) in enumerate(zip(rows, self._scores(inputs, rows), strict=True)):
            flat = self._select(scores, row, row.budgets[layer])
            head, pos = flat // row.real, flat % row.real + row.start
            kept_k.append(keys[b][head, pos])
            kept_v.append(values[b][head, pos])
            counts.append(torch.bincount(head, minlength=h))
        return RaggedLayer(
            torch.cat(kept_k).contiguous(),
            torch.cat(kept_v).contiguous(),
            torch.stack(counts),
            width,
            config,
        )

    def prefill(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
        *,
        question_len: int = 0,
    ) -> PrefillOutput:
        """The prompt through the model; right after each layer attended over the whole
        prompt, its full keys and values in ``cache`` are replaced by the ragged layer this
        policy keeps (peak: the kept layers plus one full layer)."""
        from apportion_kvcache.ragged import RaggedCache

        n_keep = self.plan(attention_mask, question_len)
        if n_keep is None:
            return super().prefill(
                model, input_ids, attention_mask, cache, question_len=question_len
            )
        if not isinstance(cache, RaggedCache):
            raise TypeError(
                f"adakv prefills into its own cache (make_cache), not a {type(cache).__name__}"
            )
        length = input_ids.shape[1]
        q = max(0, min(int(question_len), length))
        modules = attention_modules(model)
        rows = self._rows(attention_mask, q, len(modules))
        width = max(r.n_keep for r in rows)
        real = attention_mask.bool()
        needs_hidden = bool(getattr(self.inner, "needs_prompt_hidden", False))
        if needs_hidden:  # its scores need the prompt's final hidden states: a first pass
            from apportion.host.shared import prompt_hidden

            hidden = prompt_hidden(model, input_ids, attention_mask)
            self.inner.prepare(model, input_ids, attention_mask, hidden, {})
            del hidden

        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is None or hidden.shape[1] != length:
                return  # not this prompt's prefill
            idx = int(module.layer_idx)
            layer = cache.layers[idx]
            cos, sin = kwargs["position_embeddings"]
            inputs = LayerInputs(
                module, hidden, cos, sin, layer.keys, layer.values, real, q, n_keep
            )
            cache.layers[idx] = self.compress_layer(inputs, rows, idx, width, model.config)

        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
        try:
            logits, position_ids = self.forward_prompt(model, input_ids, attention_mask, cache)
        finally:
            for h in handles:
                h.remove()
            if needs_hidden:
                self.inner.release()
        cols = torch.arange(width, device=input_ids.device)[None, :]
        kept = torch.tensor([r.n_keep for r in rows], device=input_ids.device)
        kv_mask = None if all(r.n_keep == width for r in rows) else cols >= (width - kept)[:, None]
        info = {
            "n_keep": width,
            "evicted": length - width,
            "kept_entries": sum(
                int(layer.counts.sum()) for layer in cache.layers if hasattr(layer, "counts")
            ),
            "layer_budgets": [r.budgets for r in rows],
        }
        return PrefillOutput(logits, kv_mask, position_ids[:, -1] + 1, info)
