"""kv-policy ``cachegen``: the prompt's context KV goes through the CacheGen codec.

On a prefill the context KV (the prompt minus its question) is encoded at ``level`` and
decoded back into the cache, so generation runs on exactly what a receiver of the bitstream
would have. With ``store`` set (a directory or ``redis://`` URL) the bitstream is saved under
the model's fingerprint, the context's token ids and everything else that changes its bytes
(the store key's variant, :meth:`CacheGenPolicy.store_variant`: the policy, the bitstream
version, the level and its bins, the token grouping and chunking, the KV dtype), and a later
prompt with the same context under the same settings loads and decodes it instead of
recomputing the context: only the question is prefilled. A prompt without a question keeps its
last token out of the context, so that a hit always has a token to compute the next one from.
A damaged entry reads as a miss (the store sets it aside); a full store (disk or Redis) raises
:class:`~apportion_kvcache.errors.StoreFullError`, which a run records as the sample's error.

Each row of a batch is coded on its own real tokens (padding never enters the statistics),
so a batched answer equals the answer alone. ``PrefillOutput.info`` reports the bitstream
bytes, the fp16 bytes of the same KV and whether the store was hit.

Options: the codec's (``levels``, ``group_size``, ``chunk_tokens``, see
:class:`~apportion_kvcache.cachegen.codec.CodecConfig`), ``level`` and ``store``.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch
from apportion.host.kv import KVPolicy, PrefillOutput, cache_kwargs, positions_from_mask
from pydantic import Field

from apportion_kvcache.cachegen import codec as _codec
from apportion_kvcache.cachegen.codec import CacheGenCodec, CodecConfig


class CacheGenPolicyConfig(CodecConfig):
    level: int = Field(0, ge=0, le=64, description="encoding level used (0 = finest)")
    store: str | None = Field(None, description="directory or redis:// URL to save/load bitstreams")


class CacheGenPolicy(KVPolicy):
    name: ClassVar[str] = "cachegen"
    summary: ClassVar[str] = (
        "CacheGen: context KV through the quantize+delta+range-coded bitstream "
        "(optional store reuse)"
    )
    Config = CacheGenPolicyConfig

    def __init__(self, config: CacheGenPolicyConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if cfg.level >= len(cfg.levels):
            from apportion.errors import ConfigError

            raise ConfigError(
                f"cachegen level {cfg.level} out of range: {len(cfg.levels)} levels configured"
            )
        codec_cfg = CodecConfig(**{k: getattr(cfg, k) for k in CodecConfig.model_fields})
        self.codec = CacheGenCodec(codec_cfg)
        #: the codec settings part of the store key's variant: everything besides the model,
        #: the context and the KV dtype that changes the bitstream (see :meth:`store_variant`)
        settings = {
            "policy": self.name,
            "version": _codec.VERSION,
            "level": cfg.level,
            "bins": cfg.levels[cfg.level],
            "group_size": cfg.group_size,
            "chunk_tokens": cfg.chunk_tokens,
        }
        self.variant = "cachegen:" + json.dumps(settings, sort_keys=True, separators=(",", ":"))
        self._store = None
        self._loaded: Any = None
        self.last_info: dict[str, Any] = {}

    def bind(self, loaded: Any) -> None:
        """Keep the loaded model's fingerprint: bitstreams and store keys carry it."""
        self._loaded = loaded

    def fingerprint(self, model: Any) -> str:
        """The fingerprint of ``model`` (architecture and weights): the bound model's, or
        that of a model used without :meth:`bind`."""
        from apportion.host.model import fingerprint_for

        return fingerprint_for(model, self._loaded)

    def store_variant(self, model: Any) -> str:
        """The store key's variant for ``model``'s KV: the codec settings and the KV dtype (a
        bfloat16 and a float32 load of one checkpoint share a fingerprint, not their bytes);
        the model itself is the key's fingerprint."""
        dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
        return f"{self.variant}|dtype={dtype}"

    @property
    def store(self) -> Any:
        if self._store is None and self.config.store:
            from apportion_kvcache.store import open_store

            self._store = open_store(self.config.store)
        return self._store

    def prefill(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
        *,
        question_len: int = 0,
    ) -> PrefillOutput:
        length = input_ids.shape[1]
        # at least one token (the last) stays out of the context: a store hit computes the
        # next token's logits from it
        q = max(1, min(int(question_len), length - 1))
        ctx_len = length - q
        fingerprint = self.fingerprint(model)
        variant = self.store_variant(model)
        hit = False
        if (
            self.store is not None
            and input_ids.shape[0] == 1
            and bool(attention_mask.all())
            and ctx_len > 0
        ):
            ctx_ids = input_ids[0, :ctx_len].tolist()
            kv = self.store.load_kv(
                fingerprint, ctx_ids, model=model, variant=variant, codec=self.codec
            )
            if kv is not None:
                hit = True
                for i, (k, v) in enumerate(kv):
                    cache.update(k, v, i)
                pos = positions_from_mask(attention_mask)
                out = model(
                    input_ids=input_ids[:, ctx_len:],
                    attention_mask=attention_mask,
                    position_ids=pos[:, ctx_len:],
                    use_cache=True,
                    logits_to_keep=1,
                    **cache_kwargs(model, cache),
                )
                self.last_info = {"store_hit": True, "context_tokens": ctx_len}
                return PrefillOutput(
                    out.logits[:, -1, :], None, pos[:, -1] + 1, info=dict(self.last_info)
                )
        pre = super().prefill(model, input_ids, attention_mask, cache, question_len=question_len)
        nbytes = fp16 = 0
        for row in range(input_ids.shape[0]):
            start = int((~attention_mask[row].bool()).sum())  # left padding
            if ctx_len - start <= 0:
                continue
            kv = [
                (
                    layer.keys[row : row + 1, :, start:ctx_len],
                    layer.values[row : row + 1, :, start:ctx_len],
                )
                for layer in cache.layers
            ]
            bs = self.codec.encode(kv, fingerprint=fingerprint, level=self.config.level)
            nbytes += len(bs)
            fp16 += sum(k.numel() * 4 for k, _ in kv)
            decoded = self.codec.decode(bs, fingerprint=fingerprint, device=input_ids.device)
            for layer, (k, v) in zip(cache.layers, decoded, strict=True):
                layer.keys[row : row + 1, :, start:ctx_len] = k.to(layer.keys.dtype)
                layer.values[row : row + 1, :, start:ctx_len] = v.to(layer.values.dtype)
            if self.store is not None and input_ids.shape[0] == 1 and start == 0:
                self.store.save_bitstream(
                    fingerprint, input_ids[0, :ctx_len].tolist(), bs, variant=variant
                )
        self.last_info = {
            "store_hit": hit,
            "bitstream_bytes": nbytes,
            "fp16_bytes": fp16,
            "context_tokens": ctx_len,
        }
        pre.info = dict(self.last_info)
        return pre
