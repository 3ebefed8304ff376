"""Entry point of apportion-kvcache: registers its policies by import path (nothing heavy
is imported here) and provides the core's KV store."""

from apportion import hookimpl

APPORTION_API = ">=2.0,<3"


@hookimpl
def apportion_register_kv_policies(register):
    register("apportion_kvcache.streaming:StreamingLLM", name="streaming")
    register("apportion_kvcache.snapkv:SnapKV", name="snapkv")
    register("apportion_kvcache.h2o:H2O", name="h2o")
    register("apportion_kvcache.qspan:QSpan", name="qspan")
    register("apportion_kvcache.probe:Probe", name="probe")
    register("apportion_kvcache.surprise:Surprise", name="surprise")
    register("apportion_kvcache.cachegen.policy:CacheGenPolicy", name="cachegen")
    register("apportion_kvcache.kvcomm.policy:KVCOMM", name="kvcomm")
    register("apportion_kvcache.fastswitch.policy:FastSwitch", name="fastswitch")
    register("apportion_kvcache.distkv.policy:DistKV", name="distkv")


@hookimpl
def apportion_kv_store(url, max_bytes):
    """The KV store at ``url``: a directory (:class:`~apportion_kvcache.store.LocalStore`) or a
    ``redis://`` URL (:class:`~apportion_kvcache.store.RedisStore`), capped at ``max_bytes``."""
    from apportion_kvcache.store import open_store

    return open_store(url, max_bytes=max_bytes)
