"""The HF transformers host (``pip install apportion-core[hf]``): model loading, attention
backends, KV policies and a measured greedy generation loop. Importing it imports torch."""

from apportion.host.attention import AttentionBackend
from apportion.host.generate import GenerationResult, Host
from apportion.host.kv import KVPolicy, PrefillOutput, cache_nbytes
from apportion.host.model import LoadedModel, load_model

__all__ = [
    "AttentionBackend",
    "GenerationResult",
    "Host",
    "KVPolicy",
    "LoadedModel",
    "PrefillOutput",
    "cache_nbytes",
    "load_model",
]
