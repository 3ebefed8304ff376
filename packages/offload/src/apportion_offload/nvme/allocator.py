"""The ``nvme`` allocator: :class:`NvmeSwapper`, MemAscend-style direct-I/O swapping of host
tensors to NVMe files (the file layout is :mod:`apportion_offload.nvme.fileformat`).

A swap-out

1. creates a hidden temporary file beside the target (:func:`apportion.host.io.temp_path`)
   and *preallocates* it (``posix_fallocate``), so that a full disk fails up front with
   :class:`~apportion_offload.errors.SwapSpaceError`;
2. writes the blocks asynchronously on a thread pool with ``O_DIRECT`` (hashing one block
   while another is in flight), from the tensor itself when it lives in an aligned pool
   buffer, else through pinned staging buffers;
3. writes the header last, ``fdatasync``s, and renames the file into place: a reader sees the
   whole swap or none of it, and a failure leaves nothing behind.

A swap-in opens the file once and reads both the header and the data through that
descriptor, so a swap-in racing a swap-out of the same key reads the old version or the new
one, whole. It validates the header before reading (:func:`~.fileformat.read_header`), then
the xxh3 checksum of every block; a corrupted block is a
:class:`~apportion_offload.errors.SwapChecksumError`.

Opening a directory reclaims what nothing can use any more, under an exclusive ``flock`` of
the directory: temporary files of writers that are gone (a kill -9;
:func:`apportion.host.io.reclaim_temps`) and *orphans*, ``.apswap`` files older than the
swapper whose header is invalid (truncated, foreign, corrupted). What was reclaimed is in
:attr:`NvmeSwapper.reclaimed` and ``stats().extra["reclaimed"]``. :meth:`NvmeSwapper.total_bytes`
counts every file the swapper owns on disk: swaps and temporary files, its own in flight too.

Host buffers come from a :class:`~apportion_offload.pool.PinnedPool`, which is also this
allocator's ``allocate``/``free``: tensors allocated here swap out without a copy.

Options (:class:`NvmeSwapConfig`): ``directory`` (default: a fresh temporary directory,
deleted on :meth:`NvmeSwapper.close`), ``alignment``, ``block_bytes``, ``io_threads``,
``direct`` (``auto`` falls back to buffered I/O where the file system refuses ``O_DIRECT``),
``fsync``, ``pool_cap_bytes`` and ``pin`` (of the buffer pool).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from apportion.base import Allocator, AllocatorStats
from apportion.host.io import TEMP_MARK, fsync_dir, is_disk_full, reclaim_temps, temp_path
from pydantic import Field, field_validator

from apportion_offload.errors import SwapChecksumError, SwapFormatError, SwapSpaceError
from apportion_offload.hostmem import round_up
from apportion_offload.kv.options import KVOffloadConfig, OffloadsKV
from apportion_offload.nvme.fileformat import (
    BLOCK_ENTRY,
    CHECKSUM,
    MAX_HEADER_BYTES,
    PREFIX,
    SUFFIX,
    SwapHeader,
    dtype_from,
    dtype_name,
    hexsum,
    open_swap,
    pread_all,
    pwrite_all,
    read_header,
)
from apportion_offload.pool import PinnedPool, PinnedPoolConfig

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_TEMP = f"{SUFFIX}{TEMP_MARK}"  # in the name of every temporary file of a swapper
log = logging.getLogger(__name__)


def _no_space(exc: OSError) -> bool:
    """A full file system (ENOSPC, EDQUOT) or the file size limit (EFBIG)."""
    return is_disk_full(exc) or exc.errno == errno.EFBIG


class _DirLock:
    """An exclusive ``flock`` of a directory, for reclaiming in it (best effort where the file
    system has no locks)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.fd: int | None = None

    def __enter__(self) -> _DirLock:
        try:
            self.fd = os.open(self.directory, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


class NvmeSwapConfig(KVOffloadConfig):
    directory: str | None = Field(
        None, description="where swap files go (default: a fresh temp dir)"
    )
    alignment: int = Field(
        4096, description="O_DIRECT alignment of offsets and lengths (power of two >= 512)"
    )
    block_bytes: int = Field(
        8 << 20, ge=4096, le=1 << 30, description="I/O and checksum block size"
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


class NvmeSwapper(OffloadsKV, Allocator):
    """See the module docstring. With ``resident_kv_bytes`` it is also a KV tier: the KV
    cache's layers beyond the budget live in its swap files during generation
    (:mod:`apportion_offload.kv`)."""

    name = "nvme"
    summary = "direct-I/O (O_DIRECT) async NVMe swapper: preallocated, checksummed, atomic files"
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
        self.reclaimed: dict[str, Any] = self._reclaim()

    # ------------------------------------------------------------------ setup
    def _probe_direct(self) -> bool:
        if self.config.direct == "off" or not hasattr(os, "O_DIRECT"):
            if self.config.direct == "on":
                raise SwapFormatError("nvme: direct='on' but this platform has no O_DIRECT")
            return False
        probe = temp_path(self.directory / f".probe{SUFFIX}")  # reclaimed if we die here
        try:
            fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
            os.close(fd)
            return True
        except OSError as exc:
            if self.config.direct == "on":
                raise SwapFormatError(
                    f"nvme: {self.directory} refuses O_DIRECT ({exc.strerror}); "
                    "use direct='auto' or 'off'"
                ) from None
            self.direct_refused = exc.strerror
            return False
        finally:
            probe.unlink(missing_ok=True)

    def _reclaim(self) -> dict[str, Any]:
        """Remove, under an exclusive lock of the directory, the temporary files of writers
        that are gone and the orphans: ``.apswap`` files older than this swapper that no
        reader can use (bad magic, truncated, a header that fails its checksum or lies)."""
        opened = time.time_ns()
        orphans: list[str] = []
        orphan_bytes = 0
        with _DirLock(self.directory):
            temp_files, temp_bytes = reclaim_temps(self.directory)
            for path in sorted(self.directory.glob(f"*{SUFFIX}")):
                if path.name.startswith("."):
                    continue
                try:
                    st = path.stat()
                    if not path.is_file() or st.st_mtime_ns >= opened:
                        continue
                    read_header(path)
                except (SwapFormatError, SwapChecksumError):
                    try:
                        path.unlink()
                    except FileNotFoundError:
                        continue
                    orphans.append(path.name)
                    orphan_bytes += st.st_size
                except OSError:  # gone meanwhile, unreadable: not ours to judge
                    continue
        if temp_files or orphans:
            log.warning(
                "nvme: reclaimed %d temporary file(s) of dead writers (%d bytes) and %d "
                "orphan swap file(s) without a valid header (%d bytes: %s) in %s",
                temp_files,
                temp_bytes,
                len(orphans),
                orphan_bytes,
                ", ".join(orphans) or "none",
                self.directory,
            )
        return {
            "temp_files": temp_files,
            "temp_bytes": temp_bytes,
            "orphans": orphans,
            "orphan_bytes": orphan_bytes,
        }

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
        s.extra = {
            **c,
            "direct": self.direct,
            "disk_bytes": self.total_bytes(),
            "reclaimed": self.reclaimed,
            "pool": pool.extra,
        }
        return s

    def kv_tier(self) -> Any:
        from apportion_offload.kv.tiers import NvmeTier

        cfg = self.config
        return NvmeTier(
            self,
            segment_tokens=cfg.kv_segment_tokens,
            on_full=cfg.kv_on_full,
            wait_seconds=cfg.kv_wait_seconds,
        )

    # ------------------------------------------------------------------ swap out
    def swap_out(self, key: str, tensor: Any) -> Future:
        """Write ``tensor`` to ``<key>.apswap`` asynchronously; the future's result is the path.

        Do not modify ``tensor`` until the future is done. An existing swap of the same key is
        replaced atomically. A swap whose header would pass
        :data:`~.fileformat.MAX_HEADER_BYTES` (too many blocks) is a
        :class:`~apportion_offload.errors.SwapFormatError`, raised here before anything is
        written; a full disk is a :class:`~apportion_offload.errors.SwapSpaceError`.
        """
        import torch

        final = self.path(key)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"swap_out needs a torch.Tensor, got {type(tensor).__name__}")
        nbytes = tensor.numel() * tensor.element_size()
        cfg = self.config
        padded = round_up(max(nbytes, 1), cfg.alignment)
        n_blocks = -(-padded // cfg.block_bytes)
        meta: dict[str, Any] = {
            "key": key,
            "dtype": dtype_name(tensor.dtype),
            "shape": list(tensor.shape),
            "nbytes": nbytes,
            "alignment": cfg.alignment,
            "block_bytes": cfg.block_bytes,
            "checksum": CHECKSUM,
            "blocks": [],
        }
        header_bytes = SwapHeader.size_for(meta, cfg.alignment, n_blocks)
        if header_bytes > MAX_HEADER_BYTES:
            raise self._header_too_large(key, meta, nbytes, header_bytes)
        total = header_bytes + padded
        tmp = temp_path(final)
        src, buf = self._source(tensor, nbytes, padded)  # before the file: bad input leaves nothing
        started = time.perf_counter()
        try:
            fd = self._open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except OSError as exc:
            if _no_space(exc):
                raise self._space_error(exc, key, final, total) from None
            raise
        try:
            os.posix_fallocate(fd, 0, total)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            if _no_space(exc):
                raise self._space_error(exc, key, final, total) from None
            raise

        blocks: list[Future] = []
        fd_open = [True]  # closed once only: a second close could hit a reused descriptor

        def close_fd() -> None:
            if fd_open[0]:
                fd_open[0] = False
                os.close(fd)

        def abandon() -> None:
            """Stop the blocks, wait for those already writing, remove the temporary file."""
            for f in blocks:
                f.cancel()
            for f in blocks:
                if not f.cancelled():
                    f.exception()  # wait: no block may still write into the unlinked file
            try:
                close_fd()
            except OSError:
                pass
            tmp.unlink(missing_ok=True)

        def commit() -> Path:
            try:
                meta["blocks"] = [f.result() for f in blocks]
                header = SwapHeader.encode(meta, cfg.alignment)
                if len(header) != header_bytes:  # the data was written after header_bytes
                    raise SwapFormatError(
                        f"nvme: the header of {key!r} is {len(header)} bytes, "
                        f"{header_bytes} were reserved (a bug)"
                    )
                hbuf = self.pool.acquire(len(header))
                try:
                    hbuf.view(len(header))[:] = header
                    pwrite_all(fd, hbuf.view(len(header)), 0)
                finally:
                    self.pool.give_back(hbuf)
                if cfg.fsync:
                    os.fdatasync(fd)
                close_fd()
                os.rename(tmp, final)
                if cfg.fsync:
                    fsync_dir(self.directory)
            except BaseException as exc:
                abandon()
                if isinstance(exc, OSError) and _no_space(exc):
                    raise self._space_error(exc, key, final, total) from None
                raise
            with self._lock:
                self._counters["swaps_out"] += 1
                self._counters["bytes_written"] += total
                self._counters["write_seconds"] += time.perf_counter() - started
                self._counters["zero_copy_out"] += buf is not None
            return final

        try:  # a swapper closed meanwhile refuses new work: leave no file behind
            for i in range(n_blocks):
                blocks.append(
                    self._io.submit(
                        self._write_block, fd, src, buf, i, header_bytes, nbytes, padded
                    )
                )
            return self._commit.submit(commit)
        except BaseException:
            abandon()
            raise

    def _header_too_large(
        self, key: str, meta: dict[str, Any], nbytes: int, header_bytes: int
    ) -> SwapFormatError:
        base = SwapHeader.size_for(meta, self.config.alignment, 0)
        most = max(1, (MAX_HEADER_BYTES - base - PREFIX.size) // BLOCK_ENTRY)
        need = round_up(-(-round_up(max(nbytes, 1), self.config.alignment) // most), 4096)
        return SwapFormatError(
            f"nvme: swapping out {key!r} ({nbytes} bytes) in blocks of "
            f"{self.config.block_bytes} bytes needs a {header_bytes}-byte header, past the "
            f"limit of {MAX_HEADER_BYTES} bytes; nothing was written. Raise block_bytes to at "
            f"least {need}, or split the tensor."
        )

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
            digest = hexsum(view)
            pwrite_all(fd, view, base + start)
            return digest
        stage = self.pool.acquire(stop - start)
        try:
            real = max(0, min(stop, nbytes) - start)
            if real:
                stage.tensor[:real].copy_(src[start : start + real])
            if real < stop - start:
                stage.tensor[real : stop - start].zero_()
            view = stage.view(stop - start)
            digest = hexsum(view)
            pwrite_all(fd, view, base + start)
            return digest
        finally:
            self.pool.give_back(stage)

    def _space_error(self, exc: OSError, key: str, final: Path, total: int) -> SwapSpaceError:
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
            f"nvme: {what} while swapping out {key!r} to {final}: {total} bytes needed, "
            f"{free}; nothing was written. Free space, choose another directory, or offload less."
        )
        err.errno = exc.errno
        err.path = str(final)  # (not .filename: OSError would print it instead of the message)
        return err

    # ------------------------------------------------------------------ swap in
    def read_header(self, path: str | Path) -> SwapHeader:
        """Validate and parse a swap file's header (see :func:`.fileformat.read_header`)."""
        return read_header(path)

    def swap_in(self, key: str, out: Any = None) -> Future:
        """Read ``<key>.apswap`` back; the future's result is the tensor.

        Without ``out`` the tensor is allocated from this swapper's pool (give it back with
        :meth:`free`). ``out`` must match the swapped dtype and shape.
        """
        path = self.path(key)
        # One descriptor for the header and the data: a swap-out replacing the key meanwhile
        # renames a new file into place, and this read keeps the old one, whole.
        fd = open_swap(path)
        dest = None
        try:
            header = read_header(path, fd)  # errors surface here, in the caller
            dtype, shape = dtype_from(header.dtype), tuple(header.shape)
            if out is not None and (out.dtype != dtype or tuple(out.shape) != shape):
                raise ValueError(
                    f"swap_in({key!r}): out is {tuple(out.shape)} {out.dtype} "
                    f"but the swap holds {shape} {dtype}"
                )
            if self.direct:
                self._set_direct(fd)
            dest = out if out is not None else self.allocate(shape, dtype)
            return self._commit.submit(self._read, fd, path, header, dest, out is None)
        except BaseException:
            os.close(fd)
            if dest is not None and out is None:
                self.free(dest)
            raise

    @staticmethod
    def _set_direct(fd: int) -> None:
        """Switch an open descriptor to ``O_DIRECT`` (Linux allows it through ``F_SETFL``);
        where refused, the read stays buffered."""
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError:
            pass

    def _read(self, fd: int, path: Path, header: SwapHeader, dest: Any, owned: bool) -> Any:
        import torch

        started = time.perf_counter()
        futures: list[Future] = []
        try:
            nbytes = header.nbytes
            padded = round_up(max(nbytes, 1), header.alignment)
            buf = self.pool.buffer_of(dest)
            zero_copy = buf is not None and buf.address == dest.data_ptr() and buf.nbytes >= padded
            flat = dest.reshape(-1).view(torch.uint8) if nbytes else None
            for i in range(len(header.blocks)):
                futures.append(
                    self._io.submit(
                        self._read_block,
                        fd,
                        path,
                        header,
                        i,
                        buf if zero_copy else None,
                        flat,
                        padded,
                    )
                )
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            for f in futures:
                if not f.cancelled():
                    f.exception()  # wait: no block may still read into the freed buffer
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
            pread_all(fd, view, header.header_bytes + start)
            if hexsum(view) != header.blocks[i]:
                raise SwapChecksumError(
                    f"nvme: block {i} (bytes {start}-{stop}) of {path} fails its checksum: "
                    "the swap file is corrupted"
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

    def total_bytes(self) -> int:
        """Bytes of every file this swapper's directory holds for it: the swaps, and the
        temporary files (of swaps in flight, or of writers not yet reclaimed)."""
        total = 0
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return 0
        for entry in entries:
            name = entry.name
            if name.endswith(SUFFIX) or (name.startswith(".") and _TEMP in name):
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:  # renamed or removed meanwhile
                    continue
        return total

    def disk_bytes(self) -> int:
        """The same as :meth:`total_bytes`."""
        return self.total_bytes()

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
