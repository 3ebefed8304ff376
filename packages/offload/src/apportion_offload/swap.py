"""Allocator ``nvme``: MemAscend-style direct-I/O swapper from host tensors to NVMe files.

Each swapped tensor is one file ``<key>.apswap`` in ``directory``::

    [header: magic, version, lengths, header checksum, JSON (dtype, shape, block checksums)]
    [data: the tensor's bytes, zero-padded to the alignment, in blocks of block_bytes]

Every offset and length is a multiple of ``alignment`` so that the data moves with
``O_DIRECT`` (no page cache, no double copy). A swap-out

1. creates a hidden temporary file and *preallocates* it (``posix_fallocate``), so that a full
   disk fails up front with :class:`~apportion_offload.errors.SwapSpaceError`;
2. writes the blocks asynchronously on a thread pool (hashing one block while another is in
   flight), from the tensor itself when it lives in an aligned pool buffer, else through
   pinned staging buffers;
3. writes the header last, ``fdatasync``s, and renames the file into place: a reader sees the
   whole swap or none of it, and a failure leaves nothing behind.

A swap-in checks the magic, version, alignment and header checksum before reading, then the
xxh3 checksum of every block; a foreign, truncated or unaligned file is refused with
:class:`~apportion_offload.errors.SwapFormatError`, a corrupted one with
:class:`~apportion_offload.errors.SwapChecksumError`. Nothing is ever unpickled.

Host buffers come from a :class:`~apportion_offload.pool.PinnedPool`, which is also this
allocator's ``allocate``/``free``: tensors allocated here swap out without a copy.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import xxhash
from apportion.base import Allocator, AllocatorStats
from apportion.config import ComponentConfig
from pydantic import Field, field_validator

from apportion_offload.errors import SwapChecksumError, SwapFormatError, SwapSpaceError
from apportion_offload.hostmem import round_up
from apportion_offload.pool import PinnedPool, PinnedPoolConfig

MAGIC = b"APSWAP\r\n"  # the \r\n catches text-mode mangling, as PNG's signature does
VERSION = 1
_PREFIX = struct.Struct("<8sIIIQ")  # magic, version, header_bytes, json_bytes, xxh3(json)
SUFFIX = ".apswap"
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class NvmeSwapConfig(ComponentConfig):
    directory: str | None = Field(
        None, description="where swap files go (default: a fresh temp dir)"
    )
    alignment: int = Field(
        4096, description="O_DIRECT alignment of offsets and lengths (power of two >= 512)"
    )
    block_bytes: int = Field(
        8 << 20, ge=1 << 16, le=1 << 30, description="I/O and checksum block size"
    )
    io_threads: int = Field(4, ge=1, le=64, description="blocks in flight at once")
    direct: Literal["auto", "on", "off"] = Field(
        "auto",
        description="O_DIRECT: auto falls back to buffered I/O where the file system refuses it",
    )
    fsync: bool = Field(True, description="fdatasync each swap file before it becomes visible")
    pool_cap_bytes: int = Field(1 << 30, ge=1 << 20, description="cap of the host buffer pool")
    pin: Literal["auto", "cuda", "mlock", "none"] = "auto"

    @field_validator("alignment")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v < 512 or v & (v - 1):
            raise ValueError(f"alignment must be a power of two >= 512, got {v}")
        return v

    @field_validator("block_bytes")
    @classmethod
    def _block(cls, v: int) -> int:
        if v % 4096:
            raise ValueError(f"block_bytes must be a multiple of 4096, got {v}")
        return v


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from(name: str) -> Any:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SwapFormatError(f"swap header names an unknown dtype {name!r}")
    return dtype


def _hexsum(view: Any) -> str:
    return f"{xxhash.xxh3_64_intdigest(view):016x}"


class SwapHeader:
    """The parsed, validated header of a swap file."""

    def __init__(self, meta: dict[str, Any], header_bytes: int):
        self.meta = meta
        self.header_bytes = header_bytes

    def __getattr__(self, name: str) -> Any:
        try:
            return self.meta[name]
        except KeyError:
            raise AttributeError(name) from None

    @staticmethod
    def encode(meta: dict[str, Any], alignment: int) -> bytes:
        body = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        size = round_up(_PREFIX.size + len(body), alignment)
        prefix = _PREFIX.pack(MAGIC, VERSION, size, len(body), xxhash.xxh3_64_intdigest(body))
        return (prefix + body).ljust(size, b"\0")

    @staticmethod
    def size_for(meta: dict[str, Any], alignment: int) -> int:
        return len(SwapHeader.encode(meta, alignment))


class NvmeSwapper(Allocator):
    name = "nvme"
    Config = NvmeSwapConfig

    def __init__(self, config: NvmeSwapConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if cfg.directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="apportion-swap-")
            self.directory = Path(self._tmp.name)
        else:
            self._tmp = None
            self.directory = Path(cfg.directory)
            self.directory.mkdir(parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise SwapFormatError(f"nvme: swap directory {self.directory} is not writable")
        self.pool = PinnedPool(
            PinnedPoolConfig(
                cap_bytes=cfg.pool_cap_bytes, alignment=min(cfg.alignment, 4096), pin=cfg.pin
            )
        )
        self._io = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="apportion-nvme-io")
        self._commit = ThreadPoolExecutor(2, thread_name_prefix="apportion-nvme-commit")
        self._lock = threading.Lock()
        self._seq = 0
        self.direct = self._probe_direct()
        self._counters = {
            "swaps_out": 0,
            "swaps_in": 0,
            "bytes_written": 0,
            "bytes_read": 0,
            "write_seconds": 0.0,
            "read_seconds": 0.0,
            "zero_copy_out": 0,
            "zero_copy_in": 0,
        }
        self._remove_stale_temporaries()

    # ------------------------------------------------------------------ setup
    def _probe_direct(self) -> bool:
        if self.config.direct == "off" or not hasattr(os, "O_DIRECT"):
            if self.config.direct == "on":
                raise SwapFormatError("nvme: direct='on' but this platform has no O_DIRECT")
            return False
        probe = self.directory / f".probe-{os.getpid()}-{threading.get_ident()}"
        try:
            fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
            os.close(fd)
            return True
        except OSError as exc:
            if self.config.direct == "on":
                raise SwapFormatError(
                    f"nvme: {self.directory} refuses O_DIRECT ({exc.strerror}); use direct='auto' or 'off'"
                ) from None
            self.direct_refused = exc.strerror
            return False
        finally:
            probe.unlink(missing_ok=True)

    def _remove_stale_temporaries(self) -> None:
        for path in self.directory.glob(f".*{SUFFIX}.tmp-*"):
            pid = path.name.rsplit("-", 2)[-2]
            if pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)

    def path(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(
                f"swap key {key!r} must be 1-200 characters of letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return self.directory / f"{key}{SUFFIX}"

    def _open(self, path: Path, flags: int) -> int:
        return os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o600)

    # ------------------------------------------------------------------ Allocator API
    def allocate(self, shape: Sequence[int], dtype: Any, *, access: str = "default") -> Any:
        """Host memory from the aligned pool: swaps of these tensors need no staging copy."""
        tensor = self.pool.allocate(shape, dtype, access=access)
        self._stats.allocations += 1
        return tensor

    def free(self, tensor: Any) -> None:
        self.pool.free(tensor)

    def stats(self) -> AllocatorStats:
        pool = self.pool.stats()
        s = self._stats
        s.current_bytes, s.peak_bytes = pool.current_bytes, pool.peak_bytes
        c = dict(self._counters)
        for way, sec in (("written", "write_seconds"), ("read", "read_seconds")):
            c[f"{way}_gb_per_s"] = c[f"bytes_{way}"] / c[sec] / 1e9 if c[sec] else None
        s.extra = {**c, "direct": self.direct, "disk_bytes": self.disk_bytes(), "pool": pool.extra}
        return s

    # ------------------------------------------------------------------ swap out
    def swap_out(self, key: str, tensor: Any) -> Future:
        """Write ``tensor`` to ``<key>.apswap`` asynchronously; the future's result is the path.

        Do not modify ``tensor`` until the future is done. An existing swap of the same key is
        replaced atomically.
        """
        import torch

        final = self.path(key)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"swap_out needs a torch.Tensor, got {type(tensor).__name__}")
        nbytes = tensor.numel() * tensor.element_size()
        cfg = self.config
        padded = round_up(max(nbytes, 1), cfg.alignment)
        n_blocks = -(-padded // cfg.block_bytes)
        meta = {
            "key": key,
            "dtype": _dtype_name(tensor.dtype),
            "shape": list(tensor.shape),
            "nbytes": nbytes,
            "alignment": cfg.alignment,
            "block_bytes": cfg.block_bytes,
            "checksum": "xxh3_64",
            "blocks": ["0" * 16] * n_blocks,
        }
        header_bytes = SwapHeader.size_for(meta, cfg.alignment)
        total = header_bytes + padded
        with self._lock:
            self._seq += 1
            tmp = self.directory / f".{key}{SUFFIX}.tmp-{os.getpid()}-{self._seq}"
        src, buf = self._source(tensor, nbytes, padded)  # before the file: bad input leaves nothing
        started = time.perf_counter()
        try:
            fd = self._open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except OSError as exc:
            if exc.errno in _SPACE_ERRNOS:
                raise self._space_error(exc, key, total) from None
            raise
        try:
            os.posix_fallocate(fd, 0, total)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            if exc.errno in _SPACE_ERRNOS:
                raise self._space_error(exc, key, total) from None
            raise

        blocks = [
            self._io.submit(self._write_block, fd, src, buf, i, header_bytes, nbytes, padded)
            for i in range(n_blocks)
        ]

        def commit() -> Path:
            try:
                meta["blocks"] = [f.result() for f in blocks]
                header = SwapHeader.encode(meta, cfg.alignment)
                hbuf = self.pool.acquire(len(header))
                try:
                    hbuf.view(len(header))[:] = header
                    _pwrite_all(fd, hbuf.view(len(header)), 0)
                finally:
                    self.pool.give_back(hbuf)
                if cfg.fsync:
                    os.fdatasync(fd)
                os.close(fd)
                os.rename(tmp, final)
                if cfg.fsync:
                    _fsync_dir(self.directory)
            except BaseException as exc:
                for f in blocks:
                    f.cancel()
                for f in blocks:
                    if not f.cancelled():
                        f.exception()  # wait: no block may still write into the unlinked file
                try:
                    os.close(fd)
                except OSError:
                    pass
                tmp.unlink(missing_ok=True)
                if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
                    raise self._space_error(exc, key, total) from None
                raise
            with self._lock:
                self._counters["swaps_out"] += 1
                self._counters["bytes_written"] += total
                self._counters["write_seconds"] += time.perf_counter() - started
                self._counters["zero_copy_out"] += buf is not None
            return final

        return self._commit.submit(commit)

    def _source(self, tensor: Any, nbytes: int, padded: int) -> tuple[Any, Any]:
        """(flat uint8 source, pool buffer when the tensor sits aligned in one, else None)."""
        import torch

        flat = (
            tensor.detach().reshape(-1).view(torch.uint8)
            if nbytes
            else torch.zeros(0, dtype=torch.uint8)
        )
        buf = self.pool.buffer_of(tensor)
        if (
            buf is not None
            and tensor.is_contiguous()
            and buf.address == tensor.data_ptr()
            and buf.nbytes >= padded
        ):
            if padded > nbytes:
                buf.tensor[nbytes:padded].zero_()
            return flat, buf
        if not tensor.is_contiguous():
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        return flat, None

    def _write_block(
        self, fd: int, src: Any, buf: Any, i: int, base: int, nbytes: int, padded: int
    ) -> str:
        bs = self.config.block_bytes
        start, stop = i * bs, min((i + 1) * bs, padded)
        if buf is not None:
            view = buf.view(stop)[start:]
            digest = _hexsum(view)
            _pwrite_all(fd, view, base + start)
            return digest
        stage = self.pool.acquire(stop - start)
        try:
            real = max(0, min(stop, nbytes) - start)
            if real:
                stage.tensor[:real].copy_(src[start : start + real])
            if real < stop - start:
                stage.tensor[real : stop - start].zero_()
            view = stage.view(stop - start)
            digest = _hexsum(view)
            _pwrite_all(fd, view, base + start)
            return digest
        finally:
            self.pool.give_back(stage)

    def _space_error(self, exc: OSError, key: str, total: int) -> SwapSpaceError:
        try:
            st = os.statvfs(self.directory)
            free = f"{st.f_bavail * st.f_frsize} bytes free"
        except OSError:
            free = "free space unknown"
        what = (
            "no space left on the device"
            if exc.errno != errno.EFBIG
            else "the file size limit was hit"
        )
        err = SwapSpaceError(
            f"nvme: {what} while swapping out {key!r} ({total} bytes) to {self.directory} "
            f"({free}); nothing was written. Free space, choose another directory, or offload less."
        )
        err.errno = exc.errno
        return err

    # ------------------------------------------------------------------ swap in
    def read_header(self, path: str | Path) -> SwapHeader:
        """Validate and parse a swap file's header (magic, version, checksum, alignment, size)."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"nvme: no swap file {path}") from None
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 1 << 16, 0)
        finally:
            os.close(fd)
        if len(head) < _PREFIX.size or head[:8] != MAGIC:
            raise SwapFormatError(f"nvme: {path} is not an apportion swap file (bad magic)")
        _, version, header_bytes, json_bytes, digest = _PREFIX.unpack_from(head)
        if version != VERSION:
            raise SwapFormatError(
                f"nvme: {path} has swap format version {version}; this reader knows {VERSION}"
            )
        if (
            header_bytes % 512
            or _PREFIX.size + json_bytes > header_bytes
            or header_bytes > len(head)
        ):
            raise SwapFormatError(
                f"nvme: {path} has a malformed or unaligned header ({header_bytes} bytes)"
            )
        body = head[_PREFIX.size : _PREFIX.size + json_bytes]
        if xxhash.xxh3_64_intdigest(body) != digest:
            raise SwapChecksumError(
                f"nvme: the header of {path} fails its checksum (the file is corrupted)"
            )
        meta = _checked_meta(path, body)
        align, bs, nbytes = meta["alignment"], meta["block_bytes"], meta["nbytes"]
        padded = round_up(max(nbytes, 1), align)
        if align < 512 or align & (align - 1) or header_bytes % align or bs % align:
            raise SwapFormatError(
                f"nvme: {path} is not aligned (alignment {align}, header {header_bytes})"
            )
        if size != header_bytes + padded or len(meta["blocks"]) != -(-padded // bs):
            raise SwapFormatError(
                f"nvme: {path} is {size} bytes but its header describes {header_bytes + padded}: "
                "truncated, extended or unaligned"
            )
        return SwapHeader(meta, header_bytes)

    def swap_in(self, key: str, out: Any = None) -> Future:
        """Read ``<key>.apswap`` back; the future's result is the tensor.

        Without ``out`` the tensor is allocated from this swapper's pool (give it back with
        :meth:`free`). ``out`` must match the swapped dtype and shape.
        """
        path = self.path(key)
        header = self.read_header(path)  # errors surface here, in the caller
        dtype, shape = _dtype_from(header.dtype), tuple(header.shape)
        if out is not None and (out.dtype != dtype or tuple(out.shape) != shape):
            raise ValueError(
                f"swap_in({key!r}): out is {tuple(out.shape)} {out.dtype} but the swap holds {shape} {dtype}"
            )
        dest = out if out is not None else self.allocate(shape, dtype)
        return self._commit.submit(self._read, path, header, dest, out is None)

    def _read(self, path: Path, header: SwapHeader, dest: Any, owned: bool) -> Any:
        import torch

        started = time.perf_counter()
        nbytes = header.nbytes
        padded = round_up(max(nbytes, 1), header.alignment)
        buf = self.pool.buffer_of(dest)
        zero_copy = buf is not None and buf.address == dest.data_ptr() and buf.nbytes >= padded
        flat = dest.reshape(-1).view(torch.uint8) if nbytes else None
        try:
            fd = self._open(path, os.O_RDONLY)
        except OSError:
            if owned:
                self.free(dest)
            raise
        try:
            futures = [
                self._io.submit(
                    self._read_block, fd, path, header, i, buf if zero_copy else None, flat, padded
                )
                for i in range(len(header.blocks))
            ]
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            if owned:
                self.free(dest)
            raise
        finally:
            os.close(fd)
        with self._lock:
            self._counters["swaps_in"] += 1
            self._counters["bytes_read"] += header.header_bytes + padded
            self._counters["read_seconds"] += time.perf_counter() - started
            self._counters["zero_copy_in"] += zero_copy
        return dest

    def _read_block(
        self, fd: int, path: Path, header: SwapHeader, i: int, buf: Any, flat: Any, padded: int
    ) -> None:
        bs, nbytes = header.block_bytes, header.nbytes
        start, stop = i * bs, min((i + 1) * bs, padded)
        stage = None
        if buf is not None:
            view = buf.view(stop)[start:]
        else:
            stage = self.pool.acquire(stop - start)
            view = stage.view(stop - start)
        try:
            _pread_all(fd, view, header.header_bytes + start)
            if _hexsum(view) != header.blocks[i]:
                raise SwapChecksumError(
                    f"nvme: block {i} (bytes {start}-{stop}) of {path} fails its checksum: the swap file is corrupted"
                )
            real = max(0, min(stop, nbytes) - start)
            if stage is not None and real:
                flat[start : start + real].copy_(stage.tensor[:real])
        finally:
            if stage is not None:
                self.pool.give_back(stage)

    # ------------------------------------------------------------------ housekeeping
    def keys(self) -> list[str]:
        return sorted(
            p.name[: -len(SUFFIX)]
            for p in self.directory.glob(f"*{SUFFIX}")
            if not p.name.startswith(".")
        )

    def remove(self, key: str) -> None:
        self.path(key).unlink()

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob(f"*{SUFFIX}"))

    def close(self) -> None:
        """Wait for pending I/O, release the pool; a temporary directory is deleted."""
        self._commit.shutdown(wait=True)
        self._io.shutdown(wait=True)
        self.pool.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> NvmeSwapper:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_META_TYPES = {
    "key": str,
    "dtype": str,
    "shape": list,
    "nbytes": int,
    "alignment": int,
    "block_bytes": int,
    "checksum": str,
    "blocks": list,
}
_HEX16 = re.compile(r"[0-9a-f]{16}")


def _checked_meta(path: Path, body: bytes) -> dict[str, Any]:
    """The header's JSON, with every field this reader relies on present and consistent
    (a file whose header checksum holds can still come from a foreign or buggy writer)."""
    import torch

    def bad(what: str) -> SwapFormatError:
        return SwapFormatError(f"nvme: {path} has a malformed header: {what}")

    try:
        meta = json.loads(body)
    except ValueError:
        raise bad("its metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise bad("its metadata is not a JSON object")
    for name, kind in _META_TYPES.items():
        value = meta.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise bad(f"field {name!r} is {value!r}, not {kind.__name__}")
    if meta["checksum"] != "xxh3_64":
        raise bad(f"unknown checksum {meta['checksum']!r}")
    if not all(isinstance(b, str) and _HEX16.fullmatch(b) for b in meta["blocks"]):
        raise bad("block checksums are not 16 hex digits")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in meta["shape"]):
        raise bad(f"shape {meta['shape']!r} is not a list of non-negative integers")
    if meta["block_bytes"] <= 0 or meta["alignment"] <= 0:
        raise bad("block_bytes and alignment must be positive")
    dtype = _dtype_from(meta["dtype"])
    numel = 1
    for d in meta["shape"]:
        numel *= d
    if numel * torch.empty((), dtype=dtype).element_size() != meta["nbytes"]:
        raise bad(
            f"nbytes {meta['nbytes']} does not match shape {meta['shape']} of {meta['dtype']}"
        )
    return meta


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view, offset = view[n:], offset + n


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise SwapFormatError("nvme: the swap file ended early (truncated)")
        view, offset = view[n:], offset + n


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
