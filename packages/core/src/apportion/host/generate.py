"""The measured generation loop: prompt -> tokens -> prefill (through the attention backend
and the KV policy) -> greedy decode, with the stats every benchmark records."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from apportion.base import Prompt
from apportion.errors import PromptTooLongError
from apportion.host.attention import AttentionBackend
from apportion.host.kv import KVPolicy, cache_kwargs, cache_seq_lengths
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EncodedPrompt:
    ids: list[int]
    question_len: int


class Host:
    """Runs prompts through one model with one attention backend and one KV policy."""

    def __init__(
        self,
        loaded: LoadedModel,
        attention: AttentionBackend | None = None,
        kv_policy: KVPolicy | None = None,
    ):
        self.loaded = loaded
        self.attention = attention or AttentionBackend()
        self.kv_policy = kv_policy or KVPolicy()

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
        encoded = [self.encode(p) for p in prompts]
        for e in encoded:
            self.check_fits(len(e.ids), max_new_tokens)
        # question_len is shared by the batch: keep the shortest so no row loses its question
        question_len = min(e.question_len for e in encoded)
        input_ids, attention_mask = self._pad(encoded)
        return self._run(input_ids, attention_mask, question_len, max_new_tokens)

    def _pad(self, encoded: list[EncodedPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
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
    ) -> list[GenerationResult]:
        model = self.loaded.model
        batch = input_ids.shape[0]
        eos = self._eos_ids()
        cache = self.kv_policy.make_cache(model)
        sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
        with self.attention.installed(model):
            sync()
            t0 = time.perf_counter()
            pre = self.attention.prefill(
                model,
                input_ids,
                attention_mask,
                cache,
                question_len=question_len,
                inner=self.kv_policy.prefill,
            )
            sync()
            prefill_s = time.perf_counter() - t0
            kv_tokens = max(cache_seq_lengths(cache) or [0])
            peak = self.kv_policy.kv_bytes(cache)
            logits, kv_mask, position = pre.logits, pre.kv_mask, pre.next_position.clone()
            generated = torch.empty((batch, 0), dtype=torch.long, device=input_ids.device)
            done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
            t1 = time.perf_counter()
            steps = forwards = 0
            for step in range(max_new_tokens):
                next_tok = logits.argmax(-1)
                next_tok = torch.where(
                    done, torch.full_like(next_tok, self.tokenizer.pad_token_id), next_tok
                )
                generated = torch.cat([generated, next_tok[:, None]], dim=1)
                steps += 1
                done |= torch.isin(next_tok, torch.tensor(sorted(eos), device=next_tok.device))
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                if kv_mask is not None:
                    kv_mask = torch.cat(
                        [
                            kv_mask,
                            torch.ones((batch, 1), dtype=kv_mask.dtype, device=kv_mask.device),
                        ],
                        1,
                    )
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
                peak = max(peak, self.kv_policy.kv_bytes(cache))
            sync()
            decode_s = time.perf_counter() - t1
        results = []
        prompt_lens = attention_mask.sum(-1).tolist()
        for i in range(batch):
            row = generated[i].tolist()
            finish = "length"
            for j, t in enumerate(row):
                if t in eos:
                    row, finish = row[:j], "stop"
                    break
            results.append(
                GenerationResult(
                    text=self.tokenizer.decode(row, skip_special_tokens=True).strip(),
                    prompt_tokens=int(prompt_lens[i]),
                    new_tokens=len(row),
                    kv_tokens=kv_tokens,
                    peak_kv_bytes=int(peak),
                    prefill_seconds=prefill_s,
                    decode_seconds=decode_s,
                    decode_tokens_per_s=(forwards * batch / decode_s) if decode_s > 0 else 0.0,
                    batch_size=batch,
                    finish_reason=finish,
                )
            )
        return results
