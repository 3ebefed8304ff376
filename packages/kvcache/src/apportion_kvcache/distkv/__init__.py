"""DistKV (Infinite-LLM, Lin et al., 2024): one request's KV blocks lent by other instances.

- :mod:`.policy`: the ``distkv`` kv-policy (:class:`DistKV`, :class:`DistKVConfig`)
- :mod:`.cache`: the cache over the home's tail and the lent blocks, and the attention path
- :mod:`.instances`: the rManager (holds lent blocks) and the gManager (the directory)
- :mod:`.ranks`: instances as torch.distributed ranks (:class:`Cluster`, :func:`serve`)

The names below are imported on first access, so a lending rank imports neither
transformers nor the policy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DistKV": "apportion_kvcache.distkv.policy",
    "DistKVConfig": "apportion_kvcache.distkv.policy",
    "DistKVCache": "apportion_kvcache.distkv.cache",
    "DistKVLayer": "apportion_kvcache.distkv.cache",
    "install": "apportion_kvcache.distkv.cache",
    "uninstall": "apportion_kvcache.distkv.cache",
    "GManager": "apportion_kvcache.distkv.instances",
    "Instance": "apportion_kvcache.distkv.instances",
    "RManager": "apportion_kvcache.distkv.instances",
    "Cluster": "apportion_kvcache.distkv.ranks",
    "RemoteInstance": "apportion_kvcache.distkv.ranks",
    "DistKVError": "apportion_kvcache.errors",
    "KVCapacityError": "apportion_kvcache.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'apportion_kvcache.distkv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
