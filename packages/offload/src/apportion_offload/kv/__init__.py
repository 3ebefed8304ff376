"""The KV cache of generation, offloaded through an allocator's tiers.

- :mod:`~apportion_offload.kv.options`: the options every offload allocator takes
  (``resident_kv_bytes``, ``kv_on_full``, ...) and the mixin that makes it the core's
  :meth:`apportion.base.Allocator.kv_cache`;
- :mod:`~apportion_offload.kv.tiers`: host memory (``pinned-pool``, ``tiered``) and NVMe
  swap files (``nvme``, and the spill tier of the others);
- :mod:`~apportion_offload.kv.cache`: :class:`OffloadedKVCache`, the transformers ``Cache``;
- :mod:`~apportion_offload.kv.decodemodel`: the decode speed of a placement, behind
  ``apportion plan --offload TIER --resident-kv-fraction F``.

Importing this package imports neither torch nor transformers; ``OffloadedKVCache`` is
imported from :mod:`apportion_offload.kv.cache`.
"""

from apportion_offload.kv.options import KVOffloadConfig, OffloadsKV

__all__ = ["KVOffloadConfig", "OffloadsKV"]
