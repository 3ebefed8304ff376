"""transformers integration: this package's attention functions in ``AttentionInterface`` and
``AttentionMaskInterface``, so ``attn_implementation="apportion-<name>"`` works on any
Llama-like model loaded with plain transformers::

    from apportion_attention import hf

    hf.register()  # once per process; imports transformers and torch
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="apportion-squeezed")

Nothing is registered at import. The registered functions belong to default-config backends,
kept in :data:`BACKENDS` (change one's ``config`` there, or call :func:`register` with your own
instances, which replace them under the same names).

Registered by default, the backends whose attention function is the technique on its own:

- ``apportion-squeezed``: the whole prompt is the fixed context; decode steps read the keys
  the centroid lookup selects (the host also tells it where the question starts).
- ``apportion-longheads``: per-head chunk selection once the cache outgrows
  ``(top_k + 2) * chunk_size`` tokens (reading prompts past the window needs the host's
  block prefill).
- ``apportion-distattention``: micro-attention over KV shards merged by log-sum-exp (exact).
- ``apportion-ssa``: block-sparse attention (top-k key blocks, sink, local).

Not registered: ``ape`` and ``infiniretri``. What they do happens in the host's prefill
(parallel context encoding; chunked reading); outside it their attention function is plain
SDPA, so a name for it in plain transformers would promise what it does not do.
"""

from __future__ import annotations

from typing import Any

from apportion.host.attention import AttentionBackend, register_attention

#: the default-config instances behind the registered names (their state: e.g. the index)
BACKENDS: dict[str, AttentionBackend] = {}


def default_backends() -> tuple[AttentionBackend, ...]:
    """Default-config instances of the backends registered at import."""
    from apportion_attention.distattention import DistAttention
    from apportion_attention.longheads import LongHeads
    from apportion_attention.squeezed import Squeezed
    from apportion_attention.ssa import SSAAttention

    return (Squeezed(), LongHeads(), DistAttention(), SSAAttention())


def register(*backends: Any) -> list[str]:
    """Register backend instances as ``apportion-<name>`` (default: :func:`default_backends`);
    returns the registered names. A backend without an attention function is skipped."""
    if not backends:
        backends = default_backends()
    names = []
    for b in backends:
        fn = b.attention_function()
        if fn is None:
            continue
        name = register_attention(f"apportion-{b.name}", fn, b.mask_function())
        BACKENDS[name] = b
        names.append(name)
    return names
