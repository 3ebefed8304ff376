"""The long-context cost model of Fu (2024), "Challenges in Deploying Long-Context
Transformers: A Theoretical Peak Performance Analysis".

Four figures bound a long-context deployment, each by one hardware limit, and all trace back
to the size of the KV cache:

- **concurrency** (HBM size): how many users' KV caches fit beside the weights;
- **prefill** (GPU FLOPs): ``2·N·s`` for the linear layers plus ``L·d·s²`` for causal
  attention (Kaplan et al.'s ``2·L·d`` per token of context, averaged over the causal prefix);
- **decode** (HBM bandwidth): every new token reads the weights and the whole KV cache;
- **context switch** (PCIe): swapping one user's KV cache between HBM and host DRAM.

Theoretical peak figures: no kernel overheads, 100% utilisation. The paper's running example
(a 34B model, Yi-34B-200K shaped, at 50K context on an A100 80GB) is the ``yi-34b`` preset on
``a100-80gb``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from apportion.errors import ConfigError

GiB = 1 << 30


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know about a model."""

    name: str
    params: float  # parameter count
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    bytes_per_param: float = 2.0  # bf16 weights
    kv_bytes: float = 2.0  # bf16 KV cache

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V, every layer, every KV head."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str = "model") -> ModelShape:
        """Shape from an HF ``config.json`` (Llama-like keys); parameters estimated from it."""
        try:
            hidden = int(config["hidden_size"])
            layers = int(config["num_hidden_layers"])
            heads = int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or hidden // heads)
            inter = int(config.get("intermediate_size") or 4 * hidden)
            vocab = int(config.get("vocab_size") or 32000)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"model config {name!r} lacks a usable field: {exc}") from None
        attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
        mlp = 3 * hidden * inter
        embed = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
        return cls(name, float(layers * (attn + mlp) + embed), layers, hidden, kv_heads, head_dim)


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    hbm_bytes: float
    pcie_bandwidth: float  # host <-> device bytes/s
    extra: dict[str, float] = field(default_factory=dict)  # nvme, cxl bandwidths for offload plans


MODELS: dict[str, ModelShape] = {
    # Yi-34B-200K: the paper's running example (60 layers, d=7168, 8 KV heads of 128)
    "yi-34b": ModelShape("yi-34b", 34e9, 60, 7168, 8, 128),
    "llama-3-8b": ModelShape("llama-3-8b", 8.03e9, 32, 4096, 8, 128),
    "llama-3-70b": ModelShape("llama-3-70b", 70.6e9, 80, 8192, 8, 128),
    "smollm2-135m": ModelShape("smollm2-135m", 134.5e6, 30, 576, 3, 64),
}

HARDWARE: dict[str, Hardware] = {
    "a100-80gb": Hardware(
        "a100-80gb", 312e12, 2.0e12, 80 * GiB, 25e9, {"nvme_bandwidth": 7e9, "cxl_bandwidth": 64e9}
    ),
    "h100-sxm": Hardware(
        "h100-sxm", 989e12, 3.35e12, 80 * GiB, 50e9, {"nvme_bandwidth": 14e9, "cxl_bandwidth": 64e9}
    ),
    "h200": Hardware(
        "h200", 989e12, 4.8e12, 141e9, 50e9, {"nvme_bandwidth": 14e9, "cxl_bandwidth": 64e9}
    ),
}

#: The paper's figures for its running example, for side-by-side comparison.
PAPER_FIGURES = {
    4_000: {"concurrency": 20, "prefill_seconds": 0.89, "decode_seconds": 8.5},
    50_000: {"concurrency": 1, "prefill_seconds": 14.1, "decode_seconds": 9.8},
}


@dataclass
class Plan:
    model: ModelShape
    hardware: Hardware
    context: int
    new_tokens: int = 250

    @property
    def kv_bytes_per_user(self) -> float:
        return self.model.kv_bytes_per_token * self.context

    def concurrency(self) -> int:
        """Users whose KV caches fit in the HBM left beside the weights."""
        free = self.hardware.hbm_bytes - self.model.weight_bytes
        return max(0, math.floor(free / self.kv_bytes_per_user)) if free > 0 else 0

    def prefill_flops(self) -> float:
        s = self.context
        return 2 * self.model.params * s + self.model.layers * self.model.hidden * s * s

    def prefill_seconds(self) -> float:
        return self.prefill_flops() / self.hardware.flops

    def decode_seconds_per_token(self) -> float:
        return (self.model.weight_bytes + self.kv_bytes_per_user) / self.hardware.hbm_bandwidth

    def decode_seconds(self) -> float:
        return self.decode_seconds_per_token() * self.new_tokens

    def context_switch_seconds(self) -> float:
        return self.kv_bytes_per_user / self.hardware.pcie_bandwidth

    def figures(self) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "hardware": self.hardware.name,
            "context": self.context,
            "new_tokens": self.new_tokens,
            "kv_bytes_per_token": self.model.kv_bytes_per_token,
            "kv_bytes_per_user": self.kv_bytes_per_user,
            "weight_bytes": self.model.weight_bytes,
            "max_concurrent_users": self.concurrency(),
            "prefill_seconds": round(self.prefill_seconds(), 4),
            "decode_seconds": round(self.decode_seconds(), 4),
            "decode_ms_per_token": round(1e3 * self.decode_seconds_per_token(), 4),
            "context_switch_seconds": round(self.context_switch_seconds(), 4),
        }


def resolve_model(name: str) -> ModelShape:
    if name in MODELS:
        return MODELS[name]
    if name.lower() in {"smollm2", "default", "embedded"}:
        return MODELS["smollm2-135m"]
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return ModelShape.from_hf_config(data, name=str(path.parent.name))
    raise ConfigError(
        f"unknown model {name!r}: use a preset ({', '.join(MODELS)}) or a folder/config.json path"
    )


def resolve_hardware(name: str) -> Hardware:
    try:
        return HARDWARE[name]
    except KeyError:
        raise ConfigError(f"unknown hardware {name!r}; presets: {', '.join(HARDWARE)}") from None


def compare_with_paper(new_tokens: int = 250) -> list[dict[str, Any]]:
    """Our figures beside the paper's for its running example, with relative errors."""
    rows = []
    for context, paper in PAPER_FIGURES.items():
        plan = Plan(MODELS["yi-34b"], HARDWARE["a100-80gb"], context, new_tokens).figures()
        ours = {
            "concurrency": plan["max_concurrent_users"],
            "prefill_seconds": plan["prefill_seconds"],
            "decode_seconds": plan["decode_seconds"],
        }
        for key, ref in paper.items():
            rows.append(
                {
                    "context": context,
                    "figure": key,
                    "ours": ours[key],
                    "paper": ref,
                    "rel_error": round((ours[key] - ref) / ref, 4),
                }
            )
    return rows


def as_dict(obj: Any) -> dict[str, Any]:
    return asdict(obj)
