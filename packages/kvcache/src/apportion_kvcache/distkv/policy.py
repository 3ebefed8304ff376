"""kv-policy ``distkv``: DistKV (Infinite-LLM; Lin et al., "Infinite-LLM: Efficient LLM
Service for Long Context with DistAttention and Distributed KVCache", 2024): one request's KV
blocks spread over several instances.

The *home* instance runs the model. Its KV budget is ``local_capacity_tokens``; when a
request's context outgrows it, the oldest full blocks (``block_size`` tokens) move to other
instances, chosen by the **gManager** (the global directory: which instance holds which block
of which request, and how much free memory each instance has; it lends from the instance with
the most free blocks). Each instance's **rManager** holds its blocks and computes attention
*where the blocks live*: the home sends the queries of a layer, every instance returns the
normalised partial output and its log-sum-exp over its own blocks, and the home merges them
exactly (:mod:`.cache`). KV never travels back.

Instances are either in-process objects (:class:`~.instances.RManager`, the default:
``instances - 1`` of them, ``instance_capacity_tokens`` each) or torch.distributed ranks
(:class:`~.ranks.Cluster`) behind the same interface. The prompt is read in chunks of
``local_capacity_tokens - block_size`` tokens, so that blocks only ever move once they lie
entirely before the current queries. The host's ``kv_tokens`` counts the home's entries;
:meth:`DistKV.kv_bytes` counts every instance's.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from apportion.base import ComponentConfig
from apportion.host.kv import KVPolicy, PrefillOutput, cache_kwargs, positions_from_mask
from pydantic import Field

from apportion_kvcache.distkv.cache import DistKVCache, install
from apportion_kvcache.distkv.instances import GManager, Instance, RManager
from apportion_kvcache.errors import DistKVError, KVCapacityError


class DistKVConfig(ComponentConfig):
    instances: int = Field(
        2, ge=1, description="in-process instances (home included) when no group is given"
    )
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    local_capacity_tokens: int = Field(
        128, ge=2, description="KV tokens the home instance keeps per request"
    )
    instance_capacity_tokens: int = Field(
        1 << 20, ge=1, description="KV tokens each other instance can lend"
    )


class DistKV(KVPolicy):
    """kv-policy ``distkv``: exact attention over KV blocks lent by other instances.

    With no ``instances`` given, ``config.instances - 1`` in-process :class:`RManager` lend
    ``instance_capacity_tokens`` each. Pass remote instances (a
    :class:`~apportion_kvcache.distkv.ranks.Cluster`'s) to spread across processes.
    """

    name: ClassVar[str] = "distkv"
    summary: ClassVar[str] = (
        "DistKV (Infinite-LLM): KV blocks lent by other instances, attention merged exactly by LSE"
    )
    Config = DistKVConfig

    def __init__(self, config: DistKVConfig | None = None, instances: list[Instance] | None = None):
        super().__init__(config)
        cfg = self.config
        if cfg.local_capacity_tokens < 2 * cfg.block_size:
            raise ValueError(
                f"local_capacity_tokens ({cfg.local_capacity_tokens}) must be at least two "
                f"blocks (2 x block_size {cfg.block_size}): the home reads the prompt in chunks "
                "that fit it"
            )
        if instances is None:
            blocks = math.ceil(cfg.instance_capacity_tokens / cfg.block_size)
            instances = [RManager(i, blocks) for i in range(1, cfg.instances)]
        self.gmanager = GManager({inst.id: inst for inst in instances})

    def instance_of(self, request: int, block: int) -> Instance:
        for b, i in self.gmanager.directory.get(request, []):
            if b == block:
                return self.gmanager.instances[i]
        raise DistKVError(f"block {block} of request {request} is in no instance's directory")

    def capacity_tokens(self) -> int:
        """Tokens one request can hold: the home's budget plus every lendable block."""
        return self.config.local_capacity_tokens + self.gmanager.capacity_tokens(
            self.config.block_size
        )

    def make_cache(self, model: Any) -> DistKVCache:
        install(model)
        return DistKVCache(self, model.config.num_hidden_layers)

    def prefill(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
        *,
        question_len: int = 0,
    ) -> PrefillOutput:
        if not isinstance(cache, DistKVCache):
            raise TypeError(
                f"distkv prefill needs the cache from its make_cache, got {type(cache).__name__}"
            )
        n = input_ids.shape[1]
        if n > self.capacity_tokens():
            raise KVCapacityError(
                f"prompt of {n} tokens exceeds the {self.capacity_tokens()} KV tokens this home "
                f"({self.config.local_capacity_tokens}) and its {len(self.gmanager.instances)} "
                "lending instances can hold"
            )
        cache.padding = attention_mask.bool()
        positions = positions_from_mask(attention_mask)
        chunk = self.config.local_capacity_tokens - self.config.block_size
        logits = None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            out = model(
                input_ids=input_ids[:, s:e],
                position_ids=positions[:, s:e],
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(model, cache),
            )
            logits = out.logits[:, -1, :]
        assert logits is not None
        kv_mask = None if bool(attention_mask.all()) else attention_mask.bool()
        return PrefillOutput(
            logits=logits,
            kv_mask=kv_mask,
            next_position=positions[:, -1] + 1,
            info={"remote_blocks": cache.remote_blocks},
        )

    def kv_bytes(self, cache: Any) -> int:
        return cache.nbytes() if isinstance(cache, DistKVCache) else super().kv_bytes(cache)
