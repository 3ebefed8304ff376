"""``arc-compress``: learned context compression through ``Prompt.embeds``.

Shapes and token accounting (k times fewer slots for the context), the encoder's states,
the artifact (round trip; corrupt, forged, other-version, mismatched files are an
``ArtifactError``, a missing one a ``CompressorMissingError``; nothing is unpickled), a tiny
training run that lowers the loss with the decoder frozen, the CLI, and the core's
prompt-strategy contract with an untrained projector."""

import json
import math
import pickle
import random
import struct
from pathlib import Path

import pytest
import torch
from apportion.base import PromptStrategy
from apportion.host import Host
from apportion.testing.contracts import PromptStrategyContract
from apportion_icl.compressor import texts
from apportion_icl.compressor.artifact import (
    FORMAT,
    KIND,
    Artifact,
    CompressorMissingError,
    checksum,
)
from apportion_icl.compressor.model import encoder_states, mean_pool
from apportion_icl.compressor.strategy import PLACEHOLDER, ArcCompress, ArcCompressConfig
from apportion_icl.compressor.train import Example, frozen, new_projector, train
from apportion_icl.errors import ArtifactError
from safetensors.torch import load_file, save_file

QUESTION = "What is the access code for the red locker?"
CONTEXT = (
    "The old ferry moved slowly past the harbour wall as the lamps came on. "
    "The access code for the red locker is 4417302. "
    "A thin fog settled for the night beside the stone bridge without a sound."
)


class TestArcCompressContract(PromptStrategyContract):
    component = "arc-compress"
    options = {"random_init": True}


def _strategy(smollm2, **options):
    return ArcCompress(ArcCompressConfig(random_init=True, **options)).bind(smollm2)


# ----------------------------------------------------------------------------- the encoder
def test_mean_pool_groups_of_k_with_a_short_last_group():
    x = torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 3)
    pooled = mean_pool(x, 4)
    assert pooled.shape == (3, 3)
    assert pooled[:, 0].tolist() == [1.5, 5.5, 8.5]  # the last group holds rows 8 and 9
    assert mean_pool(x, 1).equal(x) and mean_pool(x, 10).shape == (1, 3)


def test_encoder_states_are_the_models_hidden_states_after_a_sink(smollm2):
    ids = smollm2.tokenizer.encode(CONTEXT, add_special_tokens=False)
    zero = encoder_states(smollm2.model, smollm2.tokenizer, ids, 0)
    assert torch.equal(zero, smollm2.model.get_input_embeddings().weight[ids])
    from apportion_icl.compressor.model import sink_token

    with torch.no_grad():
        full = smollm2.model(
            input_ids=torch.tensor([[sink_token(smollm2.tokenizer), *ids]]),
            output_hidden_states=True,
        ).hidden_states
    two = encoder_states(smollm2.model, smollm2.tokenizer, ids, 2)
    assert two.shape == (len(ids), 576)
    assert torch.allclose(two, full[2][0, 1:], atol=1e-5)
    with pytest.raises(ValueError, match="layers"):
        encoder_states(smollm2.model, smollm2.tokenizer, ids, 99)


# ---------------------------------------------------------------- shapes and token accounting
@pytest.mark.parametrize("k", [4, 8])
def test_the_context_takes_k_times_fewer_tokens(smollm2, k):
    tok = smollm2.tokenizer
    context = texts.needle_haystack(random.Random(k), tok, 300).text
    n = len(tok.encode(context, add_special_tokens=False))
    host = Host(smollm2)
    p = _strategy(smollm2, k=k).build(QUESTION, context=context, tokenizer=tok)
    a = p.accounting
    assert set(p.embeds) == {PLACEHOLDER} and p.embeds[PLACEHOLDER].shape == (math.ceil(n / k), 576)
    assert a["context_tokens"] == n and a["compressed_tokens"] == math.ceil(n / k)
    assert a["k"] == k and a["trained"] is False and a["encoder_layers"] == 0
    enc = host.encode(p)
    assert a["prompt_tokens"] == len(enc.ids)  # the strategy counts as the host does
    plain = host.encode(PromptStrategy().build(QUESTION, context=context))
    saved = len(plain.ids) - len(enc.ids)
    assert abs(saved - (n - math.ceil(n / k))) <= 1  # the blank line may tokenize apart
    result = host.generate(p, max_new_tokens=4)[0]
    assert result.prompt_tokens == len(enc.ids)
    assert result.kv_tokens == len(enc.ids)  # the cache holds the slots, not the context


def test_no_context_and_budgets(smollm2):
    from apportion.errors import PromptTooLongError
    from apportion_icl.errors import BudgetError

    s, tok = _strategy(smollm2), smollm2.tokenizer
    p = s.build(QUESTION, tokenizer=tok)
    assert not p.embeds and p.accounting["compressed"] is False
    with pytest.raises(BudgetError, match="budget"):
        s.build(QUESTION, context=CONTEXT, tokenizer=tok, budget=5)
    need = s.build(QUESTION, context=CONTEXT, tokenizer=tok).accounting["prompt_tokens"]
    with pytest.raises(PromptTooLongError, match="compressed"):
        s.build(QUESTION, context=CONTEXT, tokenizer=tok, budget=need - 1)
    assert s.build(QUESTION, context=CONTEXT, tokenizer=tok, budget=need).embeds


# ------------------------------------------------------------------------------ artifacts
def _artifact(smollm2, **meta):
    projector = new_projector(smollm2, hidden=16, seed=1)
    with torch.no_grad():
        projector.fc2.weight.normal_()  # not all zeros, so that a flipped byte shows
    base = {
        "k_values": [4, 8],
        "encoder_layers": 0,
        "dim": 576,
        "hidden": 16,
        "model": smollm2.name,
        "model_fingerprint": smollm2.fingerprint,
    }
    return Artifact(dict(projector.state_dict()), {**base, **meta})


def test_round_trip(smollm2, tmp_path):
    art = _artifact(smollm2)
    path = art.save(tmp_path / "c.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary left
    back = Artifact.load(path)
    assert back.meta["kind"] == KIND and back.meta["format"] == FORMAT
    assert back.meta["k_values"] == [4, 8]
    for name, t in art.tensors.items():
        assert torch.equal(back.tensors[name], t)
    s = ArcCompress(ArcCompressConfig(artifact=str(path), k=8)).bind(smollm2)
    p = s.build(QUESTION, context=CONTEXT, tokenizer=smollm2.tokenizer)
    assert p.accounting["trained"] is True and p.accounting["artifact"] == str(path)
    expected = s.compressor().projector(
        mean_pool(encoder_states(smollm2.model, smollm2.tokenizer, _ids(smollm2), 0), 8)
    )
    assert torch.allclose(p.embeds[PLACEHOLDER], expected)


def _ids(smollm2):
    return smollm2.tokenizer.encode(CONTEXT, add_special_tokens=False)


def _forge(path: Path, edit=None, tensors=None, sha=None) -> None:
    """Rewrite ``path`` with its metadata edited and/or other tensors, the checksum
    recomputed (``sha`` given: that one instead), so that what is refused is refused for its
    content."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["apportion"])
    tensors = tensors if tensors is not None else load_file(str(path))
    if edit is not None:
        edit(meta)
    digest = sha if sha is not None else checksum(meta, tensors)
    save_file(tensors, str(path), metadata={"apportion": json.dumps(meta), "sha256": digest})


def _flip(path: Path, at: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0x01
    path.write_bytes(bytes(blob))


def _edit_meta_keep_sha(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        stored = f.metadata()
    meta = json.loads(stored["apportion"])
    meta["hidden"] = 16
    meta["encoder_layers"] = 3
    save_file(
        load_file(str(path)),
        str(path),
        metadata={"apportion": json.dumps(meta), "sha256": stored["sha256"]},
    )


def _tensors(**changes):
    def make(path: Path):
        t = load_file(str(path))
        t.update(changes)
        return {k: v for k, v in t.items() if v is not None}

    return make


CASES = {
    "empty file": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "flipped byte in the weights": lambda p: _flip(p, -5),
    "metadata edited, checksum kept": _edit_meta_keep_sha,
    "huge header length": lambda p: p.write_bytes(struct.pack("<Q", 1 << 62) + b"{}"),
    "not JSON in the header": lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{"),
    "a pickle": lambda p: p.write_bytes(pickle.dumps({"fc1.weight": [1.0]})),
    "no apportion metadata": lambda p: save_file(load_file(str(p)), str(p)),
    "another format": lambda p: _forge(p, lambda m: m.update(format=FORMAT + 1)),
    "another kind": lambda p: _forge(p, lambda m: m.update(kind="dynaicl-controller")),
    "missing tensor": lambda p: _forge(p, tensors=_tensors(gain=None)(p)),
    "extra tensor": lambda p: _forge(p, tensors=_tensors(extra=torch.zeros(2))(p)),
    "wrong shape": lambda p: _forge(p, tensors=_tensors(gain=torch.zeros(575))(p)),
    "wrong dtype": lambda p: _forge(
        p, tensors=_tensors(gain=torch.zeros(576, dtype=torch.float64))(p)
    ),
    "NaN weight": lambda p: _forge(p, tensors=_tensors(gain=torch.full((576,), math.nan))(p)),
    "hidden disagrees with the tensors": lambda p: _forge(p, lambda m: m.update(hidden=17)),
    "k out of range": lambda p: _forge(p, lambda m: m.update(k_values=[0, 4])),
    "negative encoder layers": lambda p: _forge(p, lambda m: m.update(encoder_layers=-1)),
    "wrong checksum": lambda p: _forge(p, sha="0" * 64),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_or_forged_artifact_is_refused(smollm2, tmp_path, case):
    path = _artifact(smollm2).save(tmp_path / "c.safetensors")
    CASES[case](path)
    with pytest.raises(ArtifactError, match=str(path)):
        Artifact.load(path)


def test_a_missing_artifact_says_how_to_train_one(smollm2, tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CompressorMissingError, match="apportion icl compressor-train"):
        Artifact.load(path)
    s = ArcCompress(ArcCompressConfig(artifact=str(path))).bind(smollm2)
    with pytest.raises(CompressorMissingError):
        s.build(QUESTION, context=CONTEXT, tokenizer=smollm2.tokenizer)


@pytest.mark.parametrize(
    ("meta", "options", "match"),
    [
        ({"k_values": [4]}, {"k": 8}, "not k = 8"),
        ({"model_fingerprint": "0123456789abcdef"}, {}, "trained for the model"),
        ({}, {"encoder_layers": 2}, "encoder_layers = 0"),
    ],
)
def test_an_artifact_for_other_options_or_another_model_is_refused(
    smollm2, tmp_path, meta, options, match
):
    path = _artifact(smollm2, **meta).save(tmp_path / "c.safetensors")
    s = ArcCompress(ArcCompressConfig(artifact=str(path), **options)).bind(smollm2)
    with pytest.raises(ArtifactError, match=match):
        s.build(QUESTION, context=CONTEXT, tokenizer=smollm2.tokenizer)


def test_saving_refuses_what_could_not_be_loaded(smollm2, tmp_path):
    art = _artifact(smollm2)
    art.tensors["gain"] = torch.full((576,), math.inf)
    with pytest.raises(ValueError, match="not finite"):
        art.save(tmp_path / "c.safetensors")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ training
def test_a_tiny_training_run_lowers_the_loss_and_leaves_the_decoder_alone(smollm2, tmp_path):
    before = {n: p.detach().clone() for n, p in list(smollm2.model.named_parameters())[:3]}
    flags = [p.requires_grad for p in smollm2.model.parameters()]
    examples = [
        Example("The meeting point is the bakery.", "Repeat the text above word for word.",
                "", "reconstruct"),
        Example("The access code is 4417.", "What is the access code?",
                "The access code is 4417.", "qa"),
    ]  # fmt: skip
    result = train(
        tmp_path / "tiny.safetensors",
        loaded=smollm2,
        examples=examples,
        k_values=(4,),
        steps=8,
        lr=1e-2,
        hidden=32,
        max_context_tokens=16,
        checkpoint_every=4,
    )
    first, last = result.history[0]["eval"], result.history[-1]["eval"]
    assert last["all"] < first["all"], (first, last)
    assert result.artifact.meta["steps"] == 8
    for n, p in list(smollm2.model.named_parameters())[:3]:
        assert torch.equal(p, before[n])
    assert [p.requires_grad for p in smollm2.model.parameters()] == flags
    back = Artifact.load(result.path)
    assert back.meta["eval_after"] == last and back.meta["hidden"] == 32
    s = ArcCompress(ArcCompressConfig(artifact=str(result.path))).bind(smollm2)
    assert s.build(QUESTION, context=CONTEXT, tokenizer=smollm2.tokenizer).accounting["trained"]


def test_frozen_restores_flags():
    layer = torch.nn.Linear(2, 2)
    layer.bias.requires_grad_(False)
    with frozen(layer):
        assert not any(p.requires_grad for p in layer.parameters())
    assert layer.weight.requires_grad and not layer.bias.requires_grad


def test_generated_passages_answer_their_questions():
    rng = random.Random(0)
    for _ in range(50):
        p = texts.passage(rng)
        for qa in p.qa:
            assert qa.answer in p.text and qa.answer in qa.sentence


def test_training_text_names_nothing_the_shipped_qa_set_asks_about():
    """The QA set stays held out: no person, city, company word or product of the
    generator occurs in its documents or questions."""
    from apportion_icl import data

    qa_text = " ".join(d["text"] for d in data.documents().values())
    qa_text += " ".join(q.query + " " + q.answer for q in data.qa())
    words = set(qa_text.replace(".", " ").replace("?", " ").split())
    for name in [*texts.FIRST, *texts.LAST, *texts.CITIES, *texts.CO_A]:
        assert not set(name.split()) & words, name
    for product in texts.PRODUCTS:
        assert product not in qa_text, product


def test_cli_trains_an_artifact(tmp_path, cli_runner):
    out = tmp_path / "cli.safetensors"
    result = cli_runner(
        ["compressor-train", "--out", str(out), "--steps", "2", "--eval", "1", "--k", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "compressor written to" in result.output
    assert Artifact.load(out).meta["k_values"] == [4]


@pytest.fixture
def cli_runner():
    from apportion_icl.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    return lambda args: runner.invoke(app, args)


def test_the_run_loop_measures_a_compressed_prompt(smollm2, registry):
    """``apportion run``'s sample path: the runner builds the prompt with the run's
    tokenizer, the host splices the embeddings, the record counts the slots."""
    from apportion.runner import run_sample

    bench = registry.create("benchmark", "niah", {"lengths": [512], "samples": 1})
    sample = next(iter(bench.samples(smollm2.tokenizer)))
    strategy = registry.create("prompt-strategy", "arc-compress", {"k": 8})
    strategy.bind(smollm2)
    rec = run_sample(Host(smollm2), strategy, bench, sample, 8)
    acc = rec["prompt_accounting"]
    assert acc["trained"] is True and acc["compressed_tokens"] == math.ceil(
        acc["context_tokens"] / 8
    )
    assert rec["prompt_tokens"] == acc["prompt_tokens"] < acc["context_tokens"] / 4
    assert rec["kv_tokens"] == rec["prompt_tokens"] and 0.0 <= rec["score"] <= 1.0
