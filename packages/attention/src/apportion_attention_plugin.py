"""Entry point of apportion-attention (``[project.entry-points.apportion]``): registers its
components by import path, nothing heavy.

It is a top-level module of the wheel, not ``apportion_attention.plugin``, on purpose: importing
any submodule of ``apportion_attention`` runs the package's ``__init__``, which imports
transformers (and torch) to register the attention functions for plain transformers. Loading
plugins (``apportion plugins``) must not import torch, so this module never imports
``apportion_attention``; the registered import paths are resolved only when a component is used.
"""

from apportion import hookimpl

APPORTION_API = ">=1.0,<2"


@hookimpl
def apportion_register_attention(register):
    # issue 5: Squeezed Attention, LongHeads, InfiniRetri
    register(
        "squeezed",
        "apportion_attention.squeezed.backend:Squeezed",
        config="apportion_attention.squeezed.backend:SqueezedConfig",
        summary="Squeezed Attention: K-means key clusters, two-level centroid lookup, sparse decode (Triton)",
    )
    register(
        "longheads",
        "apportion_attention.longheads:LongHeads",
        config="apportion_attention.longheads:LongHeadsConfig",
        summary="LongHeads: per-head top-k chunks, positions remapped into the trained window",
    )
    register(
        "infiniretri",
        "apportion_attention.infiniretri:InfiniRetri",
        config="apportion_attention.infiniretri:InfiniRetriConfig",
        summary="InfiniRetri: chunked reading, the question's attention keeps sentences for the next chunk",
    )
    # issue 8: APE, DistAttention, HoPE (+ its RoPE-scaling comparators), SSA
    register(
        "distattention",
        "apportion_attention.distattention:DistAttention",
        config="apportion_attention.distattention:DistAttentionConfig",
        summary="DistAttention (Infinite-LLM): micro-attention over KV shards, merged exactly by LSE",
    )
    register(
        "ape",
        "apportion_attention.ape:APE",
        config="apportion_attention.ape:APEConfig",
        summary="APE: contexts encoded in parallel after a shared prefix, cached; temperature + scale at query time",
    )
    register(
        "hope",
        "apportion_attention.hope:HoPE",
        config="apportion_attention.hope:HoPEConfig",
        summary="HoPE position plugin: lowest RoPE frequencies zeroed, dynamic position scaling past the window",
    )
    register(
        "rope-ntk",
        "apportion_attention.hope_scaling:DynamicNTK",
        config="apportion_attention.hope_scaling:NTKConfig",
        summary="position plugin: dynamic NTK-aware RoPE scaling (HoPE's comparator)",
    )
    register(
        "rope-yarn",
        "apportion_attention.hope_scaling:YaRN",
        config="apportion_attention.hope_scaling:YaRNConfig",
        summary="position plugin: YaRN RoPE scaling with a length-chosen factor (HoPE's comparator)",
    )
    register(
        "ssa",
        "apportion_attention.ssa:SSAAttention",
        config="apportion_attention.ssa:SSAConfig",
        summary="SSA block-sparse attention (top-k key blocks + sink + local); train it with ssa.SSALoss",
    )


@hookimpl
def apportion_model_loaded(model, tokenizer, spec):
    # issue 5: InfiniRetri finds sentence ends with the host's tokenizer
    from apportion_attention.infiniretri import TOKENIZERS

    TOKENIZERS[model] = tokenizer
