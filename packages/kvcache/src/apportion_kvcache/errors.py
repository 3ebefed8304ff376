"""Typed errors of apportion-kvcache."""

from __future__ import annotations

from apportion.errors import ApportionError


class CorruptKVError(ApportionError, ValueError):
    """A bitstream or store file is truncated, corrupted, foreign or of a future version."""


class KVMismatchError(ApportionError, ValueError):
    """A stored KV belongs to another model, or its shape does not fit the model it is loaded
    into; a stored compressed context was made with another model, tokenizer, policy or
    ratio than the one it is loaded for (the message names both sides)."""


class KVNotFoundError(ApportionError, LookupError):
    """A stored KV (a compressed context's handle) is not in the store: never stored there,
    evicted, or damaged and set aside."""

    def __str__(self) -> str:  # LookupError's KeyError kin would quote the message
        return str(self.args[0]) if self.args else ""


class StoreUnavailableError(ApportionError, ConnectionError):
    """The store's backend (e.g. a Redis server) cannot be reached."""


class StoreFullError(ApportionError, ValueError):
    """The entry alone is larger than the store's size cap (nothing was evicted for it), the
    disk under the store is full, or a Redis store is out of memory. ``path`` names the file
    (or the Redis URL) that could not be written, ``needed`` the bytes it needed."""

    def __init__(self, message: str, *, path: str | None = None, needed: int | None = None):
        super().__init__(message)
        self.path = path
        self.needed = needed


class AnchorMismatchError(ApportionError):
    """A KVCOMM anchor (or a pool) recorded with one model was offered to another."""


class AnchorPoolFileError(ApportionError):
    """A saved KVCOMM anchor pool is unreadable: wrong format, version or checksum."""


class DistKVError(ApportionError):
    """A DistKV instance failed or did not answer in time."""


class KVCapacityError(ApportionError):
    """Every DistKV instance is full: the request is refused (admission control), nothing
    crashes."""
