"""The KV cache offloaded by the run's allocator vs all resident, and transformers' own
offloading cache, on the same prompts and model; and ``apportion plan --offload``'s
prediction of each placement's decode beside the measured one.

For each prompt (a haystack of ``--sentences`` sentences with a fact and a question, about
1-2K tokens for the defaults) SmolLM2-135M-Instruct generates ``--new`` greedy tokens:

- ``resident``: the host's ordinary cache (a ``DynamicCache``, every layer on the device);
- ``pinned-pool``, ``tiered``, ``nvme``: the host with that allocator and
  ``resident_kv_bytes`` = ``--budget`` (default 25%) of the prompt's full KV (measured by the
  resident run), so the rest of the layers live in the tier and stream through it;
- ``pinned-pool-no-prefetch``: the same without fetching ahead (what the prefetch hides);
- ``transformers-offloading``: ``DynamicCache(config, offloading=True)`` under the same host
  and greedy loop, transformers' peer: decode tokens/s and its peak KV on the device; then
  ``pinned-pool`` again at that resident budget (ours vs the peer at the same budget). It
  needs an accelerator stream; where it fails (a CPU-only machine) its error is recorded,
  not skipped.

``--long-context TOKENS`` adds one prompt of about TOKENS tokens (SmolLM2's window is 8192
positions, the new tokens included: 8000 leaves room for 32) run ``resident`` and ``nvme``
only, at the same budget share.

Figures, per (prompt, config): answers token-identical to ``resident``; peak resident KV
(measured by the host after every layer of the prefill and of every decode step) against
the budget plus one layer; decode tokens/s as a ratio to ``resident`` in this run (the best
of ``--repeats`` per prompt, configs interleaved so that machine noise hits all); the
decode's copy-thread time, the compute's wait for fetches and the *overlap share*
``1 - fetch_wait / copy`` (the copy time hidden under compute) from the cache's counters
over the decode steps; and the prediction of ``apportion plan --offload TIER
--resident-kv-bytes B --step-ms S --calibrate`` (the same hook, this machine's figures
measured once at the start, ``S`` the resident run's step) beside the measured step, with
their ratio. Prints one JSON line per (prompt, config), then a ``"summary": true`` object.

Targets (CPU): token-identical everywhere, resident <= budget + one layer, host tier decode
>= 0.9x, NVMe >= 0.5x (and at ~8K tokens), the plan's prediction within 25% of the measured
decode step. On a GPU: ours >= 1.0x transformers' offloading cache at its resident budget.

    OMP_NUM_THREADS=1 uv run --no-sync python benchmarks/offload_kv.py --long-context 8000
"""

from __future__ import annotations

import argparse
import json
import tempfile

TIERS = ("pinned-pool", "tiered", "nvme")
CONFIGS = ("resident", *TIERS, "pinned-pool-no-prefetch")
SEGMENT_TOKENS = 64  # the allocators' default kv_segment_tokens


def build_prompts(n_sentences: list[int]) -> list:
    from apportion.base import Prompt
    from apportion.testing.contracts import QUESTION, _long_context

    return [
        Prompt([{"role": "user", "content": f"{_long_context(n)}\n\n{QUESTION}"}], QUESTION)
        for n in n_sentences
    ]


def prompt_of_tokens(host, tokens: int):
    """A haystack prompt of at most ``tokens`` tokens (as the host encodes it), near it."""
    n = max(1, tokens // 17)
    for _ in range(8):
        got = len(host.encode(build_prompts([n])[0]).ids)
        if got <= tokens and tokens - got < 40:
            break
        n = max(1, int(n * tokens / got) - (1 if got > tokens else 0))
    while n > 1 and len(host.encode(build_prompts([n])[0]).ids) > tokens:
        n -= 1
    return build_prompts([n])[0]


class Watch:
    """The offloaded cache an allocator builds, and its counters at the first decode step
    (the model's second forward): the decode's own copy figures are the difference."""

    def __init__(self, loaded, allocator):
        self.cache = None
        self.at_decode: dict = {}
        self._calls = 0
        build = allocator.kv_cache

        def kv_cache(model, cache):
            self.cache = build(model, cache)
            return self.cache

        allocator.kv_cache = kv_cache
        self._handle = loaded.model.register_forward_pre_hook(self._pre)

    def _pre(self, module, args):
        self._calls += 1
        if self._calls == 2 and self.cache is not None:
            self.at_decode = dict(self.cache.counters)

    def close(self) -> None:
        self._handle.remove()

    def decode_figures(self) -> dict:
        if self.cache is None:
            return {}
        end, start = self.cache.counters, self.at_decode
        copy = end["copy_seconds"] - start.get("copy_seconds", 0.0)
        wait = end["fetch_wait_seconds"] - start.get("fetch_wait_seconds", 0.0)
        placed = self.cache.placement()
        return {
            "pinned_layers": len(placed["pinned_layers"]),
            "offloaded_layers": len(placed["offloaded_layers"]),
            "decode_copy_seconds": round(copy, 5),
            "decode_fetch_wait_seconds": round(wait, 5),
            "overlap_share": overlap(copy, wait),
        }


def overlap(copy: float, wait: float) -> float | None:
    """Share of the copy thread's time hidden under compute: ``1 - wait / copy``, at least 0
    (on an oversubscribed CPU the compute also waits for the copy thread to be scheduled)."""
    return round(max(0.0, 1.0 - wait / copy), 4) if copy > 0 else None


def generate(loaded, registry, prompt, new: int, name: str, budget: int, swap_dir: str):
    """One generation of config ``name``: (result, the cache's decode figures)."""
    from apportion.host import Host

    if name == "resident":
        return Host(loaded).generate(prompt, max_new_tokens=new)[0], {}
    tier = name.removesuffix("-no-prefetch")
    opts = {"resident_kv_bytes": budget, "kv_prefetch": tier == name}
    opts["directory" if tier == "nvme" else "kv_spill_directory"] = swap_dir
    allocator = registry.create("allocator", tier, opts)
    watch = Watch(loaded, allocator)
    try:
        got = Host(loaded, allocator=allocator).generate(prompt, max_new_tokens=new)[0]
    finally:
        watch.close()
    return got, watch.decode_figures()


def predict(shape, name: str, got, budget: int, resident_step: float, swap_dir: str) -> dict:
    """``apportion plan --offload TIER`` for this run (through the plugin hook, as the CLI
    calls it); the no-prefetch config through the model directly (the CLI has no flag)."""
    from apportion.plan import HARDWARE, KVOffloadQuery, Plan
    from apportion.plugins import get_plugin_host
    from apportion_offload.kv.decodemodel import KVShape, calibrated
    from apportion_offload.kv.decodemodel import predict as model

    tier = name.removesuffix("-no-prefetch")
    if tier != name:
        out = model(
            KVShape.from_model_shape(shape),
            calibrated(swap_dir),
            tier,
            got.prompt_tokens,
            got.new_tokens,
            budget,
            resident_step_seconds=resident_step,
            prefetch=False,
            segment_tokens=SEGMENT_TOKENS,
        ).as_dict()
    else:
        query = KVOffloadQuery(budget, resident_step, calibrate=True, directory=swap_dir)
        plan = Plan(shape, HARDWARE["a100-80gb"], got.prompt_tokens, got.new_tokens, query)
        out = get_plugin_host().hook.apportion_plan_offload(
            plan=plan, placement=tier, hardware=plan.hardware
        )
    measured = 1.0 / got.decode_tokens_per_s
    return {
        "predicted_ms_per_step": round(out["decode_ms_per_step"], 3),
        "measured_ms_per_step": round(1e3 * measured, 3),
        "predicted_over_measured": round(out["decode_ms_per_step"] / 1e3 / measured, 4),
        "predicted_pinned_layers": out["pinned_layers"],
        "predicted_fetch_hidden_share": out["fetch_hidden_share"],
        "plan_command": (
            f"apportion plan --model smollm2 --dtype float32 --offload {tier} "
            f"--resident-kv-bytes {budget} --context {got.prompt_tokens} "
            f"--new-tokens {got.new_tokens} --step-ms {1e3 * resident_step:.2f} --calibrate"
        ),
    }


def row_of(p_i, name, got, ref, budget, layer, figures) -> dict:
    return {
        "prompt": p_i,
        "prompt_tokens": got.prompt_tokens,
        "config": name,
        "identical": got.text == ref.text and got.new_tokens == ref.new_tokens,
        "new_tokens": got.new_tokens,
        "budget_bytes": budget if name != "resident" else None,
        "layer_bytes": layer,
        "peak_kv_bytes": got.peak_kv_bytes,
        "peak_resident_kv_bytes": got.peak_resident_kv_bytes,
        "within_budget_plus_layer": name == "resident"
        or got.peak_resident_kv_bytes <= budget + layer,
        "decode_tokens_per_s": got.decode_tokens_per_s,
        "prefill_seconds": got.prefill_seconds,
        **figures,
    }


def measure_prompt(loaded, registry, shape, prompt, p_i, configs, args, swap_dir) -> list:
    """Every config on one prompt, best of ``--repeats`` (interleaved), with predictions;
    returns the rows and the resident answer."""
    from apportion.host import Host

    layers = loaded.model.config.num_hidden_layers
    ref = Host(loaded).generate(prompt, max_new_tokens=args.new)[0]  # warm, and the answer
    budget = int(ref.peak_kv_bytes * args.budget)
    layer = ref.peak_kv_bytes // layers
    best: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for name in configs:
            got, figures = generate(loaded, registry, prompt, args.new, name, budget, swap_dir)
            if name not in best or got.decode_tokens_per_s > best[name][0].decode_tokens_per_s:
                best[name] = (got, figures)
    resident = best["resident"][0]
    resident_step = 1.0 / resident.decode_tokens_per_s
    rows = []
    for name in configs:
        got, figures = best[name]
        row = row_of(p_i, name, got, ref, budget, layer, figures)
        row["decode_vs_resident"] = got.decode_tokens_per_s / resident.decode_tokens_per_s
        if name != "resident":
            row.update(predict(shape, name, got, budget, resident_step, swap_dir))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, ref


def run_peer(loaded, registry, prompt, p_i, new: int, ref, swap_dir: str) -> list:
    """transformers' offloading DynamicCache under the host's greedy loop; where it runs,
    ``pinned-pool`` at its peak resident KV (the same budget)."""
    from apportion.host import Host
    from apportion.host.kv import KVPolicy, attention_modules

    class Peer(KVPolicy):
        name = "transformers-offloading"

        def make_cache(self, model):
            from transformers import DynamicCache

            return DynamicCache(config=model.config, offloading=True)

    device = loaded.device
    peak = {"bytes": 0}
    caches: list = []

    def on_device(module, args, output):  # the peer's KV on the model's device now
        if not caches:
            return
        total = 0
        for lay in caches[0].layers:
            for t in (getattr(lay, "keys", None), getattr(lay, "values", None)):
                if t is not None and t.device.type == device.type:
                    total += t.numel() * t.element_size()
        peak["bytes"] = max(peak["bytes"], total)

    policy = Peer()
    make = policy.make_cache
    policy.make_cache = lambda model: caches.append(make(model)) or caches[-1]
    out: dict = {"prompt": p_i, "config": "transformers-offloading"}
    handles = [m.register_forward_hook(on_device) for m in attention_modules(loaded.model)]
    try:
        got = Host(loaded, kv_policy=policy).generate(prompt, max_new_tokens=new)[0]
    except Exception as exc:  # its own error, recorded
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out), flush=True)
        return [out]
    finally:
        for h in handles:
            h.remove()
    out.update(
        identical=got.text == ref.text,
        new_tokens=got.new_tokens,
        decode_tokens_per_s=got.decode_tokens_per_s,
        peak_kv_bytes=got.peak_kv_bytes,
        peak_resident_kv_bytes=peak["bytes"],
    )
    print(json.dumps(out), flush=True)
    layer = ref.peak_kv_bytes // loaded.model.config.num_hidden_layers
    budget = max(peak["bytes"], layer + 2 * layer // 8)
    ours, figures = generate(loaded, registry, prompt, new, "pinned-pool", budget, swap_dir)
    mine = row_of(p_i, "pinned-pool-at-peer-budget", ours, ref, budget, layer, figures)
    mine["vs_peer"] = ours.decode_tokens_per_s / got.decode_tokens_per_s
    print(json.dumps(mine), flush=True)
    return [out, mine]


def ratio_of_totals(rows: list, base_rows: list) -> float:
    """Decode tokens/s of ``rows`` over ``base_rows``'s, each from its total time."""
    new = sum(r["new_tokens"] for r in rows)
    secs = sum(r["new_tokens"] / r["decode_tokens_per_s"] for r in rows)
    base_new = sum(r["new_tokens"] for r in base_rows)
    base_secs = sum(r["new_tokens"] / r["decode_tokens_per_s"] for r in base_rows)
    return (new / secs) / (base_new / base_secs)


def summarize(name: str, mine: list, base: list) -> dict:
    out = {
        "identical": all(r["identical"] for r in mine),
        "within_budget_plus_layer": all(r["within_budget_plus_layer"] for r in mine),
        "max_resident_over_budget": max(
            r["peak_resident_kv_bytes"] / r["budget_bytes"] for r in mine
        )
        if name != "resident"
        else None,
        "max_resident_share_of_kv": max(
            r["peak_resident_kv_bytes"] / r["peak_kv_bytes"] for r in mine
        ),
        "decode_vs_resident": ratio_of_totals(mine, base),
    }
    if name != "resident":
        copy = sum(r.get("decode_copy_seconds") or 0.0 for r in mine)
        wait = sum(r.get("decode_fetch_wait_seconds") or 0.0 for r in mine)
        out["overlap_share"] = overlap(copy, wait)
        out["plan_predicted_over_measured"] = [r["predicted_over_measured"] for r in mine]
        out["placement_as_predicted"] = all(
            r["predicted_pinned_layers"] == r.get("pinned_layers") for r in mine
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, nargs="+", default=[50, 75, 100])
    ap.add_argument("--new", type=int, default=32, help="greedy tokens per answer")
    ap.add_argument("--budget", type=float, default=0.25, help="resident share of the KV")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--long-context",
        type=int,
        default=0,
        metavar="TOKENS",
        help="also run nvme vs resident on a prompt of about TOKENS tokens (0: not)",
    )
    ap.add_argument("--long-repeats", type=int, default=1)
    ap.add_argument("--swap-dir", default=None, help="swap files and the disk calibration")
    args = ap.parse_args()

    import torch
    from apportion.config import ModelSpec
    from apportion.host import Host, load_model
    from apportion.plan import ModelShape
    from apportion.plugins import get_registry
    from apportion_offload.kv.decodemodel import calibrated

    loaded = load_model(ModelSpec(name="smollm2", device=args.device, dtype="float32"))
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    shape = ModelShape.from_hf_config(loaded.model.config.to_dict(), "smollm2").with_dtype(dtype)
    registry = get_registry()
    swap = tempfile.TemporaryDirectory(prefix="apportion-offload-kv-", dir=args.swap_dir)
    hardware = calibrated(swap.name).figures()  # once, before any generation
    print(json.dumps({"calibration": hardware}), flush=True)
    rows: list = []
    peers: list = []
    for p_i, prompt in enumerate(build_prompts(args.sentences)):
        got, ref = measure_prompt(loaded, registry, shape, prompt, p_i, CONFIGS, args, swap.name)
        rows += got
        peers += run_peer(loaded, registry, prompt, p_i, args.new, ref, swap.name)
    long_rows: list = []
    if args.long_context:
        prompt = prompt_of_tokens(Host(loaded), args.long_context - args.new)
        long_args = argparse.Namespace(**{**vars(args), "repeats": args.long_repeats})
        long_rows, _ = measure_prompt(
            loaded, registry, shape, prompt, "long", ("resident", "nvme"), long_args, swap.name
        )
    swap.cleanup()

    summary: dict = {"summary": True, "budget_share": args.budget, "device": str(loaded.device)}
    summary.update(torch=torch.__version__, dtype=dtype, calibration=hardware)
    base = [r for r in rows if r["config"] == "resident"]
    for name in CONFIGS:
        summary[name] = summarize(name, [r for r in rows if r["config"] == name], base)
    peer = [r for r in peers if r["config"] == "transformers-offloading"]
    ours = [r for r in peers if r["config"] == "pinned-pool-at-peer-budget"]
    ran = [r for r in peer if "error" not in r]
    summary["transformers-offloading"] = {
        "errors": sorted({r["error"] for r in peer if "error" in r}),
        "identical": [r.get("identical") for r in peer],
        "decode_tokens_per_s": [r["decode_tokens_per_s"] for r in ran],
        "peak_resident_kv_bytes": [r["peak_resident_kv_bytes"] for r in ran],
        "ours_at_its_budget_vs_it": ratio_of_totals(ours, ran) if ran else None,
        "ours_identical": all(r["identical"] for r in ours) if ours else None,
    }
    if long_rows:
        long_nvme = [r for r in long_rows if r["config"] == "nvme"]
        summary["nvme-long"] = {
            "prompt_tokens": long_nvme[0]["prompt_tokens"],
            **summarize("nvme", long_nvme, [r for r in long_rows if r["config"] == "resident"]),
        }
    plan_rows = [r for r in rows + long_rows if "predicted_over_measured" in r]
    worst = max(abs(r["predicted_over_measured"] - 1) for r in plan_rows)
    summary["plan"] = {
        "max_abs_error": round(worst, 4),
        "predicted_over_measured": {
            name: ratio_of_totals_pred(name, plan_rows) for name in CONFIGS[1:]
        },
        "example": plan_rows[0]["plan_command"],
    }
    on_gpu = loaded.device.type != "cpu"
    peer_ratio = summary["transformers-offloading"]["ours_at_its_budget_vs_it"]
    targets = {
        "host tier decode >= 0.9x resident": min(
            summary[t]["decode_vs_resident"] for t in ("pinned-pool", "tiered")
        )
        >= 0.9,
        "nvme decode >= 0.5x resident": summary["nvme"]["decode_vs_resident"] >= 0.5,
        "token-identical": all(summary[t]["identical"] for t in TIERS),
        "resident <= budget + one layer": all(
            summary[t]["within_budget_plus_layer"] for t in TIERS
        ),
        "plan --offload predicts the decode step within 25%": worst <= 0.25,
        # None: not measured in this run (the peer does not run here; no long prompt)
        "ours >= 1.0x transformers' offloading at its budget (GPU)": None
        if not (on_gpu and peer_ratio is not None)
        else peer_ratio >= 1.0,
        "nvme at the long context decode >= 0.5x resident": None
        if not long_rows
        else summary["nvme-long"]["decode_vs_resident"] >= 0.5
        and summary["nvme-long"]["within_budget_plus_layer"],
    }
    summary["targets"] = targets
    print(json.dumps(summary), flush=True)


def ratio_of_totals_pred(name: str, rows: list) -> float | None:
    """Predicted over measured decode time of config ``name``, over all its prompts."""
    mine = [r for r in rows if r["config"] == name and "predicted_ms_per_step" in r]
    if not mine:
        return None
    pred = sum(r["predicted_ms_per_step"] * r["new_tokens"] for r in mine)
    meas = sum(r["measured_ms_per_step"] * r["new_tokens"] for r in mine)
    return round(pred / meas, 4)


if __name__ == "__main__":
    main()
