"""transformers integration: register this package's backends in ``AttentionInterface`` and
``AttentionMaskInterface`` so ``attn_implementation="apportion-<name>"`` works on any
Llama-like model loaded with plain transformers::

    import apportion_attention.hf  # registers (importing transformers)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="apportion-squeezed")

``import apportion_attention`` registers them too when transformers is already imported
(the package itself stays torch-free at import, for ``apportion plugins``). The registered
functions use default-config backends; :func:`register` takes your own instances.
"""

from __future__ import annotations

from typing import Any

from apportion.host.attention import AttentionBackend, register_attention

#: the default-config instances behind the registered names (their state: e.g. the index)
BACKENDS: dict[str, AttentionBackend] = {}


def register(*backends: Any) -> list[str]:
    """Register backend instances (default: this package's function-based backends with
    default configs); returns the registered names."""
    if not backends:
        from apportion_attention.squeezed import Squeezed

        backends = (Squeezed(),)
    names = []
    for b in backends:
        fn = b.attention_function()
        if fn is None:
            continue
        name = register_attention(f"apportion-{b.name}", fn, b.mask_function())
        BACKENDS[name] = b
        names.append(name)
    return names


register()
