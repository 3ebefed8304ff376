"""The KV store: a context's KV (or its CacheGen bitstream) keyed by model, tokens and variant.

It implements the core's :class:`apportion.host.store.KVStore` protocol (``save_kv`` and
``load_kv``) and is what :func:`apportion.host.store.open_store` returns for a directory or a
``redis://`` URL once apportion-kvcache is installed.

Keys are :func:`apportion.host.store.prefix_key` ``(fingerprint, token ids, variant)``: the same
context on the same model under the same settings finds its KV again, in this process or
another one; ``variant`` names whatever else changes the stored bytes (a codec and its
settings), so other settings are another entry, never a wrong hit. Each entry is a payload and
a JSON manifest::

    {"format": "apportion-kvstore", "version": 2, "kind": "kv" | "cachegen",
     "model": fingerprint, "tokens": n, "nbytes": n, "sha256": hex, "created": t,
     "variant": str, "meta": {...}, "payload": "<key>.<unique>.bin" (directory stores)}

A ``kv`` payload is a safetensors blob (``k.<layer>``/``v.<layer>``, its metadata naming the
format ``apportion-kv`` and its version), a ``cachegen`` payload is a CacheGen bitstream (which
carries its own version); nothing is ever unpickled. Every read checks the manifest, the size
and the digest. A damaged entry (a torn or truncated file, a flipped byte, a manifest of an
unknown version, a payload that does not decode) is never returned and never fails the caller:
it is set aside (quarantined in a directory store, deleted in Redis), logged with its reason
on the ``apportion_kvcache.store`` logger, counted in ``store.stats["corrupt"]``, and reads as
a miss, so the context is recomputed and stored again. A KV that does not fit the model it is
loaded into raises :class:`KVMismatchError`.

Backends: :class:`LocalStore` (a directory; atomic writes, an LRU size cap, safe with
concurrent writers in several processes) and :class:`RedisStore` (a ``redis-server`` shared by
processes and hosts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apportion.errors import ConfigError
from apportion.host.io import TEMP_MARK, atomic_write, is_disk_full, loads_json, reclaim_temps
from apportion.host.store import prefix_key

from apportion_kvcache.errors import (
    CorruptKVError,
    KVMismatchError,
    StoreFullError,
    StoreUnavailableError,
)

__all__ = [
    "Entry",
    "Store",
    "LocalStore",
    "RedisStore",
    "StoreFullError",
    "open_store",
    "parse_manifest",
    "prefix_key",
    "verify_payload",
]

log = logging.getLogger(__name__)

FORMAT = "apportion-kvstore"
VERSION = 2  # 2: a directory store's payload has a unique name, given by the manifest
READABLE_VERSIONS = (1, 2)  # 1: the payload is <key>.bin
KINDS = ("kv", "cachegen")
MAX_MANIFEST_BYTES = 1 << 20
MAX_MANIFEST_DEPTH = 16
#: the format of a ``kv`` payload (safetensors metadata); payloads of 0.1.0 carry none
KV_FORMAT = "apportion-kv"
KV_VERSION = "1"
#: where a directory store sets its damaged entries aside, and how many files it keeps there
QUARANTINE = "quarantine"
QUARANTINE_KEEP = 32

_KEY = re.compile(r"^[0-9a-f]{64}$")
_PAYLOAD = re.compile(r"^([0-9a-f]{64})(\.[0-9a-f]{16})?\.bin$")
_SHARD = re.compile(r"^[0-9a-f]{2}$")


@dataclass
class Entry:
    key: str
    kind: str
    payload: bytes
    manifest: dict[str, Any]


def _manifest(
    key: str,
    kind: str,
    payload: bytes,
    fingerprint: str,
    tokens: int,
    meta: dict[str, Any] | None,
    variant: str = "",
    payload_name: str | None = None,
) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"unknown entry kind {kind!r}; expected one of {KINDS}")
    m = {
        "format": FORMAT,
        "version": VERSION,
        "key": key,
        "kind": kind,
        "model": fingerprint,
        "tokens": int(tokens),
        "nbytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "created": time.time(),
        "variant": variant,
        "meta": meta or {},
    }
    if payload_name is not None:
        m["payload"] = payload_name
    return m


def parse_manifest(raw: bytes, key: str, where: str) -> dict[str, Any]:
    """Validate a manifest's bytes (size, nesting, JSON, format, version, fields)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CorruptKVError(f"{where}: manifest of {len(raw)} bytes is too large")
    m = loads_json(
        raw,
        what=f"{where}: manifest",
        error=CorruptKVError,
        max_bytes=MAX_MANIFEST_BYTES,
        max_depth=MAX_MANIFEST_DEPTH,
    )
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CorruptKVError(f"{where}: not an apportion KV store manifest")
    version = m.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CorruptKVError(
            f"{where}: store format version {version!r} is not supported "
            f"(this build reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    payload = m.get("payload")
    ok = (
        m.get("key") == key
        and m.get("kind") in KINDS
        and isinstance(m.get("model"), str)
        and _is_int(m.get("nbytes"))
        and m["nbytes"] >= 0
        and isinstance(m.get("sha256"), str)
        and len(m["sha256"]) == 64
        and _is_int(m.get("tokens"))
        and m["tokens"] >= 0
        and isinstance(m.get("variant", ""), str)
        and isinstance(m.get("meta", {}), dict)
        and (
            payload is None
            or (
                isinstance(payload, str)
                and (match := _PAYLOAD.match(payload)) is not None
                and match.group(1) == key
            )
        )
    )
    if not ok:
        raise CorruptKVError(f"{where}: manifest fields are missing or wrong")
    return m


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def verify_payload(payload: bytes, manifest: dict[str, Any], where: str) -> None:
    if len(payload) != manifest["nbytes"]:
        raise CorruptKVError(
            f"{where}: payload has {len(payload)} bytes, manifest says {manifest['nbytes']}"
        )
    if hashlib.sha256(payload).hexdigest() != manifest["sha256"]:
        raise CorruptKVError(f"{where}: payload checksum mismatch")


class Store:
    """The store interface: raw entries by key (:meth:`put`, :meth:`get`), and the core's
    :class:`apportion.host.store.KVStore` protocol on top (:meth:`save_kv`, :meth:`load_kv`),
    plus CacheGen bitstreams (:meth:`save_bitstream`).

    ``stats`` counts, in this process: ``corrupt`` (damaged entries set aside and read as
    misses), ``reclaimed_files`` and ``reclaimed_bytes`` (what dead writers left, removed)."""

    stats: dict[str, int]

    def _new_stats(self) -> None:
        self.stats = {"corrupt": 0, "reclaimed_files": 0, "reclaimed_bytes": 0}

    def put(
        self,
        key: str,
        kind: str,
        payload: bytes,
        *,
        fingerprint: str,
        tokens: int,
        meta: dict[str, Any] | None = None,
        variant: str = "",
    ) -> None:
        raise NotImplementedError

    def get(self, key: str) -> Entry | None:
        """The entry, whole and verified, or None (absent, or damaged: then set aside)."""
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        raise NotImplementedError

    def keys(self) -> list[str]:
        raise NotImplementedError

    def discard(self, entry: Entry, reason: str) -> None:
        """Set aside ``entry`` (verified, yet its content is unusable: ``reason``), unless it
        was replaced meanwhile; it then reads as a miss."""
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def _report(self, key: str, reason: str, action: str) -> None:
        self.stats["corrupt"] += 1
        log.warning(
            "KV store %s: entry %s is damaged and was %s; it reads as a miss (%s)",
            self._where(),
            key[:12],
            action,
            reason,
        )

    def _where(self) -> str:
        return type(self).__name__

    # ------------------------------------------------------------------ KV helpers
    def save_kv(
        self,
        fingerprint: str,
        token_ids: Sequence[int],
        kv: Any,
        meta: dict[str, Any] | None = None,
        *,
        variant: str = "",
    ) -> str:
        """Store a context's KV (per-layer (keys, values) or a transformers cache) losslessly
        under ``prefix_key(fingerprint, token_ids, variant)``; returns the key."""
        import torch
        from safetensors.torch import save

        from apportion_kvcache.kv import kv_from_cache

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
        key = prefix_key(fingerprint, token_ids, variant)
        self.put(
            key,
            "kv",
            save(tensors, metadata={"format": KV_FORMAT, "version": KV_VERSION}),
            fingerprint=fingerprint,
            tokens=len(token_ids),
            meta=meta,
            variant=variant,
        )
        return key

    def save_bitstream(
        self,
        fingerprint: str,
        token_ids: Sequence[int],
        bitstream: bytes,
        meta: dict[str, Any] | None = None,
        *,
        variant: str = "",
    ) -> str:
        """Store a CacheGen bitstream (validated before it is written); returns the key."""
        from apportion_kvcache.cachegen.codec import CacheGenCodec

        header = CacheGenCodec().read_header(bitstream)
        if header.fingerprint and header.fingerprint != fingerprint:
            raise KVMismatchError("the bitstream was encoded for another model than the key names")
        key = prefix_key(fingerprint, token_ids, variant)
        self.put(
            key,
            "cachegen",
            bitstream,
            fingerprint=fingerprint,
            tokens=len(token_ids),
            meta=meta,
            variant=variant,
        )
        return key

    def load_kv(
        self,
        fingerprint: str,
        token_ids: Sequence[int],
        *,
        model: Any = None,
        variant: str = "",
        codec: Any = None,
    ) -> list[tuple[Any, Any]] | None:
        """The stored KV of this context (decoding a bitstream, with ``codec`` when given, if
        that is what is stored), or None: absent, or damaged (set aside, see the module).

        With ``model`` the shapes are checked against its config and tensors moved to its
        device and dtype."""
        from apportion_kvcache.cachegen.codec import CacheGenCodec
        from apportion_kvcache.kv import check_kv_shape

        key = prefix_key(fingerprint, token_ids, variant)
        entry = self.get(key)
        if entry is None:
            return None
        where = f"store entry {key[:12]}"
        if entry.manifest["model"] != fingerprint:
            raise KVMismatchError(f"{where} belongs to model {entry.manifest['model'][:16]}")
        try:
            if entry.kind == "cachegen":
                kv = (codec or CacheGenCodec()).decode(entry.payload, fingerprint=fingerprint)
            else:
                kv = _kv_from_safetensors(entry.payload, where)
        except CorruptKVError as exc:  # verified bytes that do not decode: a foreign writer
            self.discard(entry, str(exc))
            return None
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

    def load_cache(
        self, fingerprint: str, token_ids: Sequence[int], model: Any, *, variant: str = ""
    ) -> Any:
        """Like :meth:`load_kv`, as a transformers ``DynamicCache`` for ``model`` (or None)."""
        from apportion_kvcache.kv import cache_from_kv

        kv = self.load_kv(fingerprint, token_ids, model=model, variant=variant)
        return None if kv is None else cache_from_kv(kv, model.config)


def kv_payload_metadata(payload: bytes, where: str) -> Any:
    """The ``__metadata__`` value of a ``kv`` payload's safetensors header (None if it has
    none), read with bounded parsing; a header that is not JSON raises
    :class:`CorruptKVError`."""
    if len(payload) < 8:
        raise CorruptKVError(f"{where}: KV payload of {len(payload)} bytes is truncated")
    (hlen,) = struct.unpack_from("<Q", payload, 0)
    if hlen > min(len(payload) - 8, 1 << 24):
        raise CorruptKVError(f"{where}: KV payload header length {hlen} is out of range")
    header = loads_json(
        payload[8 : 8 + hlen], what=f"{where}: KV payload header", error=CorruptKVError
    )
    return header.get("__metadata__") if isinstance(header, dict) else None


def _kv_from_safetensors(payload: bytes, where: str) -> list[tuple[Any, Any]]:
    from safetensors.torch import load

    fmt = kv_payload_metadata(payload, where)
    if fmt is not None and (
        not isinstance(fmt, dict)
        or fmt.get("format") != KV_FORMAT
        or fmt.get("version") != KV_VERSION
    ):
        raise CorruptKVError(
            f"{where}: KV payload of format {fmt!r} is not supported "
            f"(this build reads {KV_FORMAT} version {KV_VERSION})"
        )
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


class LocalStore(Store):
    """A directory of entries: ``<root>/<key[:2]>/<key>.json`` (the manifest) naming its
    payload ``<key>.<unique>.bin`` beside it.

    Each file is written atomically (:func:`apportion.host.io.atomic_write`: a temporary file
    beside it, fsynced, renamed into place). An overwrite writes the new payload under a new
    name, then commits the manifest (the commit record), then removes the old payload: a kill
    at any point leaves the old entry or the new one, whole, never a manifest naming bytes it
    does not describe. Writes, eviction and reclaiming run under an inter-process file lock, so
    several processes may write at once.

    Opening a store (under the lock) removes the temporary files of writers that died and the
    payloads no manifest names (``stats["reclaimed_files"]``/``["reclaimed_bytes"]``), and sets
    aside manifests that are damaged or lack their payload. :meth:`total_bytes` counts every
    byte the store holds (payloads, manifests, quarantined and temporary files); ``max_bytes``
    caps it: quarantined files first, then the least recently read or written entries are
    evicted, never the one being written; an entry larger than the whole cap, or a full disk,
    raises :class:`StoreFullError` (naming the file and the bytes it needed) and leaves no
    partial file behind.
    """

    def __init__(self, root: str | os.PathLike[str], max_bytes: int | None = None):
        from filelock import FileLock

        self.root = Path(root)
        self._mkdir(self.root)
        self.max_bytes = max_bytes
        self._new_stats()
        self._lock = FileLock(str(self.root / ".lock"), timeout=120)
        with self._locked():
            self._reclaim()

    def _where(self) -> str:
        return str(self.root)

    def _paths(self, key: str) -> tuple[Path, Path]:
        """(shard folder, manifest path) of ``key``."""
        if not _KEY.match(key):
            raise ValueError(f"bad store key {key!r}: expected 64 lowercase hex digits")
        d = self.root / key[:2]
        return d, d / f"{key}.json"

    def _full(self, path: Path) -> Callable[[OSError, int], StoreFullError]:
        def error(exc: OSError, nbytes: int) -> StoreFullError:
            return StoreFullError(
                f"no room for {nbytes} bytes at {path} (KV store {self.root}): "
                f"{exc.strerror or exc}",
                path=str(path),
                needed=nbytes,
            )

        return error

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store's inter-process lock; no room to create its file (the first time) is
        a :class:`StoreFullError`."""
        try:
            self._lock.acquire()
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            lock = self.root / ".lock"
            raise StoreFullError(
                f"no room to create the lock file {lock} of the KV store {self.root}: "
                f"{exc.strerror or exc}",
                path=str(lock),
                needed=0,
            ) from exc
        try:
            yield
        finally:
            self._lock.release()

    def _mkdir(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if is_disk_full(exc):
                raise StoreFullError(
                    f"no room to create {folder} for a KV store: {exc.strerror or exc}",
                    path=str(folder),
                    needed=0,
                ) from exc
            raise

    # ------------------------------------------------------------------ writing
    def put(
        self,
        key: str,
        kind: str,
        payload: bytes,
        *,
        fingerprint: str,
        tokens: int,
        meta: dict[str, Any] | None = None,
        variant: str = "",
    ) -> None:
        d, man_path = self._paths(key)
        name = f"{key}.{secrets.token_hex(8)}.bin"
        manifest = json.dumps(
            _manifest(key, kind, payload, fingerprint, tokens, meta, variant, payload_name=name)
        ).encode()
        size = len(payload) + len(manifest)
        if self.max_bytes is not None and size > self.max_bytes:
            raise StoreFullError(
                f"entry of {size} bytes exceeds the cap of {self.max_bytes} bytes of the KV "
                f"store at {self.root}",
                path=str(self.root),
                needed=size,
            )
        with self._locked():
            self._mkdir(d)
            if self.max_bytes is not None:
                self._evict_for(size, keep=key)
            new = d / name
            atomic_write(new, payload, on_full=self._full(new))
            try:
                atomic_write(man_path, manifest, on_full=self._full(man_path))
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    new.unlink()  # the old manifest still names the old payload
                raise
            for old in d.glob(f"{key}*.bin"):  # committed: the old payload is garbage
                if old.name != name:
                    with contextlib.suppress(FileNotFoundError):
                        old.unlink()

    def _evict_for(self, incoming: int, keep: str) -> None:
        """Under the lock: make room for ``incoming`` bytes within ``max_bytes``."""
        cap = self.max_bytes
        assert cap is not None
        keep_dir, keep_man = self._paths(keep)
        keep_files = {keep_man, *keep_dir.glob(f"{keep}*.bin")}
        total = sum(_size(p) for p in self._owned_files() if p not in keep_files)
        if total + incoming <= cap:
            return
        for p in sorted(self._quarantined()):  # worthless bytes go first
            total -= _size(p)
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            if total + incoming <= cap:
                return
        rows = []
        for key, man in self._entries():
            with contextlib.suppress(FileNotFoundError):
                rows.append((man.stat().st_mtime, key, man))
        for _, key, man in sorted(rows):
            if total + incoming <= cap:
                break
            if key == keep:
                continue
            # manifest first: a reader never finds a manifest whose payload is gone for good
            for p in (man, *man.parent.glob(f"{key}*.bin")):
                total -= _size(p)
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    # ------------------------------------------------------------------ reading
    def _read(self, key: str) -> tuple[Entry | None, str | None]:
        """(entry, None), (None, None) when absent, or (None, why it is damaged)."""
        d, man_path = self._paths(key)
        try:
            raw = man_path.read_bytes()
        except FileNotFoundError:
            return None, None
        try:
            manifest = parse_manifest(raw, key, str(man_path))
        except CorruptKVError as exc:
            return None, str(exc)
        pay_path = d / _payload_name(key, manifest)
        try:
            payload = pay_path.read_bytes()
        except FileNotFoundError:
            return None, f"{man_path}: its payload {pay_path.name} is missing"
        try:
            verify_payload(payload, manifest, str(pay_path))
        except CorruptKVError as exc:
            return None, str(exc)
        return Entry(key, manifest["kind"], payload, manifest), None

    def get(self, key: str) -> Entry | None:
        entry, problem = self._read(key)
        if problem is not None:
            # a concurrent overwrite may have moved the files under us: judge under the lock
            with self._locked():
                entry, problem = self._read(key)
                if problem is not None:
                    self._quarantine(key, problem)
                    return None
        if entry is not None:
            with contextlib.suppress(OSError):
                os.utime(self._paths(key)[1])  # LRU: a read refreshes the entry
        return entry

    def discard(self, entry: Entry, reason: str) -> None:
        with self._locked():
            current, problem = self._read(entry.key)
            if problem is not None or (
                current is not None and current.manifest["sha256"] == entry.manifest["sha256"]
            ):
                self._quarantine(entry.key, reason)

    def _quarantine(self, key: str, reason: str) -> None:
        """Under the lock: move the files of ``key`` aside, count and log it."""
        d, man_path = self._paths(key)
        q = self.root / QUARANTINE
        stamp = time.time_ns()
        moved = False
        for p in (man_path, *d.glob(f"{key}*.bin")):
            try:
                q.mkdir(exist_ok=True)
                os.replace(p, q / f"{stamp}-{p.name}")
                moved = True
            except FileNotFoundError:
                continue
            except OSError:  # cannot set it aside: remove it
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                moved = True
        if moved:
            self._report(key, reason, f"quarantined in {q}")
        self._trim_quarantine()

    def _quarantined(self) -> list[Path]:
        q = self.root / QUARANTINE
        return [p for p in q.iterdir() if p.is_file()] if q.is_dir() else []

    def _trim_quarantine(self) -> None:
        for p in sorted(self._quarantined(), key=lambda p: p.name)[:-QUARANTINE_KEEP]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def _reclaim(self) -> None:
        """Under the lock, on open: what dead writers left, and manifests without payload."""
        files, freed = reclaim_temps(self.root, recursive=True)
        for d in self._shards():
            named: set[str] = set()
            for key, man in self._entries(d):
                try:
                    manifest = parse_manifest(man.read_bytes(), key, str(man))
                except FileNotFoundError:
                    continue
                except CorruptKVError as exc:
                    self._quarantine(key, str(exc))
                    continue
                name = _payload_name(key, manifest)
                if not (d / name).is_file():
                    self._quarantine(key, f"{man}: its payload {name} is missing")
                    continue
                named.add(name)
            for p in d.glob("*.bin"):
                if _PAYLOAD.match(p.name) and p.name not in named:  # an orphan
                    size = _size(p)
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                        files, freed = files + 1, freed + size
        self._trim_quarantine()
        self.stats["reclaimed_files"] += files
        self.stats["reclaimed_bytes"] += freed
        if files:
            log.info(
                "KV store %s: removed %d files (%d bytes) left by writers that died",
                self.root,
                files,
                freed,
            )

    # ------------------------------------------------------------------ listing
    def _shards(self) -> list[Path]:
        return [d for d in self.root.iterdir() if _SHARD.match(d.name) and d.is_dir()]

    def _entries(self, shard: Path | None = None) -> Iterator[tuple[str, Path]]:
        for d in [shard] if shard is not None else self._shards():
            for man in d.glob("*.json"):
                if _KEY.match(man.stem) and man.stem[:2] == d.name:
                    yield man.stem, man

    def _owned_files(self) -> Iterator[Path]:
        """Every file the store holds, its lock aside."""
        for d in self._shards():
            yield from (p for p in d.iterdir() if p.is_file())
        yield from self._quarantined()
        yield from (p for p in self.root.glob(f".*{TEMP_MARK}*") if p.is_file())

    def delete(self, key: str) -> bool:
        d, man_path = self._paths(key)
        with self._locked():
            found = man_path.exists()
            for p in (man_path, *d.glob(f"{key}*.bin")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return found

    def keys(self) -> list[str]:
        return sorted(k for k, _ in self._entries())

    def total_bytes(self) -> int:
        """Every byte the store holds on disk: payloads, manifests, quarantined and temporary
        files (what ``max_bytes`` caps)."""
        return sum(_size(p) for p in self._owned_files())


def _payload_name(key: str, manifest: dict[str, Any]) -> str:
    name = manifest.get("payload")
    if manifest["version"] == 1 or name is None:
        return f"{key}.bin"
    return str(name)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------- redis


class RedisStore(Store):
    """Entries in a Redis server: ``<ns>:m:<key>`` (manifest) and ``<ns>:p:<key>`` (payload),
    written in one MULTI/EXEC transaction; a sorted set ``<ns>:lru`` orders them by last use
    for the optional ``max_bytes`` cap (the entry being written is never evicted). A damaged
    entry is deleted and reads as a miss; a server out of memory (``maxmemory`` with
    ``noeviction``) raises :class:`StoreFullError`; a malformed URL is a ``ConfigError``."""

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
        self._new_stats()
        try:
            self._redis = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"the Redis KV store URL {url!r} is malformed: {exc}", [("store", url)]
            ) from None

    def _where(self) -> str:
        return self.url

    @contextlib.contextmanager
    def _conn(self, needed: int | None = None) -> Iterator[Any]:
        import redis

        try:
            yield self._redis
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailableError(
                f"cannot reach the Redis KV store at {self.url}: {exc}"
            ) from None
        except redis.ResponseError as exc:
            if not _out_of_memory(exc):
                raise
            raise StoreFullError(
                f"the Redis KV store at {self.url} is out of memory (maxmemory)"
                + (f" for an entry of {needed} bytes" if needed is not None else "")
                + f": {exc}",
                path=self.url,
                needed=needed,
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
        variant: str = "",
    ) -> None:
        manifest = json.dumps(
            _manifest(key, kind, payload, fingerprint, tokens, meta, variant)
        ).encode()
        size = len(payload) + len(manifest)
        if self.max_bytes is not None and size > self.max_bytes:
            raise StoreFullError(
                f"entry of {size} bytes exceeds the cap of {self.max_bytes} bytes of the KV "
                f"store at {self.url}",
                path=self.url,
                needed=size,
            )
        with self._conn(needed=size) as r:
            pipe = r.pipeline(transaction=True)
            pipe.set(f"{self.ns}:p:{key}", payload)
            pipe.set(f"{self.ns}:m:{key}", manifest)
            pipe.zadd(f"{self.ns}:lru", {key: time.time()})
            pipe.hset(f"{self.ns}:size", key, size)
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
        import redis

        with self._conn() as r:
            raw, payload = r.mget(f"{self.ns}:m:{key}", f"{self.ns}:p:{key}")
            if raw is None and payload is None:
                return None
            where = f"redis entry {key[:12]} at {self.url}"
            try:
                if raw is None or payload is None:
                    raise CorruptKVError(f"{where}: manifest or payload missing")
                manifest = parse_manifest(raw, key, where)
                verify_payload(payload, manifest, where)
            except CorruptKVError as exc:
                self._drop_if_unchanged(r, key, raw, payload, str(exc))
                return None
            with contextlib.suppress(redis.ResponseError):  # a full server still reads
                r.zadd(f"{self.ns}:lru", {key: time.time()}, xx=True)
        return Entry(key, manifest["kind"], payload, manifest)

    def _drop_if_unchanged(
        self, r: Any, key: str, raw: bytes | None, payload: bytes | None, reason: str
    ) -> None:
        """Delete the entry if it still holds what was judged damaged (a writer may have
        replaced it meanwhile)."""
        import redis

        mkey, pkey = f"{self.ns}:m:{key}", f"{self.ns}:p:{key}"
        with r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(mkey, pkey)
                if pipe.mget(mkey, pkey) != [raw, payload]:
                    pipe.unwatch()
                    return
                pipe.multi()
                pipe.delete(mkey, pkey)
                pipe.zrem(f"{self.ns}:lru", key)
                pipe.hdel(f"{self.ns}:size", key)
                pipe.execute()
            except redis.WatchError:
                return
        self._report(key, reason, "deleted")

    def discard(self, entry: Entry, reason: str) -> None:
        with self._conn() as r:
            raw, payload = r.mget(f"{self.ns}:m:{entry.key}", f"{self.ns}:p:{entry.key}")
            if payload == entry.payload:
                self._drop_if_unchanged(r, entry.key, raw, payload, reason)

    def delete(self, key: str) -> bool:
        with self._conn() as r:
            return self._delete(r, key) > 0

    def keys(self) -> list[str]:
        with self._conn() as r:
            return sorted(k.decode() for k in r.zrange(f"{self.ns}:lru", 0, -1))

    def ping(self) -> None:
        with self._conn() as r:
            r.ping()


def _out_of_memory(exc: Exception) -> bool:
    import redis

    text = str(exc)
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        text.startswith("OOM") or "maxmemory" in text
    )


def open_store(url: str, max_bytes: int | None = None) -> Store:
    """``redis://...`` (or ``rediss://``, ``unix://``) -> :class:`RedisStore`; anything else is
    a directory for :class:`LocalStore`. ``max_bytes`` caps what the store holds (None: no
    cap). What the ``apportion_kv_store`` hook answers for
    :func:`apportion.host.store.open_store`."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url, max_bytes=max_bytes)
    return LocalStore(url, max_bytes=max_bytes)
