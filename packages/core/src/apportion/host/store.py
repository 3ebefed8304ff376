"""The KV-store protocol: how a component saves a context's KV and finds it again, in this
process or another, without knowing which family provides the store. Torch-free at import.

A store keys an entry by the model's fingerprint, the context's token ids and a ``variant``
naming everything else that changes the stored bytes (a codec and its settings, a compression
policy and its options): the same context under other settings is another entry, never a
wrong hit. apportion-kvcache provides the stores (a directory, Redis) through the
``apportion_kv_store`` hook; :func:`open_store` asks for one::

    store = open_store("/tmp/kv")              # or "redis://127.0.0.1:6379/0"
    key = store.save_kv(loaded.fingerprint, ids, kv)
    kv = store.load_kv(loaded.fingerprint, ids, model=loaded.model)  # None on a miss
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from apportion.errors import ConfigError


def prefix_key(fingerprint: str, token_ids: Sequence[int], variant: str = "") -> str:
    """The store key of a token sequence under a model and a variant: hex sha256 over all three.

    ``variant`` is a canonical string of whatever else changes the stored bytes (empty for
    plain, lossless KV)."""
    h = hashlib.sha256()
    h.update(b"apportion-kv\0")
    h.update(fingerprint.encode())
    h.update(b"\0")
    if variant:
        h.update(b"variant\0" + variant.encode() + b"\0")
    h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in token_ids))
    return h.hexdigest()


@runtime_checkable
class KVStore(Protocol):
    """What a component may ask of a KV store.

    ``kv`` is a list of per-layer ``(keys, values)`` tensors (batch, kv heads, tokens, head
    dim), or a transformers ``Cache``. ``load_kv`` returns ``None`` on a miss; an entry for
    another model or another token count raises the store's mismatch error; a damaged entry is
    never returned (the store treats it as a miss and reports it).
    """

    def save_kv(
        self,
        fingerprint: str,
        token_ids: Sequence[int],
        kv: Any,
        meta: dict[str, Any] | None = None,
        *,
        variant: str = "",
    ) -> str:
        """Store ``kv`` losslessly; returns the entry's key."""
        ...

    def load_kv(
        self,
        fingerprint: str,
        token_ids: Sequence[int],
        *,
        model: Any = None,
        variant: str = "",
    ) -> list[tuple[Any, Any]] | None:
        """The stored KV (moved to ``model``'s device and dtype when given), or ``None``."""
        ...


def open_store(url: str, max_bytes: int | None = None) -> KVStore:
    """The KV store at ``url`` (a directory, or ``redis://host:port/db``), from whichever
    installed plugin provides stores. No provider installed is a :class:`ConfigError`."""
    from apportion.plugins import get_plugin_host

    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"a KV store needs a directory or redis:// URL, got {url!r}")
    store = get_plugin_host().hook.apportion_kv_store(url=url, max_bytes=max_bytes)
    if store is None:
        raise ConfigError(
            f"no installed plugin provides a KV store for {url!r} (pip install apportion-kvcache)",
            [("store", url)],
        )
    return store
