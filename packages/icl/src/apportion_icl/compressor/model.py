"""The compressor: a frozen encoder (the first ``L`` layers of the served model), mean-pooling
of every ``k`` tokens, and a learned projector into the decoder's input-embedding space.

``Compressor(loaded, projector, encoder_layers)`` compresses token ids into ``ceil(n / k)``
vectors (``compress(ids, k)``): the encoder reads the context alone (after one sink token,
whose state is dropped, so that no group holds the first position's outsized activations),
its layer-``L`` hidden states are averaged over consecutive groups of ``k`` tokens (the last
group may be shorter), and the :class:`Projector` maps each average to one input embedding
of the frozen decoder.

The projector is a residual MLP on RMS-normalised input, scaled by a learned per-dimension
gain: ``gain * (x + W2 gelu(W1 x + b1) + b2)`` with ``x = pooled / rms(pooled)``. ``W2`` and
``b2`` start at zero and ``gain`` at the RMS of the decoder's token embeddings, so an
untrained projector hands the decoder the normalised mean of the group's states at the
scale of a token embedding (with ``L = 0``: the mean of the group's token embeddings), and
training learns the correction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class Projector(nn.Module):
    """``gain * (x + fc2(gelu(fc1(x))))`` on ``x = rmsnorm(pooled)`` (see the module docstring).

    ``dim``: the decoder's hidden size; ``hidden``: the MLP's width; ``gain``: the initial
    output scale (the RMS of the decoder's token embeddings)."""

    def __init__(self, dim: int, hidden: int, gain: float = 1.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gain = nn.Parameter(torch.full((dim,), float(gain)))
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.gain * (x + self.fc2(nn.functional.gelu(self.fc1(x))))

    @property
    def dim(self) -> int:
        return int(self.fc1.in_features)

    @property
    def hidden(self) -> int:
        return int(self.fc1.out_features)

    #: the names and shapes (in terms of dim D and hidden H) an artifact must hold
    TENSORS = {
        "fc1.weight": ("H", "D"),
        "fc1.bias": ("H",),
        "fc2.weight": ("D", "H"),
        "fc2.bias": ("D",),
        "gain": ("D",),
    }


def embedding_rms(model: Any) -> float:
    """The RMS of the decoder's token-embedding entries (the projector's initial gain)."""
    weight = model.get_input_embeddings().weight.detach()
    return float(weight.float().pow(2).mean().sqrt())


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def _decoder_layers(model: Any) -> Sequence[Any]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(
            f"{type(model).__name__} has no decoder layers at .model.layers; the compressor's "
            "encoder supports Llama-style decoders"
        )
    return list(layers)


def sink_token(tokenizer: Any) -> int:
    """The token the encoder reads first (its state is dropped): the tokenizer's BOS, else
    its EOS."""
    for tid in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(tid, int):
            return tid
    return 0


@torch.no_grad()
def encoder_states(model: Any, tokenizer: Any, ids: Sequence[int], layers: int) -> torch.Tensor:
    """(n, hidden) states of ``ids`` after the first ``layers`` decoder layers of ``model``
    (``layers = 0``: the token embeddings), read after one sink token. Only those layers
    run: a forward hook on the last of them stops the forward."""
    device = next(model.parameters()).device
    x = torch.tensor([[sink_token(tokenizer), *[int(t) for t in ids]]], device=device)
    if layers == 0:
        return model.get_input_embeddings()(x)[0, 1:].float()
    blocks = _decoder_layers(model)
    if not 0 < layers <= len(blocks):
        raise ValueError(f"encoder_layers = {layers}, but the model has {len(blocks)} layers")

    def stop(module: Any, args: Any, output: Any) -> None:
        raise _Stop(output[0] if isinstance(output, (tuple, list)) else output)

    handle = blocks[layers - 1].register_forward_hook(stop)
    try:
        getattr(model, "model", model)(input_ids=x, use_cache=False)
    except _Stop as caught:
        return caught.hidden[0, 1:].float()
    finally:
        handle.remove()
    raise RuntimeError("the encoder's last layer never ran")  # pragma: no cover


def mean_pool(states: torch.Tensor, k: int) -> torch.Tensor:
    """(n, d) -> (ceil(n / k), d): the mean of every ``k`` consecutive rows (the last group
    holds the ``n mod k`` rows left, when there are any)."""
    n, d = states.shape
    groups = -(-n // k)
    pad = groups * k - n
    padded = torch.cat([states, states.new_zeros((pad, d))]) if pad else states
    counts = torch.full((groups, 1), float(k), dtype=states.dtype, device=states.device)
    if pad:
        counts[-1] = k - pad
    return padded.view(groups, k, d).sum(1) / counts


class Compressor:
    """Compresses token ids into input embeddings of ``loaded``'s model (see the module
    docstring). ``projector`` is trained (:mod:`apportion_icl.compressor.train`) or fresh."""

    def __init__(self, loaded: Any, projector: Projector, encoder_layers: int):
        self.loaded = loaded
        self.projector = projector.to(loaded.device)
        self.encoder_layers = int(encoder_layers)

    def pooled(self, ids: Sequence[int], k: int) -> torch.Tensor:
        """(ceil(n / k), hidden) group means of the encoder's states (no gradient)."""
        if not ids:
            raise ValueError("nothing to compress: the context has no tokens")
        states = encoder_states(self.loaded.model, self.loaded.tokenizer, ids, self.encoder_layers)
        return mean_pool(states, int(k))

    def compress(self, ids: Sequence[int], k: int) -> torch.Tensor:
        """(ceil(n / k), hidden) input embeddings for ``ids`` (float32; through the
        projector, with its gradient when enabled)."""
        return self.projector(self.pooled(ids, k))
