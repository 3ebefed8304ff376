"""Entry point of apportion-attention: registers its backends by import path (nothing heavy
is imported here, and nothing is registered into transformers: see
:func:`apportion_attention.hf.register`)."""

from apportion import hookimpl

APPORTION_API = ">=2.0,<3"


@hookimpl
def apportion_register_attention(register):
    register("apportion_attention.squeezed.backend:Squeezed", name="squeezed")
    register("apportion_attention.longheads:LongHeads", name="longheads")
    register("apportion_attention.infiniretri:InfiniRetri", name="infiniretri")
    register("apportion_attention.distattention:DistAttention", name="distattention")
    register("apportion_attention.ape:APE", name="ape")
    register("apportion_attention.hope:HoPE", name="hope")
    register("apportion_attention.rope_scaling:DynamicNTK", name="rope-ntk")
    register("apportion_attention.rope_scaling:YaRN", name="rope-yarn")
    register("apportion_attention.ssa:SSAAttention", name="ssa")
    register("apportion_attention.context_steer:ContextSteer", name="context-attention")
