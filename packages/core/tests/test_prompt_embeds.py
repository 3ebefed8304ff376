"""``Prompt.embeds``: a prompt strategy hands the host input embeddings for part of the
prompt, which the host splices in place of a placeholder for the prefill (learned context
compression). Splicing the model's own token embeddings must give exactly the text's answer,
with the ``full`` policy, a layer-wise policy, the shared prefill, a batch and the
query-agnostic mode; a policy that reads the prompt in pieces and malformed entries are
refused with ``PromptEmbedsError``."""

import pytest
import torch
from apportion.base import Prompt
from apportion.errors import PromptEmbedsError
from apportion.host import Host
from apportion.host.kv import CompressionConfig, KVPolicy, PrefillOutput, positions_from_mask
from apportion.host.shared import generate_shared, layerwise_prefill
from apportion.testing.contracts import FACT, QUESTION

PH = "<<ctx>>"
CONTEXT = f"The lighthouse keeper writes in a log every night. {FACT} The log is kept dry."


class KeepRecent(KVPolicy):
    """A layer-wise eviction policy small enough for a test: keeps each layer's most recent
    half of the context (and the question)."""

    name = "test-keep-recent"
    summary = "most recent entries"
    Config = CompressionConfig
    layerwise = True

    def plan(self, attention_mask, question_len):
        length = attention_mask.shape[1]
        return question_len + (length - question_len) // 2

    def evict_layer(self, inputs):
        n = inputs.n_keep
        return inputs.keys[..., -n:, :].clone(), inputs.values[..., -n:, :].clone()

    def prefill(self, model, input_ids, attention_mask, cache, *, question_len=0):
        out = layerwise_prefill(model, input_ids, attention_mask, [self], question_len, [cache])
        return out[0].prefill


def _text_prompt(context=CONTEXT, question=QUESTION):
    return Prompt([{"role": "user", "content": f"{context}\n\n{question}"}], question=question)


def _embedded(loaded, context=CONTEXT, question=QUESTION):
    """The text prompt with ``context`` handed over as the model's own token embeddings."""
    ids = loaded.tokenizer.encode(context, add_special_tokens=False)
    with torch.no_grad():
        vectors = loaded.model.get_input_embeddings().weight[ids].clone()
    return Prompt(
        [{"role": "user", "content": f"{PH}\n\n{question}"}],
        question=question,
        embeds={PH: vectors},
    )


def test_import_apportion_stays_torch_free_with_the_field():
    import subprocess
    import sys

    code = "import apportion.base, sys; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_own_token_embeddings_give_exactly_the_text_answer(smollm2):
    host = Host(smollm2)
    text, spliced = host.encode(_text_prompt()), host.encode(_embedded(smollm2))
    # the placeholder is a token boundary that the chat template's text already has
    assert spliced.ids[: spliced.embeds[0][0]] == text.ids[: spliced.embeds[0][0]]
    assert len(spliced.ids) == len(text.ids) and spliced.question_len == text.question_len
    a = host.generate(_text_prompt(), max_new_tokens=12)[0]
    b = host.generate(_embedded(smollm2), max_new_tokens=12)[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    assert b.prompt_tokens == a.prompt_tokens  # the slots count as prompt tokens


def test_the_splice_changes_what_the_model_reads(smollm2):
    """Other vectors under the placeholder give another prefill (the hook is really used)."""
    host = Host(smollm2)
    p = _embedded(smollm2)
    q = _embedded(smollm2)
    q.embeds[PH] = torch.zeros_like(q.embeds[PH])
    enc = host.encode(p)
    from apportion.host.generate import splice_embeds

    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        logits = []
        for prompt in (p, q):
            e = host.encode(prompt)
            with splice_embeds(smollm2.model, ids, [(0, *e.embeds[0])]):
                logits.append(smollm2.model(input_ids=ids).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


def test_batch_of_spliced_and_text_prompts(smollm2):
    host = Host(smollm2)
    short = "A short note."
    batch = [_embedded(smollm2), _text_prompt(short), _embedded(smollm2, short)]
    alone = [host.generate(p, max_new_tokens=8)[0].token_ids for p in batch]
    together = [r.token_ids for r in host.generate(batch, max_new_tokens=8)]
    text = [r.token_ids for r in host.generate([_text_prompt(), _text_prompt(short)] * 1, 8)]
    assert together[0] == text[0] and together[1] == text[1]
    assert alone[0] == together[0]


def test_query_agnostic_mode_and_a_layerwise_policy(smollm2):
    """The context (with its spliced part) is prefilled and compressed without the question,
    which is fed afterwards; a layer-wise eviction policy reads the spliced hidden states."""
    for kw in ({"question_in_prefill": False}, {"kv_policy": KeepRecent()}):
        host = Host(smollm2, **kw)
        a = host.generate(_text_prompt(), max_new_tokens=8)[0]
        b = host.generate(_embedded(smollm2), max_new_tokens=8)[0]
        assert a.token_ids == b.token_ids, kw
        assert a.kv_tokens == b.kv_tokens


def test_shared_prefill(smollm2):
    host = Host(smollm2)
    policies = [KVPolicy(), KeepRecent()]
    text = generate_shared(host, policies, _text_prompt(), 8)
    spliced = generate_shared(host, policies, _embedded(smollm2), 8)
    assert [r.token_ids for r in text] == [r.token_ids for r in spliced]


class Chunked(KVPolicy):
    """Prefills the prompt in two pieces (as a chunked-prefill policy does)."""

    name = "test-chunked"
    summary = "two-piece prefill"

    def prefill(self, model, input_ids, attention_mask, cache, *, question_len=0):
        from apportion.host.kv import cache_kwargs

        half = input_ids.shape[1] // 2
        pos = positions_from_mask(attention_mask)
        for lo, hi in ((0, half), (half, input_ids.shape[1])):
            out = model(
                input_ids=input_ids[:, lo:hi],
                attention_mask=attention_mask[:, :hi],
                position_ids=pos[:, lo:hi],
                use_cache=True,
                **cache_kwargs(model, cache),
            )
        return PrefillOutput(out.logits[:, -1], None, pos[:, -1] + 1)


def test_a_policy_that_reads_the_prompt_in_pieces_is_refused(smollm2):
    host = Host(smollm2, kv_policy=Chunked())
    host.generate(_text_prompt(), max_new_tokens=2)  # it works on text
    with pytest.raises(PromptEmbedsError, match="in pieces"):
        host.generate(_embedded(smollm2), max_new_tokens=2)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda p: p.embeds.update({"<<absent>>": p.embeds[PH]}), "is not in"),
        (lambda p: p.messages[-1].update(content=f"{PH} {PH}\n\n{QUESTION}"), "more than once"),
        (lambda p: p.embeds.update({PH: p.embeds[PH][:, :10]}), r"shape \(n >= 1, 576\)"),
        (lambda p: p.embeds.update({PH: p.embeds[PH][:0]}), "shape"),
        (lambda p: p.embeds.update({PH: p.embeds[PH].long()}), "float tensor"),
        (lambda p: p.embeds.update({PH: p.embeds[PH].tolist()}), "float tensor"),
        (lambda p: p.embeds.update({PH: p.embeds[PH] * float("nan")}), "not all finite"),
        (lambda p: setattr(p, "question", f"{PH}\n\n{QUESTION}"), "inside the question"),
    ],
)
def test_malformed_embeds_are_refused(smollm2, edit, match):
    p = _embedded(smollm2)
    edit(p)
    with pytest.raises(PromptEmbedsError, match=match):
        Host(smollm2).generate(p, max_new_tokens=2)
