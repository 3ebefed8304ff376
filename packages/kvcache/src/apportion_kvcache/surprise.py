"""``surprise``: query-agnostic span keeping by the model's own surprisal.

What a later question can ask about is, mostly, what the model could not have guessed: a
name, a number, a fact that does not follow from the text around it. ``surprise`` prefills
the context once, reads each token's surprisal ``-log p(x_t | x_<t)`` from the model's own
next-token distribution (computed from the final hidden states in chunks, never the whole
logit matrix), lifts the ``before`` tokens ahead of a surprising token and the ``span``
tokens after it (a fact's key, then its value), and keeps the same top positions in every
layer and KV head, plus ``sink`` leading entries and
the protected tail. It needs no question, so it serves contexts compressed before their
question is known (``generation.question_in_prefill = false``) as well as with it.

The scores need the final layer, which a layer-wise prefill has not reached when it evicts
the first (:attr:`~apportion.host.kv.KVPolicy.needs_prompt_hidden`). Alone, the policy runs
the context twice: a scoring pass that holds one layer's keys and values at a time, then the
layer-wise prefill, each layer evicted by those scores as soon as it attended; its peak is the
compressed cache plus one full layer in flight, and the price is a second forward pass. With
``one_pass`` it runs the context once and evicts every layer after the last one ran: the peak
is the full cache, the time one forward (what a context compressed once for many questions
wants). In a shared prefill (:mod:`apportion.host.shared`) the one forward serves it too.

Surprisal as a keep signal follows selective-context compression of prompts (Li et al.,
"Compressing Context to Enhance Inference Efficiency of Large Language Models", 2023); applied
to KV entries with span pooling, it is this package's own.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from apportion.host.kv import LayerInputs, positions_from_mask
from pydantic import Field

from apportion_kvcache.eviction import EvictionConfig, ScoredEviction


class SurpriseConfig(EvictionConfig):
    span: int = Field(
        24, ge=0, le=128, description="tokens kept after a surprising token (its fact's value)"
    )
    before: int = Field(4, ge=0, le=64, description="tokens kept before a surprising token")
    sink: int = Field(4, ge=0, le=256, description="leading entries always kept")
    chunk: int = Field(
        512, ge=16, le=8192, description="positions per chunk of the surprisal computation"
    )
    one_pass: bool = Field(
        False,
        description="score and evict in one forward, holding every layer's full KV until the "
        "last layer has run (peak: the full cache) instead of a scoring pass first (peak: the "
        "compressed cache plus one layer; the price, a second forward). For contexts "
        "compressed once and asked many times, where the compression's time counts and its "
        "peak passes",
    )


def surprisal(
    model: Any, hidden: torch.Tensor, input_ids: torch.Tensor, chunk: int
) -> torch.Tensor:
    """(B, L) surprisal in nats of each token given the ones before it (0 for the first),
    from the final hidden states (B, L, D), ``chunk`` positions at a time."""
    head = model.get_output_embeddings()
    b, length, _ = hidden.shape
    out = torch.zeros((b, length), dtype=torch.float32, device=hidden.device)
    for start in range(0, length - 1, chunk):
        stop = min(length - 1, start + chunk)
        logp = torch.log_softmax(head(hidden[:, start:stop]).float(), dim=-1)
        nxt = input_ids[:, start + 1 : stop + 1, None]
        out[:, start + 1 : stop + 1] = -logp.gather(-1, nxt)[..., 0]
    return out


def reach(scores: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """(B, L): each position's max of ``scores`` over the ``after`` positions before it and the
    ``before`` positions after it, i.e. a surprising token lifts the ``before`` tokens ahead
    of it and the ``after`` tokens that follow it (a fact's key and then its value)."""
    padded = F.pad(scores[:, None, :], (after, before), value=float("-inf"))
    return F.max_pool1d(padded, after + before + 1, stride=1)[:, 0]


class Surprise(ScoredEviction):
    name: ClassVar[str] = "surprise"
    summary: ClassVar[str] = (
        "query-agnostic span keeping: the model's own surprisal, max-pooled over spans"
    )
    Config = SurpriseConfig
    needs_prompt_hidden: ClassVar[bool] = True

    def __init__(self, config: SurpriseConfig | None = None) -> None:
        super().__init__(config)
        self._scores: torch.Tensor | None = None

    @property
    def one_pass(self) -> bool:
        return bool(self.config.one_pass)

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        """The prompt's token scores (:meth:`prepare`), the same for every layer and KV head."""
        if self._scores is None or self._scores.shape[-1] != inputs.keys.shape[-2]:
            raise RuntimeError("surprise scores the prompt it was prepared for, in a prefill")
        return self._scores[:, None, :].expand(-1, inputs.keys.shape[1], -1)

    def prepare(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        hidden: torch.Tensor,
        memo: dict[Any, Any],
    ) -> None:
        key = ("surprise", self.config.model_dump_json(exclude={"compression_ratio"}))
        if key not in memo:
            memo[key] = self.token_scores(model, input_ids, attention_mask, hidden)
        self._scores = memo[key]

    def release(self) -> None:
        self._scores = None

    def token_scores(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        hidden: torch.Tensor,
    ) -> torch.Tensor:
        """(B, L) keep scores of one prompt batch from its final hidden states (B, L, D)."""
        c = self.config
        real = attention_mask.bool()
        scores = surprisal(model, hidden, input_ids, c.chunk).masked_fill(~real, 0.0)
        # a row's first real token has no prediction: count it as a sink
        first = real.float().argmax(-1)
        scores[torch.arange(scores.shape[0]), first] = scores.max() + 1.0
        scores = reach(scores, c.before, c.span) + 1e-3 * scores
        if c.sink:
            offsets = positions_from_mask(attention_mask)
            scores = scores.masked_fill(real & (offsets < c.sink), float(scores.max()) + 1.0)
        return scores
