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

A plan may also carry a :class:`KVOffloadQuery`: the KV cache of generation kept partly on
the device and partly in an offload tier (``plan --offload TIER --resident-kv-fraction F``).
The core only states the question; an offload plugin answers it through the
``apportion_plan_offload`` hook.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from apportion.errors import ConfigError
from apportion.host.io import loads_json

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
    vocab: int = 0  # 0: unknown (the LM head's share of the weights is then not split out)
    tied_embeddings: bool = False

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V, every layer, every KV head."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes

    @property
    def head_weight_bytes(self) -> float:
        """Weights the LM head reads per generated token (``vocab x hidden``)."""
        return self.vocab * self.hidden * self.bytes_per_param

    @property
    def layer_weight_bytes(self) -> float:
        """Weights one decoder layer reads per generated token (embeddings excluded)."""
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return max(self.params - embed, 0.0) * self.bytes_per_param / self.layers

    def with_dtype(self, dtype: str) -> ModelShape:
        """The same shape with weights and KV cache in ``dtype`` (float32, bfloat16, ...)."""
        return replace(self, bytes_per_param=dtype_bytes(dtype), kv_bytes=dtype_bytes(dtype))

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
        tied = bool(config.get("tie_word_embeddings"))
        embed = vocab * hidden * (1 if tied else 2)
        return cls(
            name,
            float(layers * (attn + mlp) + embed),
            layers,
            hidden,
            kv_heads,
            head_dim,
            vocab=vocab,
            tied_embeddings=tied,
        )


#: Bytes per element of the dtypes ``plan --dtype`` takes.
DTYPES = {
    "float32": 4.0,
    "fp32": 4.0,
    "bfloat16": 2.0,
    "bf16": 2.0,
    "float16": 2.0,
    "fp16": 2.0,
    "float8": 1.0,
    "fp8": 1.0,
}


def dtype_bytes(dtype: str) -> float:
    try:
        return DTYPES[dtype.strip().lower()]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}", [("dtype", dtype)]
        ) from None


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
    "yi-34b": ModelShape("yi-34b", 34e9, 60, 7168, 8, 128, vocab=64000),
    "llama-3-8b": ModelShape("llama-3-8b", 8.03e9, 32, 4096, 8, 128, vocab=128256),
    "llama-3-70b": ModelShape("llama-3-70b", 70.6e9, 80, 8192, 8, 128, vocab=128256),
    "smollm2-135m": ModelShape(
        "smollm2-135m", 134.5e6, 30, 576, 3, 64, vocab=49152, tied_embeddings=True
    ),
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


@dataclass(frozen=True)
class KVOffloadQuery:
    """The question ``plan --offload TIER --resident-kv-...`` asks: how fast does the decode
    run when the KV cache of generation keeps ``resident_bytes`` on the device and the rest
    of its layers in TIER (an offload allocator's tier), fetched ahead of use?

    ``step_seconds``: the all-resident decode step measured at this context (``None``: the
    answering plugin's compute model from the hardware figures); ``calibrate``: measure this
    machine's copy and disk figures instead of taking the hardware preset's; ``directory``:
    where the disk is measured (``None``: a temporary directory).
    """

    resident_bytes: float
    step_seconds: float | None = None
    calibrate: bool = False
    directory: str | None = None


@dataclass
class Plan:
    model: ModelShape
    hardware: Hardware
    context: int
    new_tokens: int = 250
    kv_offload: KVOffloadQuery | None = None

    @property
    def kv_bytes_per_user(self) -> float:
        return self.model.kv_bytes_per_token * self.context

    @property
    def full_kv_bytes(self) -> float:
        """The KV cache at the end of the generation: the context and the new tokens."""
        return self.model.kv_bytes_per_token * (self.context + self.new_tokens)

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
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        data = loads_json(raw, what=f"model config {path}", error=ConfigError)
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
