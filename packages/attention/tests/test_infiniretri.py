"""InfiniRetri on the embedded model: contract, chunked reading keeps the needle, errors."""

from __future__ import annotations

import pytest
from apportion.testing.contracts import AttentionContract
from apportion_attention.infiniretri import InfiniRetri, InfiniRetriConfig, sentence_ends


class TestInfiniRetriContract(AttentionContract):
    """The contract's prompt is shorter than one chunk: read whole, exactly dense."""

    component = "infiniretri"
    max_logit_diff = 1e-3


def _needle_prompt(smollm2, length=900, depth=0.4):
    from apportion.base import Prompt
    from apportion.plugins import get_registry

    bench = get_registry().create(
        "benchmark", "niah", {"lengths": [length], "depths": [depth], "samples": 1}
    )
    s = next(iter(bench.samples(smollm2.tokenizer)))
    return Prompt(
        [{"role": "user", "content": f"{s.context}\n\n{s.question}"}], question=s.question
    ), s


def test_chunked_reading_carries_the_needle(smollm2):
    from apportion.host import Host

    prompt, sample = _needle_prompt(smollm2)
    backend = InfiniRetri(InfiniRetriConfig(chunk_tokens=192, keep_tokens=96))
    out = Host(smollm2, backend).generate(prompt, max_new_tokens=32)[0]
    read = backend.last_read
    assert read["passes"] >= 4 and read["kept_tokens"] <= 96
    assert read["final_tokens"] < read["context_tokens"]
    assert sample.answers[0] in out.text, (out.text, read)


def test_sentence_ends(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode("One two. Three four! Five?", add_special_tokens=False)
    ends = sentence_ends(tok, ids)
    assert len(ends) == 3 and ends[-1] == len(ids) - 1


def test_bad_setups_are_named(smollm2):
    from apportion.errors import ConfigError
    from apportion.host import Host

    with pytest.raises(ConfigError, match="batch size 1"):
        Host(smollm2, InfiniRetri()).generate(["Hi.", "Hello there."], max_new_tokens=1)
    with pytest.raises(ConfigError, match="exceeds"):
        prompt, _ = _needle_prompt(smollm2, length=256)
        Host(smollm2, InfiniRetri(InfiniRetriConfig(chunk_tokens=8000, keep_tokens=1000))).generate(
            prompt, 1
        )
    text = prompt.messages[-1]["content"]  # a plain string: no question to score with
    with pytest.raises(ConfigError, match="question"):
        Host(smollm2, InfiniRetri(InfiniRetriConfig(chunk_tokens=128))).generate(
            text, max_new_tokens=1
        )
