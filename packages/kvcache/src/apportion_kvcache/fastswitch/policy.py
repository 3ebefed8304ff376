"""kv-policy ``fastswitch``: multi-turn reuse of KV kept on the host, moved by block group.

After a prompt is prefilled its KV is written into device block groups and swapped out to
the host pool on the swap thread, while decoding goes on. When a later prompt starts with
a kept prompt (the next turn of a conversation: the chat template repeats the history), the
longest kept prefix (whole blocks) is swapped back in as a few group copies and only the
new tokens are prefilled. The reused KV is the stored KV bit for bit (the pools use the
model's dtype), so answers equal full prefill's. When the host pool is full the least
recently used entries are dropped; a prompt that cannot be kept is simply not kept.

Batches of more than one row are prefilled in full (and not kept): conversations are
per-request state.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from apportion.base import ComponentConfig
from apportion.host.kv import KVPolicy, PrefillOutput, cache_kwargs
from pydantic import Field

from apportion_kvcache.fastswitch.blocks import KVShape, PoolExhaustedError
from apportion_kvcache.fastswitch.swap import SwapError, SwapManager


class FastSwitchConfig(ComponentConfig):
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    device_blocks: int = Field(1024, ge=1, description="blocks of the device staging pool")
    host_blocks: int = Field(4096, ge=1, description="blocks of host memory kept for later turns")
    min_reuse_tokens: int = Field(32, ge=1, description="shorter shared prefixes are recomputed")


@dataclass
class Kept:
    ids: tuple[int, ...]  # token ids covered (whole blocks)
    key: str
    landed: Future[Any] | None


class FastSwitch(KVPolicy):
    """Keeps each prompt's KV on the host; reuses the longest kept prefix of a new prompt."""

    name: ClassVar[str] = "fastswitch"
    summary: ClassVar[str] = (
        "FastSwitch: multi-turn reuse of host-kept KV, swapped by block group on a thread"
    )
    Config = FastSwitchConfig

    def __init__(self, config: FastSwitchConfig | None = None):
        super().__init__(config)
        self.manager: SwapManager | None = None
        self.kept: OrderedDict[str, Kept] = OrderedDict()
        self._n = 0
        self.last_info: dict[str, Any] = {}
        self.reused_tokens = 0

    def _ensure(self, model: Any) -> SwapManager:
        if self.manager is None:
            shape = KVShape.of(model.config, self.config.block_size, model.dtype)
            dev = str(model.device) if str(model.device).startswith("cuda") else "cpu"
            self.manager = SwapManager(
                shape,
                self.config.device_blocks,
                self.config.host_blocks,
                granularity="group",
                device=dev,
            )
        return self.manager

    def _match(self, ids: list[int]) -> Kept | None:
        best = None
        for k in self.kept.values():
            n = len(k.ids)
            if (
                n <= len(ids) - 1
                and (best is None or n > len(best.ids))
                and tuple(ids[:n]) == k.ids
            ):
                best = k
        return best

    def prefill(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
        *,
        question_len: int = 0,
    ) -> PrefillOutput:
        if input_ids.shape[0] != 1:
            return super().prefill(
                model, input_ids, attention_mask, cache, question_len=question_len
            )
        mgr = self._ensure(model)
        ids = input_ids[0].tolist()
        hit = self._match(ids)
        start = 0
        t_swap = 0.0
        if hit is not None and len(hit.ids) >= self.config.min_reuse_tokens:
            try:
                if hit.landed is not None:
                    hit.landed.result()
                t0 = time.perf_counter()
                # swap in: a few group copies from the host pool (the host copy stays kept)
                kv = mgr.read(hit.key).to(model.device)  # (blocks, layers, 2, kvh, bs, d)
                t_swap = time.perf_counter() - t0
                self.kept.move_to_end(hit.key)
                start = len(hit.ids)
                for layer in range(kv.shape[1]):
                    k = (
                        kv[:, layer, 0]
                        .permute(1, 0, 2, 3)
                        .reshape(kv.shape[3], -1, kv.shape[5])[None]
                    )
                    v = (
                        kv[:, layer, 1]
                        .permute(1, 0, 2, 3)
                        .reshape(kv.shape[3], -1, kv.shape[5])[None]
                    )
                    cache.update(
                        k[:, :, :start].to(model.dtype), v[:, :, :start].to(model.dtype), layer
                    )
            except (SwapError, PoolExhaustedError):
                self._drop(hit.key)
                start = 0
        pos = torch.arange(start, len(ids), device=input_ids.device)[None, :]
        out = model(
            input_ids=input_ids[:, start:],
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
        )
        self._keep(ids, cache)
        self.reused_tokens += start
        self.last_info = {"reused_tokens": start, "swap_in_seconds": t_swap}
        return PrefillOutput(
            logits=out.logits[:, -1, :],
            kv_mask=None,
            next_position=torch.tensor([len(ids)], device=input_ids.device),
            info=self.last_info,
        )

    def _keep(self, ids: list[int], cache: Any) -> None:
        mgr = self.manager
        assert mgr is not None
        bs = self.config.block_size
        n_blocks = len(ids) // bs
        if n_blocks * bs < self.config.min_reuse_tokens:
            return
        covered = tuple(ids[: n_blocks * bs])
        if any(k.ids == covered for k in self.kept.values()):
            return
        layers = cache.layers
        kv = torch.stack(
            [
                torch.stack(
                    [layer.keys[0, :, : n_blocks * bs], layer.values[0, :, : n_blocks * bs]]
                )
                for layer in layers
            ]
        )  # (layers, 2, kvh, n, d)
        kv = kv.reshape(kv.shape[0], 2, kv.shape[2], n_blocks, bs, kv.shape[-1]).permute(
            3, 0, 1, 2, 4, 5
        )
        while True:
            try:
                if mgr.host.allocator.free_blocks < n_blocks:
                    raise PoolExhaustedError("host full")
                self._n += 1
                key = f"kept-{self._n}"
                mgr.allocate(key, n_blocks)
                break
            except PoolExhaustedError:
                if not self.kept:
                    return  # cannot keep this one: fine, it is recomputed next time
                self._drop(next(iter(self.kept)))
        mgr.write(key, kv.contiguous())
        self.kept[key] = Kept(covered, key, mgr.swap_out(key))  # overlaps the decode that follows

    def _drop(self, key: str) -> None:
        k = self.kept.pop(key, None)
        if k is not None and self.manager is not None:
            if k.landed is not None:
                try:
                    k.landed.result()
                except SwapError:
                    pass
            self.manager.release(key)
