"""Typed protocols, one per component kind. Tensors appear only under ``TYPE_CHECKING``.

Implementations usually subclass the small base classes instead
(:mod:`apportion.base`, :mod:`apportion.host.attention`, :mod:`apportion.host.kv`), which
satisfy these protocols with defaults that work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from transformers import Cache, PreTrainedModel

    from apportion.base import AllocatorStats, Prompt, Sample
    from apportion.host.kv import PrefillOutput


@runtime_checkable
class AttentionBackend(Protocol):
    """How attention is computed. Installed into a model for the duration of a generation."""

    name: str
    config: Any
    #: True if the backend can read prompts longer than the model's trained window.
    extends_context: bool

    def installed(self, model: PreTrainedModel) -> AbstractContextManager[None]:
        """Make ``model`` use this backend inside the ``with`` block, and restore it after."""

    def prefill(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Cache,
        *,
        question_len: int,
        inner: Callable[..., PrefillOutput],
    ) -> PrefillOutput:
        """Prefill the prompt; ``inner`` is the KV policy's prefill (call it, or replace it)."""


@runtime_checkable
class KVPolicy(Protocol):
    """What the KV cache keeps. ``compression_ratio`` is the fraction of context KV removed."""

    name: str
    config: Any

    def make_cache(self, model: PreTrainedModel) -> Cache:
        """A fresh cache for one generation."""

    def prefill(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Cache,
        *,
        question_len: int,
    ) -> PrefillOutput:
        """Run the prompt through ``model`` into ``cache``, compressing as the policy says."""


@runtime_checkable
class Allocator(Protocol):
    """Places tensors in memory (host, pinned, NVMe, NUMA tiers)."""

    name: str
    config: Any

    def allocate(self, shape: Sequence[int], dtype: Any, *, access: str = "default") -> Any:
        """A tensor of ``shape``/``dtype`` placed according to ``access`` (e.g. 'latency', 'bandwidth')."""

    def free(self, tensor: Any) -> None:
        """Give a tensor obtained from :meth:`allocate` back."""

    def stats(self) -> AllocatorStats:
        """Current and peak bytes, and anything else the allocator tracks."""


@runtime_checkable
class TrainerStrategy(Protocol):
    """Rollout allocation, advantages and loss for GRPO-style RL."""

    name: str
    config: Any

    def allocate_rollouts(
        self, n_prompts: int, budget: int, history: Sequence[Sequence[float]] | None = None
    ) -> list[int]:
        """How many rollouts each prompt gets out of ``budget``."""

    def advantages(self, rewards: Sequence[Sequence[float | None]]) -> list[list[float]]:
        """One advantage per rollout, from the rewards of each prompt's group."""

    def loss(
        self,
        logps: torch.Tensor,
        old_logps: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        ref_logps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The policy-gradient loss over (batch, tokens) log-probs."""


@runtime_checkable
class PromptStrategy(Protocol):
    """Builds the prompt for a query under a token budget."""

    name: str
    config: Any

    def build(
        self,
        query: str,
        *,
        context: str | None = None,
        demos: Sequence[Any] = (),
        budget: int | None = None,
        tokenizer: Any = None,
    ) -> Prompt:
        """Return chat messages plus an accounting of what was kept and why."""


@runtime_checkable
class Benchmark(Protocol):
    """Generates samples in the model's own tokens and scores predictions.

    Optional: ``demos(sample) -> Sequence`` offers a demonstration pool for a sample; the
    runner then passes it, with a token budget, to the prompt strategy (``Benchmark.demos``
    in :mod:`apportion.base` returns none)."""

    name: str
    config: Any
    max_new_tokens: int

    def samples(self, tokenizer: Any) -> Iterator[Sample]:
        """Deterministic samples for the configured lengths, depths, count and seed."""

    def score(self, sample: Sample, prediction: str) -> float:
        """A score in [0, 1]."""
