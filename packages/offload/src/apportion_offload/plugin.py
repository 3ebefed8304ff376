"""Entry point of apportion-offload: registers its components by import path (nothing heavy here)."""

from apportion import hookimpl

APPORTION_API = ">=1.0,<2"


@hookimpl
def apportion_register_allocators(register):
    register(
        "pinned-pool",
        "apportion_offload.pool:PinnedPool",
        config="apportion_offload.pool:PinnedPoolConfig",
        summary="MemAscend pinned buffer pool: size-classed, aligned, reused, under a hard cap",
    )
    register(
        "nvme",
        "apportion_offload.swap:NvmeSwapper",
        config="apportion_offload.swap:NvmeSwapConfig",
        summary="direct-I/O (O_DIRECT) async NVMe swapper: preallocated, checksummed, atomic files",
    )
    register(
        "tiered",
        "apportion_offload.tiered:TieredAllocator",
        config="apportion_offload.tiered:TieredConfig",
        summary="tier-aware DRAM/CXL placement: optimizer states local, activations striped on far NUMA nodes",
    )


@hookimpl
def apportion_plan_offload(plan, placement, hardware):
    """Step time of a training step under PLACEMENT (see apportion_offload.stepmodel)."""
    from apportion_offload.stepmodel import plan_offload

    return plan_offload(plan, placement, hardware)
