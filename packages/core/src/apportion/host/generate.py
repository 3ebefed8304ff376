"""The measured generation loop: prompt -> tokens -> prefill (through the attention backend
and the KV policy) -> greedy decode, with the stats every benchmark records."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from apportion.base import Allocator, Prompt
from apportion.errors import ConfigError, PromptTooLongError
from apportion.host.attention import AttentionBackend
from apportion.host.kv import (
    KVPolicy,
    attention_modules,
    cache_kwargs,
    cache_resident_nbytes,
    cache_seq_lengths,
    drop_tail,
)
from apportion.host.model import LoadedModel


@dataclass
class GenerationResult:
    """One generated answer and what it cost. Byte and time figures are for the whole batch
    the row was generated in (``batch_size`` rows)."""

    text: str
    prompt_tokens: int
    new_tokens: int
    kv_tokens: int  # cached entries per layer after prefill (max over layers)
    peak_kv_bytes: int
    prefill_seconds: float
    decode_seconds: float
    decode_tokens_per_s: float
    batch_size: int = 1
    finish_reason: str = "length"
    #: the most KV bytes on the model's device at once (``peak_kv_bytes`` unless an
    #: allocator offloads part of the cache)
    peak_resident_kv_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.peak_resident_kv_bytes is None:
            self.peak_resident_kv_bytes = self.peak_kv_bytes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PeakMeter:
    """Records the most bytes ``policy``'s cache holds after each attention layer of ``model``
    runs, inside the ``with`` block (forward hooks registered first, so they see a layer's
    full KV before any eviction hook of the policy shrinks it). ``peak_resident``: the most
    of it on the device (:func:`cache_resident_nbytes`); ``total=False`` measures only that
    (the decode of an offloaded cache, whose total grows by one entry a step)."""

    def __init__(self, model: Any, policy: KVPolicy, cache: Any, *, total: bool = True):
        self.model, self.policy, self.cache = model, policy, cache
        self.total = total
        self.peak = self.peak_resident = 0
        self._handles: list[Any] = []

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        if self.total:
            self.peak = max(self.peak, self.policy.kv_bytes(self.cache))
        self.peak_resident = max(self.peak_resident, cache_resident_nbytes(self.cache))

    def __enter__(self) -> PeakMeter:
        try:
            modules = attention_modules(self.model)
        except TypeError:  # not a Llama-style decoder: the after-prefill figure stands
            modules = []
        self._handles = [m.register_forward_hook(self._hook) for m in modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass
class EncodedPrompt:
    ids: list[int]
    question_len: int


class Host:
    """Runs prompts through one model with one attention backend, one KV policy and one
    allocator, and measures them.

    ``peak_kv_bytes`` is the most the KV policy's cache held at any point: after every
    layer's attention during the prefill (so a cache built whole and evicted afterwards
    counts whole), after the prefill, and after every decode step.

    The allocator places the cache (:meth:`apportion.base.Allocator.kv_cache`): the KV
    policy builds its cache and evicts, the allocator's cache keeps what was kept resident
    up to its budget and the rest in its tiers. ``peak_resident_kv_bytes`` is the most of
    the KV on the device, measured after every attention layer of the prefill *and* of
    every decode step (and the cache's own count of what it held between them).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        attention: AttentionBackend | None = None,
        kv_policy: KVPolicy | None = None,
        allocator: Allocator | None = None,
        *,
        question_in_prefill: bool = True,
    ):
        self.loaded = loaded
        self.attention = attention or AttentionBackend()
        self.kv_policy = kv_policy or KVPolicy()
        self.allocator = allocator
        self.question_in_prefill = question_in_prefill
        self.attention.bind(loaded)
        self.kv_policy.bind(loaded)
        if allocator is not None:
            allocator.bind(loaded)

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    # ---------------------------------------------------------------- tokenization
    def encode(self, prompt: Prompt | str) -> EncodedPrompt:
        """Chat-template the prompt; the question (its tail) is tokenized separately so that
        its length is exact and policies can keep it whole."""
        if isinstance(prompt, str):
            prompt = Prompt([{"role": "user", "content": prompt}], question=None)
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                prompt.messages, add_generation_prompt=True, tokenize=False
            )
        else:
            text = "\n\n".join(m["content"] for m in prompt.messages) + "\n"
        split = text.rfind(prompt.question) if prompt.question else -1
        if split < 0:
            ids = tok.encode(text, add_special_tokens=False)
            return EncodedPrompt(ids, 0)
        head = tok.encode(text[:split], add_special_tokens=False)
        tail = tok.encode(text[split:], add_special_tokens=False)
        return EncodedPrompt(head + tail, len(tail))

    def check_fits(self, n_prompt: int, max_new_tokens: int) -> None:
        limit = self.loaded.max_context
        if not self.attention.extends_context and n_prompt + max_new_tokens > limit:
            raise PromptTooLongError(
                f"prompt of {n_prompt} tokens + {max_new_tokens} new tokens exceeds "
                f"{self.loaded.name}'s context of {limit} tokens (attention backend "
                f"{self.attention.name!r} does not extend the context)"
            )

    # ---------------------------------------------------------------- generation
    def generate(
        self, prompts: Prompt | str | Sequence[Prompt | str], max_new_tokens: int = 48
    ) -> list[GenerationResult]:
        """Greedy-generate for one prompt or a batch (left-padded). Raises
        :class:`PromptTooLongError` before any compute if a prompt does not fit."""
        if isinstance(prompts, (str, Prompt)):
            prompts = [prompts]
        if not prompts:
            return []
        for p in prompts:
            text = p if isinstance(p, str) else " ".join(m.get("content", "") for m in p.messages)
            if not text.strip():
                raise ConfigError("the prompt is empty: give the model something to answer")
        encoded = [self.encode(p) for p in prompts]
        for e in encoded:
            self.check_fits(len(e.ids), max_new_tokens)
        if not self.question_in_prefill and all(0 < e.question_len < len(e.ids) for e in encoded):
            probe = self.probe_ids()
            contexts = [EncodedPrompt(e.ids[: -e.question_len] + probe, 0) for e in encoded]
            questions = [EncodedPrompt(e.ids[-e.question_len :], e.question_len) for e in encoded]
            input_ids, attention_mask = self._pad(contexts)
            results = self._run(
                input_ids,
                attention_mask,
                len(probe),
                max_new_tokens,
                question=self._pad(questions),
                probe_len=len(probe),
            )
            for r, e in zip(results, encoded, strict=True):
                r.prompt_tokens = len(e.ids)
            return results
        # question_len is shared by the batch: keep the shortest so no row loses its question
        question_len = min(e.question_len for e in encoded)
        input_ids, attention_mask = self._pad(encoded)
        return self._run(input_ids, attention_mask, question_len, max_new_tokens)

    def probe_ids(self) -> list[int]:
        """Token ids of the KV policy's probe (:meth:`KVPolicy.probe`), or ``[]``."""
        text = self.kv_policy.probe()
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _pad(self, encoded: Sequence[EncodedPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(e.ids) for e in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, width - len(e.ids) :] = torch.tensor(e.ids)
            mask[i, width - len(e.ids) :] = 1
        device = self.loaded.device
        return ids.to(device), mask.to(device)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.tokenizer, getattr(self.loaded.model, "generation_config", None)):
            eos = getattr(src, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(x) for x in eos)
        im_end = (
            self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            if hasattr(self.tokenizer, "convert_tokens_to_ids")
            else None
        )
        if isinstance(im_end, int) and im_end != getattr(self.tokenizer, "unk_token_id", None):
            ids.add(im_end)
        return ids

    @torch.inference_mode()
    def _run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        question_len: int,
        max_new_tokens: int,
        question: tuple[torch.Tensor, torch.Tensor] | None = None,
        probe_len: int = 0,
    ) -> list[GenerationResult]:
        """Prefill ``input_ids`` and decode. ``question``: (ids, mask) of a left-padded chunk
        fed after the prefill compressed the context (query-agnostic mode, see
        :func:`feed_tokens`); its entries are kept whole. ``probe_len``: trailing prompt
        tokens (the policy's probe) dropped from the cache before the question is fed."""
        model = self.loaded.model
        cache = self.kv_policy.make_cache(model)
        placed = self.allocator.kv_cache(model, cache) if self.allocator is not None else None
        offloaded = placed is not None
        cache = placed if offloaded else cache
        try:
            return self._generate(
                model,
                cache,
                offloaded,
                input_ids,
                attention_mask,
                question_len,
                max_new_tokens,
                question,
                probe_len,
            )
        finally:
            close = getattr(cache, "close", None) if offloaded else None
            if callable(close):
                close()  # the allocator's tiers give back what this generation held

    def _generate(
        self,
        model: Any,
        cache: Any,
        offloaded: bool,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        question_len: int,
        max_new_tokens: int,
        question: tuple[torch.Tensor, torch.Tensor] | None,
        probe_len: int,
    ) -> list[GenerationResult]:
        sync = _sync(input_ids)
        with self.attention.installed(model):
            sync()
            t0 = time.perf_counter()
            with PeakMeter(model, self.kv_policy, cache) as meter:
                pre = self.attention.prefill(
                    model,
                    input_ids,
                    attention_mask,
                    cache,
                    question_len=question_len,
                    inner=self.kv_policy.prefill,
                )
            reported = int((pre.info or {}).get("peak_kv_bytes", 0))
            peak = max(meter.peak, reported, self.kv_policy.kv_bytes(cache))
            pre = drop_tail(cache, pre, probe_len)
            kv_tokens = max(cache_seq_lengths(cache) or [0])
            resident = max(meter.peak_resident, cache_resident_nbytes(cache))
            if question is not None:
                pre = feed_tokens(model, cache, pre, *question)
                peak = max(peak, self.kv_policy.kv_bytes(cache))
                resident = max(resident, cache_resident_nbytes(cache))
            sync()
            prefill_s = time.perf_counter() - t0
            # an offloaded cache: the resident KV is measured after every layer of every
            # decode step too (it moves within a step); otherwise the step's end says it all
            steps = PeakMeter(model, self.kv_policy, cache, total=False)
            with steps if offloaded else contextlib.nullcontext():
                decoded = greedy_decode(
                    model,
                    cache,
                    pre,
                    max_new_tokens,
                    eos=self._eos_ids(),
                    pad_id=int(self.tokenizer.pad_token_id),
                    measure=lambda: self.kv_policy.kv_bytes(cache),
                )
            if offloaded:
                own = int(getattr(cache, "peak_resident_kv_bytes", lambda: 0)())
                resident = max(resident, steps.peak_resident, own)
        peak = max(peak, decoded.peak_bytes)
        if not offloaded:  # every byte of the KV is on the device
            resident = peak
        return [
            self._result(row, decoded, int(n), kv_tokens, peak, prefill_s, resident)
            for row, n in zip(decoded.rows, attention_mask.sum(-1).tolist(), strict=True)
        ]

    def _result(
        self,
        row: list[int],
        decoded: Decoded,
        prompt_tokens: int,
        kv_tokens: int,
        peak: int,
        prefill_s: float,
        resident: int | None = None,
    ) -> GenerationResult:
        tokens, finish = decoded.trim(row)
        batch = len(decoded.rows)
        return GenerationResult(
            text=self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
            prompt_tokens=prompt_tokens,
            new_tokens=len(tokens),
            kv_tokens=kv_tokens,
            peak_kv_bytes=int(peak),
            prefill_seconds=prefill_s,
            decode_seconds=decoded.seconds,
            decode_tokens_per_s=decoded.forwards * batch / decoded.seconds
            if decoded.seconds > 0
            else 0.0,
            batch_size=batch,
            finish_reason=finish,
            peak_resident_kv_bytes=int(peak if resident is None else resident),
        )


def _sync(t: torch.Tensor) -> Any:
    return torch.cuda.synchronize if t.is_cuda else (lambda: None)


def feed_tokens(model: Any, cache: Any, pre: Any, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """Append a chunk of tokens to a prefilled (possibly compressed) ``cache`` and return the
    :class:`~apportion.host.kv.PrefillOutput` to decode from.

    This is how a question reaches a context compressed without it (kvpress's
    ``query_aware=False``): ``ids``/``mask`` are (B, n), left-padded (mask 0 at padding);
    the chunk's positions continue from ``pre.next_position``, the uncompressed length, so
    RoPE sees the question where it stood in the prompt. Its entries join the cache whole.
    """
    from apportion.host.kv import PrefillOutput

    batch = ids.shape[0]
    kv_mask = pre.kv_mask
    if kv_mask is None:
        past = max(cache_seq_lengths(cache) or [0])
        kv_mask = torch.ones((batch, past), dtype=torch.bool, device=ids.device)
    full = torch.cat([kv_mask.bool(), mask.bool()], 1)
    offsets = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids,
        attention_mask=full.long(),
        position_ids=pre.next_position[:, None] + offsets,
        use_cache=True,
        logits_to_keep=1,
        **cache_kwargs(model, cache),
    )
    return PrefillOutput(
        logits=out.logits[:, -1, :],
        kv_mask=None if bool(full.all()) else full,
        next_position=pre.next_position + mask.long().sum(-1),
        info=pre.info,
    )


@dataclass
class Decoded:
    """Greedy decode of a batch: the tokens of every row (eos included), the forwards run,
    the decode time and the most KV bytes measured after a step."""

    rows: list[list[int]]
    eos: set[int]
    forwards: int
    seconds: float
    peak_bytes: int

    def trim(self, row: list[int]) -> tuple[list[int], str]:
        """The row up to its first eos, and why it ended ('stop' or 'length')."""
        for j, t in enumerate(row):
            if t in self.eos:
                return row[:j], "stop"
        return row, "length"


def greedy_decode(
    model: Any,
    cache: Any,
    pre: Any,
    max_new_tokens: int,
    *,
    eos: set[int],
    pad_id: int,
    measure: Any = None,
    drop_finished: bool = False,
) -> Decoded:
    """Greedy tokens from a prefilled ``cache``: ``pre`` is the :class:`PrefillOutput` (last
    logits, the cache's valid-entry mask, each row's next position). Rows that hit an eos
    token are padded; the eos that ended a row is never fed back. ``measure()`` returns the
    cache's bytes after a step (its peak is reported). ``drop_finished``: rows that ended
    leave the batch (``cache.batch_select_indices``), so the rest decode cheaper."""
    logits, kv_mask, position = pre.logits, pre.kv_mask, pre.next_position.clone()
    batch, device = logits.shape[0], logits.device
    rows: list[list[int]] = [[] for _ in range(batch)]
    active = torch.arange(batch, device=device)  # the output row of each batch row
    eos_t = torch.tensor(sorted(eos), device=device)
    sync = _sync(logits)
    t0 = time.perf_counter()
    forwards = peak = 0
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_tok = torch.where(
            done, torch.full_like(done, pad_id, dtype=torch.long), logits.argmax(-1)
        )
        for r, t in zip(active.tolist(), next_tok.tolist(), strict=True):
            rows[r].append(t)
        done |= torch.isin(next_tok, eos_t)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if drop_finished and bool(done.any()):
            keep = (~done).nonzero().flatten()
            cache.batch_select_indices(keep)
            active, next_tok, position, done = (
                active[keep],
                next_tok[keep],
                position[keep],
                done[keep],
            )
            kv_mask = kv_mask[keep] if kv_mask is not None else None
        if kv_mask is not None:
            ones = torch.ones((kv_mask.shape[0], 1), dtype=kv_mask.dtype, device=kv_mask.device)
            kv_mask = torch.cat([kv_mask, ones], 1)
        out = model(
            input_ids=next_tok[:, None],
            attention_mask=kv_mask.long() if kv_mask is not None else None,
            position_ids=position[:, None],
            use_cache=True,
            **cache_kwargs(model, cache),
        )
        logits = out.logits[:, -1, :]
        forwards += 1
        position += 1
        if measure is not None:
            peak = max(peak, int(measure()))
    sync()
    width = max(len(r) for r in rows)
    rows = [r + [pad_id] * (width - len(r)) for r in rows]
    return Decoded(rows, eos, forwards, time.perf_counter() - t0, peak)
