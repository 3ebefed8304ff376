"""The offload step-time model behind ``apportion plan --offload PLACEMENT``.

Extends the long-context cost model (compute per step, quadratic attention) with the links
an offloaded step moves data over: PCIe between GPU and host, the CXL far-memory tier, and
NVMe. A *placement* says where each training state lives::

    params=nvme,gradients=cpu,optimizer=nvme,activations=cxl

or one of the presets ``gpu`` (nothing offloaded), ``cpu`` (ZeRO-Offload: gradients and
optimizer on the host), ``cxl`` (ZeRO-Offload, optimizer in local DRAM, activation checkpoints
striped on CXL), ``nvme`` (ZeRO-Infinity: parameters and optimizer on NVMe).

Per step (ZeRO-3 style, mixed precision, Adam):

- compute: ``6 P T`` matmul FLOPs plus causal attention ``6 layers hidden sum(L^2)``;
- parameters off the GPU: fp16 weights cross PCIe twice (forward and backward); from NVMe
  they are read twice too;
- gradients off the GPU: fp16 gradients cross PCIe once, and are written to NVMe if there;
- optimizer off the GPU: the CPU Adam reads and writes fp32 master, m and v (16 B/param with
  the gradient) at its tier's bandwidth, plus the NVMe swap of those 12 B/param both ways;
  the updated fp16 weights go back over PCIe when parameters stay on the GPU;
- activation checkpoints off the GPU: written in forward, read in backward, over PCIe and
  at the tier's bandwidth.

PCIe/tier traffic of parameters, gradients and activations overlaps with compute (prefetch),
so that part of the step is ``max(compute, transfer)``; the optimizer step runs after the
backward pass and is added (ZeRO-Offload without its one-step delayed update).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

TIERS = ("gpu", "cpu", "cxl", "nvme")
STATES = ("params", "gradients", "optimizer", "activations")
PRESETS = {
    "gpu": {},
    "cpu": {"gradients": "cpu", "optimizer": "cpu"},
    "cxl": {"gradients": "cpu", "optimizer": "cpu", "activations": "cxl"},
    "nvme": {"params": "nvme", "gradients": "cpu", "optimizer": "nvme"},
}


@dataclass(frozen=True)
class Placement:
    params: str = "gpu"
    gradients: str = "gpu"
    optimizer: str = "gpu"
    activations: str = "gpu"

    @classmethod
    def parse(cls, text: str) -> Placement:
        """A preset name or ``state=tier`` pairs separated by commas (unnamed states: gpu)."""
        text = (text or "").strip().lower()
        if text in PRESETS:
            return cls(**PRESETS[text])
        values: dict[str, str] = {}
        for item in text.split(","):
            state, sep, tier = (s.strip() for s in item.partition("="))
            if not sep or state not in STATES or tier not in TIERS:
                raise ValueError(
                    f"bad placement item {item!r} in {text!r}: use a preset ({', '.join(PRESETS)}) "
                    f"or state=tier pairs with states {', '.join(STATES)} "
                    f"and tiers {', '.join(TIERS)}"
                )
            if state in values:
                raise ValueError(f"placement {text!r} names {state!r} twice")
            values[state] = tier
        if values.get("optimizer", "gpu") == "gpu" and values.get("params") not in (None, "gpu"):
            raise ValueError(
                "parameters off the GPU need the optimizer off it too (ZeRO partitions both)"
            )
        return cls(**values)

    def __str__(self) -> str:
        return ",".join(f"{s}={getattr(self, s)}" for s in STATES)


@dataclass(frozen=True)
class Hardware:
    """One GPU's share of a node. Bandwidths in GB/s (1e9 B/s), capacities in GB."""

    gpu_tflops: float = 312.0  # bf16 dense peak (A100)
    mfu: float = 0.45  # fraction of peak the matmuls reach
    gpu_memory_gb: float = 80.0
    pcie_gbps: float = 24.0  # effective, gen4 x16 one direction
    dram_gbps: float = 150.0
    dram_gb: float = 512.0
    cxl_gbps: float = 48.0  # striped over the far-memory nodes
    cxl_gb: float = 512.0
    cxl_latency_factor: float = 2.2  # CXL load latency over local DRAM (latency-bound work)
    nvme_read_gbps: float = 6.5
    nvme_write_gbps: float = 3.5
    nvme_gb: float = 4000.0
    cpu_adam_params_per_s: float = 1.5e9

    @classmethod
    def from_any(cls, source: Any = None, **overrides: Any) -> Hardware:
        """Fields taken from a mapping or an object's attributes where present; the core's
        :class:`apportion.plan.Hardware` (``flops``, ``hbm_bytes``, ``pcie_bandwidth`` in B/s,
        ``extra["nvme_bandwidth"]``, ``extra["cxl_bandwidth"]``) is translated."""
        values: dict[str, Any] = {}
        if (
            source is not None
            and not isinstance(source, Mapping)
            and hasattr(source, "pcie_bandwidth")
        ):
            extra = getattr(source, "extra", None) or {}
            values.update(
                gpu_tflops=source.flops / 1e12,
                gpu_memory_gb=source.hbm_bytes / 1e9,
                pcie_gbps=source.pcie_bandwidth / 1e9,
            )
            if "nvme_bandwidth" in extra:  # one figure: take it for reads, scale writes alike
                values["nvme_read_gbps"] = extra["nvme_bandwidth"] / 1e9
                values["nvme_write_gbps"] = (
                    extra["nvme_bandwidth"] / 1e9 * cls.nvme_write_gbps / cls.nvme_read_gbps
                )
            if "cxl_bandwidth" in extra:
                values["cxl_gbps"] = extra["cxl_bandwidth"] / 1e9
            source = None
        for f in fields(cls):
            if isinstance(source, Mapping) and f.name in source:
                values[f.name] = source[f.name]
            elif source is not None and not isinstance(source, Mapping) and hasattr(source, f.name):
                values[f.name] = getattr(source, f.name)
        hw = replace(
            cls(), **{k: float(v) for k, v in {**values, **overrides}.items() if v is not None}
        )
        bad = [f.name for f in fields(hw) if not getattr(hw, f.name) > 0]
        if bad:
            raise ValueError(f"hardware figures must be positive: {', '.join(bad)}")
        return hw


@dataclass(frozen=True)
class Workload:
    params: float = 7e9
    layers: int = 32
    hidden: int = 4096
    seq_lengths: tuple[int, ...] = (32768,)  # sequences in one step on this GPU

    @property
    def tokens(self) -> int:
        return sum(self.seq_lengths)

    def flops(self) -> float:
        return 6 * self.params * self.tokens + 6 * self.layers * self.hidden * sum(
            L * L for L in self.seq_lengths
        )


def _tier_gbps(hw: Hardware, tier: str, write: bool = False) -> float:
    return {
        "cpu": hw.dram_gbps,
        "cxl": hw.cxl_gbps,
        "nvme": hw.nvme_write_gbps if write else hw.nvme_read_gbps,
    }.get(tier, float("inf"))


def step_time(work: Workload, placement: Placement, hw: Hardware | None = None) -> dict[str, Any]:
    """Predicted seconds of one training step and where they go (see the module docstring)."""
    hw = hw or Hardware()
    P = work.params
    act_bytes = 2.0 * work.tokens * work.hidden * work.layers  # one bf16 checkpoint per layer
    compute = work.flops() / (hw.gpu_tflops * 1e12 * hw.mfu)
    pcie = 0.0  # bytes over PCIe that overlap compute
    tier_s: dict[str, float] = {"cpu": 0.0, "cxl": 0.0, "nvme": 0.0}

    def move(nbytes: float, tier: str, write: bool) -> None:
        nonlocal pcie
        pcie += nbytes
        if tier != "cpu":  # host DRAM is the PCIe endpoint; other tiers add their own time
            tier_s[tier] += nbytes / (_tier_gbps(hw, tier, write) * 1e9)

    if placement.params != "gpu":
        move(2 * 2 * P, placement.params, write=False)
    if placement.gradients != "gpu":
        move(2 * P, placement.gradients, write=True)
    if placement.activations != "gpu":
        move(act_bytes, placement.activations, write=True)
        move(act_bytes, placement.activations, write=False)
    pcie_s = pcie / (hw.pcie_gbps * 1e9)
    overlapped = max(compute, pcie_s, *tier_s.values())

    opt = placement.optimizer
    if opt == "gpu":
        optimizer_s = 16 * P / (2000e9)  # HBM-bound Adam, negligible next to the rest
    else:
        mem_tier = "cpu" if opt == "nvme" else opt
        bw = _tier_gbps(hw, mem_tier) / (hw.cxl_latency_factor if mem_tier == "cxl" else 1.0)
        optimizer_s = max(P / hw.cpu_adam_params_per_s, 2 * 16 * P / (bw * 1e9))
        if opt == "nvme":
            optimizer_s += 12 * P / (hw.nvme_read_gbps * 1e9) + 12 * P / (hw.nvme_write_gbps * 1e9)
        if placement.params == "gpu":
            optimizer_s += 2 * P / (hw.pcie_gbps * 1e9)
    step = overlapped + optimizer_s

    gpu_bytes = 0.0
    for state, per_param in (("params", 2), ("gradients", 2), ("optimizer", 12)):
        if getattr(placement, state) == "gpu":
            gpu_bytes += per_param * P
    if placement.activations == "gpu":
        gpu_bytes += act_bytes
    resident = {t: 0.0 for t in ("cpu", "cxl", "nvme")}
    for state, size in (
        ("params", 2 * P),
        ("gradients", 2 * P),
        ("optimizer", 12 * P),
        ("activations", act_bytes),
    ):
        tier = getattr(placement, state)
        if tier != "gpu":
            resident[tier] += size
    parts = {
        "compute": compute,
        "pcie": pcie_s,
        **{f"{t}_io": s for t, s in tier_s.items()},
        "optimizer": optimizer_s,
    }
    return {
        "placement": str(placement),
        "step_seconds": step,
        "tokens_per_s": work.tokens / step,
        "compute_seconds": compute,
        "pcie_seconds": pcie_s,
        "cxl_seconds": tier_s["cxl"],
        "nvme_seconds": tier_s[
            "nvme"
        ],  # parameter/gradient traffic; optimizer swaps are in optimizer_seconds
        "optimizer_seconds": optimizer_s,
        "bottleneck": max(parts, key=parts.get),
        "gpu_gb": gpu_bytes / 1e9,
        "dram_gb": resident["cpu"] / 1e9,
        "cxl_gb": resident["cxl"] / 1e9,
        "nvme_gb": resident["nvme"] / 1e9,
        "fits": gpu_bytes / 1e9 <= hw.gpu_memory_gb
        and resident["cpu"] / 1e9 <= hw.dram_gb
        and resident["cxl"] / 1e9 <= hw.cxl_gb
        and resident["nvme"] / 1e9 <= hw.nvme_gb,
        "hardware": asdict(hw),
    }


def workload_from_plan(plan: Any) -> Workload:
    """Read model size and context from the core's plan object (duck-typed; defaults where a
    figure is missing), so this model keeps working as the plan grows."""

    def pick(*names: str) -> Any:
        for source in (plan, getattr(plan, "model", None)):
            for name in names:
                value = (
                    source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
                )
                if value is not None and not callable(value):
                    return value
        return None

    base = Workload()
    params = pick("params", "n_params", "num_parameters", "parameters")
    layers = pick("layers", "num_hidden_layers", "n_layers")
    hidden = pick("hidden", "hidden_size", "d_model")
    lengths = pick("seq_lengths", "lengths")
    length = pick("context", "seq_len", "context_length", "tokens", "length")
    batch = pick("batch", "batch_size") or 1
    if lengths is None:
        lengths = [int(length)] * int(batch) if length is not None else list(base.seq_lengths)
    return Workload(
        params=float(params or base.params),
        layers=int(layers or base.layers),
        hidden=int(hidden or base.hidden),
        seq_lengths=tuple(int(x) for x in lengths),
    )


def plan_offload(plan: Any, placement: str, hardware: Any = None) -> dict[str, Any] | None:
    """The ``apportion_plan_offload`` hook: ``None`` for a placement that is not ours, a clear
    :class:`~apportion.errors.ConfigError` for a malformed one of ours. A plan that carries a
    resident KV budget (``plan.kv_offload``) asks for the decode speed of the KV cache in a
    tier: :func:`apportion_offload.kv.decodemodel.plan_kv_decode` answers it."""
    from apportion.errors import ConfigError

    if getattr(plan, "kv_offload", None) is not None:
        from apportion_offload.kv.decodemodel import plan_kv_decode

        return plan_kv_decode(plan, placement, hardware)
    text = (placement or "").strip().lower()
    if text not in PRESETS and "=" not in text:
        return None
    try:
        parsed = Placement.parse(text)
        hw = Hardware.from_any(hardware)
    except ValueError as exc:
        raise ConfigError(f"--offload {placement!r}: {exc}", [("offload", str(exc))]) from None
    result = step_time(workload_from_plan(plan), parsed, hw)
    baseline = step_time(workload_from_plan(plan), Placement(), hw)
    result["slowdown_vs_gpu"] = result["step_seconds"] / baseline["step_seconds"]
    result["gpu_only_fits"] = baseline["fits"]
    result.pop("hardware")
    return result
