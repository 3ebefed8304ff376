"""DistKV (Infinite-LLM): one request's KV blocks spread over several instances.

The *home* instance runs the model. Its KV budget is ``local_capacity_tokens``; when a
request's context outgrows it, the oldest full blocks move to other instances, chosen by the
**gManager** (the global directory: which instance holds which block of which request, and
how much free memory each instance has; it lends from the instance with the most free
blocks). Each instance's **rManager** holds its blocks and computes attention *where the
blocks live*: the home sends the queries of a layer, every instance returns the normalised
partial output and its log-sum-exp over its own blocks, and the home merges them exactly
with :func:`apportion.host.lse.merge`. KV never travels back.

Instances are either in-process objects (:class:`RManager`, the default: the contract and
a single machine) or torch.distributed ranks (:mod:`apportion_kvcache.distkv_dist`: gloo on
CPU, NCCL on GPU) behind the same interface.

Blocks only ever move when they lie entirely before the current queries, so remote blocks
need no causal mask (only the padding mask of batched prompts travels with them); the prompt
is read in chunks of ``local_capacity_tokens - block_size`` tokens to keep that true.

How it reaches the model: the attention of each decoder layer is wrapped once per model
(:func:`install`); the wrapper takes the DistKV path only when the cache passed to the layer
is a :class:`DistKVCache` and otherwise calls the original forward, so other policies and
plain transformers are unaffected. The host's ``kv_tokens`` counts the home's entries;
:meth:`DistKV.kv_bytes` counts every instance's.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar

import torch
from apportion.config import ComponentConfig
from apportion.host.kv import KVPolicy, PrefillOutput
from apportion.host.lse import merge, partial_attention
from pydantic import Field

from apportion_kvcache.distkv_instances import (  # noqa: F401  (re-exported)
    DistKVError,
    GManager,
    Instance,
    KVCapacityError,
    RManager,
)


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


# ----------------------------------------------------------------------------- the cache

_request_ids = itertools.count(1)


def _layer_base() -> type:
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


class DistKVLayer(_layer_base()):  # type: ignore[misc]
    """One layer's home-resident tail: keys/values (b, kvh, n, d), the column index of its
    first entry and the padding validity (b, n). Remote blocks are in the gManager's directory."""

    def __init__(self) -> None:
        super().__init__()
        self.valid: torch.Tensor | None = None
        self.first_col = 0

    def update(self, *args: Any, **kwargs: Any) -> Any:
        raise DistKVError(
            "a DistKV layer is filled by the DistKV attention path, not by Cache.update"
        )

    def local_len(self) -> int:
        return 0 if self.keys is None or self.keys.dim() != 4 else int(self.keys.shape[-2])

    def get_seq_length(self) -> int:
        return self.first_col + self.local_len()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


def _cache_base() -> type:
    from transformers.cache_utils import Cache

    return Cache


class DistKVCache(_cache_base()):  # type: ignore[misc]
    """A request's KV over the home tail and the lent blocks: a transformers ``Cache`` whose
    layers report the full sequence length while holding only the home's part."""

    def __init__(self, policy: DistKV, num_layers: int):
        super().__init__(layers=[DistKVLayer() for _ in range(num_layers)])
        self.policy = policy
        self.request = next(_request_ids)
        self.padding: torch.Tensor | None = None  # (b, n) validity of the prompt columns
        self.remote_blocks = 0

    def __del__(self) -> None:  # give lent blocks back
        try:
            self.policy.gmanager.release(self.request)
        except Exception:
            pass

    # -- the DistKV step of one layer
    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        layer = self.layers[layer_idx]
        b, _, n, _ = k.shape
        col0 = layer.get_seq_length()
        if self.padding is not None and col0 < self.padding.shape[1]:
            valid = self.padding[:, col0 : col0 + n]
            if valid.shape[1] < n:
                valid = torch.cat(
                    [valid, torch.ones(b, n - valid.shape[1], dtype=torch.bool, device=k.device)], 1
                )
        else:
            valid = torch.ones(b, n, dtype=torch.bool, device=k.device)
        if layer.local_len() == 0:
            layer.keys, layer.values, layer.valid = k, v, valid
            layer.is_initialized = True
        else:
            layer.keys = torch.cat([layer.keys, k], -2)
            layer.values = torch.cat([layer.values, v], -2)
            layer.valid = torch.cat([layer.valid, valid], -1)

    def migrate(self, layer_idx: int, query_cols: int) -> None:
        """Move the oldest full blocks that lie before the current queries off the home."""
        pol = self.policy
        bs = pol.config.block_size
        layer = self.layers[layer_idx]
        first_query_col = layer.get_seq_length() - query_cols
        while (
            layer.local_len() > pol.config.local_capacity_tokens
            and layer.first_col + bs <= first_query_col
        ):
            block = layer.first_col // bs
            if layer_idx == 0:  # layer 0 decides where a block goes; the others follow
                inst = pol.gmanager.lend()
                pol.gmanager.place(self.request, block, inst)
                self.remote_blocks += 1
            else:
                inst = pol.instance_of(self.request, block)
            inst.put(
                self.request,
                block,
                layer_idx,
                layer.keys[..., :bs, :].contiguous(),
                layer.values[..., :bs, :].contiguous(),
                layer.valid[:, :bs].contiguous(),
            )
            layer.keys, layer.values = layer.keys[..., bs:, :], layer.values[..., bs:, :]
            layer.valid = layer.valid[:, bs:]
            layer.first_col += bs

    def attention(self, layer_idx: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Exact attention of ``q`` (b, H, m, d) over all of this request's keys: (b, H, m, d)."""
        layer = self.layers[layer_idx]
        assert layer.keys is not None and layer.valid is not None
        b, h, m, d = q.shape
        kvh = layer.keys.shape[1]
        g = h // kvh
        qg = q.reshape(b, kvh, g * m, d)
        holders = self.policy.gmanager.holders(self.request)
        pending = [inst.attend(self.request, layer_idx, qg, scale) for inst in holders]
        n = layer.local_len()
        cols = torch.arange(layer.first_col, layer.first_col + n, device=q.device)
        qcols = cols[-m:]
        causal = cols[None, :] <= qcols[:, None]  # (m, n)
        mask = causal[None, None] & layer.valid[:, None, None, :]  # (b, 1, m, n)
        mask = (
            mask.expand(b, kvh, m, n).unsqueeze(2).expand(b, kvh, g, m, n).reshape(b, kvh, g * m, n)
        )
        o, lse = partial_attention(qg, layer.keys, layer.values, scale=scale, mask=mask)
        outs, lses = [o], [lse]
        for ro, rl in pending:
            outs.append(ro.to(o.device))
            lses.append(rl.to(o.device))
        out, _ = merge(outs, lses)
        return out.reshape(b, kvh, g, m, d).reshape(b, h, m, d).to(q.dtype)

    def nbytes(self) -> int:
        local = sum(
            t.numel() * t.element_size()
            for layer in self.layers
            for t in (layer.keys, layer.values)
            if t is not None
        )
        bytes_per_block = 0
        if self.layers and self.layers[0].keys is not None:
            k = self.layers[0].keys
            bytes_per_block = (
                2
                * k.shape[0]
                * k.shape[1]
                * self.policy.config.block_size
                * k.shape[3]
                * k.element_size()
                * len(self.layers)
            )
        return local + self.remote_blocks * bytes_per_block


# ----------------------------------------------------------------------------- model wiring


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(1) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(1)


def _distkv_attention(
    module: Any, hidden_states: torch.Tensor, position_embeddings: Any, cache: DistKVCache
) -> tuple[torch.Tensor, None]:
    shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    q = module.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = module.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = module.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    idx = module.layer_idx
    cache.append(idx, k, v)
    out = cache.attention(idx, q, module.scaling)
    cache.migrate(idx, q.shape[2])
    out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
    return module.o_proj(out), None


def install(model: Any) -> None:
    """Wrap each decoder layer's attention once: DistKV path when the cache is a
    :class:`DistKVCache`, the original forward otherwise."""
    for layer in model.model.layers:
        attn = layer.self_attn
        if getattr(attn, "_apportion_distkv", False):
            continue
        original = attn.forward

        def forward(
            hidden_states: torch.Tensor,
            position_embeddings: Any = None,
            attention_mask: Any = None,
            cache: Any = None,
            _orig: Any = original,
            _mod: Any = attn,
            **kwargs: Any,
        ) -> Any:
            c = cache if cache is not None else kwargs.get("past_key_values")
            if isinstance(c, DistKVCache):
                return _distkv_attention(_mod, hidden_states, position_embeddings, c)
            return _orig(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache=cache,
                **kwargs,
            )

        attn.forward = forward
        attn._apportion_distkv = True


def uninstall(model: Any) -> None:
    for layer in model.model.layers:
        attn = layer.self_attn
        if getattr(attn, "_apportion_distkv", False):
            del attn.forward
            attn._apportion_distkv = False


# ----------------------------------------------------------------------------- the policy


class DistKV(KVPolicy):
    """kv-policy ``distkv``: exact attention over KV blocks lent by other instances.

    With no ``instances`` given, ``config.instances - 1`` in-process :class:`RManager` lend
    ``instance_capacity_tokens`` each. Pass remote instances (see
    :mod:`apportion_kvcache.distkv_dist`) to spread across processes.
    """

    name: ClassVar[str] = "distkv"
    Config = DistKVConfig

    def __init__(self, config: DistKVConfig | None = None, instances: list[Instance] | None = None):
        super().__init__(config)
        cfg = self.config
        if cfg.local_capacity_tokens < 2 * cfg.block_size:
            raise ValueError(
                f"local_capacity_tokens ({cfg.local_capacity_tokens}) must be at least two blocks "
                f"(2 x block_size {cfg.block_size}): the home reads the prompt in chunks that fit it"
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
                f"({self.config.local_capacity_tokens}) and its {len(self.gmanager.instances)} lending "
                "instances can hold"
            )
        from apportion.host.kv import cache_kwargs, positions_from_mask

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
