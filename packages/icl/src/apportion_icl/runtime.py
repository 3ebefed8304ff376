"""Running the LLM a strategy is bound to.

Strategies that look inside the LLM (latent selection, confidence, recycling, attention
pruning, verify loops, IterDRAG) get the model explicitly: the core runner calls
``strategy.bind(loaded)`` with the model the run loaded, and code that uses a strategy
directly does the same. A strategy used without ``bind`` loads its ``model`` option once, on
first use, through :func:`load_llm`, and keeps it on the instance. No model is kept in a
module: which model a strategy runs is the caller's ``bind`` or the strategy's own option.

Sentence embeddings come from the core's :class:`apportion.host.embed.SentenceEmbedder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apportion.config import ModelSpec
    from apportion.host.model import LoadedModel


def load_llm(spec: ModelSpec | None = None) -> LoadedModel:
    """Load the model an unbound strategy runs: ``spec`` (default: :func:`default_spec`).
    Every call loads a fresh model; the caller keeps it (a strategy, on itself)."""
    from apportion.host import load_model

    return load_model(spec if spec is not None else default_spec())


def default_spec(name: str = "smollm2") -> ModelSpec:
    """The :class:`~apportion.config.ModelSpec` an unbound strategy loads for ``name``: on the
    CPU, in float32."""
    from apportion.config import ModelSpec

    return ModelSpec(name=name, device="cpu", dtype="float32")


def generate(loaded: Any, prompts: Sequence[Any], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers (text) of ``loaded`` for prompts (``Prompt``, message lists or strings)."""
    from apportion.base import Prompt
    from apportion.host import Host

    items = [Prompt(p) if isinstance(p, list) else p for p in prompts]
    return [r.text for r in Host(loaded).generate(items, max_new_tokens=max_new_tokens)]
