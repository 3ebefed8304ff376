"""Typed errors of apportion-kvcache."""

from __future__ import annotations

from apportion.errors import ApportionError


class CorruptKVError(ApportionError, ValueError):
    """A bitstream or store file is truncated, corrupted, foreign or of a future version."""


class KVMismatchError(ApportionError, ValueError):
    """A stored KV belongs to another model, or its shape does not fit the model it is loaded into."""


class StoreUnavailableError(ApportionError, ConnectionError):
    """The store's backend (e.g. a Redis server) cannot be reached."""
