"""Reading the LLM's attention from the question to the context without materialising the
full attention matrix: an attention function (installed through the core's
:class:`~apportion.host.attention.AttentionBackend`) computes SDPA as usual and, on chosen
layers, also the softmax rows of the last ``n_query`` positions, averaged over heads."""

from __future__ import annotations

from typing import Any

from apportion.host.attention import AttentionBackend


class AttentionProbe(AttentionBackend):
    name = "icl-probe"

    def __init__(self, layers: list[int], n_query: int):
        super().__init__()
        self.layers = set(layers)
        self.n_query = n_query
        self.captured: dict[int, Any] = {}

    def attention_function(self):
        import torch
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            out = sdpa_attention_forward(
                module,
                query,
                key,
                value,
                attention_mask,
                scaling=scaling,
                dropout=dropout,
                **kwargs,
            )
            layer = getattr(module, "layer_idx", None)
            if layer in self.layers:
                nq = min(self.n_query, query.shape[2])
                q = query[:, :, -nq:, :].float()
                groups = q.shape[1] // key.shape[1]
                k = key.float().repeat_interleave(groups, dim=1)
                scale = scaling if scaling is not None else q.shape[-1] ** -0.5
                scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, nq, L)
                total = k.shape[2]
                rows = torch.arange(total - nq, total, device=q.device)[:, None]
                cols = torch.arange(total, device=q.device)[None, :]
                scores = scores.masked_fill(cols > rows, float("-inf"))
                self.captured[layer] = torch.softmax(scores, -1).mean(dim=(1, 2)).detach().cpu()
            return out

        return fn


def question_attention(
    loaded: Any, context_ids: list[int], query_ids: list[int], layers: list[int], sink: int = 4
) -> Any:
    """Mean attention (over the chosen layers, heads and query tokens) that the query pays to
    each context token: a (len(context_ids),) tensor. The first ``sink`` tokens are zeroed:
    they soak up attention whatever they say (attention sinks, Xiao et al. 2023)."""
    import torch

    n_layers = loaded.model.config.num_hidden_layers
    layers = sorted({(layer % n_layers) for layer in layers})
    probe = AttentionProbe(layers, len(query_ids))
    ids = torch.tensor([context_ids + query_ids], device=loaded.device)
    with probe.installed(loaded.model), torch.inference_mode():
        loaded.model(input_ids=ids, use_cache=False)
    att = torch.stack([probe.captured[layer][0] for layer in layers]).mean(0)
    att = att[: len(context_ids)].clone()
    att[:sink] = 0
    return att
