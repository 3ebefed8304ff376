"""Attention backends for the HF host. The base class *is* the ``dense`` backend (SDPA).

A backend that computes attention differently returns a function from
:meth:`AttentionBackend.attention_function` with transformers' attention signature
``fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs) ->
(output, weights)``. :meth:`AttentionBackend.installed` registers it in
``AttentionInterface`` (and a mask builder in ``AttentionMaskInterface``) under
``"apportion-<name>"`` and switches the model to it for the ``with`` block (restoring on exit
what was registered under that name before), so the same function also works as
``attn_implementation="apportion-<name>"`` in plain transformers.

A backend that changes *how the prompt is read* (chunked reading, retrieval) overrides
:meth:`prefill`; ``inner`` is the KV policy's prefill, so backends and policies compose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from apportion.base import Component


def register_attention(
    name: str, fn: Callable[..., Any], mask_fn: Callable[..., Any] | None = None
) -> str:
    """Register ``fn`` as ``name`` in transformers' attention and mask interfaces."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, mask_fn or sdpa_mask)
    return name


def registered_attention(name: str) -> tuple[Callable[..., Any], Callable[..., Any] | None] | None:
    """The (attention, mask) functions registered as ``name``, or ``None`` if there are none."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    functions: dict[str, Any] = AttentionInterface._global_mapping
    masks: dict[str, Any] = AttentionMaskInterface._global_mapping
    if name not in functions:
        return None
    return functions[name], masks.get(name)


class AttentionBackend(Component):
    """``dense``: transformers' SDPA attention, unchanged."""

    kind: ClassVar[str] = "attention"
    name: ClassVar[str] = "dense"
    summary: ClassVar[str] = "transformers' SDPA attention over every key (the reference)"
    #: True if this backend reads prompts longer than the model's trained window.
    extends_context: ClassVar[bool] = False

    def attention_function(self) -> Callable[..., Any] | None:
        """The attention function to install, or ``None`` to keep SDPA."""
        return None

    def mask_function(self) -> Callable[..., Any] | None:
        """The mask builder for :class:`AttentionMaskInterface`; ``None`` means SDPA's."""
        return None

    @property
    def attn_implementation(self) -> str:
        return "sdpa" if self.attention_function() is None else f"apportion-{self.name}"

    @contextmanager
    def installed(self, model: Any) -> Iterator[None]:
        """Switch ``model`` to this backend's function for the ``with`` block. A function that
        was registered under the same name before (e.g. by ``import apportion_attention``, for
        plain transformers) is registered again on exit; a new name stays registered."""
        fn = self.attention_function()
        key = "sdpa"
        before = None
        if fn is not None:
            before = registered_attention(f"apportion-{self.name}")
            key = register_attention(f"apportion-{self.name}", fn, self.mask_function())
        previous = model.config._attn_implementation
        if previous != key:
            model.set_attn_implementation(key)
        try:
            yield
        finally:
            if previous != key:
                model.set_attn_implementation(previous)
            if before is not None:
                register_attention(key, *before)

    def prefill(
        self,
        model: Any,
        input_ids: Any,
        attention_mask: Any,
        cache: Any,
        *,
        question_len: int,
        inner: Callable[..., Any],
    ) -> Any:
        return inner(model, input_ids, attention_mask, cache, question_len=question_len)
