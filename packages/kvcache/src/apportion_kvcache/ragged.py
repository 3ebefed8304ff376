"""Ragged KV storage: every KV head of every row keeps its own number of entries.

An adaptive budget (:mod:`apportion_kvcache.adaptive`) gives the KV heads of one layer
different numbers of entries. A ``(B, H, L, D)`` tensor cannot hold them without padding every
head to the longest, which would keep the bytes the budget saved, so a :class:`RaggedLayer`
holds a layer in two parts:

- the compressed prompt, flat: ``prefix_keys``/``prefix_values`` are ``(N, D)``, one segment
  per (row, head) in that order, each segment in position order; ``counts`` ``(B, H)`` says how
  long each segment is. Nothing is padded: ``N`` is exactly the entries kept;
- what is appended after the prefill (the question fed later, the generated tokens): every
  head receives each new token, so these entries are a dense ``(B, H, n, D)`` tail.

:meth:`RaggedLayer.update` appends to the tail and returns the layer itself in place of key
and value tensors; the attention function registered here (:func:`ragged_attention`, as
``"apportion-ragged-kv"`` in transformers' ``AttentionInterface``, see
:func:`ragged_attention_installed`) computes each KV head's group of query heads against that
head's own segment and the tail, merged exactly by log-sum-exp
(:mod:`apportion.host.lse`). Any other layer (a plain tensor cache, the prefill before a
layer is compressed) goes to transformers' SDPA.

Lengths and masks: ``get_seq_length()`` is ``width`` (the host-side width of the compressed
prompt, the same for every layer: the mask the host keeps covers it) plus the tail. The
attention function reads only the tail's columns of the model's 4-D mask (causality and the
padding of a left-padded question); the validity of the prefix is the layer's own ``counts``.
Positions are untouched: the kept keys keep their RoPE and the host continues ``position_ids``
from the uncompressed length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from apportion.errors import ConfigError
from apportion.host.attention import register_attention, registered_attention
from apportion.host.lse import merge, partial_attention
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: the name the ragged attention function is registered under
RAGGED_ATTENTION = "apportion-ragged-kv"


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class RaggedLayer(DynamicLayer):
    """One layer's KV with a number of entries per (row, KV head); see the module docstring.

    ``prefix_keys``/``prefix_values``: ``(N, D)``, segments in (row, head) order, each in
    position order. ``counts``: ``(B, H)`` segment lengths. ``width``: the host-side width of
    the compressed prompt (what :meth:`get_seq_length` reports before anything is appended).
    ``config``: the model's config; :meth:`update` refuses to run unless its attention is the
    ragged one (the layer cannot be read by any other function).
    """

    #: keeps its KV in its own layout (see :func:`apportion.host.kv.drop_tail`)
    ragged = True
    is_croppable = True

    def __init__(
        self,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        counts: torch.Tensor,
        width: int,
        config: Any = None,
    ) -> None:
        super().__init__()
        if prefix_keys.shape != prefix_values.shape or prefix_keys.dim() != 2:
            raise ValueError(
                f"prefix keys {tuple(prefix_keys.shape)} and values "
                f"{tuple(prefix_values.shape)} must be the same (N, D)"
            )
        if int(counts.sum()) != prefix_keys.shape[0]:
            raise ValueError(
                f"counts sum to {int(counts.sum())}, the prefix holds {len(prefix_keys)}"
            )
        b, h = counts.shape
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.counts = counts.to(device=prefix_keys.device, dtype=torch.long)
        self.width = int(width)
        empty = prefix_keys.new_empty((b, h, 0, prefix_keys.shape[-1]))
        self.tail_keys, self.tail_values = empty, empty.clone()
        self.device, self.dtype = prefix_keys.device, prefix_keys.dtype
        self.is_initialized = True
        self._config = config
        self._index()

    def _index(self) -> None:
        flat = self.counts.flatten()
        self.starts = (flat.cumsum(0) - flat).view_as(self.counts)
        self._counts = self.counts.tolist()
        self._starts = self.starts.tolist()

    # ------------------------------------------------------------------ transformers' layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Any, Any]:
        """Append ``key_states``/``value_states`` ``(B, H, n, D)`` to the tail; returns the
        layer itself as both key and value, for :func:`ragged_attention` to read."""
        implementation = getattr(self._config, "_attn_implementation", RAGGED_ATTENTION)
        if implementation != RAGGED_ATTENTION:
            raise RuntimeError(
                f"a ragged KV cache is read by the {RAGGED_ATTENTION!r} attention, but the model "
                f"runs {implementation!r}: enter the KV policy's installed(model) around the "
                "forward (apportion.host.Host does)"
            )
        self.tail_keys = torch.cat([self.tail_keys, key_states], dim=-2)
        self.tail_values = torch.cat([self.tail_values, value_states], dim=-2)
        return self, self

    def get_seq_length(self) -> int:
        return self.width + int(self.tail_keys.shape[-2])

    def nbytes(self) -> int:
        """Bytes of every key and value this layer holds (the prefix, exactly, and the tail)."""
        return _nbytes(self.prefix_keys, self.prefix_values, self.tail_keys, self.tail_values)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` entries of every (row, head): from the tail
        first, then from the end of every segment (the protected tail of the prompt, which
        every head keeps: a probe's entries, see :func:`apportion.host.kv.drop_tail`)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): give a negative number of entries to remove"
            )
        n = -int(tokens_to_remove)
        if n == 0:
            return
        appended = int(self.tail_keys.shape[-2])
        rest = n - min(n, appended)
        if rest > int(self.counts.min()):
            raise ValueError(
                f"cannot remove {rest} prompt entries from every head: one keeps only "
                f"{int(self.counts.min())}"
            )
        keep = max(0, appended - n)
        self.tail_keys = self.tail_keys[..., :keep, :].contiguous()
        self.tail_values = self.tail_values[..., :keep, :].contiguous()
        if rest == 0:
            return
        flat = self.counts.flatten()
        segment = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), flat)
        pos = torch.arange(segment.numel(), device=flat.device) - self.starts.flatten()[segment]
        kept = pos < (flat - rest)[segment]
        self.prefix_keys = self.prefix_keys[kept].contiguous()
        self.prefix_values = self.prefix_values[kept].contiguous()
        self.counts = self.counts - rest
        self.width -= rest
        self._index()

    def _select_rows(self, indices: torch.Tensor) -> None:
        idx = indices.to(device=self.counts.device, dtype=torch.long)
        per_row = self.counts.sum(1)
        row_start = (per_row.cumsum(0) - per_row).tolist()
        per_row_list = per_row.tolist()
        pieces = [
            torch.arange(row_start[r], row_start[r] + per_row_list[r], device=idx.device)
            for r in idx.tolist()
        ]
        gather = torch.cat(pieces) if pieces else idx.new_zeros(0)
        self.prefix_keys = self.prefix_keys[gather]
        self.prefix_values = self.prefix_values[gather]
        self.counts = self.counts[idx]
        self.tail_keys, self.tail_values = self.tail_keys[idx], self.tail_values[idx]
        self._index()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = torch.arange(self.counts.shape[0], device=self.counts.device)
        self._select_rows(rows.repeat_interleave(repeats))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def reset(self) -> None:
        d = self.prefix_keys.shape[-1]
        self.prefix_keys = self.prefix_keys.new_empty((0, d))
        self.prefix_values = self.prefix_values.new_empty((0, d))
        self.counts = torch.zeros_like(self.counts)
        self.tail_keys = self.tail_keys[..., :0, :]
        self.tail_values = self.tail_values[..., :0, :]
        self.width = 0
        self._index()

    def offload(self) -> None:
        for name in ("prefix_keys", "prefix_values", "tail_keys", "tail_values"):
            setattr(self, name, getattr(self, name).to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        for name in ("prefix_keys", "prefix_values", "tail_keys", "tail_values"):
            setattr(self, name, getattr(self, name).to(self.device, non_blocking=True))

    # ------------------------------------------------------------------ reading it
    def head_prefix(self, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys and values ``(B, M, D)`` of ``head``'s segments (``M`` the longest row's) and
        their validity ``(B, 1, M)`` (``None`` when every row's segment is ``M`` long)."""
        rows = self.counts.shape[0]
        lengths = [self._counts[r][head] for r in range(rows)]
        if rows == 1:  # a view, nothing copied
            s, n = self._starts[0][head], lengths[0]
            return self.prefix_keys[None, s : s + n], self.prefix_values[None, s : s + n], None
        longest = max(lengths)
        cols = torch.arange(longest, device=self.counts.device)
        index = self.starts[:, head, None] + cols[None, :]
        index = index.clamp(max=max(0, self.prefix_keys.shape[0] - 1))
        valid = cols[None, :] < self.counts[:, head, None]
        if self.prefix_keys.shape[0] == 0:
            d = self.prefix_keys.shape[-1]
            empty = self.prefix_keys.new_zeros((rows, 0, d))
            return empty, empty.clone(), None
        keys, values = self.prefix_keys[index], self.prefix_values[index]
        return keys, values, None if bool(valid.all()) else valid[:, None, :]

    def attend(
        self, query: torch.Tensor, attention_mask: torch.Tensor | None, scale: float | None
    ) -> torch.Tensor:
        """Attention of ``query`` ``(B, H_q, T, D)`` (the last ``T`` appended tokens' queries)
        over this layer: each KV head's group of query heads against its own segment and the
        tail. ``attention_mask``: the model's 4-D mask (its last columns are the tail's) or
        ``None`` (causal). Returns ``(B, T, H_q, D)``, as transformers' attention functions."""
        b, h_q, t, d = query.shape
        h = self.counts.shape[1]
        groups = h_q // h
        appended = int(self.tail_keys.shape[-2])
        tail_ok = _tail_mask(attention_mask, b, t, appended, query.device)
        tail_ok = tail_ok[:, None].expand(b, groups, t, appended).reshape(b, groups * t, appended)
        q = query.reshape(b, h, groups * t, d)
        outs = []
        for head in range(h):
            keys, values, valid = self.head_prefix(head)
            o1, l1 = partial_attention(q[:, head], keys, values, scale=scale, mask=valid)
            o2, l2 = partial_attention(
                q[:, head],
                self.tail_keys[:, head],
                self.tail_values[:, head],
                scale=scale,
                mask=tail_ok,
            )
            out, _ = merge([o1, o2], [l1, l2])
            outs.append(out.view(b, groups, t, d))
        return torch.stack(outs, 1).view(b, h_q, t, d).transpose(1, 2).to(query.dtype)


def _tail_mask(
    mask: torch.Tensor | None, batch: int, t: int, appended: int, device: torch.device
) -> torch.Tensor:
    """(B, T, A) bool: which of the ``A`` appended entries each of the last ``T`` queries sees."""
    if mask is None:
        rows = torch.arange(t, device=device)[:, None]
        cols = torch.arange(appended, device=device)[None, :]
        return (cols <= rows + (appended - t))[None].expand(batch, t, appended)
    if mask.dim() != 4 or mask.shape[-1] < appended:
        raise RuntimeError(
            f"the attention mask {tuple(mask.shape)} does not cover the {appended} entries "
            "appended to a ragged KV layer"
        )
    ok = mask[:, 0, -t:, -appended:]
    if ok.dtype != torch.bool:  # an additive mask: 0 where attended
        ok = ok == 0
    return ok.expand(batch, t, appended)


def ragged_attention(
    module: Any,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: a :class:`RaggedLayer` (what its ``update``
    returns) is read per KV head (:meth:`RaggedLayer.attend`); plain tensors go to SDPA."""
    if isinstance(key, RaggedLayer):
        return key.attend(query, attention_mask, scaling), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


@contextlib.contextmanager
def ragged_attention_installed(model: Any, owner: str) -> Iterator[None]:
    """Switch ``model`` to :func:`ragged_attention` for the ``with`` block, restoring its
    attention (and what was registered under the name before) on exit. ``owner`` names the
    component that asked, for the error raised when another attention function (an attention
    backend's) is installed: the ragged one cannot stand in for it."""
    previous = model.config._attn_implementation
    if previous not in ("sdpa", "eager", RAGGED_ATTENTION):
        raise ConfigError(
            f"kv-policy {owner!r} stores ragged per-head KV and reads it with its own attention "
            f"function; it cannot run beside the attention backend's {previous!r}: use the "
            "dense attention backend",
            [("attention", previous)],
        )
    before = registered_attention(RAGGED_ATTENTION)
    register_attention(RAGGED_ATTENTION, ragged_attention)
    if previous != RAGGED_ATTENTION:
        model.set_attn_implementation(RAGGED_ATTENTION)
    try:
        yield
    finally:
        if previous != RAGGED_ATTENTION:
            model.set_attn_implementation(previous)
        if before is not None:
            register_attention(RAGGED_ATTENTION, *before)


class RaggedCache(DynamicCache):
    """A transformers ``DynamicCache`` whose layers may be :class:`RaggedLayer`;
    :meth:`kv_nbytes` counts what every layer holds (what
    :func:`apportion.host.kv.cache_nbytes` reads)."""

    def kv_nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            if isinstance(layer, RaggedLayer):
                total += layer.nbytes()
                continue
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += _nbytes(t)
        return total


__all__ = [
    "RAGGED_ATTENTION",
    "RaggedCache",
    "RaggedLayer",
    "ragged_attention",
    "ragged_attention_installed",
]
