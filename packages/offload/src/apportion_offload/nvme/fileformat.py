"""The swap file format of the ``nvme`` allocator (format version 1).

Each swapped tensor is one file ``<key>.apswap``::

    [prefix: magic "APSWAP\\r\\n", version, header_bytes, json_bytes, xxh3_64(JSON)]
    [JSON: key, dtype, shape, nbytes, alignment, block_bytes, checksum, per-block xxh3_64]
    [zero padding up to header_bytes, a multiple of the alignment]
    [data: the tensor's bytes, zero-padded to the alignment, in blocks of block_bytes]

Every offset and length is a multiple of ``alignment`` (a power of two >= 512), so the data
region moves with ``O_DIRECT``. The header grows with the number of blocks (19 bytes a block);
``header_bytes`` in the prefix records its size, at most :data:`MAX_HEADER_BYTES` (a writer
refuses a swap whose header would be larger, before writing anything).
:func:`read_header` checks the magic, version, alignment and
header checksum, then every field of the JSON (a header from a foreign or buggy writer can
pass its own checksum), and the file's exact size, before a byte of data is read: a foreign,
truncated or unaligned file is a :class:`~apportion_offload.errors.SwapFormatError`, a
corrupted header a :class:`~apportion_offload.errors.SwapChecksumError`. Nothing is ever
unpickled: the JSON is parsed with :func:`apportion.host.io.loads_json` (bounded).
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import xxhash
from apportion.host.io import loads_json

from apportion_offload.errors import SwapChecksumError, SwapFormatError
from apportion_offload.hostmem import round_up

MAGIC = b"APSWAP\r\n"  # the \r\n catches text-mode mangling, as PNG's signature does
VERSION = 1
PREFIX = struct.Struct("<8sIIIQ")  # magic, version, header_bytes, json_bytes, xxh3(json)
SUFFIX = ".apswap"
CHECKSUM = "xxh3_64"
HEAD_READ = 1 << 16  # bytes read first; a larger header is read whole once its size is known
MAX_HEADER_BYTES = 1 << 26  # 64 MiB: about 3.5 M blocks (220 GiB at 64 KiB blocks)
BLOCK_ENTRY = 19  # bytes a block adds to the JSON: "0123456789abcdef" and a comma

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


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from(name: str) -> Any:
    """The torch dtype a header names; anything else is a :class:`SwapFormatError`."""
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SwapFormatError(f"swap header names an unknown dtype {name!r}")
    return dtype


def hexsum(view: Any) -> str:
    """The per-block checksum: xxh3_64 as 16 hex digits."""
    return f"{xxhash.xxh3_64_intdigest(view):016x}"


class SwapHeader:
    """The parsed, validated header of a swap file: its JSON fields as attributes
    (``dtype``, ``shape``, ``nbytes``, ``alignment``, ``block_bytes``, ``blocks``, ...) and
    ``header_bytes``, where the data region starts."""

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
        """The header bytes of ``meta``, zero-padded to a multiple of ``alignment``."""
        body = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        size = round_up(PREFIX.size + len(body), alignment)
        prefix = PREFIX.pack(MAGIC, VERSION, size, len(body), xxhash.xxh3_64_intdigest(body))
        return (prefix + body).ljust(size, b"\0")

    @staticmethod
    def size_for(meta: dict[str, Any], alignment: int, n_blocks: int | None = None) -> int:
        """The encoded size of ``meta``'s header. With ``n_blocks``, computed without building
        the block list (``meta["blocks"]`` is ignored): cheap for any size of swap."""
        if n_blocks is None:
            return len(SwapHeader.encode(meta, alignment))
        body = json.dumps({**meta, "blocks": []}, sort_keys=True, separators=(",", ":")).encode()
        return round_up(PREFIX.size + len(body) + max(0, BLOCK_ENTRY * n_blocks - 1), alignment)


def open_swap(path: str | Path) -> int:
    """A read-only descriptor of the swap file at ``path`` (a missing one is a
    ``FileNotFoundError`` naming it). Read the header and the data through the same
    descriptor: a file replaced in between is never mixed with its successor."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise FileNotFoundError(f"nvme: no swap file {path}") from None


def read_header(path: str | Path, fd: int | None = None) -> SwapHeader:
    """Validate and parse a swap file's header (magic, version, checksum, fields, alignment,
    size); see the module docstring for what is refused and how. With ``fd`` (from
    :func:`open_swap`), the header is read from that open file; ``path`` names it in errors."""
    path = Path(path)
    if fd is None:
        fd = open_swap(path)
        try:
            return read_header(path, fd)
        finally:
            os.close(fd)
    size = os.fstat(fd).st_size
    head = os.pread(fd, HEAD_READ, 0)
    if len(head) < PREFIX.size or head[:8] != MAGIC:
        raise SwapFormatError(f"nvme: {path} is not an apportion swap file (bad magic)")
    _, version, header_bytes, json_bytes, digest = PREFIX.unpack_from(head)
    if version != VERSION:
        raise SwapFormatError(
            f"nvme: {path} has swap format version {version}; this reader knows {VERSION}"
        )
    if (
        header_bytes % 512
        or PREFIX.size + json_bytes > header_bytes
        or header_bytes > min(size, MAX_HEADER_BYTES)
    ):
        raise SwapFormatError(
            f"nvme: {path} has a malformed or unaligned header ({header_bytes} bytes; "
            f"the file is {size} bytes, the limit {MAX_HEADER_BYTES})"
        )
    if header_bytes > len(head):  # a large header: read the rest of it
        head += os.pread(fd, header_bytes - len(head), len(head))
        if len(head) < header_bytes:
            raise SwapFormatError(f"nvme: {path} ended inside its header (truncated)")
    body = head[PREFIX.size : PREFIX.size + json_bytes]
    if xxhash.xxh3_64_intdigest(body) != digest:
        raise SwapChecksumError(
            f"nvme: the header of {path} fails its checksum (the file is corrupted)"
        )
    meta = checked_meta(path, body)
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


def checked_meta(path: Path, body: bytes) -> dict[str, Any]:
    """The header's JSON, with every field this reader relies on present and consistent
    (a file whose header checksum holds can still come from a foreign or buggy writer)."""
    import torch

    def bad(what: str) -> SwapFormatError:
        return SwapFormatError(f"nvme: {path} has a malformed header: {what}")

    meta = loads_json(body, what="its metadata", error=bad, max_bytes=MAX_HEADER_BYTES)
    if not isinstance(meta, dict):
        raise bad("its metadata is not a JSON object")
    for name, kind in _META_TYPES.items():
        value = meta.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise bad(f"field {name!r} is {value!r}, not {kind.__name__}")
    if meta["checksum"] != CHECKSUM:
        raise bad(f"unknown checksum {meta['checksum']!r}")
    if not all(isinstance(b, str) and _HEX16.fullmatch(b) for b in meta["blocks"]):
        raise bad("block checksums are not 16 hex digits")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in meta["shape"]):
        raise bad(f"shape {meta['shape']!r} is not a list of non-negative integers")
    if meta["block_bytes"] <= 0 or meta["alignment"] <= 0:
        raise bad("block_bytes and alignment must be positive")
    dtype = dtype_from(meta["dtype"])
    numel = 1
    for d in meta["shape"]:
        numel *= d
    if numel * torch.empty((), dtype=dtype).element_size() != meta["nbytes"]:
        raise bad(
            f"nbytes {meta['nbytes']} does not match shape {meta['shape']} of {meta['dtype']}"
        )
    return meta


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """Write all of ``view`` at ``offset`` (``pwrite`` may write less than asked)."""
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view, offset = view[n:], offset + n


def pread_all(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset``; a file that ends first is a :class:`SwapFormatError`."""
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise SwapFormatError("nvme: the swap file ended early (truncated)")
        view, offset = view[n:], offset + n
