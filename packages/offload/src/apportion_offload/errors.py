"""Typed errors of apportion-offload. Each message names what was wrong and what to change."""

from __future__ import annotations

from apportion.errors import ApportionError


class OffloadError(ApportionError):
    """Base class of every error this package raises on purpose."""


class PoolCapacityError(OffloadError, MemoryError):
    """An allocation would push a pool past its hard cap (raised instead of an OOM crash)."""


class SwapSpaceError(OffloadError, OSError):
    """The swap directory's file system is full (ENOSPC) or refuses the file's size (EFBIG).

    Nothing of the swap that failed is visible afterwards: its temporary file is removed.
    """


class SwapFormatError(OffloadError, ValueError):
    """A file that is not an apportion swap file, of an unknown version, or not aligned."""


class SwapChecksumError(OffloadError):
    """A swap file's header or data block does not match its stored checksum."""


class KVOffloadError(OffloadError):
    """The offloaded KV cache lost a layer's data during generation: a swap file missing or
    corrupted, a full disk, a tier that stayed full. Names the layer and the file (or tier);
    generation stops, so no answer is ever produced from partial KV.

    ``layer``: the layer index; ``path``: the swap file, when there is one.
    """

    def __init__(self, message: str, *, layer: int | None = None, path: str | None = None):
        super().__init__(message)
        self.layer = layer
        self.path = path
