"""``kvpress:<press>`` — a kvpress press (NVIDIA/kvpress) run as an apportion KV policy.

Every press the installed kvpress exports is registered as ``kvpress:<press>``
(:mod:`apportion_kvcache.kvpress_names`): ``kvpress:snapkv``, ``kvpress:expected-attention``,
``kvpress:streaming-llm``, ``kvpress:knorm``, ``kvpress:tova``, ... Its options are the
press's own dataclass fields that take a plain value (``window_size``, ``n_sink``,
``kernel_size``, ...), validated like any component's; ``compression_ratio`` keeps the
project's meaning and default (0.5).

Budget semantics are kvpress's pipeline's, which are the project's: the press compresses
the *context* only, and ``compression_ratio`` is the fraction of the context's entries it
removes. The question (the host's protected tail, ``question_len`` tokens) is fed right after
the compressed context, whole, with positions continuing from the uncompressed length
(kvpress's ``KVPressTextGenerationPipeline`` feeds its question the same way). So a press
never sees the question, with the question in the prefill or not: kvpress presses are
query-agnostic. A context no longer than the press's own ``window_size`` or ``n_sink`` is
kept whole (there is nothing outside them to evict; kvpress asserts instead).

The press runs inside the host's prefill, so the host measures its peak KV (each layer is
seen whole before the press's hook shrinks it). Rows of a left-padded batch are prefilled
one at a time (kvpress presses take one unpadded row) and gathered into one cache, left
padded again; the peak counts the rows already compressed plus the one in flight.

A press that cannot run under the adapter is refused when it is built (or bound to a model)
with a :class:`~apportion.errors.ConfigError` naming the press and the reason: one that wraps
another press (its config cannot name one; build it in Python and use
:meth:`KVPressPolicy.of`), one without a ``compression_ratio``, one that loads weights or
statistics from a model hub when it runs, one that scores with attention weights, which only
eager attention returns (``kvpress:observed-attention``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar

import torch
from apportion.errors import ConfigError
from apportion.host.kv import (
    CompressionConfig,
    KVPolicy,
    PrefillOutput,
    cache_kwargs,
    cache_nbytes,
    cache_seq_lengths,
)
from pydantic import Field, create_model

from apportion_kvcache.kvpress_names import INSTALL_HINT, PREFIX, press_classes

#: presses that load weights or statistics from a model hub when they run
FROM_HUB = {
    "DuoAttentionPress": "its attention-head patterns",
    "ExpectedAttentionStatsPress": "its query statistics",
    "FastKVzipPress": "its gate weights",
    "KVzapPress": "its scoring model",
    "LUKVPress": "its budget curves",
    "QFilterPress": "its Q-filters",
    "RestoreKVPress": "its restoration model",
}
#: presses that score with the attention weights, which only eager attention returns
NEEDS_EAGER = {"ObservedAttentionPress"}
#: press fields that bound the tokens a press needs before it can evict anything
_MIN_CONTEXT_FIELDS = ("window_size", "n_sink")


def _import_kvpress(name: str) -> Any:
    try:
        import kvpress
    except ImportError as exc:
        raise ConfigError(
            f"kv-policy {name!r} needs kvpress, which cannot be imported here "
            f"({type(exc).__name__}: {exc}); {INSTALL_HINT} (it pins transformers<5.3)",
            [("name", name)],
        ) from None
    return kvpress


_REQUIRED = object()


def _field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default; ``MISSING`` for one built per instance (not an option),
    ``_REQUIRED`` for none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.MISSING
    return _REQUIRED


def press_options(press_cls: type) -> dict[str, Any]:
    """The press's options a config may set: its init fields with a plain default (bool, int,
    float, str or None), ``compression_ratio`` aside. Returns ``{field: default}``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(press_cls):
        if not f.init or f.name.startswith("_") or f.name == "compression_ratio":
            continue
        default = _field_default(f)
        if default is None or isinstance(default, (bool, int, float, str)):
            out[f.name] = default
    return out


def unsupported_reason(press_cls: type) -> str | None:
    """Why ``press_cls`` cannot run as a KV policy under the adapter, or ``None``."""
    name = press_cls.__name__
    if name in FROM_HUB:
        return (
            f"it loads {FROM_HUB[name]} from a model hub when it runs, and apportion never "
            "downloads at run time"
        )
    fields = {f.name: f for f in dataclasses.fields(press_cls) if f.init}
    wrapped = [n for n, f in fields.items() if _field_default(f) is _REQUIRED]
    wrapped += [n for n in ("press", "base_press", "presses") if n in fields and n not in wrapped]
    if wrapped:
        return (
            f"it wraps another press (option {wrapped[0]!r}), which a config cannot name; "
            "build the press in Python and run it with KVPressPolicy.of(press)"
        )
    if "compression_ratio" not in fields:
        return (
            "it has no compression_ratio option (it sets its budget its own way), so the "
            "fraction of the context's entries removed cannot be set"
        )
    return None


class KVPressConfig(CompressionConfig):
    """Options of every ``kvpress:<press>`` policy; each press adds its own fields."""


class KVPressPolicy(KVPolicy):
    """A kvpress press as a KV policy (see the module docstring). Subclasses are made per
    press (:func:`policy_class`); :meth:`of` wraps a press object built in Python."""

    name: ClassVar[str] = "kvpress"
    summary: ClassVar[str] = "a kvpress press"
    Config: ClassVar[type[CompressionConfig]] = KVPressConfig
    #: the kvpress class name (e.g. ``"SnapKVPress"``)
    press_class: ClassVar[str] = ""

    def __init__(self, config: CompressionConfig | None = None, *, press: Any = None) -> None:
        super().__init__(config)
        self.press = press if press is not None else self._build_press()
        self._loaded: Any = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def of(cls, press: Any) -> KVPressPolicy:
        """A policy running ``press``, a kvpress press object built in Python (a wrapper such
        as ``AdaKVPress(SnapKVPress(0.5))`` included). Its ``compression_ratio`` is the press's."""
        kvpress = _import_kvpress(PREFIX + type(press).__name__)
        if not isinstance(press, kvpress.BasePress):
            raise ConfigError(f"{press!r} is not a kvpress press", [("press", repr(press))])
        ratio = getattr(press, "compression_ratio", 0.0)
        try:
            ratio = float(ratio) if ratio is not None else 0.0
        except (TypeError, ValueError):
            ratio = 0.0
        return cls(KVPressConfig(compression_ratio=min(max(ratio, 0.0), 0.999)), press=press)

    def _build_press(self) -> Any:
        label = self.name
        kvpress = _import_kvpress(label)
        press_cls = getattr(kvpress, self.press_class, None)
        if press_cls is None:
            raise ConfigError(
                f"kv-policy {label!r}: the installed kvpress has no {self.press_class}; "
                f"{INSTALL_HINT} --upgrade",
                [("name", label)],
            )
        why = unsupported_reason(press_cls)
        if why:
            raise ConfigError(
                f"kv-policy {label!r} ({self.press_class}) cannot run under apportion: {why}",
                [("name", why)],
            )
        opts = self.config.model_dump()
        try:
            return press_cls(**opts)
        except (AssertionError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"kv-policy {label!r}: {self.press_class}({_kw(opts)}) refused its options: "
                f"{type(exc).__name__}: {exc}",
                [("options", str(exc))],
            ) from None

    def bind(self, loaded: Any) -> None:
        impl = getattr(getattr(loaded, "model", None), "config", None)
        impl = getattr(impl, "_attn_implementation", None)
        if type(self.press).__name__ in NEEDS_EAGER and impl != "eager":
            raise ConfigError(
                f"kv-policy {self.name!r} ({type(self.press).__name__}) needs eager attention: "
                f"it scores with the attention weights, which only transformers' eager "
                f"attention returns, and the model runs {impl!r} attention",
                [("name", "needs eager attention")],
            )
        self._loaded = loaded

    # ------------------------------------------------------------------ prefill
    def _min_context(self) -> int:
        return max(int(getattr(self.press, f, 0) or 0) for f in _MIN_CONTEXT_FIELDS)

    def _compresses(self, context_len: int) -> bool:
        ratio = getattr(self.press, "compression_ratio", None)
        if ratio is not None and float(ratio) <= 0.0:
            return False
        return context_len > self._min_context()

    def prefill(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
        *,
        question_len: int = 0,
    ) -> PrefillOutput:
        """Prefill each row's context (all but the last ``question_len`` tokens) under the
        press, then feed the question whole after it, positions continuing."""
        rows, length = input_ids.shape
        q = max(0, min(int(question_len), length - 1))
        real = attention_mask.bool()
        starts = [int(length - n) for n in real.sum(-1).tolist()]
        contexts = [length - q - s for s in starts]
        if not any(self._compresses(n) for n in contexts):
            return super().prefill(model, input_ids, attention_mask, cache, question_len=q)
        if rows == 1 and starts[0] == 0:
            self._press_row(model, input_ids[:, : length - q], cache)
            kv_mask = None
            info: dict[str, Any] = {}
        else:
            kv_mask, peak = self._press_rows(model, input_ids, starts, length - q, cache)
            info = {"peak_kv_bytes": peak}
        next_position = torch.tensor(contexts, device=input_ids.device)
        if q == 0:
            logits = self._last_logits
            return PrefillOutput(logits, kv_mask, next_position, info)
        return self._feed(model, cache, input_ids[:, length - q :], kv_mask, next_position, info)

    def _press_row(self, model: Any, ids: torch.Tensor, cache: Any) -> None:
        """One unpadded row's context into ``cache`` under the press (kvpress compresses in
        a forward hook on every attention layer of this, the cache's first, forward)."""
        compress = self._compresses(ids.shape[1])
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        try:
            with self.press(model) if compress else contextlib.nullcontext():
                out = model(
                    input_ids=ids,
                    position_ids=positions,
                    use_cache=True,
                    logits_to_keep=1,
                    **cache_kwargs(model, cache),
                )
        except (AssertionError, ValueError, NotImplementedError, RuntimeError) as exc:
            raise ConfigError(
                f"kv-policy {self.name!r} ({type(self.press).__name__}) failed on a context of "
                f"{ids.shape[1]} tokens: {type(exc).__name__}: {exc}",
                [("name", str(exc))],
            ) from exc
        self._last_logits = out.logits[:, -1, :]

    def _press_rows(
        self, model: Any, input_ids: torch.Tensor, starts: list[int], end: int, cache: Any
    ) -> tuple[torch.Tensor, int]:
        """Every row alone, then gathered into ``cache`` left-padded; returns the validity
        mask of the gathered entries and the most bytes held at once."""
        per_row: list[Any] = []
        logits = []
        done = peak = 0
        for r, start in enumerate(starts):
            row_cache = self.make_cache(model)
            meter = _LayerPeak(model, row_cache)
            with meter:
                self._press_row(model, input_ids[r : r + 1, start:end], row_cache)
            peak = max(peak, done + meter.peak, done + cache_nbytes(row_cache))
            done += cache_nbytes(row_cache)
            per_row.append(row_cache)
            logits.append(self._last_logits)
        lengths = [cache_seq_lengths(c) for c in per_row]
        if any(min(n) != max(n) for n in lengths):
            raise ConfigError(
                f"kv-policy {self.name!r} ({type(self.press).__name__}) keeps a different number "
                "of entries in each layer, which a left-padded batch cannot hold; run one "
                "prompt at a time (batch size 1)",
                [("name", "per-layer budgets")],
            )
        width = max(n[0] for n in lengths)
        for layer in range(len(per_row[0].layers)):
            keys, values = [], []
            for c in per_row:
                k, v = c.layers[layer].keys, c.layers[layer].values
                pad = width - k.shape[-2]
                keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            cache.update(torch.cat(keys), torch.cat(values), layer)
        mask = torch.zeros((len(per_row), width), dtype=torch.bool, device=input_ids.device)
        for r, n in enumerate(lengths):
            mask[r, width - n[0] :] = True
        self._last_logits = torch.cat(logits)
        return mask, max(peak, cache_nbytes(cache))

    def _feed(
        self,
        model: Any,
        cache: Any,
        ids: torch.Tensor,
        kv_mask: torch.Tensor | None,
        next_position: torch.Tensor,
        info: dict[str, Any],
    ) -> PrefillOutput:
        """The question after the compressed context: its positions continue from each row's
        uncompressed length; no mask where every entry is valid (as kvpress's pipeline)."""
        steps = torch.arange(ids.shape[1], device=ids.device)[None]
        mask = None
        if kv_mask is not None:
            ones = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
            mask = torch.cat([kv_mask, ones], 1)
        out = model(
            input_ids=ids,
            attention_mask=mask.long() if mask is not None else None,
            position_ids=next_position[:, None] + steps,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
        )
        return PrefillOutput(
            logits=out.logits[:, -1, :],
            kv_mask=mask,
            next_position=next_position + ids.shape[1],
            info=info,
        )


class _LayerPeak:
    """The most bytes ``cache`` holds after any attention layer runs (forward hooks
    registered before the press's, so they see each layer whole)."""

    def __init__(self, model: Any, cache: Any) -> None:
        from apportion.host.kv import attention_modules

        self.modules = attention_modules(model)
        self.cache = cache
        self.peak = 0
        self._handles: list[Any] = []

    def _hook(self, *args: Any) -> None:
        self.peak = max(self.peak, cache_nbytes(self.cache))

    def __enter__(self) -> _LayerPeak:
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()


def _kw(opts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in opts.items())


_CLASSES: dict[str, type[KVPressPolicy]] = {}


def policy_class(press_class: str) -> type[KVPressPolicy]:
    """The :class:`KVPressPolicy` subclass of kvpress's ``press_class`` (``"SnapKVPress"``):
    its registered name, summary and a ``Config`` holding the press's own options."""
    if press_class in _CLASSES:
        return _CLASSES[press_class]
    names = {cls: name for name, cls in press_classes().items()}
    name = names.get(press_class)
    if name is None:
        raise AttributeError(f"the installed kvpress exports no press {press_class!r}")
    kvpress = _import_kvpress(name)
    press_cls = getattr(kvpress, press_class)
    doc = (press_cls.__doc__ or "").strip().splitlines()
    first = doc[0].strip().rstrip(".") if doc else press_class
    fields: dict[str, Any] = {}
    for field, default in press_options(press_cls).items():
        annotation: Any = (
            type(default) if default is not None else (bool | int | float | str | None)
        )
        fields[field] = (
            annotation,
            Field(default, description=f"kvpress {press_class}.{field}"),
        )
    config = create_model(f"{press_class}Config", __base__=KVPressConfig, **fields)
    why = unsupported_reason(press_cls)
    if press_class in NEEDS_EAGER:
        why = why or "it needs eager attention"
    summary = f"kvpress {press_class}: {first}"
    if why:
        summary += f" (cannot run here: {why.split(';')[0].split(',')[0]})"
    cls = type(
        press_class,
        (KVPressPolicy,),
        {
            "name": name,
            "summary": summary,
            "Config": config,
            "press_class": press_class,
            "__module__": __name__,
            "__doc__": f"``{name}``: kvpress's {press_class} as a KV policy.",
        },
    )
    _CLASSES[press_class] = cls
    return cls


def kvpress_policy(press: str, **options: Any) -> KVPressPolicy:
    """``kvpress_policy("snapkv", compression_ratio=0.5, window_size=32)``: the policy of a
    press by its short name, without the registry. Raises :class:`ConfigError` naming the
    press when kvpress is not installed or does not have it."""
    name = press if press.startswith(PREFIX) else PREFIX + press
    classes = press_classes()
    if not classes:
        raise ConfigError(
            f"kv-policy {name!r} needs kvpress, which is not installed: {INSTALL_HINT}",
            [("name", name)],
        )
    if name not in classes:
        import difflib

        close = difflib.get_close_matches(name, list(classes), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"the installed kvpress has no press {name!r}.{hint} Known: {', '.join(classes)}",
            [("name", name)],
        )
    cls = policy_class(classes[name])
    from apportion.registry import ComponentSpec

    spec = ComponentSpec(kind=cls.kind, name=name, target=cls, _cls=cls)
    return spec.create(options)


def __getattr__(attr: str) -> Any:
    """``apportion_kvcache.kvpress_adapter:SnapKVPress`` (the registry's import path) builds
    the policy class of that press on first use."""
    if attr.endswith("Press") and not attr.startswith("_"):
        return policy_class(attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["KVPressConfig", "KVPressPolicy", "kvpress_policy", "policy_class", "press_options"]
