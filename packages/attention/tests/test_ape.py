"""APE: exact at T=S=1 with one context, context KV reused across queries, answers with many."""

from __future__ import annotations

import pytest
import torch
from apportion.testing.contracts import AttentionContract
from apportion_attention.ape import APE, APEConfig, APEError, MemoryContextStore


class TestAPEContract(AttentionContract):
    """The contract's prompt is one paragraph (no separate contexts), which APE reads
    sequentially through the KV policy: the logits match dense."""

    component = "ape"
    max_logit_diff = 1e-3


INSTRUCTION = "Answer the question using the documents below."
DOCS = [
    "The orchard behind the mill grows pears and a few old apple trees.",
    "The special magic number for amber-canyon is: 4417309.",
    "Tide tables for the northern harbor are printed every spring.",
    "A lantern festival is held in the square on the first frost.",
]
QUESTION = "What is the special magic number for amber-canyon? Answer with the number only."


def prompt(docs):
    return "\n\n".join([INSTRUCTION, *docs, QUESTION])


def prefill(smollm2, backend, text):
    from apportion.host import Host
    from apportion.host.kv import KVPolicy

    host = Host(smollm2, backend, KVPolicy())
    enc = host.encode(text)
    ids = torch.tensor([enc.ids])
    cache = KVPolicy().make_cache(smollm2.model)
    with torch.inference_mode(), backend.installed(smollm2.model):
        return backend.prefill(smollm2.model, ids, torch.ones_like(ids), cache,
                               question_len=enc.question_len, inner=KVPolicy().prefill)


def test_split_keeps_every_token(smollm2):
    ape = APE()
    ids = smollm2.tokenizer.encode(prompt(DOCS))
    segments = ape.split(ids, ape.separator_patterns(smollm2.model), 0)
    assert len(segments) == 2 + len(DOCS)
    assert sum(segments, []) == ids


def test_one_context_at_unit_temperature_and_scale_is_sequential(smollm2):
    from apportion.host.attention import AttentionBackend

    ape = APE(APEConfig(temperature=1.0, scale=1.0, min_contexts=1))
    text = prompt(DOCS[1:2])
    got = prefill(smollm2, ape, text)
    ref = prefill(smollm2, AttentionBackend(), text)
    assert got.info["contexts"] == 1
    assert int(got.next_position) == int(ref.next_position)
    assert (got.logits - ref.logits).abs().max().item() < 1e-3


def test_context_kv_is_reused_across_queries(smollm2):
    ape = APE()
    first = prefill(smollm2, ape, prompt(DOCS))
    assert first.info["encoded"] == len(DOCS) and first.info["reused"] == 0
    again = prefill(smollm2, ape, prompt(list(reversed(DOCS))))  # another order: same KV
    assert again.info["encoded"] == 0 and again.info["reused"] == len(DOCS)
    assert isinstance(ape.store, MemoryContextStore) and ape.store.hits >= len(DOCS)


def test_generation_with_parallel_contexts_finds_the_fact(smollm2):
    from apportion.host import Host

    out = Host(smollm2, APE()).generate(prompt(DOCS), max_new_tokens=24)[0]
    assert "4417309" in out.text.replace(",", "")


def test_bad_input_is_named():
    with pytest.raises(APEError, match="empty context"):
        APE().encode_contexts(None, [1, 2], [[3], []])
    with pytest.raises(APEError, match="prefix"):
        APE().encode_contexts(None, [], [[3]])
