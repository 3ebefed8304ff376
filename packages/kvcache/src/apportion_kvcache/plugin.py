"""Entry point of apportion-kvcache: registers its components by import path (nothing heavy here)."""

from apportion import hookimpl

APPORTION_API = ">=1.0,<2"


@hookimpl
def apportion_register_kv_policies(register):
    register(
        "streaming",
        "apportion_kvcache.streaming:StreamingLLM",
        config="apportion_kvcache.streaming:StreamingConfig",
        summary="StreamingLLM: attention sinks + recent window (positions kept exact)",
    )
    register(
        "snapkv",
        "apportion_kvcache.snapkv:SnapKV",
        config="apportion_kvcache.snapkv:SnapKVConfig",
        summary="SnapKV: observation-window attention, pooled, per KV head (GQA-aware)",
    )
    register(
        "h2o",
        "apportion_kvcache.h2o:H2O",
        config="apportion_kvcache.h2o:H2OConfig",
        summary="H2O: accumulated-attention heavy hitters + recent tokens, scored in a hook",
    )
    register(
        "qspan",
        "apportion_kvcache.qspan:QSpan",
        config="apportion_kvcache.qspan:QSpanConfig",
        summary="question-aware span keeping: question-query peaks, GQA union, kept neighbourhoods",
    )
    register(
        "cachegen",
        "apportion_kvcache.cachegen_policy:CacheGenPolicy",
        config="apportion_kvcache.cachegen_policy:CacheGenPolicyConfig",
        summary="CacheGen: context KV through the quantize+delta+range-coded bitstream (optional store reuse)",
    )
    register(
        "kvcomm",
        "apportion_kvcache.kvcomm:KVCOMM",
        config="apportion_kvcache.kvcomm:KVCOMMConfig",
        summary="KVCOMM: shared segments reused under new prefixes, offsets from an anchor pool (RoPE-aware)",
    )
    register(
        "fastswitch",
        "apportion_kvcache.fastswitch.policy:FastSwitch",
        config="apportion_kvcache.fastswitch.policy:FastSwitchConfig",
        summary="FastSwitch: multi-turn reuse of host-kept KV, swapped by block group on a thread",
    )
    register(
        "distkv",
        "apportion_kvcache.distkv:DistKV",
        config="apportion_kvcache.distkv:DistKVConfig",
        summary="DistKV (Infinite-LLM): KV blocks lent by other instances, attention merged exactly by LSE",
    )
