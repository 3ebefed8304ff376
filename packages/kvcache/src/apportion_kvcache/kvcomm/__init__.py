"""KVCOMM (Ye et al., 2025): shared segments' KV reused across prefixes in multi-agent prompts.

- :mod:`.policy`: the ``kvcomm`` kv-policy (:class:`KVCOMM`, shared segments, reuse)
- :mod:`.pool`: the anchor pool (offsets, matching, safetensors persistence)
- :mod:`.agents`: a multi-agent workload and its comparison with full prefill
"""

from apportion_kvcache.errors import AnchorMismatchError, AnchorPoolFileError
from apportion_kvcache.kvcomm.policy import KVCOMM, KVCOMMConfig, KVCOMMStats, SharedSegment
from apportion_kvcache.kvcomm.pool import Anchor, AnchorPool

__all__ = [
    "KVCOMM",
    "Anchor",
    "AnchorMismatchError",
    "AnchorPool",
    "AnchorPoolFileError",
    "KVCOMMConfig",
    "KVCOMMStats",
    "SharedSegment",
]
