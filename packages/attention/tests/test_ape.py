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
        return backend.prefill(
            smollm2.model,
            ids,
            torch.ones_like(ids),
            cache,
            question_len=enc.question_len,
            inner=KVPolicy().prefill,
        )


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


# ------------------------------------------------------------------ positions, exactness, defaults


def parts(smollm2, ape, docs):
    from apportion.host import Host

    enc = Host(smollm2, ape).encode(prompt(docs))
    patterns = ape.separator_patterns(smollm2.model)
    segments = ape.split(enc.ids, patterns, enc.question_len)
    return segments[0], [ape.canonical(c, patterns) for c in segments[1:-1]], segments[-1]


def test_query_positions_continue_after_the_longest_context(smollm2):
    ape = APE()
    prefix, contexts, query = parts(smollm2, ape, DOCS)
    from apportion.host.kv import KVPolicy, cache_seq_lengths

    cache = KVPolicy().make_cache(smollm2.model)
    with torch.inference_mode(), ape.installed(smollm2.model):
        out = ape.prefill_parts(smollm2.model, prefix, contexts, query, cache)
    lengths = [len(c) for c in contexts]
    assert len(set(lengths)) > 1  # the longest context is not just any context
    # the query starts at P + max(len): every context sits at P .. P + len - 1
    assert int(out.next_position) == len(prefix) + max(lengths) + len(query)
    # the cache holds every context in full, one after the other
    assert cache_seq_lengths(cache) == [len(prefix) + sum(lengths) + len(query)] * len(cache.layers)


def test_batched_context_encoding_matches_one_context_at_a_time(smollm2):
    """Contexts of different lengths share a right-padded batch: padding must not leak."""
    ape = APE(APEConfig(cache_entries=0))
    prefix, contexts, _ = parts(smollm2, ape, DOCS)
    with torch.inference_mode(), ape.installed(smollm2.model):
        past = ape._forward_kv(smollm2.model, [prefix], None, 0)[0]
        batched = ape._forward_kv(smollm2.model, contexts, past, len(prefix))
        single = [ape._forward_kv(smollm2.model, [c], past, len(prefix))[0] for c in contexts]
    for b, s, c in zip(batched, single, contexts, strict=True):
        assert b[0][0].shape[-2] == len(c)
        diff = max(
            max((bk - sk).abs().max().item(), (bv - sv).abs().max().item())
            for (bk, bv), (sk, sv) in zip(b, s, strict=True)
        )
        assert diff < 1e-3


def test_parallel_at_unit_temperature_and_scale_is_exact_attention(smollm2):
    """At T = S = 1 the split-and-merge attention over [prefix | contexts | query] is plain
    causal attention over that cache (contexts at their reused positions): same logits as
    SDPA reading the same cache, with several contexts and grouped-query heads."""
    from apportion.host.kv import KVPolicy, cache_kwargs

    ape = APE(APEConfig(temperature=1.0, scale=1.0))
    prefix, contexts, query = parts(smollm2, ape, DOCS)
    model = smollm2.model
    with torch.inference_mode(), ape.installed(model):
        pre, kvs, _ = ape.encode_contexts(model, prefix, contexts)
        logits = []
        for use_ape in (True, False):
            cache = KVPolicy().make_cache(model)
            st = ape.assemble(model, cache, pre, kvs)
            if not use_ape:
                ape.state = None  # dense SDPA, causal over the cache as laid out
            positions = st.next_position + torch.arange(len(query))
            out = model(
                input_ids=torch.tensor([query]),
                position_ids=positions[None],
                use_cache=True,
                **cache_kwargs(model, cache),
            )
            logits.append(out.logits[0])
    assert (logits[0] - logits[1]).abs().max().item() < 1e-3


def test_state_is_forgotten_when_uninstalled(smollm2):
    ape = APE()
    prefill(smollm2, ape, prompt(DOCS))
    assert ape.state is None


FILLER = [
    "The orchard behind the mill grows pears and a few old apple trees.",
    "Tide tables for the northern harbor are printed every spring.",
    "A lantern festival is held in the square on the first frost.",
    "The library keeps its maps in long drawers under the windows.",
    "Ferries to the island stop running when the wind turns east.",
    "The bakery on the corner sells rye bread until noon.",
    "Old railway tracks run along the river towards the quarry.",
    "The choir rehearses in the chapel on Thursday evenings.",
]
KEYS8 = [
    "amber-canyon",
    "silent-meadow",
    "hollow-river",
    "quiet-summit",
    "misty-bridge",
    "golden-marsh",
    "pale-comet",
    "frozen-lantern",
]
VALUES8 = ["4417309", "8991540", "2019454", "2084812", "7909627", "4108701", "2907993", "5470368"]


def eight_docs():
    docs = []
    for i in range(8):
        body = [FILLER[(i + j) % 8] for j in range(4)]
        body.insert(i % 5, f"The special magic number for {KEYS8[i]} is: {VALUES8[i]}.")
        docs.append(" ".join(body))
    return docs


def value_logprob(smollm2, ape, ask):
    """Log-probability of the right number after "The special magic number for KEY is"."""
    from apportion.host import Host
    from apportion.host.kv import KVPolicy, cache_kwargs

    text = "\n\n".join(
        [
            INSTRUCTION,
            *eight_docs(),
            f"What is the special magic number for {KEYS8[ask]}? Answer with the number only.",
        ]
    )
    enc = Host(smollm2, ape).encode(text)
    ids = torch.tensor([enc.ids])
    tok = smollm2.tokenizer
    lead = tok.encode(f"The special magic number for {KEYS8[ask]} is", add_special_tokens=False)
    value = tok.encode(f" {VALUES8[ask]}", add_special_tokens=False)
    cache = KVPolicy().make_cache(smollm2.model)
    with torch.inference_mode(), ape.installed(smollm2.model):
        out = ape.prefill(
            smollm2.model,
            ids,
            torch.ones_like(ids),
            cache,
            question_len=enc.question_len,
            inner=KVPolicy().prefill,
        )
        assert out.info["contexts"] == 8
        feed = lead + value[:-1]
        nxt = smollm2.model(
            input_ids=torch.tensor([feed]),
            position_ids=(out.next_position + torch.arange(len(feed)))[None],
            use_cache=True,
            **cache_kwargs(smollm2.model, cache),
        )
    lp = torch.log_softmax(nxt.logits[0, len(lead) - 1 :].float(), -1)
    return lp[torch.arange(len(value)), torch.tensor(value)].sum().item()


def test_default_temperature_and_scale_beat_plain_parallel_at_eight_contexts(smollm2):
    """Plain parallel encoding (T = S = 1) of 8 contexts loses the fact (on the benchmark it
    often answers nothing: <|im_end|> first); APE's defaults must recover probability mass
    on the right number."""
    plain = APE(APEConfig(temperature=1.0, scale=1.0))
    ape = APE()
    asks = [0, 3, 5]
    lp_plain = sum(value_logprob(smollm2, plain, a) for a in asks)
    lp_ape = sum(value_logprob(smollm2, ape, a) for a in asks)
    assert lp_ape > lp_plain + 1.0, (lp_ape, lp_plain)


def test_separator_patterns_do_not_reload_the_tokenizer_per_backend(smollm2, monkeypatch):
    """A new backend's first (cold) prefill must not pay for loading the tokenizer again."""
    import transformers

    first = APE().separator_patterns(smollm2.model)
    monkeypatch.setattr(
        transformers.AutoTokenizer,
        "from_pretrained",
        lambda *a, **k: pytest.fail("tokenizer loaded again"),
    )
    second = APE()
    second.bind(smollm2)  # as the host does: the loaded model's tokenizer is handed over
    assert second.separator_patterns(smollm2.model) == first
