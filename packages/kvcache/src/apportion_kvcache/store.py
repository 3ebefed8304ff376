"""A KV store: a context's KV (or its CacheGen bitstream) keyed by model + token prefix.

Keys are ``sha256(model fingerprint, token ids)``: the same prompt prefix on the same model
finds its KV again, in this process or another one. Each entry is a payload and a JSON
manifest::

    {"format": "apportion-kvstore", "version": 1, "kind": "kv" | "cachegen",
     "model": fingerprint, "tokens": n, "nbytes": n, "sha256": hex, "created": t, "meta": {...}}

A ``kv`` payload is a safetensors blob (``k.<layer>``/``v.<layer>``), a ``cachegen`` payload
is a CacheGen bitstream; nothing is ever unpickled. Every read checks the manifest, the size
and the digest and raises :class:`CorruptKVError` for anything off; a KV that does not fit the
model it is loaded into raises :class:`KVMismatchError`.

Backends: :class:`LocalStore` (a directory; atomic temp-file + rename writes, an LRU size cap,
safe with concurrent writers in several processes) and :class:`RedisStore` (a ``redis-server``
shared by processes and hosts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apportion_kvcache.errors import CorruptKVError, KVMismatchError, StoreUnavailableError

FORMAT = "apportion-kvstore"
VERSION = 1
KINDS = ("kv", "cachegen")
MAX_MANIFEST_BYTES = 1 << 20


class StoreFullError(ValueError):
    """The entry alone is larger than the store's size cap (nothing was evicted for it)."""


def prefix_key(fingerprint: str, token_ids: Sequence[int]) -> str:
    """The store key of a token prefix under a model: hex sha256 over both."""
    h = hashlib.sha256()
    h.update(b"apportion-kv\0")
    h.update(fingerprint.encode())
    h.update(b"\0")
    h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in token_ids))
    return h.hexdigest()


@dataclass
class Entry:
    key: str
    kind: str
    payload: bytes
    manifest: dict[str, Any]


def _manifest(
    key: str, kind: str, payload: bytes, fingerprint: str, tokens: int, meta: dict[str, Any] | None
) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"unknown entry kind {kind!r}; expected one of {KINDS}")
    return {
        "format": FORMAT,
        "version": VERSION,
        "key": key,
        "kind": kind,
        "model": fingerprint,
        "tokens": int(tokens),
        "nbytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "created": time.time(),
        "meta": meta or {},
    }


def parse_manifest(raw: bytes, key: str, where: str) -> dict[str, Any]:
    """Validate a manifest's bytes (size, JSON, format, version, fields)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CorruptKVError(f"{where}: manifest of {len(raw)} bytes is too large")
    try:
        m = json.loads(raw)
    except ValueError as exc:
        raise CorruptKVError(f"{where}: manifest is not JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CorruptKVError(f"{where}: not an apportion KV store manifest")
    version = m.get("version")
    if version != VERSION:
        raise CorruptKVError(
            f"{where}: store format version {version!r} is not supported "
            f"(this build reads version {VERSION})"
        )
    ok = (
        m.get("key") == key
        and m.get("kind") in KINDS
        and isinstance(m.get("model"), str)
        and isinstance(m.get("nbytes"), int)
        and m["nbytes"] >= 0
        and isinstance(m.get("sha256"), str)
        and len(m["sha256"]) == 64
        and isinstance(m.get("tokens"), int)
    )
    if not ok:
        raise CorruptKVError(f"{where}: manifest fields are missing or wrong")
    return m


def verify_payload(payload: bytes, manifest: dict[str, Any], where: str) -> None:
    if len(payload) != manifest["nbytes"]:
        raise CorruptKVError(
            f"{where}: payload has {len(payload)} bytes, manifest says {manifest['nbytes']}"
        )
    if hashlib.sha256(payload).hexdigest() != manifest["sha256"]:
        raise CorruptKVError(f"{where}: payload checksum mismatch")


class KVStore:
    """The store interface: raw entries by key, plus KV/bitstream helpers on top."""

    def put(
        self,
        key: str,
        kind: str,
        payload: bytes,
        *,
        fingerprint: str,
        tokens: int,
        meta: dict[str, Any] | None = None,
    ) -> None:
        raise NotImplementedError

    def get(self, key: str) -> Entry | None:
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        raise NotImplementedError

    def keys(self) -> list[str]:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    # ------------------------------------------------------------------ KV helpers
    def save_kv(
        self,
        fingerprint: str,
        token_ids: Sequence[int],
        kv: Any,
        meta: dict[str, Any] | None = None,
    ) -> str:
        """Store a context's KV (per-layer (keys, values) or a transformers cache) losslessly."""
        import torch
        from safetensors.torch import save

        from apportion_kvcache.cachegen import kv_from_cache

        if hasattr(kv, "layers"):
            kv = kv_from_cache(kv)
        if not kv or any(k.shape[-2] != len(token_ids) for k, _ in kv):
            have = kv[0][0].shape[-2] if kv else 0
            raise ValueError(
                f"the KV holds {have} tokens but {len(token_ids)} token ids were given"
            )
        tensors: dict[str, torch.Tensor] = {}
        for i, (k, v) in enumerate(kv):
            tensors[f"k.{i}"] = k.detach().to("cpu").contiguous()
            tensors[f"v.{i}"] = v.detach().to("cpu").contiguous()
        key = prefix_key(fingerprint, token_ids)
        self.put(
            key, "kv", save(tensors), fingerprint=fingerprint, tokens=len(token_ids), meta=meta
        )
        return key

    def save_bitstream(
        self,
        fingerprint: str,
        token_ids: Sequence[int],
        bitstream: bytes,
        meta: dict[str, Any] | None = None,
    ) -> str:
        """Store a CacheGen bitstream (validated before it is written)."""
        from apportion_kvcache.cachegen import CacheGenCodec

        header = CacheGenCodec().read_header(bitstream)
        if header.fingerprint and header.fingerprint != fingerprint:
            raise KVMismatchError("the bitstream was encoded for another model than the key names")
        key = prefix_key(fingerprint, token_ids)
        self.put(
            key, "cachegen", bitstream, fingerprint=fingerprint, tokens=len(token_ids), meta=meta
        )
        return key

    def load_kv(
        self, fingerprint: str, token_ids: Sequence[int], *, model: Any = None, codec: Any = None
    ) -> list[tuple[Any, Any]] | None:
        """The stored KV of this prefix (decoding a bitstream if that is what is stored), or None.

        With ``model`` the shapes are checked against its config and tensors moved to its
        device and dtype."""
        from apportion_kvcache.cachegen import CacheGenCodec, check_kv_shape

        key = prefix_key(fingerprint, token_ids)
        entry = self.get(key)
        if entry is None:
            return None
        where = f"store entry {key[:12]}"
        if entry.manifest["model"] != fingerprint:
            raise KVMismatchError(f"{where} belongs to model {entry.manifest['model'][:16]}")
        if entry.kind == "cachegen":
            kv = (codec or CacheGenCodec()).decode(entry.payload, fingerprint=fingerprint)
        else:
            kv = _kv_from_safetensors(entry.payload, where)
        if entry.manifest["tokens"] != len(token_ids) or any(
            k.shape[-2] != len(token_ids) for k, _ in kv
        ):
            raise KVMismatchError(
                f"{where} holds {kv[0][0].shape[-2]} tokens, the prefix has {len(token_ids)}"
            )
        if model is not None:
            check_kv_shape(len(kv), kv[0][0].shape[1], kv[0][0].shape[-1], model.config)
            kv = [(k.to(model.device, model.dtype), v.to(model.device, model.dtype)) for k, v in kv]
        return kv

    def load_cache(self, fingerprint: str, token_ids: Sequence[int], model: Any) -> Any:
        """Like :meth:`load_kv`, as a transformers ``DynamicCache`` for ``model`` (or None)."""
        from apportion_kvcache.cachegen import cache_from_kv

        kv = self.load_kv(fingerprint, token_ids, model=model)
        return None if kv is None else cache_from_kv(kv, model.config)


def _kv_from_safetensors(payload: bytes, where: str) -> list[tuple[Any, Any]]:
    from safetensors.torch import load

    try:
        tensors = load(payload)
    except Exception as exc:
        raise CorruptKVError(f"{where}: unreadable KV payload ({exc})") from None
    n = len(tensors) // 2
    if (
        len(tensors) % 2
        or any(f"k.{i}" not in tensors or f"v.{i}" not in tensors for i in range(n))
        or n == 0
    ):
        raise CorruptKVError(f"{where}: KV payload does not hold k.<i>/v.<i> pairs")
    kv = [(tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in range(n)]
    shape = kv[0][0].shape
    if len(shape) != 4 or any(k.shape != shape or v.shape != shape for k, v in kv):
        raise CorruptKVError(f"{where}: KV tensors have inconsistent shapes")
    return kv


# --------------------------------------------------------------------------- local directory


class LocalStore(KVStore):
    """A directory of entries: ``<root>/<key[:2]>/<key>.bin`` + ``<key>.json``.

    Writes go to a temp file in the same directory, are fsynced and renamed into place, payload
    first, manifest last (the manifest is the commit record); the commit and LRU eviction run
    under an inter-process file lock, so several processes may write at once. ``max_bytes``
    caps the payload total: older entries (least recently read or written) are evicted, never
    the one being written; an entry larger than the whole cap raises :class:`StoreFullError`.
    """

    def __init__(self, root: str | os.PathLike[str], max_bytes: int | None = None):
        from filelock import FileLock

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = FileLock(str(self.root / ".lock"), timeout=120)

    def _paths(self, key: str) -> tuple[Path, Path]:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"bad store key {key!r}: expected 64 lowercase hex digits")
        d = self.root / key[:2]
        return d / f"{key}.bin", d / f"{key}.json"

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put(
        self,
        key: str,
        kind: str,
        payload: bytes,
        *,
        fingerprint: str,
        tokens: int,
        meta: dict[str, Any] | None = None,
    ) -> None:
        bin_path, man_path = self._paths(key)
        manifest = _manifest(key, kind, payload, fingerprint, tokens, meta)
        if self.max_bytes is not None and len(payload) > self.max_bytes:
            raise StoreFullError(
                f"entry of {len(payload)} bytes exceeds the store cap of {self.max_bytes} bytes"
            )
        # stage both files outside the lock (the slow part), commit under it
        staged = []
        for path, data in ((bin_path, payload), (man_path, json.dumps(manifest).encode())):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            staged.append((tmp, path))
        try:
            with self._lock:
                if self.max_bytes is not None:
                    self._evict_for(len(payload), keep=key)
                for tmp, path in staged:
                    os.replace(tmp, path)
        finally:
            for tmp, _ in staged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _entries(self) -> Iterator[tuple[str, Path, Path]]:
        for man in self.root.glob("??/*.json"):
            key = man.stem
            yield key, man.with_suffix(".bin"), man

    def _evict_for(self, incoming: int, keep: str) -> None:
        rows = []
        for key, b, m in self._entries():
            try:
                rows.append((m.stat().st_mtime, key, b.stat().st_size, b, m))
            except FileNotFoundError:
                continue
        total = sum(r[2] for r in rows if r[1] != keep)
        for _, key, size, b, m in sorted(rows):
            if total + incoming <= self.max_bytes:  # type: ignore[operator]
                break
            if key == keep:
                continue
            for p in (m, b):  # manifest first: a reader never sees a manifest without payload
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            total -= size

    def get(self, key: str) -> Entry | None:
        bin_path, man_path = self._paths(key)
        where = f"{man_path}"
        for attempt in range(2):
            try:
                raw = man_path.read_bytes()
                manifest = parse_manifest(raw, key, where)
                payload = bin_path.read_bytes()
            except FileNotFoundError:
                return None
            try:
                verify_payload(payload, manifest, str(bin_path))
            except CorruptKVError:
                if attempt == 0:  # a concurrent rewrite of the same key: read again, committed
                    with self._lock:
                        continue
                raise
            with contextlib.suppress(OSError):
                os.utime(man_path)  # LRU: a read refreshes the entry
            return Entry(key, manifest["kind"], payload, manifest)
        return None

    def delete(self, key: str) -> bool:
        bin_path, man_path = self._paths(key)
        with self._lock:
            found = man_path.exists()
            for p in (man_path, bin_path):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return found

    def keys(self) -> list[str]:
        return sorted(k for k, _, _ in self._entries())

    def total_bytes(self) -> int:
        total = 0
        for _, b, _ in self._entries():
            with contextlib.suppress(FileNotFoundError):
                total += b.stat().st_size
        return total


# --------------------------------------------------------------------------- redis


class RedisStore(KVStore):
    """Entries in a Redis server: ``<ns>:m:<key>`` (manifest) and ``<ns>:p:<key>`` (payload),
    written in one MULTI/EXEC transaction; a sorted set ``<ns>:lru`` orders them by last use
    for the optional ``max_bytes`` cap (the entry being written is never evicted)."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "apportion:kv",
        max_bytes: int | None = None,
        timeout: float = 5.0,
    ):
        import redis

        self.url = url
        self.ns = namespace
        self.max_bytes = max_bytes
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    @contextlib.contextmanager
    def _conn(self) -> Iterator[Any]:
        import redis

        try:
            yield self._redis
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailableError(
                f"cannot reach the Redis KV store at {self.url}: {exc}"
            ) from None

    def put(
        self,
        key: str,
        kind: str,
        payload: bytes,
        *,
        fingerprint: str,
        tokens: int,
        meta: dict[str, Any] | None = None,
    ) -> None:
        manifest = _manifest(key, kind, payload, fingerprint, tokens, meta)
        if self.max_bytes is not None and len(payload) > self.max_bytes:
            raise StoreFullError(
                f"entry of {len(payload)} bytes exceeds the store cap of {self.max_bytes} bytes"
            )
        with self._conn() as r:
            pipe = r.pipeline(transaction=True)
            pipe.set(f"{self.ns}:p:{key}", payload)
            pipe.set(f"{self.ns}:m:{key}", json.dumps(manifest).encode())
            pipe.zadd(f"{self.ns}:lru", {key: time.time()})
            pipe.hset(f"{self.ns}:size", key, len(payload))
            pipe.execute()
            if self.max_bytes is not None:
                self._evict(r, keep=key)

    def _evict(self, r: Any, keep: str) -> None:
        sizes = {k.decode(): int(v) for k, v in r.hgetall(f"{self.ns}:size").items()}
        total = sum(sizes.values())
        for raw in r.zrange(f"{self.ns}:lru", 0, -1):
            if total <= self.max_bytes:
                break
            k = raw.decode()
            if k == keep:
                continue
            self._delete(r, k)
            total -= sizes.get(k, 0)

    def _delete(self, r: Any, key: str) -> int:
        pipe = r.pipeline(transaction=True)
        pipe.delete(f"{self.ns}:m:{key}", f"{self.ns}:p:{key}")
        pipe.zrem(f"{self.ns}:lru", key)
        pipe.hdel(f"{self.ns}:size", key)
        return int(pipe.execute()[0])

    def get(self, key: str) -> Entry | None:
        with self._conn() as r:
            raw, payload = r.mget(f"{self.ns}:m:{key}", f"{self.ns}:p:{key}")
            if raw is None or payload is None:
                return None
            where = f"redis entry {key[:12]}"
            manifest = parse_manifest(raw, key, where)
            verify_payload(payload, manifest, where)
            r.zadd(f"{self.ns}:lru", {key: time.time()}, xx=True)
        return Entry(key, manifest["kind"], payload, manifest)

    def delete(self, key: str) -> bool:
        with self._conn() as r:
            return self._delete(r, key) > 0

    def keys(self) -> list[str]:
        with self._conn() as r:
            return sorted(k.decode() for k in r.zrange(f"{self.ns}:lru", 0, -1))

    def ping(self) -> None:
        with self._conn() as r:
            r.ping()


def open_store(spec: str, max_bytes: int | None = None) -> KVStore:
    """``redis://...`` -> :class:`RedisStore`; anything else is a directory for :class:`LocalStore`."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(spec, max_bytes=max_bytes)
    return LocalStore(spec, max_bytes=max_bytes)
