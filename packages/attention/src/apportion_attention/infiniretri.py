"""InfiniRetri (Ye et al., 2025): the model's own attention retrieves from inputs of any
length, read one window-sized chunk at a time.

For each chunk the model reads ``[prompt head] + [kept sentences] + [chunk] + [question]``
(fresh positions from 0, so every pass is inside the trained window). At layer
``score_layer`` the question tokens' attention to the context tokens, summed over heads
and question tokens and smoothed over a ``phrase_window`` (a 1D average, so that phrases
rather than lone tokens win), scores each token; a sentence scores its best token, and the
best sentences, up to ``keep_tokens`` tokens, are kept *as token ids* (in their original
order) for the next chunk. The forward pass stops at ``score_layer``: the layers above it
are not needed to score. After the last chunk the answer is generated from
``[head] + [kept] + [question]`` through the KV policy's own prefill.

Sentences end at tokens whose text ends in ``.``, ``!``, ``?`` or a newline; the tokenizer
comes from :meth:`InfiniRetri.bind` (the host binds the loaded model) or from
:meth:`InfiniRetri.use_tokenizer`. Batch size 1 (several prompts are read one by one).

Parameters (:class:`InfiniRetriConfig`): ``chunk_tokens`` new context tokens per pass,
``keep_tokens`` carried forward, ``head_tokens`` of the prompt kept in every pass,
``score_layer`` (default three quarters of the way up: the middle layer lost the needle on
long inputs) and ``phrase_window``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from apportion.config import ComponentConfig
from apportion.errors import ApportionError, ConfigError
from apportion.host.attention import AttentionBackend
from apportion.host.kv import PrefillOutput
from pydantic import Field

log = logging.getLogger("apportion_attention.infiniretri")


class InfiniRetriConfig(ComponentConfig):
    chunk_tokens: int = Field(2048, ge=64, description="new context tokens read per pass")
    keep_tokens: int = Field(
        512, ge=0, description="token budget of the sentences carried to the next pass"
    )
    head_tokens: int = Field(
        16, ge=0, description="prompt tokens (chat template head) kept in every pass"
    )
    score_layer: int | None = Field(
        None, description="layer whose attention scores tokens; None: three quarters of the way up"
    )
    phrase_window: int = Field(
        5, ge=1, description="width of the average that turns token scores into phrase scores"
    )


class _Stop(Exception):
    """Raised inside the forward pass once the scoring layer has been read."""


def sentence_ends(tokenizer: Any, ids: list[int]) -> list[int]:
    """Indices (into ``ids``) of tokens that end a sentence."""
    ends = []
    cache: dict[int, bool] = {}
    for i, t in enumerate(ids):
        if t not in cache:
            text = tokenizer.decode([t])
            cache[t] = text.rstrip(" ").endswith((".", "!", "?", "\n")) or "\n" in text
        if cache[t]:
            ends.append(i)
    return ends


class InfiniRetri(AttentionBackend):
    """Chunked reading; the question's attention picks the sentences carried forward."""

    name: ClassVar[str] = "infiniretri"
    summary: ClassVar[str] = (
        "InfiniRetri: chunked reading, the question's attention keeps sentences for the next chunk"
    )
    Config = InfiniRetriConfig
    extends_context: ClassVar[bool] = True

    def __init__(self, config: InfiniRetriConfig | None = None):
        super().__init__(config)
        self._tokenizer: Any = None
        self._score: dict[str, Any] | None = None  # set while a scoring pass runs
        #: what the last prefill did: passes, kept tokens, final prompt length
        self.last_read: dict[str, Any] = {}

    def bind(self, loaded: Any) -> None:
        """Keep the loaded model's tokenizer: sentence boundaries are read from token text."""
        self._tokenizer = loaded.tokenizer

    def use_tokenizer(self, tokenizer: Any) -> InfiniRetri:
        """Set the tokenizer for standalone use (without :meth:`bind`)."""
        self._tokenizer = tokenizer
        return self

    def attention_function(self) -> Callable[..., Any]:
        return self._attend

    def _attend(
        self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
    ):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        s = self._score
        if s is not None and getattr(module, "layer_idx", None) == s["layer"]:
            q = query[:, :, -s["question_len"] :].float()
            k = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            att = torch.softmax(
                torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1
            )  # question -> all keys
            s["scores"] = att.sum(dim=(1, 2))[0]  # (N,)
            raise _Stop
        return out

    def _require_tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise ApportionError(
                "infiniretri needs the tokenizer to find sentences: bind it to the loaded model "
                "(InfiniRetri.bind, which apportion's host calls), or call "
                "InfiniRetri.use_tokenizer(tokenizer)"
            )
        return self._tokenizer

    @torch.inference_mode()
    def _scores(self, model: Any, ids: list[int], question_len: int, layer: int) -> torch.Tensor:
        device = next(model.parameters()).device
        self._score = {"layer": layer, "question_len": question_len}
        try:
            getattr(model, "model", model)(
                input_ids=torch.tensor([ids], device=device), use_cache=False
            )
        except _Stop:
            pass
        finally:
            scores, self._score = self._score.get("scores") if self._score else None, None
        if scores is None:
            raise ApportionError(
                f"infiniretri: layer {layer} was never reached (is the backend installed?)"
            )
        return scores

    def prefill(self, model, input_ids, attention_mask, cache, *, question_len, inner):
        if input_ids.shape[0] != 1:
            raise ConfigError("infiniretri reads one prompt at a time (batch size 1)")
        if not bool(attention_mask.all()):
            raise ConfigError("infiniretri does not take padded prompts")
        c = self.config
        n_layers = model.config.num_hidden_layers
        # three quarters up, not the middle: lower and top layers lose the needle's sentence
        layer = (3 * n_layers) // 4 if c.score_layer is None else c.score_layer
        if not -n_layers <= layer < n_layers:
            raise ConfigError(f"score_layer {layer} is outside the model's {n_layers} layers")
        layer %= n_layers
        window = getattr(model.config, "max_position_embeddings", None)
        question_len = max(int(question_len), 0)
        per_pass = (
            c.head_tokens + c.keep_tokens + c.chunk_tokens + question_len + 64
        )  # 64: a sentence overrun
        if window and per_pass > window:
            raise ConfigError(
                f"one infiniretri pass ({per_pass} tokens) exceeds the model's {window} positions: "
                "lower chunk_tokens or keep_tokens"
            )
        if (
            input_ids.shape[1] - question_len - c.head_tokens <= c.chunk_tokens
        ):  # one chunk: read it whole
            self.last_read = {
                "passes": 0,
                "kept_tokens": None,
                "context_tokens": None,
                "final_tokens": int(input_ids.shape[1]),
            }
            return inner(model, input_ids, attention_mask, cache, question_len=question_len)
        if question_len == 0:
            raise ConfigError(
                "infiniretri needs the question apart from the context (a Prompt with question=...)"
            )
        ids = input_ids[0].tolist()
        head, context, question = (
            ids[: c.head_tokens],
            ids[c.head_tokens : len(ids) - question_len],
            ids[len(ids) - question_len :],
        )
        ends = sentence_ends(self._require_tokenizer(), context)
        bounds = [0] + [e + 1 for e in ends if e + 1 < len(context)] + [len(context)]
        sent_of = torch.zeros(len(context), dtype=torch.long)
        for si, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            sent_of[a:b] = si
        kept: list[int] = []  # indices into `context`, ascending
        pos = passes = 0
        while pos < len(context):
            # end each chunk on a sentence boundary when one is near
            stop = min(len(context), pos + c.chunk_tokens)
            if stop < len(context):
                inside = [b for b in bounds if pos < b <= stop]
                stop = inside[-1] if inside and inside[-1] > pos + c.chunk_tokens // 2 else stop
            cand = kept + list(range(pos, stop))
            seq = head + [context[i] for i in cand] + question
            scores = self._scores(model, seq, len(question), layer)[
                len(head) : len(head) + len(cand)
            ]
            if c.phrase_window > 1:
                scores = torch.nn.functional.avg_pool1d(
                    scores[None, None],
                    c.phrase_window,
                    stride=1,
                    padding=c.phrase_window // 2,
                    count_include_pad=False,
                )[0, 0, : len(cand)]
            kept = self._keep(cand, scores, sent_of)
            pos = stop
            passes += 1
        final = head + [context[i] for i in kept] + question
        self.last_read = {
            "passes": passes,
            "kept_tokens": len(kept),
            "context_tokens": len(context),
            "final_tokens": len(final),
        }
        ids_t = torch.tensor([final], device=input_ids.device)
        out = inner(model, ids_t, torch.ones_like(ids_t), cache, question_len=question_len)
        return PrefillOutput(
            logits=out.logits,
            kv_mask=out.kv_mask,
            next_position=out.next_position,
            info=self.last_read,
        )

    def _keep(self, cand: list[int], scores: torch.Tensor, sent_of: torch.Tensor) -> list[int]:
        """The best sentences among ``cand`` (context indices) up to ``keep_tokens`` tokens."""
        budget = self.config.keep_tokens
        if budget == 0 or not cand:
            return []
        cand_t = torch.tensor(cand)
        sents = sent_of[cand_t]
        uniq, inv = torch.unique(sents, return_inverse=True)
        best = torch.full((len(uniq),), float("-inf")).scatter_reduce(
            0, inv, scores.float().cpu(), reduce="amax"
        )
        sizes = torch.bincount(inv, minlength=len(uniq))
        chosen: set[int] = set()
        used = 0
        for j in best.argsort(descending=True).tolist():
            n = int(sizes[j])
            if used + n > budget:
                if used == 0:  # a single sentence longer than the budget: keep its best part
                    chosen.add(j)
                    used = budget
                break
            chosen.add(j)
            used += n
        keep = [i for i, s in zip(cand, inv.tolist(), strict=True) if s in chosen]
        return keep[-budget:] if len(keep) > budget else keep
