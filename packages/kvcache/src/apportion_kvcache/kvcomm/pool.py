"""KVCOMM's anchor pool: the observed KV offsets of shared segments, matched by slot, length
and embedding similarity, and saved to a checksummed safetensors file.

An anchor is bound to the model that produced it (its fingerprint, architecture and weights):
adding it to a pool of another model, or loading a pool for another model, raises
:class:`~apportion_kvcache.errors.AnchorMismatchError`; a damaged or foreign file raises
:class:`~apportion_kvcache.errors.AnchorPoolFileError`. Nothing is ever unpickled.

The file (format version 3) is a safetensors blob whose metadata names the format, its
version, the pool's fingerprint and cap and the anchors (JSON); its sha256 covers all of that
metadata and every tensor's name, dtype, shape and bytes, so a flipped byte anywhere fails the
load. Every value is then checked (types, ranges, one tensor set per anchor, consistent shapes,
one model) before anything is built. Versions 1 and 2 (whose checksum covered the tensors
only) still load, with the same checks on their values.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from apportion.host.io import atomic_write, loads_json

from apportion_kvcache.errors import AnchorMismatchError, AnchorPoolFileError

FORMAT = "apportion-kvcomm-anchors"
FORMAT_VERSION = 3  # 2: anchors may carry base keys ("{i}.bk"); 3: the checksum covers metadata
READABLE_VERSIONS = (1, 2, 3)
MAX_PER_SLOT = 1 << 16
MAX_ANCHORS = 1 << 20
_HEADER_KEYS = {"format", "version", "fingerprint", "anchors", "sha256", "max_per_slot"}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Anchor:
    """One observed offset of a segment in a slot. ``delta_k`` is de-rotated; both are
    (layers, kv_heads, tokens, head_dim), stored in float16. ``base_k`` (same shape, optional)
    is the segment's own de-rotated base keys: what 'nearest' mode matches a new token against."""

    slot: str
    length: int
    embedding: torch.Tensor
    delta_k: torch.Tensor
    delta_v: torch.Tensor
    fingerprint: str
    last_used: float = field(default_factory=time.monotonic)
    base_k: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        parts = (self.delta_k, self.delta_v, self.embedding) + (
            (self.base_k,) if self.base_k is not None else ()
        )
        return sum(t.numel() * t.element_size() for t in parts)


class AnchorPool:
    """Anchors grouped by slot, all from one model (``fingerprint``)."""

    def __init__(self, fingerprint: str | None = None, max_per_slot: int = 8):
        self.fingerprint = fingerprint
        self.max_per_slot = max_per_slot
        self.slots: dict[str, list[Anchor]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.slots.values())

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for v in self.slots.values() for a in v)

    def check_model(self, fingerprint: str) -> None:
        if self.fingerprint is None:
            self.fingerprint = fingerprint
        elif fingerprint != self.fingerprint:
            raise AnchorMismatchError(
                f"anchor pool was recorded with model {self.fingerprint}, not {fingerprint}: "
                "offsets from another model are meaningless; start a new pool"
            )

    def add(self, anchor: Anchor) -> None:
        self.check_model(anchor.fingerprint)
        bucket = self.slots.setdefault(anchor.slot, [])
        bucket.append(anchor)
        if len(bucket) > self.max_per_slot:
            bucket.remove(min(bucket, key=lambda a: a.last_used))

    def match(
        self,
        slot: str,
        length: int,
        embedding: torch.Tensor,
        *,
        top_k: int,
        min_similarity: float,
        length_tolerance: float,
    ) -> list[tuple[Anchor, float]]:
        """Anchors of ``slot`` with compatible length, best cosine similarity first."""
        found = []
        for a in self.slots.get(slot, []):
            if abs(a.length - length) > length_tolerance * length:
                continue
            sim = float(torch.dot(a.embedding.float(), embedding.float()))
            if sim >= min_similarity:
                found.append((a, sim))
        found.sort(key=lambda t: -t[1])
        return found[:top_k]

    # -- persistence: safetensors + JSON metadata, checksummed, atomic; never pickle
    def save(self, path: str | os.PathLike[str]) -> Path:
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {}
        meta = []
        for i, a in enumerate(a for v in self.slots.values() for a in v):
            tensors[f"{i}.dk"] = a.delta_k.contiguous()
            tensors[f"{i}.dv"] = a.delta_v.contiguous()
            tensors[f"{i}.emb"] = a.embedding.contiguous()
            if a.base_k is not None:
                tensors[f"{i}.bk"] = a.base_k.contiguous()
            meta.append({"slot": a.slot, "length": a.length, "fingerprint": a.fingerprint})
        header = {
            "format": FORMAT,
            "version": str(FORMAT_VERSION),
            "fingerprint": self.fingerprint or "",
            "anchors": json.dumps(meta),
            "max_per_slot": str(self.max_per_slot),
        }
        header["sha256"] = _digest_v3(header, tensors)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, save(tensors, metadata=header))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, fingerprint: str | None = None) -> AnchorPool:
        """Load a saved pool; with ``fingerprint`` it must come from that model. A damaged,
        foreign or inconsistent file raises :class:`AnchorPoolFileError`."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise AnchorPoolFileError(f"{path}: not a readable anchor pool ({exc})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise AnchorPoolFileError(
                f"{path}: format {header.get('format')!r}, expected {FORMAT!r}"
            )
        version = header.get("version")
        if version not in {str(v) for v in READABLE_VERSIONS}:
            known = ", ".join(map(str, READABLE_VERSIONS))
            raise AnchorPoolFileError(f"{path}: version {version!r}, this reader knows {known}")
        covered = _digest_v3(header, tensors) if version == "3" else _digest(tensors)
        if version == "3" and set(header) != _HEADER_KEYS:
            raise AnchorPoolFileError(f"{path}: unexpected metadata fields {sorted(header)}")
        if covered != header.get("sha256"):
            raise AnchorPoolFileError(f"{path}: checksum mismatch (file damaged)")
        stored, cap, anchors = _check_values(path, header, tensors)
        if fingerprint is not None and stored is not None and stored != fingerprint:
            raise AnchorMismatchError(
                f"{path}: anchors recorded with model {stored}, not {fingerprint}"
            )
        pool = cls(stored, max_per_slot=cap)
        for i, m in enumerate(anchors):
            pool.add(
                Anchor(
                    m["slot"],
                    m["length"],
                    tensors[f"{i}.emb"],
                    tensors[f"{i}.dk"],
                    tensors[f"{i}.dv"],
                    m["fingerprint"],
                    base_k=tensors.get(f"{i}.bk"),
                )
            )
        return pool


def _check_values(
    path: Any, header: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[str | None, int, list[dict[str, Any]]]:
    """The pool's fingerprint, cap and anchor metadata, every value checked against the rest."""

    def bad(what: str) -> AnchorPoolFileError:
        return AnchorPoolFileError(f"{path}: {what}")

    stored = header.get("fingerprint")
    if not isinstance(stored, str) or len(stored) > 256:
        raise bad("the pool's fingerprint is not a string")
    cap_text = header.get("max_per_slot", "8")
    if not isinstance(cap_text, str) or not re.fullmatch(r"[1-9][0-9]{0,5}", cap_text):
        raise bad(f"max_per_slot {cap_text!r} is not a positive integer")
    cap = int(cap_text)
    if cap > MAX_PER_SLOT:
        raise bad(f"max_per_slot {cap} exceeds {MAX_PER_SLOT}")
    raw = header.get("anchors")
    if not isinstance(raw, str):
        raise bad("the anchor metadata is missing")
    anchors = loads_json(raw, what=f"{path}: anchor metadata", error=bad, max_depth=4)
    if not isinstance(anchors, list) or len(anchors) > MAX_ANCHORS:
        raise bad("the anchor metadata is not a list of anchors")
    expected: set[str] = set()
    per_slot: dict[str, int] = {}
    layout = None
    for i, m in enumerate(anchors):
        if (
            not isinstance(m, dict)
            or set(m) != {"slot", "length", "fingerprint"}
            or not isinstance(m["slot"], str)
            or not isinstance(m["fingerprint"], str)
        ):
            raise bad(f"anchor {i}: metadata fields are missing or wrong")
        length = m["length"]
        if not isinstance(length, int) or isinstance(length, bool) or not 0 < length <= 1 << 24:
            raise bad(f"anchor {i}: length {length!r} is not a positive integer")
        if m["fingerprint"] != (stored or anchors[0]["fingerprint"]):
            raise bad(
                f"anchor {i}: fingerprint {m['fingerprint']!r} is not the pool's "
                f"{stored or anchors[0]['fingerprint']!r}"
            )
        per_slot[m["slot"]] = per_slot.get(m["slot"], 0) + 1
        if per_slot[m["slot"]] > cap:
            raise bad(f"slot {m['slot']!r} holds more anchors than max_per_slot {cap}")
        names = [f"{i}.dk", f"{i}.dv", f"{i}.emb"]
        has_base = f"{i}.bk" in tensors
        expected.update(names + ([f"{i}.bk"] if has_base else []))
        if any(n not in tensors for n in names):
            raise bad(f"anchor {i}: tensors missing")
        dk, dv, emb = (tensors[n] for n in names)
        shapes_ok = (
            dk.dim() == 4
            and dv.shape == dk.shape
            and dk.shape[2] == length
            and emb.dim() == 1
            and (not has_base or tensors[f"{i}.bk"].shape == dk.shape)
        )
        if not shapes_ok:
            raise bad(f"anchor {i}: tensor shapes do not fit each other or its length")
        if any(t.dtype not in _FLOATS for t in (dk, dv, emb)) or (
            has_base and tensors[f"{i}.bk"].dtype not in _FLOATS
        ):
            raise bad(f"anchor {i}: tensors are not floating point")
        this = (dk.shape[0], dk.shape[1], dk.shape[3], emb.shape[0])
        if layout is not None and this != layout:
            raise bad(f"anchor {i}: tensor shape {this} differs from the others' {layout}")
        layout = this
    if set(tensors) != expected:
        raise bad(f"tensors {sorted(set(tensors) ^ expected)[:4]} do not match the anchors")
    return stored or None, cap, anchors


def _digest_v3(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the metadata (all of it but the digest) and of every tensor's name, dtype,
    shape and bytes."""
    h = hashlib.sha256(b"apportion-kvcomm-anchors\0v3\0")
    meta = {k: v for k, v in header.items() if k != "sha256"}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        head = json.dumps([k, str(t.dtype), list(t.shape)]).encode()
        h.update(len(head).to_bytes(8, "little") + head)
        data = _raw_bytes(t)
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(_raw_bytes(tensors[k]))
    return h.hexdigest()


def _raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes in memory order, whatever its shape (a 0-dim tensor of a wider dtype
    cannot be viewed as bytes directly) or dtype."""
    if not t.numel():
        return b""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
