"""Context steering: training-free attention steering toward the user's turn.

Wang et al. (2024), "On the Loss of Context-awareness in General Instruction Fine-tuning"
(arXiv 2411.02688), find that instruction-tuned models read the user's context less well
once the chat template is applied: the roles learned in conversational fine-tuning bias
attention away from the user-turn tokens, and the model falls back on what it already
believes. They show it by the attention allocation with and without the template, and they
recover context awareness without training by steering selected heads' attention back to
the user prompt (in the manner of PASTA, Zhang et al. 2023). ``context-attention`` is that
training-free fix:

1. **Calibration** (:meth:`ContextSteer.bind`, once per model fingerprint and calibration
   setting; kept in memory): ``calibration_prompts`` generated prompts (stdlib prose of
   about ``calibration_tokens`` tokens with one made-up fact and a question about it, seeded
   by ``calibration_seed``, so they never share a fact with a benchmark) are read with and
   without the chat template. For every (layer, head), the attention mass the prompt's last
   query puts on the user's tokens (``span``) is measured both ways; the drop is the mean of
   ``mass(plain) - mass(templated)``.
2. **Selection**: the ``heads`` heads with the largest drop, among those whose drop exceeds
   ``min_drop`` (ties broken by layer, then head: deterministic).
3. **Steering**: in the selected heads, the logits of the queries past the user's span
   (``queries="after"``, the default: the assistant's header and every generated token, so
   the context itself is read as usual) on the user's tokens get ``log(alpha)`` added
   before the softmax, i.e. their probabilities are multiplied by ``alpha`` and the row is
   renormalised; ``queries="all"`` steers every query, as PASTA does. Other heads, and rows
   with no user turn, are plain SDPA; ``alpha = 1`` is exactly the plain model.

Where the user's tokens are: the backend reads the prompt's structure from its token ids
(:meth:`ContextSteer.user_span`). At bind it renders a one-message chat with the tokenizer's
template to learn the tokens that open the user turn (``<|im_start|>user\\n`` for ChatML)
and the token that closes it (``<|im_end|>``). At each prefill the user's content runs from
after the last opening before the question tail (the host's ``question_len``) to the
closing token; ``span="context"`` stops where the question begins instead. A prompt read
without the template has no user turn, so nothing competes with it and it is read unsteered.
The positions are those of the prefill; decode steps extend them (generated tokens are not
the user's). A KV policy that evicts entries breaks the position map: the backend then
reads that prompt unsteered (logged once).

Parameters (:class:`ContextSteerConfig`): ``alpha`` (the factor on the user tokens'
probabilities), ``heads`` and ``min_drop`` (which heads), ``span`` (the whole user turn or
its context before the question), ``queries`` (which queries are steered),
``calibration_prompts``, ``calibration_tokens`` and ``calibration_seed`` (the calibration
set). The defaults (60 heads, ``alpha=5``, the whole user turn, queries after it) are the
mildest of the best settings of a small grid on the ``context-awareness`` benchmark's
``dev`` split (``benchmarks/attention_context_awareness.py``); ``alpha=10`` was as good
there but dropped a digit in NIAH answers on a NIAH seed kept for development.

Selectable by name: ``attention.name = "context-attention"``.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from apportion.config import ComponentConfig
from apportion.host.attention import AttentionBackend
from pydantic import Field

from apportion_attention.distattention import as_bool_mask

log = logging.getLogger(__name__)

_SENTINEL = "\u2063CONTEXT\u2063"


class ContextSteerConfig(ComponentConfig):
    alpha: float = Field(
        5.0,
        gt=0.0,
        le=1000.0,
        description="factor on the selected heads' attention probabilities on the user's tokens "
        "(log(alpha) added to their logits, rows renormalised); 1 = the plain model",
    )
    heads: int = Field(
        60, ge=0, le=100_000, description="steer at most this many heads: the largest drops"
    )
    min_drop: float = Field(
        0.0,
        ge=-1.0,
        le=1.0,
        description="steer only heads whose attention mass on the user's tokens drops by more "
        "than this (a share of the row) when the chat template is applied",
    )
    span: Literal["user", "context"] = Field(
        "user",
        description="'user': the whole user turn (context and question); 'context': the "
        "user turn before the question",
    )
    queries: Literal["after", "all"] = Field(
        "after",
        description="'after': only the queries past the user's span (the question, the "
        "answer) are steered, so the context is read as usual; 'all': every query (PASTA)",
    )
    calibration_prompts: int = Field(
        6, ge=1, le=256, description="generated prompts read with and without the template"
    )
    calibration_tokens: int = Field(
        160, ge=48, le=8192, description="about this many tokens of prose per calibration prompt"
    )
    calibration_seed: int = Field(0, description="seed of the calibration prompts")


@dataclass(frozen=True)
class Markers:
    """The token ids around the user's content in the tokenizer's chat template."""

    open: tuple[int, ...]  # the tokens right before the content (e.g. <|im_start|> user \n)
    close: int | None  # the token right after it (e.g. <|im_end|>), if it is a special token


@dataclass
class CalibrationPrompt:
    """One calibration prompt in both renderings, with the user tokens' positions."""

    plain_ids: list[int]
    plain_span: tuple[int, int]
    chat_ids: list[int]
    chat_span: tuple[int, int]


#: per-head drops by (model fingerprint, calibration setting); what bind measured once
_DROPS: dict[tuple[str, str], torch.Tensor] = {}


def find_markers(tokenizer: Any) -> Markers | None:
    """The user turn's opening tokens and closing token in ``tokenizer``'s chat template, or
    ``None`` when it has no template (or the template drops the content)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], add_generation_prompt=True, tokenize=False
        )
    )
    at = text.find(_SENTINEL)
    if at < 0:
        return None
    head = tokenizer.encode(text[:at], add_special_tokens=False)
    tail = tokenizer.encode(text[at + len(_SENTINEL) :], add_special_tokens=False)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    # the opening starts at the last special token that is followed by a word (the role)
    start = None
    for j in range(len(head) - 1, -1, -1):
        if head[j] in special and any(
            c.isalpha() for c in tokenizer.decode(head[j + 1 :], skip_special_tokens=True)
        ):
            start = j
            break
    if start is None:
        return None
    close = tail[0] if tail and tail[0] in special else None
    return Markers(tuple(head[start:]), close)


def _last_occurrence(row: Sequence[int], pattern: Sequence[int], end: int) -> int:
    """Index just after the last occurrence of ``pattern`` ending at or before ``end``; -1."""
    n = len(pattern)
    for j in range(end - n, -1, -1):
        if list(row[j : j + n]) == list(pattern):
            return j + n
    return -1


class ContextSteer(AttentionBackend):
    """``context-attention``: raise selected heads' attention on the user's turn (training-free
    context-awareness fix of Wang et al. 2024; see the module docstring)."""

    name: ClassVar[str] = "context-attention"
    summary: ClassVar[str] = (
        "context-awareness steering: heads whose attention to the user turn drops under the "
        "chat template get alpha x attention on the user's tokens (Wang et al. 2024)"
    )
    Config = ContextSteerConfig
    config: ContextSteerConfig

    def __init__(self, config: ContextSteerConfig | None = None):
        super().__init__(config)
        self.markers: Markers | None = None
        #: (layers, heads) mean drop of attention mass on the user's tokens under the template
        self.drops: torch.Tensor | None = None
        #: layer -> the steered query heads of that layer (sorted)
        self.selected: dict[int, list[int]] = {}
        self._ctx: torch.Tensor | None = None  # (B, L) bool: the user's positions at prefill
        self._record: dict[int, torch.Tensor] | None = None
        self._record_span: tuple[int, int] | None = None
        self._logged: set[str] = set()

    # ------------------------------------------------------------------ model and heads
    def bind(self, loaded: Any) -> None:
        """Find the user turn's markers and calibrate the heads on ``loaded`` (memoised per
        model fingerprint and calibration setting)."""
        tokenizer = loaded.tokenizer
        self.markers = find_markers(tokenizer)
        if self.markers is None:
            self._note("the tokenizer has no chat template: nothing to steer toward")
            self.drops, self.selected = None, {}
            return
        cfg = self.config
        setting = json.dumps(
            [cfg.span, cfg.calibration_prompts, cfg.calibration_tokens, cfg.calibration_seed]
        )
        key = (str(getattr(loaded, "fingerprint", id(loaded.model))), setting)
        if key not in _DROPS:
            prompts = calibration_prompts(
                tokenizer,
                cfg.calibration_prompts,
                cfg.calibration_tokens,
                cfg.calibration_seed,
                span=cfg.span,
            )
            _DROPS[key] = self.measure_drops(loaded.model, prompts)
        self.drops = _DROPS[key]
        self.selected = select_heads(self.drops, cfg.heads, cfg.min_drop)

    def selected_heads(self) -> list[tuple[int, int]]:
        """The steered (layer, head) pairs, by layer then head."""
        return [(layer, h) for layer in sorted(self.selected) for h in self.selected[layer]]

    @torch.inference_mode()
    def measure_drops(self, model: Any, prompts: Sequence[CalibrationPrompt]) -> torch.Tensor:
        """Mean over ``prompts`` of (plain - templated) attention mass of the last query on
        the user's tokens, per (layer, head), read unsteered."""
        total: torch.Tensor | None = None
        for p in prompts:
            plain = self.user_mass(model, p.plain_ids, p.plain_span, steer=False)
            chat = self.user_mass(model, p.chat_ids, p.chat_span, steer=False)
            diff = plain - chat
            total = diff if total is None else total + diff
        assert total is not None
        return total / len(prompts)

    @torch.inference_mode()
    def user_mass(
        self, model: Any, ids: Sequence[int], span: tuple[int, int], *, steer: bool = True
    ) -> torch.Tensor:
        """(layers, heads): the attention mass the last query of ``ids`` puts on positions
        ``span`` (start, end), as this backend computes it (``steer=False``: plain)."""
        device = next(model.parameters()).device
        input_ids = torch.tensor([list(ids)], device=device)
        self._record, self._record_span = {}, span
        saved = self._ctx
        ctx = torch.zeros(input_ids.shape, dtype=torch.bool, device=device)
        ctx[0, span[0] : span[1]] = True
        self._ctx = ctx if steer else None
        try:
            with self.installed(model):
                model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
            layers = sorted(self._record)
            return torch.stack([self._record[i] for i in layers]).float().cpu()
        finally:
            self._record, self._record_span, self._ctx = None, None, saved

    # ------------------------------------------------------------------ prompt structure
    def user_span(self, row: Sequence[int], question_len: int) -> tuple[int, int] | None:
        """The positions (start, end) of the user's tokens in one prompt row (token ids;
        left padding allowed), or ``None`` when the row has no user turn."""
        if self.markers is None:
            return None
        n = len(row)
        tail = n - max(0, min(int(question_len), n))
        start = _last_occurrence(row, self.markers.open, tail)
        if start < 0:
            return None
        end = tail if self.config.span == "context" and question_len > 0 else n
        if self.markers.close is not None:
            for j in range(start, end):
                if row[j] == self.markers.close:
                    end = j
                    break
        if self.config.span == "user" and question_len > 0 and end == n:
            end = tail  # no closing token in the prefill: the tail is not the user's
        return (start, end) if end > start else None

    def prefill(self, model, input_ids, attention_mask, cache, *, question_len, inner):
        self._ctx = None
        if self.selected and self.config.alpha != 1.0:
            ctx = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            for b, row in enumerate(input_ids.tolist()):
                span = self.user_span(row, question_len)
                if span is not None:
                    ctx[b, span[0] : span[1]] = True
            if attention_mask is not None:
                ctx &= attention_mask.bool()
            self._ctx = ctx if bool(ctx.any()) else None
        return inner(model, input_ids, attention_mask, cache, question_len=question_len)

    # ------------------------------------------------------------------ the attention function
    def attention_function(self) -> Callable[..., Any]:
        return self._attend

    def _note(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("context-attention: %s", reason)

    def _context_keys(self, batch: int, k_len: int) -> torch.Tensor | None:
        """(B, K) bool: the keys that are the user's, or ``None`` when not steering."""
        ctx = self._ctx
        if ctx is None:
            return None
        if ctx.shape[0] != batch or k_len < ctx.shape[1]:
            self._note(
                f"the cache holds {k_len} keys for a {ctx.shape[1]}-token prompt (or rows "
                "changed): its positions no longer map to the prompt, read unsteered"
            )
            self._ctx = None
            return None
        if k_len > ctx.shape[1]:
            ctx = F.pad(ctx, (0, k_len - ctx.shape[1]), value=False)
        return ctx

    def _attend(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        layer = getattr(module, "layer_idx", None)
        heads = self.selected.get(layer, []) if layer is not None else []
        steer = bool(heads) and self.config.alpha != 1.0
        ctx = self._context_keys(query.shape[0], key.shape[-2]) if steer else None
        if ctx is None and self._record is None:
            return out, None
        b, hq, q_len, _ = query.shape
        k_len = key.shape[-2]
        group = hq // key.shape[1]
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        allowed = as_bool_mask(attention_mask, q_len, k_len, query.device)
        if ctx is not None:
            idx = torch.tensor(heads, device=query.device)
            bias = self._bias(allowed, ctx, q_len, query.dtype)  # (B, 1, Q, K)
            steered = F.scaled_dot_product_attention(
                query[:, idx],
                key[:, idx // group],
                value[:, idx // group],
                attn_mask=bias,
                scale=scale,
            )  # (B, h, Q, d)
            out = out.clone()
            out[:, :, idx] = steered.transpose(1, 2).to(out.dtype)
        if self._record is not None and layer is not None:
            self._record[layer] = self._last_query_mass(
                query, key, allowed, scale, group, heads if ctx is not None else [], ctx
            )
        return out, None

    def _bias(
        self, allowed: torch.Tensor | None, ctx: torch.Tensor, q_len: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Additive mask (B, 1, Q, K): -inf where a key may not be seen, log(alpha) on the
        user's keys (for the queries ``queries`` steers), 0 elsewhere."""
        b, k_len = ctx.shape
        boosted = ctx[:, None, None, :].expand(b, 1, q_len, k_len)
        if self.config.queries == "after":  # only queries past the user's span are steered
            pos = torch.arange(k_len, device=ctx.device)
            end = (ctx * (pos + 1)).amax(-1)  # (B,): one past the span's last position
            late = pos[k_len - q_len :][None, :] >= end[:, None]  # (B, Q); queries are the last
            boosted = boosted & late[:, None, :, None]
        bias = torch.zeros((b, 1, q_len, k_len), dtype=dtype, device=ctx.device)
        bias = bias.masked_fill(boosted, math.log(self.config.alpha))
        if allowed is not None:
            allowed = allowed.expand(b, 1, q_len, k_len)
            allowed = allowed | ~allowed.any(-1, keepdim=True)  # a padding query: keep it finite
            bias = bias.masked_fill(~allowed, float("-inf"))
        return bias

    def _last_query_mass(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        allowed: torch.Tensor | None,
        scale: float,
        group: int,
        heads: list[int],
        ctx: torch.Tensor | None,
    ) -> torch.Tensor:
        """(heads,): attention mass of the last query of row 0 on the recorded span."""
        assert self._record_span is not None
        q = query[0, :, -1:].float()  # (H, 1, d)
        k = key[0].float().repeat_interleave(group, dim=0)  # (H, K, d)
        logits = (q @ k.transpose(-1, -2))[:, 0] * scale  # (H, K)
        if allowed is not None:
            logits = logits.masked_fill(~allowed[0, 0, -1][None, :], float("-inf"))
        if heads and ctx is not None:
            boost = ctx[0].float() * math.log(self.config.alpha)
            logits[heads] = logits[heads] + boost
        probs = logits.softmax(-1)
        lo, hi = self._record_span
        return probs[:, lo:hi].sum(-1)


# ----------------------------------------------------------------------------- selection


def select_heads(drops: torch.Tensor, heads: int, min_drop: float) -> dict[int, list[int]]:
    """The ``heads`` (layer, head) pairs with the largest drop above ``min_drop``, as
    layer -> sorted heads. Ties are broken by layer, then head."""
    n_layers, n_heads = drops.shape
    flat = [
        (-float(drops[layer, h]), layer, h)
        for layer in range(n_layers)
        for h in range(n_heads)
        if float(drops[layer, h]) > min_drop
    ]
    chosen: dict[int, list[int]] = {}
    for _, layer, h in sorted(flat)[:heads]:
        chosen.setdefault(layer, []).append(h)
    return {layer: sorted(hs) for layer, hs in sorted(chosen.items())}


# --------------------------------------------------------------------------- calibration

_NAMES = ("Alder", "Birch", "Cedar", "Juniper", "Maple", "Rowan", "Willow", "Hazel", "Linden")
_THINGS = ("lantern", "harbour", "orchard", "compass", "meadow", "tower", "bridge", "garden")


def calibration_prompts(
    tokenizer: Any, n: int, tokens: int, seed: int, *, span: str = "user"
) -> list[CalibrationPrompt]:
    """``n`` seeded prompts: about ``tokens`` tokens of stdlib prose with one made-up fact
    (``The code of the Willow lantern is 4821.``) and a question about it, each as the plain
    text and as the chat-templated text, with the user tokens' positions in both."""
    from apportion.baselines.haystack import sentences

    pool = sentences()
    rng = random.Random(f"context-attention:{seed}")
    markers = find_markers(tokenizer)
    out = []
    for _ in range(n):
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        code = str(rng.randrange(1000, 10000))
        fact = f"The code of the {name} {thing} is {code}."
        question = f"What is the code of the {name} {thing}? Answer with the number only."
        words: list[str] = []
        while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < tokens:
            words.append(pool[rng.randrange(len(pool))])
        words.insert(rng.randrange(len(words) + 1), fact)
        context = " ".join(words)
        out.append(_render(tokenizer, context, question, markers, span))
    return out


def _render(
    tokenizer: Any, context: str, question: str, markers: Markers | None, span: str
) -> CalibrationPrompt:
    def enc(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    ctx_ids = enc(context)
    q_ids = enc("\n\n" + question)
    user_len = len(ctx_ids) + (len(q_ids) if span == "user" else 0)
    plain = ctx_ids + q_ids + enc("\n")
    text = str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{context}\n\n{question}"}],
            add_generation_prompt=True,
            tokenize=False,
        )
    )
    at = text.find(context)
    head = enc(text[:at])
    rest = enc(text[at + len(context) + len("\n\n" + question) :])
    chat = head + ctx_ids + q_ids + rest
    if markers is None:  # pragma: no cover - bind never calibrates without a template
        raise ValueError("calibration needs a tokenizer with a chat template")
    # the plain text's first token is the attention sink (the template's first token is, with
    # the template): it is left out of the plain span so that the drop is the user's tokens'
    return CalibrationPrompt(plain, (1, user_len), chat, (len(head) + 1, len(head) + user_len))
