"""kvpress presses as apportion KV policies: the KV-policy contract, the same answers as
kvpress's own pipeline on the same prompts, and clear errors for presses that cannot run."""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import pytest
from apportion.base import Prompt
from apportion.errors import ConfigError, UnknownComponentError
from apportion.host import Host
from apportion.testing import KVPolicyContract
from apportion.testing.contracts import QUESTION, _long_context

kvpress = pytest.importorskip("kvpress")


class TestSnapKV(KVPolicyContract):
    component = "kvpress:snapkv"
    options: ClassVar[dict[str, Any]] = {"window_size": 16}


class TestExpectedAttention(KVPolicyContract):
    component = "kvpress:expected-attention"


class TestStreamingLLM(KVPolicyContract):
    component = "kvpress:streaming-llm"


def _prompt(n: int = 30) -> tuple[str, Prompt]:
    context = _long_context(n) + "\n\n"
    return context, Prompt([{"role": "user", "content": context + QUESTION}], question=QUESTION)


#: (registered name, kvpress class, options), each run at compression_ratio 0.5
PRESSES = [
    ("kvpress:snapkv", "SnapKVPress", {"window_size": 16}),
    ("kvpress:knorm", "KnormPress", {}),
    ("kvpress:expected-attention", "ExpectedAttentionPress", {}),
    ("kvpress:streaming-llm", "StreamingLLMPress", {}),
    ("kvpress:tova", "TOVAPress", {}),
]


@pytest.fixture(scope="module")
def pipeline(smollm2):
    return kvpress.KVPressTextGenerationPipeline(model=smollm2.model, tokenizer=smollm2.tokenizer)


@pytest.mark.parametrize(("name", "press_class", "options"), PRESSES, ids=[p[0] for p in PRESSES])
def test_same_answer_as_kvpress_pipeline(registry, smollm2, pipeline, name, press_class, options):
    """The same press on the same prompt: the adapter under the host answers token for token
    what kvpress's own pipeline answers (context compressed, question fed after it at its
    uncompressed positions), and holds fewer KV bytes than the full cache."""
    context, prompt = _prompt()
    press = getattr(kvpress, press_class)(compression_ratio=0.5, **options)
    theirs = pipeline(context, question=QUESTION, press=press, max_new_tokens=24)["answer"]
    policy = registry.create("kv-policy", name, {"compression_ratio": 0.5, **options})
    ours = Host(smollm2, kv_policy=policy).generate(prompt, max_new_tokens=24)[0]
    full = Host(smollm2).generate(prompt, max_new_tokens=24)[0]
    print(f"\n{name}: kvpress {theirs!r} | apportion {ours.text!r} | full {full.text!r}")
    assert ours.text == theirs.strip()
    assert ours.peak_kv_bytes < 0.62 * full.peak_kv_bytes
    # query-agnostic mode is the same computation for a press (it never sees the question)
    agnostic = Host(smollm2, kv_policy=policy, question_in_prefill=False)
    assert agnostic.generate(prompt, max_new_tokens=24)[0].text == ours.text


def test_left_padded_batch_answers_as_alone(registry, smollm2):
    """Rows are pressed one at a time and gathered left-padded: each answers as it would
    alone, and the peak counts every row's compressed cache."""
    policy = registry.create("kv-policy", "kvpress:snapkv", {"compression_ratio": 0.5})
    prompts = [_prompt(8)[1], _prompt(24)[1]]
    batch = Host(smollm2, kv_policy=policy).generate(prompts, max_new_tokens=12)
    alone = [Host(smollm2, kv_policy=policy).generate(p, max_new_tokens=12)[0] for p in prompts]
    assert [b.text for b in batch] == [a.text for a in alone]
    assert batch[0].peak_kv_bytes >= max(a.peak_kv_bytes for a in alone)


def test_press_options_reach_the_press(registry):
    policy = registry.create(
        "kv-policy", "kvpress:snapkv", {"compression_ratio": 0.25, "window_size": 8}
    )
    assert isinstance(policy.press, kvpress.SnapKVPress)
    assert (policy.press.compression_ratio, policy.press.window_size) == (0.25, 8)
    fields = registry.get("kv-policy", "kvpress:streaming-llm").config_model().model_fields
    assert {"compression_ratio", "n_sink"} <= set(fields)


def test_of_wraps_a_press_built_in_python(smollm2):
    """A wrapper press, which a config cannot name, runs through KVPressPolicy.of."""
    from apportion_kvcache.kvpress_adapter import KVPressPolicy

    press = kvpress.KeyRerotationPress(press=kvpress.KnormPress(compression_ratio=0.5))
    context, prompt = _prompt(20)
    out = Host(smollm2, kv_policy=KVPressPolicy.of(press)).generate(prompt, max_new_tokens=6)[0]
    full = Host(smollm2).generate(prompt, max_new_tokens=6)[0]
    assert out.new_tokens > 0 and out.kv_tokens < 0.62 * full.kv_tokens


# ----------------------------------------------------------------------------- bad input


def test_press_that_needs_eager_attention(registry, smollm2):
    policy = registry.create("kv-policy", "kvpress:observed-attention")
    with pytest.raises(ConfigError, match=r"kvpress:observed-attention.*needs eager attention"):
        Host(smollm2, kv_policy=policy)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("kvpress:adakv", "wraps another press"),
        ("kvpress:decoding", "wraps another press"),
        ("kvpress:qfilter", "from a model hub"),
        ("kvpress:duo-attention", "from a model hub"),
        ("kvpress:think", "no compression_ratio"),
    ],
)
def test_press_that_cannot_run_says_why(registry, name, reason):
    with pytest.raises(ConfigError, match=rf"{name}.*cannot run under apportion: .*{reason}"):
        registry.create("kv-policy", name)
    assert "cannot run here" in registry.get("kv-policy", name).summary


def test_unknown_press_and_option(registry):
    with pytest.raises(UnknownComponentError, match="Did you mean 'kvpress:snapkv'"):
        registry.get("kv-policy", "kvpress:snapkvv")
    with pytest.raises(ConfigError, match="Did you mean 'window_size'"):
        registry.create("kv-policy", "kvpress:snapkv", {"window_sise": 8})
    with pytest.raises(ConfigError, match="compression_ratio"):
        registry.create("kv-policy", "kvpress:snapkv", {"compression_ratio": 1.5})


def test_registration_imports_neither_kvpress_nor_torch():
    import subprocess

    code = (
        "import sys, apportion.plugins as p; r = p.get_registry(); "
        "print(len([n for n in r.names('kv-policy') if n.startswith('kvpress:')]), "
        "'torch' in sys.modules, 'kvpress' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, torch_in, kvpress_in = out.stdout.split()
    assert int(count) >= 6 and torch_in == "False" and kvpress_in == "False"
