"""``latent``: UniICL-style selection by the LLM's own representation. Each text is encoded
by the served model; the mean of one hidden layer over its tokens is its vector, and demos
are chosen by cosine similarity (with MMR) in that space, so "similar" means similar *to
the model that will read them* rather than to a separate embedding model."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from apportion_icl.knn import KNN, KNNConfig


class LatentConfig(KNNConfig):
    layer: int = Field(-8, description="hidden layer to pool (negative counts from the last)")
    max_tokens: int = Field(256, ge=8, description="truncate each text to this many tokens")


class Latent(KNN):
    name = "latent"
    summary = "UniICL-style: demonstrations nearest in the LLM's own hidden-state space"
    Config = LatentConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._memo: dict[str, Any] = {}

    def bind(self, loaded: Any) -> Latent:  # type: ignore[override]
        """Run ``loaded``; vectors memoised under another model are dropped."""
        if loaded is not self._llm:
            self._memo.clear()
        super().bind(loaded)
        return self

    def vectors(self, texts: list[str]) -> Any:
        import torch

        loaded = self.llm
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        tok, model = loaded.tokenizer, loaded.model
        for text in todo:
            ids = tok.encode(text, add_special_tokens=False)[: self.config.max_tokens] or [
                tok.eos_token_id
            ]
            x = torch.tensor([ids], device=loaded.device)
            with torch.inference_mode():
                out = model(input_ids=x, output_hidden_states=True, use_cache=False)
            hidden = out.hidden_states[self.config.layer][0].float()
            self._memo[text] = torch.nn.functional.normalize(hidden.mean(0), dim=-1).cpu()
        return torch.stack([self._memo[t] for t in texts])

    def postprocess(self, vecs: Any) -> Any:
        # LLM hidden states share a large common component (a few massive dimensions), which
        # makes every cosine near 1; centering on this pool's mean restores the contrast.
        import torch

        if vecs.shape[0] < 3:
            return vecs
        return torch.nn.functional.normalize(vecs - vecs.mean(0, keepdim=True), dim=-1)
