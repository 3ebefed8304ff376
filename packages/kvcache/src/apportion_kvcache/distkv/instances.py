"""DistKV's instances, torch-light (no transformers): the rManager that holds lent blocks and
answers attention over them, and the gManager's directory. Lending ranks import only this and
:mod:`.ranks`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from apportion.host.lse import partial_attention

from apportion_kvcache.errors import DistKVError, KVCapacityError

__all__ = ["DistKVError", "GManager", "Instance", "KVCapacityError", "RManager"]


# ----------------------------------------------------------------------------- rManager


class Instance(Protocol):
    """What the home needs from an instance (in-process or remote)."""

    id: int

    def free_blocks(self) -> int: ...
    def put(
        self,
        request: int,
        block: int,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor,
    ) -> None: ...
    def attend(
        self, request: int, layer: int, q: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def release(self, request: int) -> None: ...


class RManager:
    """An instance's block holder: ``capacity_blocks`` blocks of all layers of any request."""

    def __init__(self, id: int, capacity_blocks: int):
        self.id = id
        self.capacity_blocks = capacity_blocks
        # (request, block) -> {layer: (k, v, valid)}
        self.blocks: dict[
            tuple[int, int], dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
        ] = {}

    def free_blocks(self) -> int:
        return self.capacity_blocks - len(self.blocks)

    def put(
        self,
        request: int,
        block: int,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor,
    ) -> None:
        key = (request, block)
        if key not in self.blocks and self.free_blocks() <= 0:
            raise KVCapacityError(f"instance {self.id} is full ({self.capacity_blocks} blocks)")
        self.blocks.setdefault(key, {})[layer] = (k, v, valid)

    def attend(
        self, request: int, layer: int, q: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial attention of ``q`` (b, kvh, m, d) over this instance's blocks of ``request``."""
        ks, vs, valids = [], [], []
        for (req, _), layers in sorted(self.blocks.items()):
            if req == request and layer in layers:
                k, v, valid = layers[layer]
                ks.append(k)
                vs.append(v)
                valids.append(valid)
        if not ks:
            b, h, m, d = q.shape
            return torch.zeros(b, h, m, d), torch.full((b, h, m), float("-inf"))
        k, v, valid = torch.cat(ks, -2), torch.cat(vs, -2), torch.cat(valids, -1)
        mask = valid[:, None, None, :].expand(-1, q.shape[1], q.shape[2], -1)
        return partial_attention(q, k, v, scale=scale, mask=mask)

    def release(self, request: int) -> None:
        for key in [k for k in self.blocks if k[0] == request]:
            del self.blocks[key]

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for layers in self.blocks.values()
            for kv in layers.values()
            for t in kv[:2]
        )


# ----------------------------------------------------------------------------- gManager


@dataclass
class GManager:
    """Global directory: request -> [(block index, instance id)], and lending."""

    instances: dict[int, Instance]
    directory: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    def lend(self) -> Instance:
        """The instance with the most free blocks (the idlest) lends one block."""
        best, best_free = None, 0
        for inst in self.instances.values():
            free = inst.free_blocks()  # a lent block counts as used from its first layer's put
            if free > best_free:
                best, best_free = inst, free
        if best is None:
            total = sum(i.free_blocks() for i in self.instances.values())
            raise KVCapacityError(
                f"no instance has a free KV block ({len(self.instances)} lending instances, "
                f"{total} free): the request does not fit; shorten it or add instances"
            )
        return best

    def place(self, request: int, block: int, inst: Instance) -> None:
        self.directory.setdefault(request, []).append((block, inst.id))

    def holders(self, request: int) -> list[Instance]:
        ids = sorted({i for _, i in self.directory.get(request, [])})
        return [self.instances[i] for i in ids]

    def release(self, request: int) -> None:
        for inst in self.holders(request):
            inst.release(request)
        self.directory.pop(request, None)

    def capacity_tokens(self, block_size: int) -> int:
        return sum(i.free_blocks() for i in self.instances.values()) * block_size
