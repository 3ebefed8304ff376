"""kv-policy ``kvcomm``: reuse a shared segment's KV under a different prefix, corrected by an
anchor pool.

KVCOMM (Ye et al., "KVCOMM: Online Cross-context KV-cache Communication for Efficient
LLM-based Multi-agent Systems", 2025). In a multi-agent system the same text (a retrieved
document, another agent's message) shows up in many prompts, each time after a different
prefix (the agent's role prompt, earlier messages). Its KV differs with the prefix, so plain
prefix caching cannot reuse it. KVCOMM keeps the segment's *base* KV (computed once, after a
fixed neutral prefix) and a pool of **anchors** (:mod:`.pool`): observed offsets

    Δ = KV(segment | prefix) − KV(segment | base)

measured whenever a segment had to be prefilled for real. Keys are compared with RoPE
removed (de-rotated to position 0, :func:`apportion.host.rope.unapply`) so that an offset is
independent of where the segment sits; the reused keys are re-rotated for their new
positions. For a new occurrence the pool is searched for anchors in the same *slot* (same
non-shared text before the segment: the same agent's role prompt and headers), of compatible
length, and close in embedding space (:class:`apportion.host.embed.SentenceEmbedder`),
weighted by softmax on that cosine similarity. The same segment in the same slot takes its
anchor's offsets token by token; another segment takes, per token and layer, the offsets of
the anchor tokens whose base keys are nearest ('nearest' mode). No match: the segment is
prefilled exactly, and its offset joins the pool (online update). The tokens after a segment
(the agent's own question) are always computed exactly, attending to the reused KV, and so
are the first ``recompute_head`` share of a reused segment's tokens (they attend mostly to the
new prefix: their offsets are the least predictable); only the rest counts as reused (an
occurrence counts as the share of its tokens that was reused).

The base prefix is the tokenizer's chat-template opening (BOS, default system message, user
turn) + ``base_prefix``, so that offsets hold only what differs from a typical prompt. A
segment written after another text (an agent's message about a document: ``share(...,
context=)``) has its base KV computed after that text, as in its author's prompt.

Use: ``policy.share(text, tokenizer)`` once per shared segment, then generate as usual;
occurrences are found by token match in each prompt. Reuse applies to batches of one row;
a batch is prefilled exactly. The anchor pool is bound to the model that produced it (its
:func:`apportion.host.model.fingerprint`, architecture and weights): using it with another
model raises :class:`~apportion_kvcache.errors.AnchorMismatchError`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from apportion.base import ComponentConfig
from apportion.errors import ApportionError
from apportion.host import model as host_model
from apportion.host import rope
from apportion.host.embed import SentenceEmbedder
from apportion.host.kv import KVPolicy, PrefillOutput, cache_kwargs
from pydantic import Field

from apportion_kvcache.kvcomm.pool import Anchor, AnchorPool


class KVCOMMConfig(ComponentConfig):
    top_k: int = Field(3, ge=1, description="anchors blended per reused segment")
    min_similarity: float = Field(
        0.0,
        ge=-1.0,
        le=1.0,
        description="cosine similarity (MiniLM) below which an anchor does not match",
    )
    length_tolerance: float = Field(
        0.5, ge=0.0, description="an anchor matches if |len - anchor_len| <= tolerance * len"
    )
    temperature: float = Field(
        0.05, gt=0.0, description="softmax temperature over anchor similarities"
    )
    max_anchors_per_slot: int = Field(
        8, ge=1, description="oldest-used anchors of a slot are dropped past this"
    )
    base_prefix: str = Field(
        "Context:\n", description="neutral text a segment's base KV is computed after"
    )
    base_bos: bool = Field(
        True,
        description="start the base prefix with the tokenizer's BOS token (when it has "
        "one), as real prompts start: the attention sink's KV then matches, offsets are smaller",
    )
    base_chat: bool = Field(
        True,
        description="put the base prefix in a user turn of the tokenizer's chat template "
        "(its default system message first), where chat prompts put a document: offsets "
        "then hold only what differs from a typical prompt. No template: plain base prefix",
    )
    min_segment_tokens: int = Field(
        8, ge=1, description="shorter shared segments are not worth reusing"
    )
    offset_mode: Literal["auto", "token", "nearest", "mean", "none"] = Field(
        "auto",
        description="per-token offsets by position ('token'); per token, the offsets of the "
        "anchor tokens whose base keys are nearest, layer by layer ('nearest'); their mean over "
        "tokens ('mean': the part of an offset that does not depend on which token sits there); "
        "'auto' = per-token for the same segment, nearest for another one (mean for anchors "
        "without base keys), or 'none' (plain base KV, for ablation)",
    )
    recompute_head: float = Field(
        0.02,
        ge=0.0,
        lt=1.0,
        description="share of a reused segment's first tokens "
        "computed exactly (rounded down; they attend most to the new prefix)",
    )
    recompute_tail: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of a reused segment's last tokens "
        "computed exactly (rounded down; the text after attends to them most)",
    )
    nearest_k: int = Field(4, ge=1, description="anchor tokens blended per token in 'nearest' mode")
    nearest_temperature: float = Field(
        0.05, gt=0.0, description="softmax temperature over base-key cosine similarities"
    )


@dataclass
class SharedSegment:
    """A declared shared text: its matching tokens (``ids``), embedding and base KV."""

    text: str
    ids: list[int]
    embedding: torch.Tensor
    base_k: torch.Tensor | None = None  # (layers, kv_heads, n, d) de-rotated
    base_v: torch.Tensor | None = None
    #: what the base KV is computed after (see :meth:`KVCOMM.share`)
    context: SharedSegment | list[int] | None = None
    #: the base prefix's own KV, per layer
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    full_ids: list[int] | None = None  # the text's tokens, core and the boundary token on each side


@dataclass
class KVCOMMStats:
    occurrences: int = 0
    reused: float = 0.0  # occurrences, each counted by the share of its tokens whose KV was reused
    reused_tokens: int = 0
    recomputed_tokens: int = 0  # tokens of reused occurrences computed exactly (head and tail)
    prompt_tokens: int = 0
    base_prefill_tokens: int = 0
    base_seconds: float = 0.0

    @property
    def reuse_rate(self) -> float:
        return self.reused / self.occurrences if self.occurrences else 0.0


def _find(hay: list[int], needle: list[int], start: int) -> int:
    n = len(needle)
    first = needle[0]
    for i in range(start, len(hay) - n + 1):
        if hay[i] == first and hay[i : i + n] == needle:
            return i
    return -1


class KVCOMM(KVPolicy):
    """kv-policy ``kvcomm``: anchor-corrected reuse of shared segments (see module docstring)."""

    name: ClassVar[str] = "kvcomm"
    summary: ClassVar[str] = (
        "KVCOMM: shared segments reused under new prefixes, offsets from an anchor pool "
        "(RoPE-aware)"
    )
    Config = KVCOMMConfig

    def __init__(self, config: KVCOMMConfig | None = None, pool: AnchorPool | None = None):
        super().__init__(config)
        self.pool = (
            pool if pool is not None else AnchorPool(max_per_slot=self.config.max_anchors_per_slot)
        )
        self.segments: list[SharedSegment] = []
        self.stats = KVCOMMStats()
        self._embedder: SentenceEmbedder | None = None
        self._loaded: Any = None
        self._tokenizer: Any = None
        self.last_info: dict[str, Any] = {}

    # -- setup
    def bind(self, loaded: Any) -> None:
        """Keep the loaded model: its fingerprint binds the anchor pool, its tokenizer builds
        the base prefix (until :meth:`share` names one)."""
        self._loaded = loaded
        if self._tokenizer is None:
            self._tokenizer = loaded.tokenizer

    def embed(self, text: str) -> torch.Tensor:
        """The MiniLM sentence embedding anchors are matched by."""
        if self._embedder is None:
            self._embedder = SentenceEmbedder.shared()
        return self._embedder.embed(text)

    def share(self, text: str, tokenizer: Any, *, context: str | None = None) -> SharedSegment:
        """Declare ``text`` a shared segment. Its occurrences in later prompts (as the same
        tokens) are reused when the pool has a matching anchor.

        ``context``: the text ``text`` was written after (an agent's message: the document it
        read). The segment's base KV is then its KV after ``base_prefix`` + ``context``, as in
        its author's own prompt, so the part of every offset that comes from that context (a
        message quoting the document attends to the quoted sentence) is in the base and not
        left to the anchors. When ``context`` is itself a shared segment, its base KV is
        continued: only this segment's tokens are computed."""
        if not text.strip():
            raise ValueError("a shared segment must contain text")
        self._tokenizer = tokenizer
        ids = tokenizer.encode(text, add_special_tokens=False)
        core = _core(ids)
        if len(core) < self.config.min_segment_tokens:
            raise ValueError(
                f"shared segment of {len(core)} tokens is shorter than min_segment_tokens="
                f"{self.config.min_segment_tokens}"
            )
        for seg in self.segments:
            if seg.ids == core:
                return seg
        seg = SharedSegment(text, core, self.embed(text))
        if context is not None:
            ctx_ids = tokenizer.encode(context, add_special_tokens=False)
            seg.context = next((s for s in self.segments if s.ids == _core(ctx_ids)), ctx_ids)
            seg.full_ids = ids
        self.segments.append(seg)
        return seg

    def fingerprint(self, model: Any) -> str:
        """The fingerprint (architecture and weights) anchors of ``model`` are recorded under:
        the bound model's, or that of a model used without :meth:`bind`."""
        return host_model.fingerprint_for(model, self._loaded)

    # -- base KV of a segment: after ``base_prefix``, de-rotated
    def _base(self, model: Any, seg: SharedSegment, tokenizer_ids: list[int]) -> None:
        if seg.base_k is not None:
            return
        from transformers import DynamicCache

        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config)
        if seg.context is None:
            n0, run = 0, tokenizer_ids + seg.ids
            first = len(tokenizer_ids)
        else:
            # after the context; the segment's own first token (left out of its core) is kept
            full = seg.full_ids or seg.ids
            sep = self._tokenizer.encode("\n\n", add_special_tokens=False)
            if isinstance(seg.context, SharedSegment):
                ctx = seg.context
                self._base(model, ctx, tokenizer_ids)
                assert (
                    ctx.base_k is not None and ctx.base_v is not None and ctx.prefix_kv is not None
                )
                p = ctx.prefix_kv[0][0].shape[-2]
                cos, sin = rope.cos_sin(
                    model, torch.arange(p, p + len(ctx.ids), device=model.device), torch.float32
                )
                for layer, (pk, pv) in enumerate(ctx.prefix_kv):
                    k = torch.cat(
                        [pk, rope.apply(ctx.base_k[layer], cos, sin).to(pk.dtype)], dim=-2
                    )
                    v = torch.cat([pv, ctx.base_v[layer].to(pv.dtype)], dim=-2)
                    cache.update(k[None], v[None], layer)
                n0, run = p + len(ctx.ids), sep + full
            else:
                n0, run = 0, tokenizer_ids + seg.context + sep + full
            first = n0 + len(run) - len(full) + (1 if len(_core(full)) < len(full) else 0)
        ids = torch.tensor([run], device=model.device)
        model(
            input_ids=ids,
            position_ids=torch.arange(n0, n0 + len(run), device=model.device)[None],
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
        )
        pos = torch.arange(first, first + len(seg.ids), device=model.device)
        cos, sin = rope.cos_sin(model, pos, torch.float32)
        end = first + len(seg.ids)
        seg.base_k = torch.stack(
            [rope.unapply(layer.keys[0, :, first:end].float(), cos, sin) for layer in cache.layers]
        )
        seg.base_v = torch.stack([layer.values[0, :, first:end].float() for layer in cache.layers])
        if seg.context is None:
            seg.prefix_kv = [
                (layer.keys[0, :, :first].clone(), layer.values[0, :, :first].clone())
                for layer in cache.layers
            ]
        self.stats.base_prefill_tokens += ids.shape[1]
        self.stats.base_seconds += time.perf_counter() - t0

    # -- prefill
    def _occurrences(self, ids: list[int]) -> list[tuple[int, SharedSegment]]:
        found: list[tuple[int, SharedSegment]] = []
        for seg in sorted(self.segments, key=lambda s: -len(s.ids)):  # longest first
            start = 0
            while (i := _find(ids, seg.ids, start)) >= 0:
                if all(i + len(seg.ids) <= j or i >= j + len(s.ids) for j, s in found):
                    found.append((i, seg))
                start = i + 1
        return sorted(found, key=lambda t: t[0])

    @staticmethod
    def _slot(ids: list[int], spans: list[tuple[int, int]], start: int, index: int) -> str:
        """Identity of the non-shared text before a segment: the prefix with earlier shared
        segments elided (so an agent's slot is the same whatever the document says). The token
        on each side of a segment may have merged with it, so it is elided too."""
        h = hashlib.sha256()
        pos = 0
        for s, e in spans:
            if s >= start:
                break
            h.update(torch.tensor(ids[pos : max(pos, s - 1)], dtype=torch.int64).numpy().tobytes())
            h.update(b"|seg|")
            pos = e + 1
        h.update(torch.tensor(ids[pos : max(pos, start - 1)], dtype=torch.int64).numpy().tobytes())
        h.update(f"#{index}".encode())
        return h.hexdigest()[:24]

    def _forward(
        self, model: Any, ids: torch.Tensor, start: int, cache: Any, last: bool
    ) -> torch.Tensor | None:
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None, :]
        out = model(
            input_ids=ids,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
        )
        return out.logits[:, -1, :] if last else None

    def prefill(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
        *,
        question_len: int = 0,
    ) -> PrefillOutput:
        fp = self.fingerprint(model)
        self.pool.check_model(fp)
        if input_ids.shape[0] != 1 or not self.segments:
            self.last_info = {"occurrences": 0, "reused": 0}
            return super().prefill(
                model, input_ids, attention_mask, cache, question_len=question_len
            )
        ids = input_ids[0].tolist()
        n = len(ids)
        occ = [
            (i, s) for i, s in self._occurrences(ids) if i + len(s.ids) < n
        ]  # keep >= 1 token to run
        spans = [(i, i + len(s.ids)) for i, s in occ]
        tok_base: list[int] | None = None
        pos = 0
        reused = 0.0
        reused_tokens = recomputed = 0
        for index, (start, seg) in enumerate(occ):
            slot = self._slot(ids, spans, start, index)
            end = start + len(seg.ids)
            anchors = self.pool.match(
                slot,
                len(seg.ids),
                seg.embedding,
                top_k=self.config.top_k,
                min_similarity=self.config.min_similarity,
                length_tolerance=self.config.length_tolerance,
            )
            head, tail = self._recompute_span(len(seg.ids)) if anchors else (0, 0)
            if start + head > pos:  # the text before, and the segment's head, computed exactly
                self._forward(model, input_ids[:, pos : start + head], pos, cache, last=False)
            if tok_base is None:
                tok_base = self._base_prefix_ids(model)
            self._base(model, seg, tok_base)
            cos, sin = rope.cos_sin(
                model, torch.arange(start, end, device=input_ids.device), torch.float32
            )
            if anchors:
                dk, dv = self._blend(anchors, seg)
                keep = slice(head, len(seg.ids) - tail)
                for layer in range(len(cache.layers)):
                    k = rope.apply(
                        seg.base_k[layer, :, keep] + dk[layer, :, keep], cos[keep], sin[keep]
                    )
                    v = seg.base_v[layer, :, keep] + dv[layer, :, keep]
                    cache.update(k[None].to(model.dtype), v[None].to(model.dtype), layer)
                # only the tokens whose KV was reused count: an occurrence with a recomputed
                # head/tail is a fraction of a reuse
                reused += (len(seg.ids) - head - tail) / len(seg.ids)
                reused_tokens += len(seg.ids) - head - tail
                recomputed += head + tail
                pos = end - tail  # the tail is computed exactly with the text after it
            else:
                self._forward(model, input_ids[:, start:end], start, cache, last=False)
                k_ctx = torch.stack(
                    [
                        rope.unapply(layer.keys[0, :, start:end].float(), cos, sin)
                        for layer in cache.layers
                    ]
                )
                v_ctx = torch.stack(
                    [layer.values[0, :, start:end].float() for layer in cache.layers]
                )
                self.pool.add(
                    Anchor(
                        slot,
                        len(seg.ids),
                        seg.embedding.clone(),
                        (k_ctx - seg.base_k).half(),
                        (v_ctx - seg.base_v).half(),
                        fp,
                        base_k=seg.base_k.half(),
                    )
                )
                pos = end
        logits = self._forward(model, input_ids[:, pos:], pos, cache, last=True)
        self.stats.occurrences += len(occ)
        self.stats.reused += reused
        self.stats.reused_tokens += reused_tokens
        self.stats.prompt_tokens += n
        self.stats.recomputed_tokens += recomputed
        self.last_info = {
            "occurrences": len(occ),
            "reused": reused,
            "reused_tokens": reused_tokens,
            "recomputed_tokens": recomputed,
        }
        return PrefillOutput(
            logits=logits,
            kv_mask=None,
            next_position=torch.tensor([n], device=input_ids.device),
            info=self.last_info,
        )

    def _recompute_span(self, length: int) -> tuple[int, int]:
        """How many of a reused segment's first and last tokens are computed exactly. The first
        ones attend mostly to the new prefix (their offsets vary the most between prefixes);
        the last ones are what the text after the segment attends to most."""
        head = int(length * self.config.recompute_head)
        tail = int(length * self.config.recompute_tail)
        return (head, tail) if head + tail < length else (0, 0)

    def _base_prefix_ids(self, model: Any) -> list[int]:
        tok = self._tokenizer
        if tok is None:
            raise ApportionError(
                "KVCOMM needs its tokenizer: bind it to a model or call share(text, tokenizer) "
                "first"
            )
        text = self.config.base_prefix
        if self.config.base_chat and getattr(tok, "chat_template", None) and text:
            rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
            if text in rendered:
                text = rendered[: rendered.index(text) + len(text)]
        ids = tok.encode(text, add_special_tokens=False) if text else []
        bos = getattr(tok, "bos_token_id", None)
        if self.config.base_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer`` for the base prefix (as :meth:`share` does)."""
        self._tokenizer = tokenizer

    def _blend(
        self, anchors: list[tuple[Anchor, float]], seg: SharedSegment
    ) -> tuple[torch.Tensor, torch.Tensor]:
        length = len(seg.ids)
        sims = torch.tensor([s for _, s in anchors])
        weights = torch.softmax(sims / self.config.temperature, dim=0)
        mode = self.config.offset_mode
        for a, _ in anchors:
            a.last_used = time.monotonic()
        if mode == "auto" and any(a.length == length and sim > 0.999 for a, sim in anchors):
            anchors = [(a, sim) for a, sim in anchors if a.length == length and sim > 0.999][:1]
            weights = torch.ones(1)
            mode = "token"
        if mode in ("auto", "nearest") and all(a.base_k is not None for a, _ in anchors):
            assert seg.base_k is not None
            return self._nearest([a for a, _ in anchors], weights, seg.base_k)
        dk = dv = None
        for (a, _), w in zip(anchors, weights.tolist(), strict=True):
            if mode == "none":
                ak = torch.zeros_like(_fit(a.delta_k.float(), length))
                av = torch.zeros_like(ak)
            elif mode == "token":
                ak, av = _fit(a.delta_k.float(), length), _fit(a.delta_v.float(), length)
            else:
                shape = (*a.delta_k.shape[:-2], length, a.delta_k.shape[-1])
                ak = a.delta_k.float().mean(-2, keepdim=True).expand(shape)
                av = a.delta_v.float().mean(-2, keepdim=True).expand(shape)
            dk = ak * w if dk is None else dk + ak * w
            dv = av * w if dv is None else dv + av * w
        assert dk is not None and dv is not None
        return dk, dv

    def _nearest(
        self, anchors: list[Anchor], weights: torch.Tensor, base_k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token and layer: the offsets of the ``nearest_k`` anchor tokens whose base keys
        (all heads of the layer, de-rotated) have the highest cosine similarity with this token's
        base key, blended with softmax weights (plus the log of each anchor's own weight)."""
        layers, heads, n, d = base_k.shape
        flat = lambda t: t.float().permute(0, 2, 1, 3).reshape(layers, -1, heads * d)  # noqa: E731
        keys = torch.nn.functional.normalize(
            torch.cat([flat(a.base_k) for a in anchors], dim=1), dim=-1
        )
        dks = torch.cat([flat(a.delta_k) for a in anchors], dim=1)
        dvs = torch.cat([flat(a.delta_v) for a in anchors], dim=1)
        prior = torch.cat(
            [
                torch.full((a.length,), max(float(w), 1e-30)).log()
                for a, w in zip(anchors, weights, strict=True)
            ]
        )
        query = torch.nn.functional.normalize(flat(base_k), dim=-1)
        k = min(self.config.nearest_k, keys.shape[1])
        dk = torch.empty(layers, n, heads * d)
        dv = torch.empty_like(dk)
        for layer in range(layers):
            sim = query[layer] @ keys[layer].T  # (n, M)
            top, idx = sim.topk(k, dim=-1)
            w = torch.softmax(top / self.config.nearest_temperature + prior[idx], dim=-1)[..., None]
            dk[layer] = (dks[layer][idx] * w).sum(1)
            dv[layer] = (dvs[layer][idx] * w).sum(1)
        unflat = lambda t: t.reshape(layers, n, heads, d).permute(0, 2, 1, 3)  # noqa: E731
        return unflat(dk), unflat(dv)


def _core(ids: list[int]) -> list[int]:
    """The tokens a segment is matched by: without its first and last token (they may merge
    with the neighbouring text in a prompt) when it has more than four."""
    return ids[1:-1] if len(ids) > 4 else ids


def _fit(delta: torch.Tensor, length: int) -> torch.Tensor:
    """Align an anchor's per-token offsets to ``length`` tokens: truncate, or extend with the
    mean of its last 16 offsets (far from the prefix the offset changes slowly)."""
    n = delta.shape[-2]
    if n >= length:
        return delta[..., :length, :]
    tail = delta[..., -16:, :].mean(-2, keepdim=True)
    return torch.cat([delta, tail.expand(*delta.shape[:-2], length - n, delta.shape[-1])], dim=-2)
