"""CacheGen (Liu et al., SIGCOMM 2024): KV cache compression and streaming.

- :mod:`.codec`: the bitstream format, :class:`CacheGenCodec` (encode, decode, per chunk)
- :mod:`.policy`: the ``cachegen`` kv-policy (context KV through the codec, store reuse)
- :mod:`.controller`: the streaming controller (text or KV, and which level, per chunk)
- :mod:`.baselines`: per-token quantization and the reconstruction error, for benchmarks
"""

from apportion_kvcache.cachegen.baselines import kv_error, uniform_per_token
from apportion_kvcache.cachegen.codec import (
    MAGIC,
    READABLE_VERSIONS,
    VERSION,
    CacheGenCodec,
    ChunkInfo,
    CodecConfig,
    Header,
    layer_bins,
)
from apportion_kvcache.cachegen.controller import Choice, Controller, CostModel
from apportion_kvcache.cachegen.policy import CacheGenPolicy, CacheGenPolicyConfig
from apportion_kvcache.kv import KV, cache_from_kv, check_kv_shape, kv_from_cache

__all__ = [
    "KV",
    "MAGIC",
    "READABLE_VERSIONS",
    "VERSION",
    "CacheGenCodec",
    "CacheGenPolicy",
    "CacheGenPolicyConfig",
    "Choice",
    "ChunkInfo",
    "CodecConfig",
    "Controller",
    "CostModel",
    "Header",
    "cache_from_kv",
    "check_kv_shape",
    "kv_error",
    "kv_from_cache",
    "layer_bins",
    "uniform_per_token",
]
