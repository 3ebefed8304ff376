"""Allocator ``pageable``: plain host memory, the baseline every allocator is measured against."""

from __future__ import annotations

from pydantic import Field

from apportion.base import Allocator, ComponentConfig


class PageableConfig(ComponentConfig):
    cap_bytes: int | None = Field(None, ge=1, description="refuse allocations past this many bytes")


class Pageable(Allocator):
    name = "pageable"
    summary = "ordinary pageable host memory, with byte accounting"
    Config = PageableConfig

    def allocate(self, shape, dtype, *, access="default"):
        import math

        import torch

        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        cap = self.config.cap_bytes
        if cap is not None and self._stats.current_bytes + nbytes > cap:
            raise MemoryError(
                f"allocating {nbytes} bytes would exceed the cap of {cap} bytes "
                f"({self._stats.current_bytes} in use)"
            )
        return super().allocate(shape, dtype, access=access)
