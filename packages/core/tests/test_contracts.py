"""The core baselines pass the contract suites every plugin inherits."""

from apportion.testing import (
    AllocatorContract,
    AttentionContract,
    BenchmarkContract,
    KVPolicyContract,
    PromptStrategyContract,
    TrainerStrategyContract,
)


class TestDense(AttentionContract):
    component = "dense"
    max_logit_diff = 0.0


class TestFull(KVPolicyContract):
    component = "full"


class TestPageable(AllocatorContract):
    component = "pageable"


class TestGRPO(TrainerStrategyContract):
    component = "grpo"


class TestZeroShot(PromptStrategyContract):
    component = "zero-shot"


class TestNiah(BenchmarkContract):
    component = "niah"


def test_grpo_hand_computed():
    from apportion.baselines.grpo import GRPO

    adv = GRPO().advantages([[1.0, 0.0, 0.0, 1.0]])[0]
    # mean 0.5, sample std sqrt(1/3) = 0.57735
    assert [round(a, 3) for a in adv] == [0.866, -0.866, -0.866, 0.866]


def test_niah_needle_once_at_depth(smollm2):
    from apportion.baselines.niah import SingleNeedle

    bench = SingleNeedle(SingleNeedle.Config(lengths=[1024], depths=[0.0, 0.5, 1.0], samples=1))
    for s in bench.samples(smollm2.tokenizer):
        needle = f"is: {s.answers[0]}."
        assert s.context.count(needle) == 1
        at = s.context.index(needle) / len(s.context)
        assert abs(at - s.depth) < 0.08, (s.depth, at)


def test_the_contract_catches_a_policy_that_builds_the_full_cache_first(smollm2, registry):
    """A policy that prefills the whole cache and evicts afterwards holds the full cache for
    a while: the host charges it that peak, and the contract's memory test fails for it."""
    import pytest
    from apportion.host import Host
    from apportion.host.kv import CompressionConfig, KVPolicy, PrefillOutput
    from apportion.registry import Registry
    from apportion.testing.contracts import QUESTION, _long_context

    class KeepEnds(KVPolicy):
        name = "keep-ends"
        summary = "keeps the first and last entries, evicting after the full prefill"
        Config = CompressionConfig

        def prefill(self, model, input_ids, attention_mask, cache, *, question_len=0):
            out = super().prefill(model, input_ids, attention_mask, cache, question_len=0)
            n = input_ids.shape[1]
            keep = max(question_len, int(n * (1 - self.config.compression_ratio)))
            head = keep // 2
            for layer in cache.layers:
                layer.keys = __import__("torch").cat(
                    [layer.keys[:, :, :head], layer.keys[:, :, n - (keep - head) :]], 2
                )
                layer.values = __import__("torch").cat(
                    [layer.values[:, :, :head], layer.values[:, :, n - (keep - head) :]], 2
                )
            return PrefillOutput(out.logits, None, out.next_position)

    prompt = f"{_long_context(30)}\n\n{QUESTION}"
    full = Host(smollm2).generate(prompt, max_new_tokens=2)[0]
    ends = Host(smollm2, kv_policy=KeepEnds(CompressionConfig(compression_ratio=0.5)))
    got = ends.generate(prompt, max_new_tokens=2)[0]
    assert got.kv_tokens < 0.6 * full.kv_tokens  # it does compress what it keeps...
    assert got.peak_kv_bytes >= 0.95 * full.peak_kv_bytes  # ...after holding everything

    reg = Registry()
    for spec in registry.specs():
        reg.add(spec)
    reg.register_function("kv-policy", "tests", "0")(KeepEnds)

    class Probe(KVPolicyContract):
        component = "keep-ends"

    with pytest.raises(AssertionError):
        Probe().test_compression_frees_memory(reg, smollm2)
