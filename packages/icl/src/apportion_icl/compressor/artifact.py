"""The compressor's artifact: one safetensors file, versioned and checksummed, never unpickled.

Layout: the projector's tensors (:attr:`Projector.TENSORS`, float32) and, in the header's
``__metadata__``, two strings: ``apportion`` (the JSON metadata: ``kind``, ``format``,
``k_values`` trained, ``encoder_layers``, ``dim``, ``hidden``, the model and its
fingerprint, training figures) and ``sha256``: the digest of the canonical metadata JSON,
then every tensor's name, dtype, shape and bytes in name order. A changed byte anywhere,
in the metadata or the weights, fails the checksum.

Loading reads at most :data:`MAX_BYTES`, parses the header with bounded JSON, checks the
kind and format (another version is refused with a message to retrain), the checksum, then
builds the tensors with ``safetensors`` (which never runs code) and checks their names,
dtypes, shapes and finiteness. Every failure is an
:class:`~apportion_icl.errors.ArtifactError` naming the file; a missing file is a
:class:`CompressorMissingError` saying how to train one. Writes are atomic
(:func:`apportion.host.io.atomic_write`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apportion.errors import ApportionError
from apportion.host.io import atomic_write, loads_json

from apportion_icl.errors import ArtifactError

KIND = "arc-compressor"
FORMAT = 1
MAX_BYTES = 1 << 26  # 64 MiB: a projector of width 512 over 576 dimensions is ~2.4 MB
MAX_HEADER = 1 << 16
TRAIN_HINT = "apportion icl compressor-train"
ARTIFACT_NAME = "arc-compressor.safetensors"


class CompressorMissingError(ApportionError, FileNotFoundError):
    """No compressor artifact where one was looked for; the message says how to train one."""


def default_path() -> Path:
    """``icl/arc-compressor.safetensors`` under apportion's cache folder
    (``$APPORTION_CACHE_DIR``, else ``~/.cache/apportion``)."""
    from apportion.host.model import cache_dir

    return cache_dir() / "icl" / ARTIFACT_NAME


def checksum(meta: dict[str, Any], tensors: dict[str, Any]) -> str:
    """sha256 of the canonical metadata JSON, then each tensor's name, dtype, shape and
    little-endian bytes, in name order."""
    import torch

    h = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Artifact:
    """A projector's tensors and metadata (see the module docstring)."""

    tensors: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write atomically; returns the path. Tensors that could not be loaded back (names,
        shapes, dtype, non-finite values) are a ValueError, and nothing is written."""
        from safetensors.torch import save

        tensors = {k: v.detach().contiguous().float().cpu() for k, v in self.tensors.items()}
        meta = {**self.meta, "kind": KIND, "format": FORMAT}
        problem = check_tensors(tensors, meta)
        if problem:
            raise ValueError(f"not a loadable compressor: {problem}")
        digest = checksum(meta, tensors)
        blob = save(tensors, metadata={"apportion": json.dumps(meta), "sha256": digest})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, blob)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """Read and validate (see the module docstring)."""
        path = Path(path)

        def bad(msg: str) -> ArtifactError:
            return ArtifactError(f"{path}: {msg}; retrain it with `{TRAIN_HINT}`")

        try:
            with path.open("rb") as f:
                blob = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            raise CompressorMissingError(
                f"no compressor artifact at {path}; train one with `{TRAIN_HINT} --out {path}` "
                "(about 25 minutes on one CPU core), or point the 'artifact' option at one"
            ) from None
        except OSError as exc:
            raise bad(f"cannot be read ({exc.strerror or exc})") from None
        if len(blob) > MAX_BYTES:
            raise bad(f"larger than the limit of {MAX_BYTES} bytes")
        if len(blob) < 8:
            raise bad("too short for a safetensors file")
        (n,) = struct.unpack_from("<Q", blob)
        if n > MAX_HEADER or 8 + n > len(blob):
            raise bad(f"not a safetensors file (a header of {n} bytes in {len(blob)})")
        header = loads_json(
            blob[8 : 8 + n], what="its safetensors header", error=bad, max_bytes=n, max_depth=4
        )
        stored = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(stored, dict) or not isinstance(stored.get("apportion"), str):
            raise bad("no apportion metadata in the header (not a compressor artifact)")
        meta = loads_json(
            stored["apportion"].encode(), what="the compressor metadata", error=bad, max_depth=6
        )
        if not isinstance(meta, dict):
            raise bad("the metadata is not a JSON object")
        if meta.get("kind") != KIND or meta.get("format") != FORMAT:
            raise bad(
                f"a {meta.get('kind')!r} artifact of format {meta.get('format')!r}; this "
                f"version reads {KIND} format {FORMAT}"
            )
        try:
            from safetensors.torch import load

            tensors = load(bytes(blob))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise bad(f"unreadable tensors ({type(exc).__name__}: {exc})") from None
        if checksum(meta, tensors) != stored.get("sha256"):
            raise bad("the metadata or weights do not match the checksum (it is corrupt)")
        problem = check_tensors(tensors, meta)
        if problem:
            raise bad(problem)
        return cls(tensors, meta)


def check_tensors(tensors: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """Why ``tensors`` and ``meta`` are not a projector this version can run (None if they
    are): the metadata's fields, then the tensors' names, dtypes, shapes and values."""
    import torch

    from apportion_icl.compressor.model import Projector

    dims = {}
    for key in ("dim", "hidden", "encoder_layers"):
        v = meta.get(key)
        if (
            not isinstance(v, int)
            or isinstance(v, bool)
            or v < (0 if key == "encoder_layers" else 1)
        ):
            return f"metadata field {key!r} must be a positive integer, got {v!r}"
        dims[key] = v
    ks = meta.get("k_values")
    if (
        not isinstance(ks, list)
        or not ks
        or not all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 64 for k in ks)
    ):
        return f"metadata field 'k_values' must be a list of integers in 1..64, got {ks!r}"
    if sorted(tensors) != sorted(Projector.TENSORS):
        return f"holds tensors {sorted(tensors)}; a projector holds {sorted(Projector.TENSORS)}"
    size = {"D": dims["dim"], "H": dims["hidden"]}
    for name, symbols in Projector.TENSORS.items():
        t = tensors[name]
        want = tuple(size[s] for s in symbols)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            return f"tensor {name!r} must be float32, got {getattr(t, 'dtype', type(t))}"
        if tuple(t.shape) != want:
            return f"tensor {name!r} has shape {tuple(t.shape)}, the metadata says {want}"
        if not bool(torch.isfinite(t).all()):
            return f"tensor {name!r} holds values that are not finite"
    return None
