"""The computation-allocation model of DRAG/IterDRAG (Yue et al. 2025): fitted on measured
runs, it predicts accuracy from a configuration (k documents, m demos, n rounds) and picks
the configuration with the best predicted accuracy whose prompt fits a token budget.

Accuracy is modelled as ``sigmoid(a . [1, log(1+k), log(1+m), n-1, log(1+k)*(n-1)])`` (the
paper's log-linear form in the inference parameters, plus the interaction between documents
and rounds), fitted by binomial log-likelihood with a small L2 penalty; prompt tokens as a
linear function of ``k*n``, ``m`` and ``n``, fitted by least squares on the same runs. The
model is stored as versioned JSON, written atomically, with the sha256 of its coefficients,
grid and metadata. Loading checks the version and checksum, then every value (coefficient
counts, finite numbers, a non-empty grid of (k >= 0, m >= 0, n >= 1) integers, an object for
``meta``): anything else is an :class:`~apportion_icl.errors.ArtifactError` naming the file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apportion.host.io import atomic_write, loads_json

from apportion_icl.errors import ArtifactError, BudgetError

FORMAT = 1
MAX_BYTES = 1 << 24
_BODY = ("acc_coef", "tok_coef", "grid", "meta")


def features(k: int, m: int, n: int) -> list[float]:
    lk = math.log1p(k)
    return [1.0, lk, math.log1p(m), n - 1.0, lk * (n - 1.0)]


def token_features(k: int, m: int, n: int) -> list[float]:
    return [1.0, float(k * n), float(m), float(n - 1)]


@dataclass
class AllocationModel:
    acc_coef: list[float]
    tok_coef: list[float]
    grid: list[tuple[int, int, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(
        cls, runs: Sequence[dict[str, Any]], l2: float = 1e-3, steps: int = 800
    ) -> AllocationModel:
        """``runs``: dicts with k, m, n, accuracy (0..1), n_samples and mean prompt tokens."""
        import torch

        if len(runs) < 3:
            raise ValueError(
                f"the allocation model needs at least 3 measured configurations, got {len(runs)}"
            )
        x = torch.tensor([features(r["k"], r["m"], r["n"]) for r in runs])
        y = torch.tensor([float(r["accuracy"]) for r in runs])
        w = torch.tensor([float(r.get("n_samples", 1)) for r in runs])
        coef = torch.zeros(x.shape[1], requires_grad=True)
        opt = torch.optim.Adam([coef], lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            logits = x @ coef
            loss = (
                w
                * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
            ).sum() / w.sum()
            (loss + l2 * (coef[1:] ** 2).sum()).backward()
            opt.step()
        xt = torch.tensor(
            [token_features(r["k"], r["m"], r["n"]) for r in runs], dtype=torch.float64
        )
        yt = torch.tensor([float(r["tokens"]) for r in runs], dtype=torch.float64)
        tok = torch.linalg.lstsq(xt, yt[:, None], rcond=None).solution[:, 0]
        grid = sorted({(int(r["k"]), int(r["m"]), int(r["n"])) for r in runs})
        return cls(
            [float(c) for c in coef.detach()],
            [float(c) for c in tok],
            grid,
            {"n_runs": len(runs), "fit_loss": float(loss.detach())},
        )

    def accuracy(self, k: int, m: int, n: int) -> float:
        z = sum(a * b for a, b in zip(self.acc_coef, features(k, m, n), strict=True))
        return 1 / (1 + math.exp(-z))

    def tokens(self, k: int, m: int, n: int) -> float:
        return sum(a * b for a, b in zip(self.tok_coef, token_features(k, m, n), strict=True))

    def candidates(self, iterative: bool | None = None) -> list[tuple[int, int, int]]:
        ks = sorted({g[0] for g in self.grid})
        ms = sorted({g[1] for g in self.grid})
        ns = sorted({g[2] for g in self.grid})
        out = list(itertools.product(ks, ms, ns))
        if iterative is False:
            out = [c for c in out if c[2] == 1]
        return out

    def best(
        self,
        budget: float,
        iterative: bool | None = None,
        among: Sequence[tuple[int, int, int]] | None = None,
    ) -> tuple[int, int, int]:
        """The (k, m, n) with the best predicted accuracy whose predicted tokens fit ``budget``
        (ties: fewer tokens), among ``among`` if given, else the grid's product."""
        options = [tuple(c) for c in among] if among is not None else self.candidates(iterative)
        if not options:
            raise ValueError("no candidate configurations to choose from")
        fits = [c for c in options if self.tokens(*c) <= budget]
        if not fits:
            cheapest = min(options, key=lambda c: self.tokens(*c))
            raise BudgetError(
                f"no configuration fits {budget} tokens; the cheapest, k,m,n={cheapest}, "
                f"needs about {self.tokens(*cheapest):.0f}"
            )
        return max(fits, key=lambda c: (round(self.accuracy(*c), 6), -self.tokens(*c)))

    def save(self, path: str | Path) -> Path:
        """Write the model as checksummed JSON, atomically; returns the path. A model that
        could not be loaded back (non-finite coefficients, a bad grid) is a ValueError."""
        body = {
            "acc_coef": [float(c) for c in self.acc_coef],
            "tok_coef": [float(c) for c in self.tok_coef],
            "grid": [[int(v) for v in g] for g in self.grid],
            "meta": self.meta,
        }
        problem = _invalid(body)
        if problem:
            raise ValueError(f"refusing to save an allocation model that {problem}")
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        doc = {"kind": "drag-allocation", "format": FORMAT, "sha256": digest, **body}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(path), json.dumps(doc, indent=1, sort_keys=True).encode())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> AllocationModel:
        p = Path(path)
        if not p.is_file():
            raise ArtifactError(
                f"no allocation model at {p}; fit one with benchmarks/icl_drag.py "
                "(AllocationModel.fit on measured runs, then .save)"
            )
        try:
            with p.open("rb") as f:
                raw = f.read(MAX_BYTES + 1)
        except OSError as exc:
            raise ArtifactError(f"{p} cannot be read ({exc.strerror or exc}); refit it") from None
        doc = loads_json(
            raw,
            what=str(p),
            error=lambda msg: ArtifactError(f"{msg}; refit it"),
            max_bytes=MAX_BYTES,
        )
        if (
            not isinstance(doc, dict)
            or doc.get("kind") != "drag-allocation"
            or doc.get("format") != FORMAT
        ):
            raise ArtifactError(f"{p} is not a drag-allocation model of format {FORMAT}")
        missing = [k for k in (*_BODY, "sha256") if k not in doc]
        if missing:
            raise ArtifactError(f"{p} lacks {', '.join(missing)}; refit it")
        body = {k: doc[k] for k in _BODY}
        if hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() != doc.get(
            "sha256"
        ):
            raise ArtifactError(f"{p} does not match its checksum; refit it")
        problem = _invalid(body)
        if problem:
            raise ArtifactError(f"{p} is not a valid allocation model: it {problem}; refit it")
        return cls(
            [float(c) for c in body["acc_coef"]],
            [float(c) for c in body["tok_coef"]],
            [tuple(g) for g in body["grid"]],
            body["meta"],
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _invalid(body: dict[str, Any]) -> str | None:
    """What is wrong with a model's stored values, or None."""
    for name, n in (
        ("acc_coef", len(features(1, 1, 1))),
        ("tok_coef", len(token_features(1, 1, 1))),
    ):
        coef = body[name]
        if (
            not isinstance(coef, list)
            or len(coef) != n
            or not all((_is_int(c) or isinstance(c, float)) and math.isfinite(c) for c in coef)
        ):
            return f"has {name} {coef!r}, not {n} finite numbers"
    grid = body["grid"]
    if (
        not isinstance(grid, list)
        or not grid
        or not all(
            isinstance(g, list | tuple)
            and len(g) == 3
            and all(_is_int(v) for v in g)
            and g[0] >= 0
            and g[1] >= 0
            and g[2] >= 1
            for g in grid
        )
    ):
        return f"has grid {grid!r}, not a non-empty list of (k >= 0, m >= 0, n >= 1) integers"
    if not isinstance(body["meta"], dict):
        return f"has meta {body['meta']!r}, not an object"
    return None
