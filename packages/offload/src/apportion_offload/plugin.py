"""Entry point of apportion-offload: registers its allocators by import path (nothing heavy
is imported here) and the step-time model behind ``apportion plan --offload``."""

from apportion import hookimpl

APPORTION_API = ">=2.0,<3"


@hookimpl
def apportion_register_allocators(register):
    register("apportion_offload.pool:PinnedPool", name="pinned-pool")
    register("apportion_offload.nvme:NvmeSwapper", name="nvme")
    register("apportion_offload.tiered:TieredAllocator", name="tiered")


@hookimpl
def apportion_plan_offload(plan, placement, hardware):
    """Step time of a training step under PLACEMENT (see apportion_offload.stepmodel), or,
    for a plan with a resident KV budget, the decode speed of the KV cache in that tier
    (apportion_offload.kv.decodemodel)."""
    from apportion_offload.stepmodel import plan_offload

    return plan_offload(plan, placement, hardware)
