"""Compress once, ask many: a context's KV, compressed before its questions are known, kept in a
KV store and answered from any number of times, in this process or another.

::

    handle = compress_context(loaded, context, "probe", "/tmp/kv")  # or "redis://host:6379/0"
    for answer in ask(loaded, handle, ["Who signed it?", "When?"], max_new_tokens=32):
        print(answer.text)

:func:`compress_context` chat-templates the context as the host does for a user turn whose
question comes later (``context + separator + question``, then the assistant's turn), runs it
through the KV policy in query-agnostic mode (:meth:`apportion.host.Host.prefill_context`: the
policy's probe, if it has one, stands in for the question and is dropped afterwards), and
stores what the policy kept: every layer's keys and values, the uncompressed context length
(later tokens take positions from there, so RoPE sees them where they would have stood), the
kept entries' validity mask if the policy returns one, and the metadata below. The KV is stored
as safetensors, or CacheGen-coded (``codec_level``; :mod:`apportion_kvcache.cachegen`).

:func:`ask` loads the entry once and answers each question by feeding the question's tokens
(and the chat template's assistant turn) after the stored cache
(:meth:`~apportion.host.Host.generate_after`); the context is never recomputed. Every question
starts from the same stored state: a batch of questions runs as rows over the one loaded KV,
``batch_size`` at a time. One at a time (``batch_size=1``), each answer is token for token
:meth:`apportion.host.Host.generate` with ``question_in_prefill=False`` and the same policy;
as rows of a batch, up to the arithmetic of a padded batch, as with any batched generation.

The entry's metadata travels inside the payload, under the store's checksum (safetensors
metadata, or the CacheGen header, which the codec also checks with its CRC)::

    {"format": "apportion-kv-compressed", "version": 1, "model": fingerprint,
     "tokenizer": tokenizer fingerprint, "model_name": str,
     "policy": {"name": str, "options": {...}, "compression_ratio": float | None},
     "codec": {"name": "none"} | {"name": "cachegen", "version", "level", "bins", ...},
     "dtype": str, "layers": n, "context_tokens": n, "kept_tokens": n, "kv_mask": runs | None,
     "question_suffix": str, "separator": str}

Loading checks the entry against the model and tokenizer it is used with (and, when asked, the
policy and ratio it was compressed with): a difference raises
:class:`~apportion_kvcache.errors.KVMismatchError` naming the stored and the current side. A
damaged entry is set aside by the store and reads as a miss
(:class:`~apportion_kvcache.errors.KVNotFoundError`), never as an answer.

A handle is the name given to :func:`compress_context` or, without one, the entry's store key
(64 hex digits): the key of the model, the context's tokens and every setting that changes the
stored bytes, so the same context compressed alike lands on the same entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from apportion.errors import ConfigError
from apportion.host.kv import KVPolicy, PrefillOutput
from apportion.host.store import prefix_key

from apportion_kvcache.errors import CorruptKVError, KVMismatchError, KVNotFoundError
from apportion_kvcache.kv import KV, cache_from_kv, check_kv_shape, kv_from_cache

__all__ = [
    "FORMAT",
    "VERSION",
    "ContextHandle",
    "StoredContext",
    "ask",
    "compress_context",
    "load_context",
    "read_entry",
    "store_key",
    "tokenizer_fingerprint",
    "vllm_request",
]

FORMAT = "apportion-kv-compressed"
VERSION = 1
READABLE_VERSIONS = (1,)
#: stands in for the question while the context's template is rendered
_MARK = "\u27e6apportion:question\u27e7"
_KEY = re.compile(r"^[0-9a-f]{64}$")
_MAX_NAME = 256


@dataclass
class ContextHandle:
    """A stored compressed context: ``handle`` is what :func:`ask` and ``apportion kv ask``
    take (its name, else its key), ``meta`` the stored metadata, ``stats`` what compressing
    it cost (``compress_seconds``, ``peak_kv_bytes``, ``stored_bytes``, ``kv_bytes``)."""

    handle: str
    key: str
    store: Any
    meta: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.handle


@dataclass
class StoredContext:
    """A compressed context loaded for one model: per-layer ``kv`` (batch 1, on the model's
    device and dtype), ``kv_mask`` (1, kept) or None, ``context_tokens`` (the uncompressed
    length: the next position) and the entry's ``meta``."""

    handle: str
    key: str
    kv: KV
    kv_mask: torch.Tensor | None
    context_tokens: int
    meta: dict[str, Any]

    def prefilled(self, model: Any, rows: int = 1) -> tuple[Any, PrefillOutput]:
        """A fresh cache of ``rows`` rows holding the stored KV, and the prefill output to
        feed questions after (:meth:`apportion.host.Host.generate_after`). The stored tensors
        are shared, never written: each call starts from the same state."""
        kv = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.kv]
        cache = cache_from_kv(kv, model.config)
        device = self.kv[0][0].device
        mask = None if self.kv_mask is None else self.kv_mask.to(device).expand(rows, -1)
        pre = PrefillOutput(
            logits=torch.empty((rows, 0), device=device),
            kv_mask=mask,
            next_position=torch.full((rows,), self.context_tokens, device=device),
        )
        return cache, pre


# ------------------------------------------------------------------------------- identity


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short stable id of a tokenizer: sha256 over its serialized form (a fast tokenizer's
    JSON, else its vocabulary) and its chat template, which decide the context's tokens."""
    h = hashlib.sha256(b"apportion-tokenizer\0")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        h.update(json.dumps(vocab, ensure_ascii=False).encode())
    template = getattr(tokenizer, "chat_template", None)
    h.update(b"\0chat\0" + json.dumps(template, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


_tokenizer_id = tokenizer_fingerprint  # the name, where a parameter shadows it


def store_key(handle: str) -> str:
    """The store key of a handle: a key (64 hex digits) is itself, a name is hashed."""
    if not isinstance(handle, str) or not handle.strip():
        raise ConfigError(f"a compressed-context handle must be a non-empty string, not {handle!r}")
    if _KEY.match(handle):
        return handle
    return hashlib.sha256(b"apportion-kv-name\0" + handle.encode()).hexdigest()


def _check_name(name: str) -> None:
    if not name.strip() or len(name) > _MAX_NAME or any(ord(c) < 32 for c in name):
        raise ConfigError(
            f"name {name!r} is not usable: give 1 to {_MAX_NAME} printable characters"
        )
    if _KEY.match(name):
        raise ConfigError(f"name {name!r} looks like a store key (64 hex digits); choose another")


def _open(store: Any) -> Any:
    if isinstance(store, str):
        from apportion_kvcache.store import open_store

        return open_store(store)
    if store is None:
        raise ConfigError("no KV store given: pass a directory, a redis:// URL or a store")
    return store


# ------------------------------------------------------------------------------- compress


def _template(
    host: Any, context: str | Sequence[dict[str, str]], separator: str
) -> tuple[str, str]:
    """(the context's text up to where its question will stand, the text after the question)."""
    if isinstance(context, str):
        messages = [{"role": "user", "content": context}]
    else:
        messages = [dict(m) for m in context]
        if not messages or any(
            not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ConfigError("messages must be a non-empty list of {'role', 'content'} strings")
    if not any(m["content"].strip() for m in messages):
        raise ConfigError("the context is empty: give the model something to read")
    if messages[-1]["role"] == "user":
        messages[-1]["content"] += separator + _MARK
    else:
        messages.append({"role": "user", "content": _MARK})
    text = host.render(messages)
    split = text.rfind(_MARK)
    if split < 0:
        raise ConfigError("the chat template dropped the question's place; it cannot be split")
    return text[:split], text[split + len(_MARK) :]


def _policy(kv_policy: KVPolicy | str, options: dict[str, Any] | None) -> KVPolicy:
    if isinstance(kv_policy, str):
        from apportion.plugins import get_registry

        policy: KVPolicy = get_registry().create("kv-policy", kv_policy, options or {})
        return policy
    if options:
        raise ConfigError("options go with a policy name; this policy is already built")
    return kv_policy


def _codec(level: int | None) -> Any:
    if level is None:
        return None
    from apportion_kvcache.cachegen.codec import CacheGenCodec

    codec = CacheGenCodec()
    if not 0 <= int(level) < codec.n_levels:
        raise ConfigError(
            f"codec level {level} is out of range: CacheGen has levels 0..{codec.n_levels - 1}"
        )
    return codec


def _mask_runs(mask: torch.Tensor | None) -> list[list[int]] | None:
    """[start, stop) runs of valid entries of a (1, n) mask."""
    if mask is None:
        return None
    row = mask[0].bool().tolist()
    runs, start = [], None
    for i, ok in enumerate([*row, False]):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            runs.append([start, i])
            start = None
    return runs


def compress_context(
    loaded: Any,
    context: str | Sequence[dict[str, str]],
    kv_policy: KVPolicy | str,
    store: Any,
    *,
    options: dict[str, Any] | None = None,
    codec_level: int | None = None,
    name: str | None = None,
    separator: str = "\n\n",
    attention: Any = None,
) -> ContextHandle:
    """Compress ``context`` once with ``kv_policy`` and store it; returns its handle.

    ``context`` is the text of a user turn (or chat messages) whose question comes later,
    after ``separator``. ``kv_policy`` is a policy or a registered name (with ``options``);
    ``store`` a store, a directory or a ``redis://`` URL. ``codec_level`` CacheGen-codes the
    KV at that level (None: stored as it is). ``name`` stores the entry under that name
    (replacing an entry of the same name); without it the handle is the store key.
    ``attention`` is the attention backend of the prefill (dense by default).
    """
    from apportion.host import Host
    from apportion.host.model import fingerprint as model_fingerprint

    if name is not None:
        _check_name(name)
    policy = _policy(kv_policy, options)
    codec = _codec(codec_level)
    store = _open(store)
    host = Host(loaded, attention, policy, question_in_prefill=False)
    head, suffix = _template(host, context, separator)
    ids = host.tokenizer.encode(head, add_special_tokens=False)
    t0 = time.perf_counter()
    cache, pre = host.prefill_context([ids])
    if any(getattr(layer, "ragged", False) for layer in getattr(cache, "layers", [])):
        raise ConfigError(
            f"kv-policy {policy.name!r} keeps a ragged KV (its own number of entries per head); "
            "a compressed context stores one (heads, tokens) shape per layer: use a policy "
            "with uniform budgets"
        )
    try:
        kv = [(k.detach(), v.detach()) for k, v in kv_from_cache(cache)]
    except (ValueError, AttributeError) as exc:
        raise ConfigError(
            f"kv-policy {policy.name!r} keeps its KV in a form that cannot be stored: {exc}"
        ) from None
    shapes = {tuple(k.shape) for k, _ in kv} | {tuple(v.shape) for _, v in kv}
    if len(shapes) != 1:
        raise ConfigError(
            f"kv-policy {policy.name!r} keeps layers of different shapes ({sorted(shapes)}); "
            "a compressed context stores one shape for every layer"
        )
    fp = str(getattr(loaded, "fingerprint", None) or model_fingerprint(loaded.model))
    dtype = str(kv[0][0].dtype).removeprefix("torch.")
    config = policy.config
    level = 0 if codec_level is None else int(codec_level)
    codec_meta: dict[str, Any] = {"name": "none"}
    if codec is not None:
        from apportion_kvcache.cachegen import codec as cg

        codec_meta = {
            "name": "cachegen",
            "version": cg.VERSION,
            "level": level,
            "bins": codec.config.levels[level],
            "group_size": codec.config.group_size,
            "chunk_tokens": codec.config.chunk_tokens,
        }
    ratio = getattr(config, "compression_ratio", None)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model": fp,
        "tokenizer": tokenizer_fingerprint(host.tokenizer),
        "model_name": str(getattr(loaded, "name", "")),
        "policy": {
            "name": policy.name,
            "options": config.model_dump(mode="json") if config is not None else {},
            "compression_ratio": None if ratio is None else float(ratio),
        },
        "codec": codec_meta,
        "dtype": dtype,
        "layers": len(kv),
        "context_tokens": int(pre.next_position[0]),
        "kept_tokens": int(kv[0][0].shape[-2]),
        "kv_mask": _mask_runs(pre.kv_mask),
        "question_suffix": suffix,
        "separator": separator,
    }
    variant_fields = {k: meta[k] for k in ("format", "version", "tokenizer", "policy", "codec")}
    variant = "compressed:" + json.dumps(
        variant_fields | {"dtype": dtype, "suffix": suffix}, sort_keys=True, separators=(",", ":")
    )
    key = store_key(name) if name is not None else prefix_key(fp, ids, variant)
    if codec is None:
        from safetensors.torch import save

        from apportion_kvcache.store import KV_FORMAT, KV_VERSION

        tensors: dict[str, torch.Tensor] = {}
        for i, (k, v) in enumerate(kv):
            tensors[f"k.{i}"] = k.to("cpu").contiguous()
            tensors[f"v.{i}"] = v.to("cpu").contiguous()
        payload = save(
            tensors,
            metadata={"format": KV_FORMAT, "version": KV_VERSION, "compressed": json.dumps(meta)},
        )
        kind = "kv"
    else:
        payload = codec.encode(kv, fingerprint=fp, level=level, meta={"compressed": meta})
        kind = "cachegen"
    listing = {k: meta[k] for k in ("policy", "codec", "context_tokens", "kept_tokens")}
    store.put(
        key,
        kind,
        payload,
        fingerprint=fp,
        tokens=meta["context_tokens"],
        meta=listing | ({"name": name} if name is not None else {}),
        variant=variant,
    )
    stats = {
        "compress_seconds": time.perf_counter() - t0,
        "peak_kv_bytes": int((pre.info or {}).get("peak_kv_bytes", 0)),
        "stored_bytes": len(payload),
        "kv_bytes": sum(k.numel() * k.element_size() * 2 for k, _ in kv),
    }
    return ContextHandle(name if name is not None else key, key, store, meta, stats)


# ------------------------------------------------------------------------------- load


def _entry_meta(entry: Any, where: str) -> dict[str, Any] | None:
    """The compressed-context metadata inside an entry's payload (None: not such an entry).
    Bytes that verify yet do not parse raise :class:`CorruptKVError`."""
    if entry.kind == "cachegen":
        from apportion_kvcache.cachegen.codec import CacheGenCodec

        raw = CacheGenCodec().read_header(entry.payload).meta.get("compressed")
    else:
        from apportion_kvcache.store import kv_payload_metadata

        fmt = kv_payload_metadata(entry.payload, where)
        text = fmt.get("compressed") if isinstance(fmt, dict) else None
        if text is None:
            return None
        if not isinstance(text, str):
            raise CorruptKVError(f"{where}: compressed-context metadata is not a string")
        from apportion.host.io import loads_json

        raw = loads_json(text.encode(), what=f"{where}: metadata", error=CorruptKVError)
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CorruptKVError(f"{where}: not a compressed-context entry")
    version = raw.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CorruptKVError(
            f"{where}: compressed-context format version {version!r} is not supported "
            f"(this build reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    policy = raw.get("policy")
    ok = (
        isinstance(raw.get("model"), str)
        and isinstance(raw.get("tokenizer"), str)
        and isinstance(policy, dict)
        and isinstance(policy.get("name"), str)
        and isinstance(raw.get("codec"), dict)
        and isinstance(raw.get("question_suffix"), str)
        and all(_count(raw.get(k)) for k in ("layers", "context_tokens", "kept_tokens"))
        and raw["kept_tokens"] <= raw["context_tokens"]
        and _runs_ok(raw.get("kv_mask"), raw["kept_tokens"])
    )
    if not ok:
        raise CorruptKVError(f"{where}: compressed-context metadata fields are missing or wrong")
    return raw


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _runs_ok(runs: Any, n: int) -> bool:
    if runs is None:
        return True
    if not isinstance(runs, list):
        return False
    last = 0
    for r in runs:
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)):
            return False
        if not last <= r[0] < r[1] <= n:
            return False
        last = r[1]
    return True


def read_entry(store: Any, handle: str) -> tuple[Any, dict[str, Any]]:
    """The verified store entry of ``handle`` and its metadata, before any model is involved.

    Raises :class:`KVNotFoundError` if the store holds no such entry, or held a damaged one
    (which the store set aside and logged), and :class:`KVMismatchError` if the entry is not a
    compressed context."""
    store = _open(store)
    key = store_key(handle)
    where = getattr(store, "_where", lambda: type(store).__name__)()
    corrupt = dict(getattr(store, "stats", {})).get("corrupt", 0)
    entry = store.get(key)
    if entry is not None:
        try:
            meta = _entry_meta(entry, f"store entry {key[:12]}")
        except CorruptKVError as exc:  # verified bytes that do not parse: a foreign writer
            store.discard(entry, str(exc))
            entry = None
        else:
            if meta is None:
                raise KVMismatchError(
                    f"store entry {handle!r} in {where} holds a plain {entry.kind} KV, not a "
                    "compressed context (compress_context / `apportion kv compress` write those)"
                )
            return entry, meta
    damaged = dict(getattr(store, "stats", {})).get("corrupt", 0) > corrupt
    raise KVNotFoundError(
        f"no compressed context {handle!r} in the KV store {where}"
        + (
            ": the entry was damaged and has been set aside; compress the context again"
            if damaged
            else " (never stored there, evicted, or stored under another name)"
        )
    )


def _mismatch(handle: str, what: str, stored: Any, current: Any) -> NoReturn:
    raise KVMismatchError(
        f"compressed context {handle!r} was stored with {what} {stored}; "
        f"the current {what} is {current}"
    )


def check_entry(
    meta: dict[str, Any],
    handle: str,
    *,
    fingerprint: str,
    tokenizer_fingerprint: str,
    expect_policy: str | None = None,
    expect_ratio: float | None = None,
) -> None:
    """Raise :class:`KVMismatchError`, naming the stored and the current side, unless the
    entry was stored for this model and tokenizer (and, when given, with this policy and
    ratio)."""
    if meta["model"] != fingerprint:
        _mismatch(handle, "model", meta["model"], fingerprint)
    if meta["tokenizer"] != tokenizer_fingerprint:
        _mismatch(handle, "tokenizer", meta["tokenizer"], tokenizer_fingerprint)
    policy = meta["policy"]
    if expect_policy is not None and policy["name"] != expect_policy:
        _mismatch(handle, "kv-policy", repr(policy["name"]), repr(expect_policy))
    if expect_ratio is not None:
        ratio = policy.get("compression_ratio")
        if not isinstance(ratio, (int, float)) or not math.isclose(
            float(ratio), float(expect_ratio), abs_tol=1e-9
        ):
            _mismatch(handle, "compression ratio", ratio, expect_ratio)


def load_context(
    loaded: Any,
    handle: str | ContextHandle,
    *,
    store: Any = None,
    expect_policy: str | None = None,
    expect_ratio: float | None = None,
    fingerprint: str | None = None,
    tokenizer_fingerprint: str | None = None,
) -> StoredContext:
    """Load a compressed context for ``loaded`` (checked, on its device and dtype).

    ``store`` is needed unless ``handle`` is a :class:`ContextHandle`. ``expect_policy`` /
    ``expect_ratio`` refuse an entry compressed otherwise; ``fingerprint`` /
    ``tokenizer_fingerprint`` state the identity to check against when it is not
    ``loaded``'s own. With both given, ``loaded`` may be ``None`` (a host that runs the model
    its own way, as vLLM): the KV then stays on the CPU in its stored dtype. Raises
    :class:`KVMismatchError` (naming both sides) or :class:`KVNotFoundError`."""
    from apportion.host.model import fingerprint as model_fingerprint

    if isinstance(handle, ContextHandle):
        store = handle.store if store is None else store
        handle = handle.handle
    store = _open(store)
    entry, meta = read_entry(store, handle)
    if loaded is None and not (fingerprint and tokenizer_fingerprint):
        raise ConfigError(
            "load_context without a model needs fingerprint and tokenizer_fingerprint"
        )
    fp = fingerprint or getattr(loaded, "fingerprint", None) or model_fingerprint(loaded.model)
    tok_fp = tokenizer_fingerprint or _tokenizer_id(loaded.tokenizer)
    check_entry(
        meta,
        handle,
        fingerprint=str(fp),
        tokenizer_fingerprint=tok_fp,
        expect_policy=expect_policy,
        expect_ratio=expect_ratio,
    )
    where = f"store entry {entry.key[:12]}"
    try:
        if entry.manifest.get("model") != meta["model"]:
            raise CorruptKVError(f"{where}: its manifest and its payload name other models")
        if entry.kind == "cachegen":
            from apportion_kvcache.cachegen.codec import CacheGenCodec

            kv = CacheGenCodec().decode(entry.payload, fingerprint=meta["model"])
        else:
            from apportion_kvcache.store import _kv_from_safetensors

            kv = _kv_from_safetensors(entry.payload, where)
        shape = tuple(kv[0][0].shape)
        if len(kv) != meta["layers"] or shape[0] != 1 or shape[2] != meta["kept_tokens"]:
            raise CorruptKVError(f"{where}: the KV does not match its metadata")
    except CorruptKVError as exc:
        store.discard(entry, str(exc))
        raise KVNotFoundError(
            f"compressed context {handle!r} was damaged and has been set aside ({exc}); "
            "compress the context again"
        ) from None
    device: Any = "cpu"
    if loaded is not None:
        model = loaded.model
        check_kv_shape(len(kv), shape[1], shape[3], model.config)
        device, dtype = model.device, model.dtype
        kv = [(k.to(device, dtype), v.to(device, dtype)) for k, v in kv]
    mask = None
    if meta["kv_mask"] is not None:
        mask = torch.zeros((1, meta["kept_tokens"]), dtype=torch.bool, device=device)
        for start, stop in meta["kv_mask"]:
            mask[0, start:stop] = True
    return StoredContext(handle, entry.key, kv, mask, meta["context_tokens"], meta)


# ------------------------------------------------------------------------------- ask


def ask(
    loaded: Any,
    handle: str | ContextHandle | StoredContext,
    questions: str | Sequence[str],
    *,
    store: Any = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    attention: Any = None,
    expect_policy: str | None = None,
    expect_ratio: float | None = None,
) -> list[Any]:
    """Answer ``questions`` from a stored compressed context; one
    :class:`~apportion.host.generate.GenerationResult` per question, in order.

    The entry is loaded once (pass a :class:`StoredContext` from :func:`load_context` to load
    it once across calls); each question's tokens are fed after the stored cache, positions
    continuing from the uncompressed context, and greedily decoded. Questions run as rows over
    the one stored KV, ``batch_size`` at a time (1: one at a time). ``expect_policy`` /
    ``expect_ratio`` refuse an entry compressed otherwise (:class:`KVMismatchError`)."""
    from apportion.host import Host

    if isinstance(questions, str):
        questions = [questions]
    questions = list(questions)
    if not questions:
        raise ConfigError("no questions to ask")
    for q in questions:
        if not isinstance(q, str) or not q.strip():
            raise ConfigError(f"question {q!r} is empty: give the model something to answer")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
    if isinstance(handle, StoredContext):
        stored = handle
        check_entry(
            stored.meta,
            stored.handle,
            fingerprint=str(loaded.fingerprint),
            tokenizer_fingerprint=tokenizer_fingerprint(loaded.tokenizer),
            expect_policy=expect_policy,
            expect_ratio=expect_ratio,
        )
    else:
        stored = load_context(
            loaded, handle, store=store, expect_policy=expect_policy, expect_ratio=expect_ratio
        )
    host = Host(loaded, attention)
    suffix = stored.meta["question_suffix"]
    ids = [host.tokenizer.encode(q + suffix, add_special_tokens=False) for q in questions]
    out: list[Any] = []
    for i in range(0, len(ids), batch_size):
        rows = ids[i : i + batch_size]
        cache, pre = stored.prefilled(loaded.model, len(rows))
        out += host.generate_after(cache, pre, rows, max_new_tokens=max_new_tokens)
    return out


# ------------------------------------------------------------------------------- vLLM


def vllm_request(
    store: Any, handle: str | ContextHandle, question: str, tokenizer: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A vLLM prompt that asks ``question`` of a stored compressed context, and the
    ``kv_transfer_params`` that send it to the context (vLLM with
    :class:`~apportion_kvcache.vllm_connector.ApportionStoreConnector` on ``store``)::

        prompt, params = vllm_request(store, handle, "Who signed it?", llm.get_tokenizer())
        sampling = SamplingParams(max_tokens=32, extra_args={"kv_transfer_params": params})
        llm.generate(prompt, sampling)

    vLLM gives every prompt token a slot, so the prompt begins with one placeholder token per
    kept entry (the connector writes the stored entries there, keys moved to the positions
    vLLM gives those slots) and then the question with the chat template's assistant turn, as
    :func:`ask` feeds it. The prompt's ``cache_salt`` is the entry's key: vLLM's own prefix
    cache never mixes two contexts' placeholders. Run such requests with
    ``kv_load_failure_policy="fail"``: placeholders recomputed as text answer nothing.

    Raises :class:`KVNotFoundError`, :class:`KVMismatchError` (another tokenizer, naming both)
    or :class:`~apportion.errors.ConfigError` (an entry whose entries carry a validity mask,
    which vLLM's attention cannot apply; an empty question)."""
    if isinstance(handle, ContextHandle):
        handle = handle.handle
    if not isinstance(question, str) or not question.strip():
        raise ConfigError(f"question {question!r} is empty: give the model something to answer")
    entry, meta = read_entry(store, handle)
    current = tokenizer_fingerprint(tokenizer)
    if meta["tokenizer"] != current:
        _mismatch(handle, "tokenizer", meta["tokenizer"], current)
    if meta["kv_mask"] is not None:
        raise ConfigError(
            f"compressed context {handle!r} keeps a validity mask over its entries "
            f"(kv-policy {meta['policy']['name']!r}); vLLM cannot apply one: compress it with a "
            "policy that keeps whole entries"
        )
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    ids = [int(pad)] * int(meta["kept_tokens"]) + tokenizer.encode(
        question + meta["question_suffix"], add_special_tokens=False
    )
    from apportion_kvcache.vllm_names import CONTEXT_PARAM, CONTEXT_SLOTS_PARAM

    params = {CONTEXT_PARAM: handle, CONTEXT_SLOTS_PARAM: int(meta["kept_tokens"])}
    return {"prompt_token_ids": ids, "cache_salt": entry.key}, params
