"""The contract of every component kind: one small base class per kind, with defaults that work.

A component is a class that carries everything the registry needs to know about it::

    class SnapKV(ScoredEviction):
        name = "snapkv"                       # its name within its kind
        summary = "SnapKV: observation-window attention, pooled, per KV head"
        Config = SnapKVConfig                 # pydantic options, every field with a default

and is registered once, by that class (``register(SnapKV)``) or by a lazy import path
(``register("pkg.snapkv:SnapKV", name="snapkv")``), see :mod:`apportion.hookspecs`. The
registry builds it as ``cls(config)``; the instance keeps the validated options as
``self.config``. Components that need the loaded model get it explicitly through
:meth:`Component.bind`, never through module-level caches.

Attention backends and KV policies need transformers, so their bases live in
:mod:`apportion.host` (:class:`~apportion.host.attention.AttentionBackend`,
:class:`~apportion.host.kv.KVPolicy`); the four torch-free bases are here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class ComponentConfig(BaseModel):
    """Base class of component options: unknown options are errors, every field has a default."""

    model_config = ConfigDict(extra="forbid")


class EmptyConfig(ComponentConfig):
    """Options of a component that takes none."""


class Component:
    """What every component carries: its ``kind``, ``name``, one-line ``summary`` and ``Config``.

    ``incompatible_with``: ``{kind: [names]}`` this component cannot run beside; a run config
    that combines them is refused at validation, before a model loads.
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[ComponentConfig]] = EmptyConfig
    incompatible_with: ClassVar[dict[str, list[str]]] = {}

    def __init__(self, config: ComponentConfig | None = None):
        self.config = config if config is not None else self.Config()

    def bind(self, loaded: Any) -> None:
        """Receive the loaded model (an :class:`apportion.host.LoadedModel`) before first use.

        The runner and :class:`apportion.host.Host` call it once per model; the default keeps
        nothing. Components that run the model, read its tokenizer or key stored data by the
        model's fingerprint override it (as kvpress's ``post_init_from_model``).
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


# ----------------------------------------------------------------------------- benchmark


@dataclass
class Sample:
    """One benchmark item. ``context`` and ``question`` are kept apart so that KV policies can
    compress the context and leave the question whole."""

    id: str
    context: str
    question: str
    answers: list[str]
    length: int = 0  # target prompt length in tokens
    depth: float | None = None  # where the information sits, 0 = start, 1 = end
    tags: dict[str, str] = field(default_factory=dict)  # e.g. diffusion, scope
    meta: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "length": self.length,
            "depth": self.depth,
            "answers": self.answers,
            "tags": self.tags,
            "meta": self.meta,
        }


class Benchmark(Component):
    """Base benchmark: subclasses implement :meth:`samples` and may override :meth:`score`
    and :meth:`metrics`."""

    kind: ClassVar[str] = "benchmark"
    max_new_tokens: ClassVar[int] = 48

    def samples(self, tokenizer: Any) -> Iterator[Sample]:
        raise NotImplementedError

    def demos(self, sample: Sample) -> Sequence[Any]:
        """Demonstrations a prompt strategy may put before ``sample`` (``Demo``-like objects,
        ``(input, output)`` pairs or mappings with input/output keys). The runner passes them
        to ``PromptStrategy.build`` with a token budget. Default: none (zero-shot)."""
        return ()

    def score(self, sample: Sample, prediction: str) -> float:
        """Default: fraction of gold answers found in the prediction (case-insensitive)."""
        if not sample.answers:
            return 0.0
        pred = prediction.lower()
        return sum(a.lower() in pred for a in sample.answers) / len(sample.answers)

    def metrics(self, sample: Sample, prediction: str) -> dict[str, Any] | None:
        """Extra named figures recorded beside the score (e.g. per-item accuracy); default none."""
        return None


# ------------------------------------------------------------------------- prompt strategy


@dataclass
class Prompt:
    """Chat messages for the model. ``question`` is the trailing text of the last message that
    must never be compressed (the host keeps it apart from the context).

    ``embeds``: input embeddings the host reads in place of text, for learned context
    compression (soft prompts, ICAE, ARC-Encoder). Each key is a *placeholder*: a string
    that occurs exactly once in the chat-templated prompt, before the question; its value is
    a float tensor of shape ``(n, hidden)`` in the model's input-embedding space (what
    ``model.get_input_embeddings()`` outputs). The host tokenizes the text around each
    placeholder on its own (a placeholder is a token boundary), gives the placeholder ``n``
    token slots (they count in ``prompt_tokens`` and in the context window; their token id is
    the pad token's), and during the prefill the model reads the tensor's rows at those
    slots instead of token embeddings; decoding then continues from the KV cache as usual.
    The values are typed loosely so that ``import apportion`` stays torch-free: any
    ``torch.Tensor`` (the host casts it to the model's dtype and device).

    The splice composes with every KV policy and attention backend that runs the prompt
    through the model in one forward (``full``, the layer-wise eviction policies, the
    query-agnostic probe); one that reads the prompt in pieces is refused with a
    :class:`~apportion.errors.PromptEmbedsError`, as is a malformed entry (a placeholder
    missing, repeated or inside the question; a tensor of the wrong shape). A host that
    cannot read embeddings (one that only takes text) must refuse a prompt with ``embeds``.
    """

    messages: list[dict[str, str]]
    question: str | None = None
    accounting: dict[str, Any] = field(default_factory=dict)
    embeds: dict[str, Any] = field(default_factory=dict)


class PromptStrategy(Component):
    """``zero-shot``: the context, then the question; no demonstrations.

    The contract: ``build`` returns a :class:`Prompt` whose last message is the user's and
    ends with the query (``Prompt.question``), with ``accounting`` saying what was kept; a
    ``budget`` smaller than the query alone is an error. A strategy may hand the host part of
    the prompt as input embeddings instead of text (``Prompt.embeds``, see :class:`Prompt`):
    learned compressors put a placeholder where the context would stand and the compressed
    vectors under it, and count the placeholder's ``n`` slots as the context's tokens."""

    kind: ClassVar[str] = "prompt-strategy"
    name: ClassVar[str] = "zero-shot"
    summary: ClassVar[str] = "the context, then the question; no demonstrations"

    def build(
        self,
        query: str,
        *,
        context: str | None = None,
        demos: Sequence[Any] = (),
        budget: int | None = None,
        tokenizer: Any = None,
    ) -> Prompt:
        content = f"{context}\n\n{query}" if context else query
        accounting: dict[str, Any] = {"demos_kept": 0, "demos_offered": len(demos)}
        if tokenizer is not None:
            n = len(tokenizer.encode(content, add_special_tokens=False))
            accounting["prompt_tokens"] = n
            if budget is not None and n > budget:
                from apportion.errors import PromptTooLongError

                raise PromptTooLongError(
                    f"the prompt needs {n} tokens but the budget is {budget}; "
                    "use a prompt strategy that prunes, or raise the budget"
                )
        return Prompt([{"role": "user", "content": content}], question=query, accounting=accounting)


# ------------------------------------------------------------------------ trainer strategy


class TrainerStrategy(Component):
    """Base GRPO-style strategy: uniform rollouts, group-normalised advantages, clipped loss."""

    kind: ClassVar[str] = "trainer-strategy"

    def allocate_rollouts(
        self, n_prompts: int, budget: int, history: Sequence[Sequence[float]] | None = None
    ) -> list[int]:
        if n_prompts <= 0:
            raise ValueError(f"n_prompts must be positive, got {n_prompts}")
        if budget < n_prompts:
            raise ValueError(
                f"budget {budget} is smaller than the number of prompts {n_prompts}: "
                "every prompt needs at least one rollout"
            )
        base, extra = divmod(budget, n_prompts)
        return [base + (i < extra) for i in range(n_prompts)]

    def advantages(self, rewards: Sequence[Sequence[float | None]]) -> list[list[float]]:
        """(r - mean) / (std + eps) per group; NaN/None rewards get advantage 0 and are
        excluded from the statistics; a group of one gets 0."""
        out = []
        for group in rewards:
            valid = [float(r) for r in group if r is not None and not math.isnan(float(r))]
            if len(valid) < 2:
                out.append([0.0 for _ in group])
                continue
            mean = sum(valid) / len(valid)
            std = math.sqrt(sum((r - mean) ** 2 for r in valid) / (len(valid) - 1))
            out.append(
                [
                    0.0 if r is None or math.isnan(float(r)) else (float(r) - mean) / (std + 1e-4)
                    for r in group
                ]
            )
        return out

    def loss(
        self, logps: Any, old_logps: Any, advantages: Any, mask: Any, ref_logps: Any = None
    ) -> Any:
        """PPO-clipped token loss averaged per sequence then over the batch (GRPO)."""
        import torch

        eps = getattr(self.config, "clip_eps", 0.2)
        ratio = torch.exp(logps - old_logps)
        adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
        mask = mask.to(per_token.dtype)
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.mean()


# ------------------------------------------------------------------------------ allocator


@dataclass
class AllocatorStats:
    current_bytes: int = 0
    peak_bytes: int = 0
    allocations: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Allocator(Component):
    """Base allocator: ordinary pageable host memory through torch, with byte accounting.

    An allocator may also place the KV cache of generation (the offload family's tiers):

    - :meth:`kv_budget`: the bytes of KV it keeps *resident* (on the model's device), or
      ``None`` when every layer stays resident. The runner refuses a budget smaller than one
      layer's KV at the run's longest prompt before the model loads.
    - :meth:`kv_cache`: given the KV policy's cache (``KVPolicy.make_cache``), the cache
      generation runs on instead, or ``None`` to keep the policy's. The host composes them:
      the policy evicts first, the allocator's cache places what was kept. A cache that holds
      KV outside the device may report ``kv_nbytes()`` (all of it) and
      ``resident_kv_bytes()`` (what is on the device); the host measures both.

    The defaults offload nothing.
    """

    kind: ClassVar[str] = "allocator"

    def kv_budget(self) -> int | None:
        """Bytes of KV this allocator keeps resident during generation (``None``: all)."""
        return None

    def kv_cache(self, model: Any, cache: Any) -> Any | None:
        """The cache to generate with in place of the KV policy's ``cache`` (``None``: keep
        it, every layer resident). Called once per generation, before the prefill."""
        return None

    def __init__(self, config: ComponentConfig | None = None):
        super().__init__(config)
        self._stats = AllocatorStats()
        self._live: dict[int, int] = {}

    def allocate(self, shape: Sequence[int], dtype: Any, *, access: str = "default") -> Any:
        import torch

        tensor = torch.empty(tuple(shape), dtype=dtype)
        self._track(tensor)
        return tensor

    def free(self, tensor: Any) -> None:
        nbytes = self._live.pop(id(tensor), None)
        if nbytes is None:
            raise ValueError("free() of a tensor this allocator did not allocate (or freed twice)")
        self._stats.current_bytes -= nbytes

    def stats(self) -> AllocatorStats:
        return self._stats

    def _track(self, tensor: Any) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self._live[id(tensor)] = nbytes
        self._stats.allocations += 1
        self._stats.current_bytes += nbytes
        self._stats.peak_bytes = max(self._stats.peak_bytes, self._stats.current_bytes)
