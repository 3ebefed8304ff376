"""The measured generation loop: prompt -> tokens -> prefill (through the attention backend
and the KV policy) -> greedy decode, with the stats every benchmark records."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from apportion.base import Allocator, Prompt
from apportion.errors import ConfigError, PromptEmbedsError, PromptTooLongError
from apportion.host.attention import AttentionBackend
from apportion.host.kv import (
    DecodeState,
    KVPolicy,
    PrefillOutput,
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
    #: the generated token ids, up to the eos that ended the row (``text`` is their decoding,
    #: stripped); not part of :meth:`as_dict`
    token_ids: list[int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.peak_resident_kv_bytes is None:
            self.peak_resident_kv_bytes = self.peak_kv_bytes

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("token_ids", None)
        return out


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
    """A prompt's token ids; its last ``question_len`` are the question. ``embeds``: (offset
    in ``ids``, (n, hidden) tensor) of each placeholder of ``Prompt.embeds``, whose ``n``
    slots in ``ids`` hold the pad token and are read from the tensor in the prefill."""

    ids: list[int]
    question_len: int
    embeds: list[tuple[int, Any]] = field(default_factory=list)


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
        chat_template: bool = True,
    ):
        self.loaded = loaded
        self.attention = attention or AttentionBackend()
        self.kv_policy = kv_policy or KVPolicy()
        self.allocator = allocator
        self.question_in_prefill = question_in_prefill
        #: False: :meth:`render` joins the messages' contents as plain text even when the
        #: tokenizer has a chat template (``generation.chat_template``)
        self.chat_template = chat_template
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
        text = self.render(prompt.messages)
        split = text.rfind(prompt.question) if prompt.question else -1
        if prompt.embeds:
            return self._encode_spliced(prompt, text, split)
        if split < 0:
            ids = tok.encode(text, add_special_tokens=False)
            return EncodedPrompt(ids, 0)
        head = tok.encode(text[:split], add_special_tokens=False)
        tail = tok.encode(text[split:], add_special_tokens=False)
        return EncodedPrompt(head + tail, len(tail))

    def _encode_spliced(self, prompt: Prompt, text: str, split: int) -> EncodedPrompt:
        """:meth:`encode` of a prompt with ``embeds`` (see :class:`~apportion.base.Prompt`):
        the text between placeholders is tokenized piece by piece, and each placeholder
        becomes as many pad-token slots as its tensor has rows."""
        tok = self.tokenizer
        hidden = int(self.loaded.model.get_input_embeddings().weight.shape[-1])
        head_end = split if split >= 0 else len(text)
        found = []
        for ph, vectors in prompt.embeds.items():
            if not isinstance(ph, str) or not ph:
                raise PromptEmbedsError(f"placeholder {ph!r}: placeholders are non-empty strings")
            at = text.find(ph)
            if at < 0 or text.find(ph, at + 1) >= 0:
                where = "is not in" if at < 0 else "occurs more than once in"
                raise PromptEmbedsError(f"placeholder {ph!r} {where} the rendered prompt")
            if at + len(ph) > head_end:
                raise PromptEmbedsError(
                    f"placeholder {ph!r} is inside the question; the question stays text"
                )
            shape = tuple(getattr(vectors, "shape", ()))
            if (
                not isinstance(vectors, torch.Tensor)
                or not vectors.is_floating_point()
                or len(shape) != 2
                or shape[0] < 1
                or shape[1] != hidden
            ):
                raise PromptEmbedsError(
                    f"placeholder {ph!r}: expected a float tensor of shape (n >= 1, {hidden}) "
                    f"(the model's embedding size), got {type(vectors).__name__} {shape}"
                )
            if not bool(torch.isfinite(vectors).all()):
                raise PromptEmbedsError(f"placeholder {ph!r}: the embeddings are not all finite")
            found.append((at, ph, vectors))
        found.sort(key=lambda f: f[0])
        ids: list[int] = []
        embeds: list[tuple[int, Any]] = []
        pos, pad = 0, int(tok.pad_token_id)
        for at, ph, vectors in found:
            if at < pos:
                raise PromptEmbedsError(f"placeholder {ph!r} overlaps another placeholder")
            if at > pos:
                ids += tok.encode(text[pos:at], add_special_tokens=False)
            embeds.append((len(ids), vectors.detach()))
            ids += [pad] * int(vectors.shape[0])
            pos = at + len(ph)
        if head_end > pos:
            ids += tok.encode(text[pos:head_end], add_special_tokens=False)
        tail = tok.encode(text[head_end:], add_special_tokens=False) if split >= 0 else []
        return EncodedPrompt(ids + tail, len(tail), embeds)

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The text the model reads for ``messages``: the tokenizer's chat template with the
        assistant's generation prompt, or the contents joined by blank lines (and a final
        newline) when it has no template or the host was made with ``chat_template=False``."""
        tok = self.tokenizer
        if self.chat_template and getattr(tok, "chat_template", None):
            return str(
                tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
            )
        return "\n\n".join(m["content"] for m in messages) + "\n"

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
        return self._generate_encoded([self.encode(p) for p in prompts], max_new_tokens)

    def generate_ids(
        self,
        rows: Sequence[Sequence[int]],
        question_len: int | Sequence[int] = 0,
        max_new_tokens: int = 48,
    ) -> list[GenerationResult]:
        """Greedy-generate for prompts given as token ids, read as they are: no chat template
        is applied (a host app that renders its own prompts, as lm-eval does, has done so).

        ``question_len``: the trailing tokens of each row that are its question (one count for
        every row, or one per row): the KV policy keeps them whole, and with
        ``question_in_prefill=False`` they are fed after the compressed context. Otherwise as
        :meth:`generate`: left-padded batch, :class:`PromptTooLongError` before any compute
        if a row does not fit."""
        if not rows:
            return []
        counts = [question_len] * len(rows) if isinstance(question_len, int) else question_len
        if len(counts) != len(rows):
            raise ConfigError(f"{len(counts)} question lengths for {len(rows)} prompts")
        if any(len(r) == 0 for r in rows):
            raise ConfigError("a prompt is empty: give the model something to answer")
        encoded = [
            EncodedPrompt([int(t) for t in r], max(0, min(int(q), len(r))))
            for r, q in zip(rows, counts, strict=True)
        ]
        return self._generate_encoded(encoded, max_new_tokens)

    def _generate_encoded(
        self, encoded: Sequence[EncodedPrompt], max_new_tokens: int
    ) -> list[GenerationResult]:
        for e in encoded:
            self.check_fits(len(e.ids), max_new_tokens)
        if not self.question_in_prefill and all(0 < e.question_len < len(e.ids) for e in encoded):
            probe = self.probe_ids()
            contexts = [
                EncodedPrompt(e.ids[: -e.question_len] + probe, 0, e.embeds) for e in encoded
            ]
            questions = [EncodedPrompt(e.ids[-e.question_len :], e.question_len) for e in encoded]
            input_ids, attention_mask = self._pad(contexts)
            results = self._run(
                input_ids,
                attention_mask,
                len(probe),
                max_new_tokens,
                question=self._pad(questions),
                probe_len=len(probe),
                splice=_splice(contexts),
            )
            for r, e in zip(results, encoded, strict=True):
                r.prompt_tokens = len(e.ids)
            return results
        # question_len is shared by the batch: keep the shortest so no row loses its question
        question_len = min(e.question_len for e in encoded)
        input_ids, attention_mask = self._pad(encoded)
        return self._run(
            input_ids, attention_mask, question_len, max_new_tokens, splice=_splice(encoded)
        )

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
        splice: Sequence[tuple[int, int, Any]] = (),
    ) -> list[GenerationResult]:
        """Prefill ``input_ids`` and decode. ``question``: (ids, mask) of a left-padded chunk
        fed after the prefill compressed the context (query-agnostic mode, see
        :func:`feed_tokens`); its entries are kept whole. ``probe_len``: trailing prompt
        tokens (the policy's probe) dropped from the cache before the question is fed.
        ``splice``: input embeddings read in the prefill (:func:`splice_embeds`)."""
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
                splice,
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
        splice: Sequence[tuple[int, int, Any]] = (),
    ) -> list[GenerationResult]:
        with self.attention.installed(model), self.kv_policy.installed(model):
            _sync(input_ids)()
            t0 = time.perf_counter()
            pre, peak, resident = self._prefill(
                model, cache, input_ids, attention_mask, question_len, probe_len, splice
            )
            return self._answer(
                model,
                cache,
                offloaded,
                pre,
                question,
                max_new_tokens,
                t0=t0,
                peak=peak,
                resident=resident,
                prompt_tokens=attention_mask.sum(-1).tolist(),
            )

    def _prefill(
        self,
        model: Any,
        cache: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        question_len: int,
        probe_len: int,
        splice: Sequence[tuple[int, int, Any]] = (),
    ) -> tuple[PrefillOutput, int, int]:
        """Prefill through the attention backend and the KV policy (inside
        ``attention.installed``), then drop the probe's ``probe_len`` entries; returns the
        prefill output and the most KV bytes held in all and on the device. ``splice``: the
        prompt's input embeddings (:func:`splice_embeds`)."""
        with (
            PeakMeter(model, self.kv_policy, cache) as meter,
            splice_embeds(model, input_ids, splice),
        ):
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
        resident = max(meter.peak_resident, cache_resident_nbytes(cache))
        return pre, peak, resident

    def _answer(
        self,
        model: Any,
        cache: Any,
        offloaded: bool,
        pre: PrefillOutput,
        question: tuple[torch.Tensor, torch.Tensor] | None,
        max_new_tokens: int,
        *,
        t0: float,
        peak: int,
        resident: int,
        prompt_tokens: Sequence[int],
    ) -> list[GenerationResult]:
        """Feed ``question`` (if any) after the prefilled ``cache`` and decode greedily (inside
        ``attention.installed``); the prefill's time runs from ``t0`` to the first decode."""
        sync = _sync(pre.next_position)
        kv_tokens = max(cache_seq_lengths(cache) or [0])
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
                policy=self.kv_policy,
            )
        if offloaded:
            own = int(getattr(cache, "peak_resident_kv_bytes", lambda: 0)())
            resident = max(resident, steps.peak_resident, own)
        peak = max(peak, decoded.peak_bytes)
        if not offloaded:  # every byte of the KV is on the device
            resident = peak
        return [
            self._result(row, decoded, int(n), kv_tokens, peak, prefill_s, resident)
            for row, n in zip(decoded.rows, prompt_tokens, strict=True)
        ]

    # ---------------------------------------------------------------- a context, then questions
    @torch.inference_mode()
    def prefill_context(self, contexts: Sequence[Sequence[int]]) -> tuple[Any, PrefillOutput]:
        """Prefill contexts before their questions are known (query-agnostic mode).

        ``contexts`` holds the token ids of each row (left-padded into one batch). The KV
        policy's probe (:meth:`probe_ids`) is appended as the protected tail and its entries
        are dropped afterwards: the cache is what :meth:`generate` with
        ``question_in_prefill=False`` holds before it feeds the question. Returns the policy's
        cache and the :class:`~apportion.host.kv.PrefillOutput` to continue from with
        :meth:`generate_after`: ``next_position`` is each row's uncompressed length,
        ``info["peak_kv_bytes"]`` the most the cache held. The allocator is not used; the
        cache stays where the policy built it."""
        if not contexts or any(len(c) == 0 for c in contexts):
            raise ConfigError("the context is empty: give the model something to read")
        probe = self.probe_ids()
        encoded = [EncodedPrompt([int(t) for t in c] + probe, 0) for c in contexts]
        for e in encoded:
            self.check_fits(len(e.ids), 0)
        input_ids, attention_mask = self._pad(encoded)
        model = self.loaded.model
        cache = self.kv_policy.make_cache(model)
        with self.attention.installed(model), self.kv_policy.installed(model):
            pre, peak, _ = self._prefill(
                model, cache, input_ids, attention_mask, len(probe), len(probe)
            )
        pre.info = {**(pre.info or {}), "peak_kv_bytes": peak}
        return cache, pre

    @torch.inference_mode()
    def generate_after(
        self,
        cache: Any,
        pre: PrefillOutput,
        questions: Sequence[Sequence[int]],
        max_new_tokens: int = 48,
    ) -> list[GenerationResult]:
        """Feed token ids after a prefilled cache and greedy-decode.

        ``questions`` holds one row of token ids per row of ``cache`` (left-padded into one
        chunk); their positions continue from ``pre.next_position`` and they join the cache
        whole (:func:`feed_tokens`). On the cache of :meth:`prefill_context` with the same
        KV policy this is :meth:`generate` with ``question_in_prefill=False``; the cache may
        as well come from a store (a context compressed once, asked many times). The cache
        grows by the question and the answer: give each call its own. A result's
        ``prompt_tokens`` counts the uncompressed context and the question. Raises
        :class:`PromptTooLongError` before any compute if a row does not fit."""
        rows = int(pre.next_position.shape[0])
        if len(questions) != rows:
            raise ConfigError(f"{len(questions)} questions for a cache of {rows} rows")
        if any(len(q) == 0 for q in questions):
            raise ConfigError("a question is empty: give the model something to answer")
        lengths = [
            int(n) + len(q) for n, q in zip(pre.next_position.tolist(), questions, strict=True)
        ]
        for n in lengths:
            self.check_fits(n, max_new_tokens)
        question = self._pad([EncodedPrompt([int(t) for t in q], len(q)) for q in questions])
        model = self.loaded.model
        peak = self.kv_policy.kv_bytes(cache)
        resident = cache_resident_nbytes(cache)
        with self.attention.installed(model), self.kv_policy.installed(model):
            _sync(question[0])()
            t0 = time.perf_counter()
            return self._answer(
                model,
                cache,
                False,
                pre,
                question,
                max_new_tokens,
                t0=t0,
                peak=peak,
                resident=resident,
                prompt_tokens=lengths,
            )

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
            token_ids=[int(t) for t in tokens],
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


def _splice(encoded: Sequence[EncodedPrompt]) -> list[tuple[int, int, Any]]:
    """(row, column, vectors) of every placeholder of ``encoded`` once left-padded together
    (as :meth:`Host._pad` pads them)."""
    width = max(len(e.ids) for e in encoded)
    return [
        (row, width - len(e.ids) + start, vectors)
        for row, e in enumerate(encoded)
        for start, vectors in e.embeds
    ]


@contextlib.contextmanager
def splice_embeds(
    model: Any, input_ids: torch.Tensor, splice: Sequence[tuple[int, int, Any]]
) -> Iterator[None]:
    """Inside the ``with`` block, the model reads ``splice``'s vectors in place of the token
    embeddings of ``input_ids`` at their slots: a forward hook on the input embedding
    replaces rows ``[column, column + n)`` of batch row ``row`` by the (n, hidden) tensor,
    cast to the model's dtype and device (this is how ``Prompt.embeds`` reaches the model,
    with every KV policy's and attention backend's own prefill unchanged).

    The model may run any number of forwards over exactly ``input_ids`` (a policy that
    needs the prompt's hidden states runs it twice). A forward over other tokens (a
    component that reads the prompt in pieces, or prefills it again with something
    appended) raises :class:`~apportion.errors.PromptEmbedsError`, as does a block that
    never read the prompt's token embeddings. Nothing is installed when ``splice`` is
    empty."""
    if not splice:
        yield
        return
    module = model.get_input_embeddings()
    calls = 0

    def hook(mod: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        ids = args[0] if args else None
        if (
            not isinstance(ids, torch.Tensor)
            or ids.shape != input_ids.shape
            or not torch.equal(ids, input_ids.to(ids.device))
        ):
            raise PromptEmbedsError(
                "the prompt carries input embeddings (Prompt.embeds), but the prefill ran the "
                "model on other tokens than the whole prompt (a KV policy or attention backend "
                "that reads it in pieces); use one that prefills the prompt in one forward, "
                "such as the 'full' KV policy with 'dense' attention"
            )
        out = output.clone()
        for row, start, vectors in splice:
            n = int(vectors.shape[0])
            out[row, start : start + n] = vectors.to(device=out.device, dtype=out.dtype)
        calls += 1
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    if calls == 0:
        raise PromptEmbedsError(
            "the prompt carries input embeddings (Prompt.embeds), but the prefill never read "
            "its token embeddings (the KV policy or attention backend passed inputs_embeds of "
            "its own), so they could not be spliced in"
        )


def feed_tokens(model: Any, cache: Any, pre: Any, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """Append a chunk of tokens to a prefilled (possibly compressed) ``cache`` and return the
    :class:`~apportion.host.kv.PrefillOutput` to decode from.

    This is how a question reaches a context compressed without it (kvpress's
    ``query_aware=False``): ``ids``/``mask`` are (B, n), left-padded (mask 0 at padding);
    the chunk's positions continue from ``pre.next_position``, the uncompressed length, so
    RoPE sees the question where it stood in the prompt. Its entries join the cache whole.
    """
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
    policy: KVPolicy | None = None,
) -> Decoded:
    """Greedy tokens from a prefilled ``cache``: ``pre`` is the :class:`PrefillOutput` (last
    logits, the cache's valid-entry mask, each row's next position). Rows that hit an eos
    token are padded; the eos that ended a row is never fed back. ``measure()`` returns the
    cache's bytes after a step (its peak is reported). ``drop_finished``: rows that ended
    leave the batch (``cache.batch_select_indices``), so the rest decode cheaper.

    ``policy``: the KV policy that may compress between steps
    (:meth:`KVPolicy.after_decode_step`: called before the first forward and after each,
    once the step's bytes are measured); a mask it returns replaces the cache's validity
    mask. Its time counts as decode time. It cannot be combined with ``drop_finished``."""
    if policy is not None and policy.compresses_decode and drop_finished:
        raise ValueError("a policy that compresses while decoding keeps every row of the batch")
    with contextlib.ExitStack() as stack:
        return _greedy(
            model, cache, pre, max_new_tokens, eos, pad_id, measure, drop_finished, policy, stack
        )


def _greedy(
    model: Any,
    cache: Any,
    pre: Any,
    max_new_tokens: int,
    eos: set[int],
    pad_id: int,
    measure: Any,
    drop_finished: bool,
    policy: KVPolicy | None,
    stack: contextlib.ExitStack,
) -> Decoded:
    logits, kv_mask, position = pre.logits, pre.kv_mask, pre.next_position.clone()
    state = DecodeState(kv_mask, position, stack=stack) if policy is not None else None

    def after(step: int) -> None:
        nonlocal kv_mask
        if policy is None or state is None:
            return
        state.kv_mask, state.position = kv_mask, position
        new = policy.after_decode_step(model, cache, step, state)
        if new is not None:
            kv_mask = None if bool(new.all()) else new.bool()

    batch, device = logits.shape[0], logits.device
    rows: list[list[int]] = [[] for _ in range(batch)]
    active = torch.arange(batch, device=device)  # the output row of each batch row
    eos_t = torch.tensor(sorted(eos), device=device)
    sync = _sync(logits)
    t0 = time.perf_counter()
    forwards = peak = 0
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    if max_new_tokens > 1:
        after(0)
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
        after(forwards)
    sync()
    width = max(len(r) for r in rows)
    rows = [r + [pad_id] * (width - len(r)) for r in rows]
    return Decoded(rows, eos, forwards, time.perf_counter() - t0, peak)
