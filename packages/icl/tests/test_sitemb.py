"""Situated retrieval (SitEmb): window construction, the unchanged default path, the option in
prune/drag/iterdrag (contracts included), the fine-tuned embedder's artifact against tampered
files, and a tiny training run."""

import hashlib
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from apportion.testing.contracts import PromptStrategyContract
from apportion_icl import data, stories
from apportion_icl.drag import DRAG, DRAGConfig, IterDRAGConfig
from apportion_icl.errors import ArtifactError
from apportion_icl.prune import Prune, PruneConfig
from apportion_icl.situated import Situated, windows
from pydantic import ValidationError
from safetensors.torch import save as st_save

GOLDEN = Path(__file__).parent / "data" / "default_path_golden.json"

# ---------------------------------------------------------------- windows


def test_window_zero_is_the_chunks_alone():
    assert windows(["a.", "b.", "c."], 0) == ["a.", "b.", "c."]


def test_windows_take_neighbours_in_reading_order():
    chunks = ["A.", "B.", "C.", "D.", "E."]
    assert windows(chunks, 1) == ["A. B.", "A. B. C.", "B. C. D.", "C. D. E.", "D. E."]
    assert windows(chunks, 2)[2] == "A. B. C. D. E."
    assert windows(chunks, 9)[0] == "A. B. C. D. E."


def test_windows_stay_within_their_group():
    chunks = ["A.", "B.", "C.", "D."]
    assert windows(chunks, 2, groups=[0, 0, 1, 1]) == ["A. B.", "A. B.", "C. D.", "C. D."]


def test_windows_drop_the_farthest_neighbours_first_to_fit():
    chunks = ["A.", "B.", "C.", "D.", "E."]
    lengths = [10, 10, 10, 10, 10]
    # room for the chunk and two neighbours: the nearest on each side
    assert windows(chunks, 2, lengths=lengths, max_tokens=30)[2] == "B. C. D."
    # room for one: the one before
    assert windows(chunks, 2, lengths=lengths, max_tokens=25)[2] == "B. C."
    # a chunk longer than the limit is still read (alone)
    assert windows(chunks, 2, lengths=[10, 10, 99, 10, 10], max_tokens=30)[2] == "C."


def test_windows_reject_bad_input():
    with pytest.raises(ValueError, match="window"):
        windows(["a"], -1)
    with pytest.raises(ValueError, match="groups"):
        windows(["a", "b"], 1, groups=[0])
    with pytest.raises(ValueError, match="lengths"):
        windows(["a", "b"], 1, lengths=[1])


# ---------------------------------------------------------------- default path


def test_default_scores_are_the_chunk_only_cosines():
    from apportion.host.embed import SentenceEmbedder

    chunks = ["He lives in Dunmore Bay now.", "Ravi Moreau grew up on a farm.", "It is cold."]
    vecs = SentenceEmbedder.shared().encode(["Where does Ravi live?"] + chunks)
    before = [float(x) for x in vecs[1:] @ vecs[0]]  # the pre-SitEmb computation
    assert Situated().scores("Where does Ravi live?", chunks) == before
    assert not PruneConfig().situated().active and not DRAGConfig().situated().active


def _golden_strategy(name):
    return {
        "prune": lambda: Prune(),
        "prune-both-none": lambda: Prune(PruneConfig(neighbors=0, hops=1)),
        "drag-bm25": lambda: DRAG(DRAGConfig(k=2, m=1)),
        "drag-embedding": lambda: DRAG(DRAGConfig(k=2, m=1, retriever="embedding")),
    }[name]()


def test_default_path_is_byte_identical_to_before(tok):
    """Prompts and selections recorded with the code before the situated option existed
    (tests/data/default_path_golden.json) come out byte for byte the same."""
    golden = json.loads(GOLDEN.read_text())
    pool = [e.as_demo() for e in data.qa("pool")]
    by_id = {e.id: e for e in data.qa("test")}
    assert len(golden) == 32
    for row in golden:
        ex = by_id[row["id"]]
        p = _golden_strategy(row["strategy"]).build(
            ex.query, context=data.qa_context(ex, n_distractors=6), demos=pool, tokenizer=tok
        )
        assert p.messages == row["messages"], row["strategy"]
        acc = p.accounting
        for key in ("documents_kept", "demo_ids", "prompt_tokens", "hops", "sentences_kept"):
            if key in row:
                assert acc[key] == row[key], (row["strategy"], key)
        if "kept" in row:
            assert [s["index"] for s in acc["kept_sentences"] if s["kept"]] == row["kept"]
        assert "situated" not in acc and "chunk" not in acc


# ---------------------------------------------------------------- the option on


@pytest.fixture(scope="module")
def story():
    return stories.eval_examples("story", n_distractors=10)


def _recall(examples, scorer, k):
    from apportion_icl.sitemb import recall_at

    r = recall_at(examples, scorer, k=k)
    return sum(r.values()) / len(r)


def test_windows_find_pronoun_facts_that_chunks_alone_miss(story):
    """'He lives in Dunmore Bay now.' is about whoever its paragraph named: alone, every
    person's such sentence looks alike; in its window it is retrievable."""
    alone = _recall(story[:8], Situated(), k=2)
    situated = _recall(story[:8], Situated(window=2), k=2)
    assert situated >= alone + 0.4, (alone, situated)


def test_shipped_haystacks_stay_solved_with_windows():
    exs = stories.eval_examples("shipped", n_distractors=10)[:6]
    assert _recall(exs, Situated(window=2), k=1) == 1.0


def test_prune_with_a_window_keeps_the_sentence_and_records_it(story, tok):
    ex = story[0]
    hop2 = ex.hops[1]
    text, acc = Prune(PruneConfig(embed_window=2, hops=1, neighbors=0, min_keep=1)).prune(
        hop2, ex.context, tok
    )
    assert acc["situated"] and acc["embed_window"] == 2 and acc["sitemb_mix"] == 0.5
    best = max(acc["kept_sentences"], key=lambda s: s["score"])
    assert best["paragraph"] == ex.groups[ex.gold[1]]  # the asked-about person's paragraph
    kept = [s["index"] for s in acc["kept_sentences"] if s["kept"]]
    assert ex.gold[1] in kept
    # what is kept is each sentence once, not its window
    assert sum(len(ex.chunks[i]) + 1 for i in kept) >= len(text) - len(kept)
    assert all(text.count(ex.chunks[i]) == 1 for i in kept)


@pytest.mark.filterwarnings("ignore::apportion_icl.errors.EmptyPoolWarning")
def test_drag_sentence_chunks_with_window_retrieve_gold(story, tok):
    hits = alone = 0
    for ex in story[:6]:
        for q, g in zip(ex.hops, ex.gold, strict=True):
            cfg = {"k": 2, "m": 0, "retriever": "embedding", "chunk": "sentence"}
            p = DRAG(DRAGConfig(**cfg, embed_window=2)).build(q, context=ex.context, tokenizer=tok)
            hits += g in p.accounting["documents_kept"]
            assert p.accounting["chunk"] == "sentence" and p.accounting["situated"]
            assert (
                "[1] " + ex.chunks[p.accounting["documents_kept"][0]] in p.messages[-1]["content"]
            )
            base = DRAG(DRAGConfig(**cfg)).build(q, context=ex.context, tokenizer=tok)
            alone += g in base.accounting["documents_kept"]
            assert "situated" not in base.accounting
    assert hits >= alone + 4, (alone, hits)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DRAGConfig(embed_window=1), "retriever = 'embedding'"),
        (lambda: IterDRAGConfig(sitemb_weights="x.json"), "retriever = 'embedding'"),
        (lambda: PruneConfig(scorer="attention", embed_window=1), "scorer"),
        (lambda: PruneConfig(sitemb_mix=0.3), "embed_window"),
        (lambda: PruneConfig(embed_window=99), "less than or equal"),
    ],
)
def test_situated_options_are_validated(make, match):
    with pytest.raises(ValidationError, match=match):
        make()


class TestPruneSituated(PromptStrategyContract):
    component = "prune"
    options = {"embed_window": 2}


class TestDRAGSituated(PromptStrategyContract):
    component = "drag"
    options = {"retriever": "embedding", "chunk": "sentence", "embed_window": 1}


class TestIterDRAGSituated(PromptStrategyContract):
    component = "iterdrag"
    options = {"n": 2, "retriever": "embedding", "embed_window": 1}


# ---------------------------------------------------------------- the artifact

LN = "encoder.layer.5.output.LayerNorm.weight"
DENSE = "encoder.layer.5.output.dense.weight"


def _embedder(scale=1.0):
    from apportion.host.embed import SentenceEmbedder
    from apportion_icl.sitemb import SitEmb

    state = SentenceEmbedder.shared().model.state_dict()
    return SitEmb({LN: state[LN] * scale, DENSE: state[DENSE].clone()}, 2, 0.5, {"train_loss": 0.5})


@pytest.fixture
def artifact(tmp_path):
    return _embedder(scale=1.5).save(tmp_path / "sit.json")


def _meta_digest(meta):
    rest = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(
        json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _forge(meta_path: Path, edit=None, tensors=None, raw=None):
    """Rewrite with ``edit`` on the metadata and/or new weights, every checksum redone."""
    meta = json.loads(meta_path.read_text())
    if tensors is not None:
        raw = st_save(tensors)
    if raw is not None:
        meta_path.with_suffix(".safetensors").write_bytes(raw)
        meta["weights_sha256"] = hashlib.sha256(raw).hexdigest()
    if edit is not None:
        edit(meta)
    meta["sha256"] = _meta_digest(meta)
    meta_path.write_text(json.dumps(meta))


def _flip(path: Path, at: int):
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0x01
    path.write_bytes(bytes(blob))


def _tensors(**over):
    from apportion.host.embed import SentenceEmbedder

    state = SentenceEmbedder.shared().model.state_dict()
    return {LN: state[LN].clone(), DENSE: state[DENSE].clone(), **over}


def _set(**fields):
    return lambda m: m.update(fields)


CASES = {
    "missing metadata": lambda p: p.unlink(),
    "missing weights": lambda p: p.with_suffix(".safetensors").unlink(),
    "empty metadata": lambda p: p.write_bytes(b""),
    "flipped byte in metadata": lambda p: p.write_text(
        p.read_text().replace('"train_loss": 0.5', '"train_loss": 0.7')
    ),
    "flipped byte in tensors": lambda p: _flip(p.with_suffix(".safetensors"), -3),
    "truncated weights": lambda p: p.with_suffix(".safetensors").write_bytes(
        p.with_suffix(".safetensors").read_bytes()[:1000]
    ),
    "truncated weights, checksums redone": lambda p: _forge(
        p, raw=p.with_suffix(".safetensors").read_bytes()[:1000]
    ),
    "huge header length, checksums redone": lambda p: _forge(
        p, raw=(1 << 62).to_bytes(8, "little") + b"{}"
    ),
    "wrong dtype, checksums redone": lambda p: _forge(
        p, tensors={k: v.double() for k, v in _tensors().items()}
    ),
    "wrong shape, checksums redone": lambda p: _forge(p, tensors=_tensors(**{LN: torch.ones(3)})),
    "unknown tensor, checksums redone": lambda p: _forge(
        p, tensors=_tensors(extra=torch.zeros(2)), edit=_set(tensors=[DENSE, LN, "extra"])
    ),
    "tensors not as listed": lambda p: _forge(p, tensors={LN: _tensors()[LN]}),
    "NaN weight": lambda p: _forge(p, tensors=_tensors(**{LN: torch.full((384,), math.nan)})),
    "another base model": lambda p: _forge(p, _set(base_sha256="0" * 64)),
    "another embedder": lambda p: _forge(p, _set(embedder="bert-base")),
    "another kind": lambda p: _forge(p, _set(kind="dynaicl-controller")),
    "an unknown format": lambda p: _forge(p, _set(format=99)),
    "window out of range": lambda p: _forge(p, _set(window=1000)),
    "mix not a number": lambda p: _forge(p, _set(mix="half")),
    "metadata checksum missing": lambda p: p.write_text(
        json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "sha256"})
    ),
    "metadata a JSON list": lambda p: p.write_text("[1, 2]"),
    "metadata nested 10,000 deep": lambda p: p.write_text(
        p.read_text().rstrip()[:-1] + ', "deep": ' + "[" * 10_000 + "]" * 10_000 + "}"
    ),
    "a pickle renamed to .safetensors, checksums redone": lambda p: _forge(
        p, raw=pickle.dumps(_tensors())
    ),
}


def test_artifact_round_trips_versioned_and_checksummed(artifact):
    from apportion_icl.sitemb import load

    meta = json.loads(artifact.read_text())
    assert meta["format"] == 1 and meta["kind"] == "sitemb-embedder"
    assert meta["sha256"] == _meta_digest(meta) and meta["tensors"] == sorted([LN, DENSE])
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["sit.json", "sit.safetensors"]
    back = load(artifact)
    ref = _embedder(scale=1.5)
    assert back.window == 2 and back.mix == 0.5 and back.meta["train_loss"] == 0.5
    assert all(torch.equal(back.tensors[k], ref.tensors[k]) for k in ref.tensors)
    back.save(artifact)  # a loaded artifact saves again
    assert load(artifact).window == 2


def test_artifact_is_applied_by_the_encoder_and_the_strategies(artifact, tok):
    from apportion.host.embed import SentenceEmbedder
    from apportion_icl.situated import encoder

    enc = encoder(str(artifact))
    assert enc.window == 2 and enc.mix == 0.5
    stock = SentenceEmbedder.shared().model.state_dict()
    assert torch.equal(enc.model.state_dict()[LN], stock[LN] * 1.5)
    assert torch.equal(enc.model.state_dict()[DENSE], stock[DENSE])
    assert not torch.equal(
        enc.embed("He lives here."), SentenceEmbedder.shared().embed("He lives here.")
    )
    s = Situated(weights=str(artifact)).settings()
    assert s == {
        "situated": True,
        "embed_window": 2,
        "sitemb_mix": 0.5,
        "sitemb_weights": str(artifact),
    }
    p = Prune(PruneConfig(sitemb_weights=str(artifact))).build(
        "Where does he live?", context="Ravi grew up here. He lives in Ravenport.", tokenizer=tok
    )
    assert p.accounting["embed_window"] == 2


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_artifact_is_an_artifact_error(artifact, case):
    from apportion_icl.sitemb import load

    CASES[case](artifact)
    with pytest.raises(ArtifactError, match="sitemb-train") as info:
        load(artifact)
    assert str(artifact.parent) in str(info.value)


def test_a_strategy_with_a_broken_artifact_fails_typed(tmp_path, tok):
    with pytest.raises(ArtifactError, match="no SitEmb artifact"):
        Prune(PruneConfig(sitemb_weights=str(tmp_path / "none.json"))).build(
            "q?", context="A. B.", tokenizer=tok
        )


def test_saving_an_invalid_embedder_is_refused(tmp_path):
    from apportion_icl.sitemb import SitEmb

    bad = SitEmb({LN: torch.full((384,), math.nan)}, 2, 0.5)
    with pytest.raises(ValueError, match="finite"):
        bad.save(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="window"):
        SitEmb(_tensors(), -1, 0.5).save(tmp_path / "bad.json")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- training


def test_training_data_never_touches_held_out_entities():
    held = stories.eval_pair_ids()
    shipped = {p.id: p for p in stories.shipped_pairs()}
    names = {shipped[i].person for i in held} | {shipped[i].company for i in held}
    train = stories.train_examples(synthetic=6, n_distractors=4)
    assert train and {e.meta["form"] for e in train} == {"story", "shipped"}
    for ex in train:
        assert not any(n in ex.context for n in names), ex.id
    test_queries = {q for e in data.qa("test") for q in [e.query, *e.meta["subquestions"]]}
    assert not test_queries & {e.query for e in train}


def test_a_tiny_training_run_lowers_the_contrastive_loss(tmp_path, tok):
    from apportion_icl.sitemb import load, train

    emb, path = train(
        tmp_path / "tiny.json",
        synthetic=4,
        n_distractors=4,
        epochs=3,
        batch_size=8,
        negatives=2,
        layers=1,
        lr=3e-4,
        evaluate=False,
    )
    m = emb.meta
    assert m["steps"] == 15 and len(m["losses"]) == 15
    assert m["probe_loss_after"] < m["probe_loss_before"] - 0.1, m
    back = load(path)
    assert back.meta["probe_loss_after"] == m["probe_loss_after"]
    assert all(k.startswith("encoder.layer.5.") for k in back.tensors)
    with pytest.raises(ValueError, match="layers"):
        train(tmp_path / "x.json", layers=9, synthetic=2, evaluate=False)
