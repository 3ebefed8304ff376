"""Page-aligned host buffers, and the three ways of keeping their pages resident.

A :class:`HostBuffer` is an anonymous ``mmap`` (so its address is page aligned, as O_DIRECT
and DMA engines want) exposed to torch without a copy. :func:`pin` then tries, in order:

- ``cuda``: ``cudaHostRegister`` the range (page-locked *and* mapped for DMA), when CUDA is up;
- ``mlock``: lock the pages in RAM through libc (no swapping, no page faults under I/O);
- ``pageable``: leave them as they are, and record why the better modes were refused.

Rounding the request to the page size (not to a power of two, as CUDA's caching host
allocator does) is the "alignment-free" half of MemAscend's pinned-memory fix.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
from dataclasses import dataclass, field
from typing import Any

PAGE = mmap.PAGESIZE
PIN_MODES = ("auto", "cuda", "mlock", "none")

_libc: Any = None


def libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return _libc


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(eq=False)
class HostBuffer:
    """``nbytes`` of page-aligned anonymous memory; ``tensor`` is a uint8 view of all of it."""

    nbytes: int
    mode: str = "pageable"  # how the pages are held: cuda, mlock or pageable
    _map: Any = field(default=None, repr=False)
    tensor: Any = field(default=None, repr=False)

    @classmethod
    def create(cls, nbytes: int) -> HostBuffer:
        import torch

        if nbytes <= 0:
            raise ValueError(f"a host buffer needs a positive size, got {nbytes}")
        mapped = mmap.mmap(-1, round_up(nbytes, PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        tensor = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes)
        return cls(nbytes=nbytes, _map=mapped, tensor=tensor)

    @property
    def address(self) -> int:
        return int(self.tensor.data_ptr())

    def view(self, nbytes: int | None = None) -> memoryview:
        """A writable memoryview of the first ``nbytes`` (all by default), without a copy."""
        return memoryview(self._map)[: self.nbytes if nbytes is None else nbytes]

    def release(self) -> None:
        """Unpin and unmap. Views handed out earlier must be gone (the allocator's contract)."""
        if self._map is None:
            return
        unpin(self)
        self.tensor = None
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds a view: the mapping goes when that view is collected
        self._map = None


def pin(buf: HostBuffer, mode: str = "auto") -> str | None:
    """Hold ``buf``'s pages resident according to ``mode`` and set ``buf.mode``.

    Returns why a requested mode was refused (``None`` when it took effect). ``auto`` asks
    for CUDA registration and is content with ``mlock`` when CUDA is absent.
    """
    if mode not in PIN_MODES:
        raise ValueError(f"pin mode must be one of {PIN_MODES}, got {mode!r}")
    buf.mode = "pageable"
    if mode == "none":
        return None
    reasons = []
    if mode in ("auto", "cuda"):
        reason = _cuda_register(buf)
        if reason is None:
            buf.mode = "cuda"
            return None
        reasons.append(f"cuda: {reason}")
    rc = libc().mlock(ctypes.c_void_p(buf.address), ctypes.c_size_t(round_up(buf.nbytes, PAGE)))
    if rc == 0:
        buf.mode = "mlock"
        return "; ".join(reasons) if mode == "cuda" else None
    err = ctypes.get_errno()
    hint = (
        " (RLIMIT_MEMLOCK is too low: raise `ulimit -l` or grant CAP_IPC_LOCK)"
        if err in (errno.ENOMEM, errno.EPERM, errno.EAGAIN)
        else ""
    )
    reasons.append(f"mlock: {os.strerror(err)}{hint}")
    return "; ".join(reasons)


def unpin(buf: HostBuffer) -> None:
    if buf.mode == "cuda":
        import torch

        torch.cuda.cudart().cudaHostUnregister(buf.address)
    elif buf.mode == "mlock":
        libc().munlock(ctypes.c_void_p(buf.address), ctypes.c_size_t(round_up(buf.nbytes, PAGE)))
    buf.mode = "pageable"


def _cuda_register(buf: HostBuffer) -> str | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return "CUDA is not available"
        err = torch.cuda.cudart().cudaHostRegister(buf.address, round_up(buf.nbytes, PAGE), 0)
        code = int(getattr(err, "value", err))
        return None if code == 0 else f"cudaHostRegister returned error {code}"
    except Exception as exc:  # a broken CUDA install must not take the pool down
        return f"{type(exc).__name__}: {exc}"
