"""DistKV's cache: a request's KV over the home's tail and the blocks lent to other instances,
and how a decoder layer's attention reaches it.

The attention of each decoder layer is wrapped once per model (:func:`install`); the wrapper
takes the DistKV path only when the cache passed to the layer is a :class:`DistKVCache` and
otherwise calls the original forward, so other policies and plain transformers are
unaffected. On the DistKV path the layer's keys and values are appended to the home's tail,
attention is computed over the tail here and over the lent blocks where they live, merged
exactly by log-sum-exp (:func:`apportion.host.lse.merge`), and the oldest full blocks that lie
before the current queries move off the home (remote blocks then need no causal mask).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import torch
from apportion.host import rope
from apportion.host.lse import merge, partial_attention

from apportion_kvcache.errors import DistKVError

if TYPE_CHECKING:
    from apportion_kvcache.distkv.policy import DistKV

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


def _distkv_attention(
    module: Any, hidden_states: torch.Tensor, position_embeddings: Any, cache: DistKVCache
) -> tuple[torch.Tensor, None]:
    shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    q = module.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = module.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = module.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
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
