"""Names shared by the vLLM connector and the code that builds its requests, importable without
vLLM (:mod:`apportion_kvcache.vllm_connector` imports vLLM and torch)."""

#: the connector's name in vLLM's ``KVTransferConfig(kv_connector=...)``
CONNECTOR = "ApportionStoreConnector"
#: ``kv_transfer_params`` key: the handle of the compressed context a request is asked of
CONTEXT_PARAM = "apportion_context"
#: ``kv_transfer_params`` key: the slots (kept entries) that context fills
CONTEXT_SLOTS_PARAM = "apportion_context_slots"
#: ``kv_transfer_params`` key: the CacheGen level (or None: raw) a request's prefix is saved at,
#: over the connector's ``codec_level``
CODEC_PARAM = "apportion_codec_level"
