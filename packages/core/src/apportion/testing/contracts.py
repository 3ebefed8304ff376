"""The contract suites. Each class is collected only through a subclass that sets
``component`` (the registered name); options for the instance under test go in ``options``."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pytest

QUESTION = "What is the secret code mentioned above? Answer with the code only."
FACT = "The secret code is 4417-BLUE."


def _long_context(n_sentences: int) -> str:
    from apportion.baselines.haystack import sentences

    pool = sentences()
    body = list(pool[:n_sentences])
    body.insert(n_sentences // 3, FACT)
    return " ".join(body)


class _Contract:
    kind: ClassVar[str] = ""
    component: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}

    def make(self, registry: Any, **overrides: Any) -> Any:
        return registry.create(self.kind, self.component, {**self.options, **overrides})

    def test_registered_with_defaults(self, registry: Any) -> None:
        spec = registry.get(self.kind, self.component)
        assert spec.summary, "every component needs a one-line summary"
        config = spec.config_model()()  # every field has a default
        instance = spec.create(config)
        assert instance is not None
        desc = spec.describe()
        assert "error" not in desc, desc.get("error")

    def test_unknown_option_is_rejected(self, registry: Any) -> None:
        from apportion.errors import ConfigError

        with pytest.raises(ConfigError, match="no_such_option"):
            registry.get(self.kind, self.component).validate_options({"no_such_option": 1})


class AttentionContract(_Contract):
    """Backends install and uninstall cleanly and keep a short prompt's answer close to dense.

    ``max_logit_diff``: how far (max abs) the first-token logits may stray from dense on a
    short prompt; ``None`` skips the check (for approximate backends on tiny contexts).
    """

    kind = "attention"
    max_logit_diff: ClassVar[float | None] = 1e-3

    def test_install_restores_model(self, registry: Any, smollm2: Any) -> None:
        backend = self.make(registry)
        before = smollm2.model.config._attn_implementation
        with backend.installed(smollm2.model):
            pass
        assert smollm2.model.config._attn_implementation == before
        assert isinstance(backend.extends_context, bool)

    def test_generates_like_dense(self, registry: Any, smollm2: Any) -> None:
        import torch

        from apportion.host import Host
        from apportion.host.attention import AttentionBackend
        from apportion.host.kv import KVPolicy

        context = _long_context(12)
        prompt = f"{context}\n\n{QUESTION}"
        host = Host(smollm2, self.make(registry), KVPolicy())
        dense = Host(smollm2, AttentionBackend(), KVPolicy())
        enc = dense.encode(prompt)
        ids = torch.tensor([enc.ids])
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            outs = []
            for h in (dense, host):
                cache = h.kv_policy.make_cache(smollm2.model)
                with h.attention.installed(smollm2.model):
                    pre = h.attention.prefill(
                        smollm2.model,
                        ids,
                        mask,
                        cache,
                        question_len=enc.question_len,
                        inner=h.kv_policy.prefill,
                    )
                outs.append(pre.logits.float())
        if self.max_logit_diff is not None:
            assert (outs[0] - outs[1]).abs().max().item() <= self.max_logit_diff
        text = host.generate(prompt, max_new_tokens=12)[0].text
        assert text.strip()


class KVPolicyContract(_Contract):
    """Budget semantics every KV policy keeps.

    Policies with a ``compression_ratio`` option must: equal ``full`` at 0; shrink the cache
    (really: fewer bytes) at 0.5; keep the question; work for batch > 1 with left padding.
    Policies with ``decode_budget`` and ``decode_interval`` options keep the cache within
    their sum while generating.
    """

    kind = "kv-policy"
    #: compressed entries may exceed the exact budget by this many per layer (rounding, windows)
    slack_tokens: ClassVar[int] = 8
    #: ``decode_budget`` the compression-while-generating check runs at (policies with that
    #: option); raise it for a policy whose recent window is larger
    decode_budget: ClassVar[int] = 48

    def _has_ratio(self, registry: Any) -> bool:
        return (
            "compression_ratio"
            in registry.get(self.kind, self.component).config_model().model_fields
        )

    def _gen(self, smollm2: Any, policy: Any, prompts: Any, n: int = 16) -> Any:
        from apportion.host import Host

        return Host(smollm2, kv_policy=policy).generate(prompts, max_new_tokens=n)

    def test_ratio_zero_equals_full(self, registry: Any, smollm2: Any) -> None:
        from apportion.host.kv import KVPolicy

        if not self._has_ratio(registry):
            pytest.skip("no compression_ratio option")
        prompt = f"{_long_context(20)}\n\n{QUESTION}"
        got = self._gen(smollm2, self.make(registry, compression_ratio=0.0), prompt)[0]
        ref = self._gen(smollm2, KVPolicy(), prompt)[0]
        assert got.text == ref.text
        assert got.kv_tokens == ref.kv_tokens

    def test_compression_frees_memory(self, registry: Any, smollm2: Any) -> None:
        from apportion.base import Prompt
        from apportion.host import Host
        from apportion.host.kv import KVPolicy

        if not self._has_ratio(registry):
            pytest.skip("no compression_ratio option")
        context = _long_context(30)
        prompt = Prompt(
            [{"role": "user", "content": f"{context}\n\n{QUESTION}"}], question=QUESTION
        )
        full = Host(smollm2, kv_policy=KVPolicy()).generate(prompt, max_new_tokens=4)[0]
        got = Host(smollm2, kv_policy=self.make(registry, compression_ratio=0.5)).generate(
            prompt, max_new_tokens=4
        )[0]
        question_len = Host(smollm2).encode(prompt).question_len
        context_len = full.kv_tokens - question_len
        budget = math.ceil(context_len * 0.5) + question_len
        assert got.kv_tokens <= budget + self.slack_tokens, (got.kv_tokens, budget)
        assert got.peak_kv_bytes < 0.62 * full.peak_kv_bytes, (
            got.peak_kv_bytes,
            full.peak_kv_bytes,
        )

    def test_batch_with_padding(self, registry: Any, smollm2: Any) -> None:
        short = f"{_long_context(6)}\n\n{QUESTION}"
        long = f"{_long_context(18)}\n\n{QUESTION}"
        opts = {"compression_ratio": 0.0} if self._has_ratio(registry) else {}
        policy = self.make(registry, **opts)
        batch = self._gen(smollm2, policy, [short, long], n=10)
        alone = [self._gen(smollm2, self.make(registry, **opts), p, n=10)[0] for p in (short, long)]
        assert [b.text for b in batch] == [a.text for a in alone]

    def test_batch_with_padding_compressed(self, registry: Any, smollm2: Any) -> None:
        if not self._has_ratio(registry):
            pytest.skip("no compression_ratio option")
        short = f"{_long_context(6)}\n\n{QUESTION}"
        long = f"{_long_context(18)}\n\n{QUESTION}"
        out = self._gen(smollm2, self.make(registry, compression_ratio=0.5), [short, long], n=8)
        assert len(out) == 2 and all(o.new_tokens > 0 for o in out)

    def test_query_agnostic(self, registry: Any, smollm2: Any) -> None:
        """Compressed before the question is fed: equal to ``full`` at ratio 0; at 0.5 the
        cache keeps at most half the context (plus the question, fed afterwards) and frees
        the bytes; a left-padded batch of different lengths still answers."""
        from apportion.base import Prompt
        from apportion.host import Host
        from apportion.host.kv import KVPolicy

        if not self._has_ratio(registry):
            pytest.skip("no compression_ratio option")

        def prompt(n: int) -> Prompt:
            text = f"{_long_context(n)}\n\n{QUESTION}"
            return Prompt([{"role": "user", "content": text}], question=QUESTION)

        def gen(policy: Any, prompts: Any, n: int = 12) -> Any:
            host = Host(smollm2, kv_policy=policy, question_in_prefill=False)
            return host.generate(prompts, max_new_tokens=n)

        full = gen(KVPolicy(), prompt(24))[0]
        assert gen(self.make(registry, compression_ratio=0.0), prompt(24))[0].text == full.text
        got = gen(self.make(registry, compression_ratio=0.5), prompt(24), n=4)[0]
        context_len = full.kv_tokens
        assert got.kv_tokens <= math.ceil(context_len * 0.5) + self.slack_tokens, (
            got.kv_tokens,
            context_len,
        )
        assert got.peak_kv_bytes < 0.62 * full.peak_kv_bytes
        out = gen(self.make(registry, compression_ratio=0.5), [prompt(6), prompt(18)], n=8)
        assert len(out) == 2 and all(o.new_tokens > 0 for o in out)

    def test_budget_at_least_context(self, registry: Any, smollm2: Any) -> None:
        """A tiny prompt under a policy configured for long ones: nothing breaks."""
        opts = {"compression_ratio": 0.1} if self._has_ratio(registry) else {}
        out = self._gen(smollm2, self.make(registry, **opts), "Say hello.", n=6)[0]
        assert out.new_tokens > 0

    def test_decode_budget_bounds_the_cache(self, registry: Any, smollm2: Any) -> None:
        """Policies with ``decode_budget`` / ``decode_interval`` options (compression while
        generating): no layer ever holds more than budget + interval entries, watched after
        every attention of the decode; an eviction did happen; the bytes go."""
        from apportion.host import Host
        from apportion.host.kv import KVPolicy, attention_modules

        fields = registry.get(self.kind, self.component).config_model().model_fields
        if not {"decode_budget", "decode_interval"} <= set(fields):
            pytest.skip("no decode_budget option")
        limit, interval = self.decode_budget, 8
        policy = self.make(registry, decode_budget=limit, decode_interval=interval)
        assert policy.compresses_decode
        caches: list[Any] = []
        lengths: list[int] = []
        make = policy.make_cache

        def recording(model: Any) -> Any:
            caches.append(make(model))
            return caches[-1]

        def watch(module: Any, args: Any, output: Any) -> None:
            keys = caches[-1].layers[module.layer_idx].keys
            if keys is not None:
                lengths.append(int(keys.shape[-2]))

        policy.make_cache = recording
        prompt = f"{_long_context(8)}\n\nRetell the text above in detail, sentence by sentence."
        handles = [m.register_forward_hook(watch) for m in attention_modules(smollm2.model)]
        try:
            got = Host(smollm2, kv_policy=policy).generate(prompt, max_new_tokens=40)[0]
        finally:
            for h in handles:
                h.remove()
        full = Host(smollm2, kv_policy=KVPolicy()).generate(prompt, max_new_tokens=40)[0]
        assert got.prompt_tokens > limit + interval and got.new_tokens > 2 * interval
        assert max(lengths) <= limit + interval, max(lengths)
        assert limit + interval in lengths  # it grew to the cut, at least once
        assert got.peak_kv_bytes < 0.5 * full.peak_kv_bytes


class AllocatorContract(_Contract):
    kind = "allocator"

    def test_allocate_free_and_stats(self, registry: Any) -> None:
        import torch

        alloc = self.make(registry)
        a = alloc.allocate((256, 16), torch.float32)
        b = alloc.allocate((100,), torch.float16)
        assert tuple(a.shape) == (256, 16) and a.dtype == torch.float32
        assert tuple(b.shape) == (100,) and b.dtype == torch.float16
        a.fill_(1.5)
        assert float(a.sum()) == 1.5 * 256 * 16
        stats = alloc.stats()
        assert stats.peak_bytes >= 256 * 16 * 4 + 200
        alloc.free(a)
        alloc.free(b)
        assert alloc.stats().peak_bytes >= stats.peak_bytes

    def test_double_free_is_an_error(self, registry: Any) -> None:
        import torch

        alloc = self.make(registry)
        t = alloc.allocate((8,), torch.float32)
        alloc.free(t)
        with pytest.raises((ValueError, KeyError)):
            alloc.free(t)


class TrainerStrategyContract(_Contract):
    kind = "trainer-strategy"

    def test_allocation_spends_budget(self, registry: Any) -> None:
        s = self.make(registry)
        alloc = s.allocate_rollouts(4, 32)
        assert len(alloc) == 4 and sum(alloc) <= 32 and min(alloc) >= 1
        with pytest.raises(ValueError, match="budget"):
            s.allocate_rollouts(8, 4)

    def test_advantages_shape_and_bad_rewards(self, registry: Any) -> None:
        s = self.make(registry)
        adv = s.advantages([[1.0, 0.0, 1.0, 0.0], [1.0], [0.0, float("nan"), None, 1.0]])
        assert [len(a) for a in adv] == [4, 1, 4]
        assert all(math.isfinite(x) for g in adv for x in g)
        assert adv[1] == [0.0]  # a group of one carries no signal
        assert adv[0][0] > 0 > adv[0][1]
        assert adv[2][1] == 0.0 and adv[2][2] == 0.0  # NaN/None excluded

    def test_loss_is_differentiable_scalar(self, registry: Any) -> None:
        import torch

        s = self.make(registry)
        logps = torch.randn(4, 6, requires_grad=True)
        loss = s.loss(logps, logps.detach(), torch.tensor([1.0, -1.0, 0.5, 0.0]), torch.ones(4, 6))
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert logps.grad is not None


class PromptStrategyContract(_Contract):
    kind = "prompt-strategy"

    def test_builds_messages(self, registry: Any, smollm2: Any) -> None:
        s = self.make(registry)
        p = s.build(
            "What is 2+2?", context="Some context.", tokenizer=smollm2.tokenizer, budget=512
        )
        assert p.messages and p.messages[-1]["role"] == "user"
        assert "What is 2+2?" in p.messages[-1]["content"]
        assert isinstance(p.accounting, dict)

    def test_budget_smaller_than_query(self, registry: Any, smollm2: Any) -> None:
        from apportion.errors import ApportionError

        s = self.make(registry)
        with pytest.raises((ApportionError, ValueError), match="budget"):
            s.build("word " * 200, tokenizer=smollm2.tokenizer, budget=10)

    def test_embeds_are_spliced(self, registry: Any, smollm2: Any) -> None:
        """The host reads ``Prompt.embeds`` in place of their placeholders.

        - Embeddings the strategy hands over are well-formed: each placeholder once in the
          rendered prompt, before the question, an (n, hidden) float tensor; the host
          generates from them and counts their ``n`` slots as prompt tokens.
        - This strategy's prompt, with its text before the question handed over as the
          model's own token embeddings of that text, generates exactly what those tokens
          generate (the splice is exact, and the prompt's shape admits it).
        """
        import torch

        from apportion.base import Prompt
        from apportion.host import Host

        s = self.make(registry)
        s.bind(smollm2)
        context = f"{FACT} The code was written on a card by the door."
        p = s.build(QUESTION, context=context, tokenizer=smollm2.tokenizer)
        host = Host(smollm2)
        hidden = smollm2.model.get_input_embeddings().weight.shape[-1]
        if p.embeds:
            rendered = host.render(p.messages)
            for placeholder, vectors in p.embeds.items():
                assert rendered.count(placeholder) == 1, placeholder
                assert rendered.index(placeholder) < rendered.rindex(p.question or placeholder)
                assert vectors.dim() == 2 and vectors.shape[1] == hidden
                assert vectors.shape[0] >= 1
            enc = host.encode(p)
            slots = sum(v.shape[0] for v in p.embeds.values())
            assert sum(v.shape[0] for _, v in enc.embeds) == slots
            result = host.generate(p, max_new_tokens=4)[0]
            assert result.prompt_tokens == len(enc.ids) and result.new_tokens >= 1

        last = p.messages[-1]["content"]
        cut = last.rfind(p.question) if p.question else -1
        head = last[:cut] if cut > 0 else ""
        for placeholder in p.embeds:  # only the text after the strategy's own embeddings
            head = head.split(placeholder)[-1]
        span = head.strip()
        if not span:
            return  # no text before the question to hand over
        placeholder = "<<apportion-contract-splice>>"
        twin = Prompt(
            [*p.messages[:-1], {**p.messages[-1], "content": last.replace(span, placeholder, 1)}],
            question=p.question,
            embeds=dict(p.embeds),
        )
        span_ids = smollm2.tokenizer.encode(span, add_special_tokens=False)
        with torch.no_grad():
            vectors = smollm2.model.get_input_embeddings().weight[span_ids].clone()
        twin.embeds[placeholder] = vectors
        enc = host.encode(twin)
        start = next(s for s, v in enc.embeds if v.data_ptr() == vectors.data_ptr())
        ids = list(enc.ids)
        ids[start : start + len(span_ids)] = span_ids
        spliced = host.generate(twin, max_new_tokens=4)[0]
        assert spliced.prompt_tokens == len(ids)
        if not p.embeds:
            plain = host.generate_ids([ids], enc.question_len, max_new_tokens=4)[0]
        elif host.encode(p).ids == ids:  # the strategy's own embeddings stay in both
            plain = host.generate(p, max_new_tokens=4)[0]
        else:
            return  # the text around the strategy's placeholders tokenizes differently
        assert spliced.token_ids == plain.token_ids


class BenchmarkContract(_Contract):
    """Deterministic samples, lengths near target in model tokens, scores in [0, 1]."""

    kind = "benchmark"
    length_tolerance: ClassVar[float] = 0.02
    small_options: ClassVar[dict[str, Any]] = {"lengths": [512, 1024], "samples": 1}

    def _samples(self, registry: Any, tok: Any, **kw: Any) -> list[Any]:
        return list(self.make(registry, **{**self.small_options, **kw}).samples(tok))

    def test_deterministic(self, registry: Any, smollm2: Any) -> None:
        a = self._samples(registry, smollm2.tokenizer, seed=3)
        b = self._samples(registry, smollm2.tokenizer, seed=3)
        assert [(s.id, s.context, s.question, s.answers) for s in a] == [
            (s.id, s.context, s.question, s.answers) for s in b
        ]
        c = self._samples(registry, smollm2.tokenizer, seed=4)
        assert [s.context for s in a] != [s.context for s in c]

    def test_lengths_near_target(self, registry: Any, smollm2: Any) -> None:
        from apportion.host import Host

        host = Host(smollm2)
        bench = self.make(registry, **self.small_options)
        strategy = registry.create("prompt-strategy", "zero-shot")
        for s in bench.samples(smollm2.tokenizer):
            n = len(host.encode(strategy.build(s.question, context=s.context)).ids)
            assert abs(n - s.length) <= self.length_tolerance * s.length, (s.id, n, s.length)

    def test_scoring(self, registry: Any, smollm2: Any) -> None:
        bench = self.make(registry, **self.small_options)
        for s in bench.samples(smollm2.tokenizer):
            assert bench.score(s, " ".join(s.answers)) == 1.0
            assert 0.0 <= bench.score(s, "") <= 1.0
            assert bench.score(s, "") < 1.0
