"""Entry point of apportion-kvcache: registers its policies by import path (nothing heavy
is imported here), provides the core's KV store and adds the ``apportion kv`` commands."""

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
    register("apportion_kvcache.adaptive:AdaKV", name="adakv")
    register("apportion_kvcache.cachegen.policy:CacheGenPolicy", name="cachegen")
    register("apportion_kvcache.kvcomm.policy:KVCOMM", name="kvcomm")
    register("apportion_kvcache.fastswitch.policy:FastSwitch", name="fastswitch")
    register("apportion_kvcache.distkv.policy:DistKV", name="distkv")
    # kvpress's presses as kvpress:<press>, where kvpress is installed (named without
    # importing it: this stays torch-free)
    from apportion_kvcache.kvpress_names import press_classes

    for name, cls in press_classes().items():
        register(f"apportion_kvcache.kvpress_adapter:{cls}", name=name)


@hookimpl
def apportion_kv_store(url, max_bytes):
    """The KV store at ``url``: a directory (:class:`~apportion_kvcache.store.LocalStore`) or a
    ``redis://`` URL (:class:`~apportion_kvcache.store.RedisStore`), capped at ``max_bytes``."""
    from apportion_kvcache.store import open_store

    return open_store(url, max_bytes=max_bytes)


@hookimpl
def apportion_register_commands(app):
    # typer only: the commands import torch and the model when they run
    from apportion_kvcache.cli import app as kv

    app.add_typer(kv, name="kv")
