"""DistAttention (Infinite-LLM): attention as micro-attentions over KV shards, merged exactly.

The keys and values of a sequence are split into shards. Each shard computes a
*micro-attention* of the queries over its own keys and returns its normalised output with
the log-sum-exp of its scores (:func:`apportion.host.lse.partial_attention`); the exact
attention over all keys is the LSE-weighted combination (:func:`apportion.host.lse.merge`).
Nothing is approximated: the result equals dense attention up to float rounding.

Two ways to use it:

- the ``distattention`` attention component, inside one process: every layer splits its
  keys into ``shards`` pieces and merges the micro-attentions (what one rank would do with
  the shards it is lent; also the reference the distributed path is tested against);
- :func:`distributed_generate`: a real generation whose KV cache is spread over
  ``world_size`` processes joined by ``torch.distributed`` (gloo on the CPU over loopback,
  NCCL on the GPU). Each rank holds only its shard of every layer's KV; the prompt is split
  into contiguous chunks (rank r prefills chunk r), each decode token's KV goes to the least
  loaded rank, and per layer the ranks exchange queries and (output, lse) pairs. Every
  collective runs under a bounded timeout, and the ranks are started and watched by core's
  launcher (:func:`apportion.host.launch.run_ranks`): a rank that dies or hangs is reported
  as :class:`DistAttentionError` naming it, never a hang.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from apportion.config import ComponentConfig
from apportion.errors import ApportionError, LaunchError
from apportion.host.attention import AttentionBackend
from apportion.host.lse import merge, partial_attention
from pydantic import Field


class DistAttentionError(ApportionError):
    """A rank died, hung past the timeout, or the distributed setup was invalid (a
    :class:`~apportion.errors.LaunchError` of the launcher is raised as this, with its
    message)."""


class DistAttentionConfig(ComponentConfig):
    shards: int = Field(
        4, ge=1, le=1024, description="KV shards per layer (micro-attentions) in one process"
    )


# ------------------------------------------------------------------ micro-attention (exact)


def as_bool_mask(
    attention_mask: torch.Tensor | None, q_len: int, k_len: int, device: Any
) -> torch.Tensor | None:
    """transformers' mask (bool True=attend, or additive float; None = causal) -> bool
    (b|1, 1, q, k).

    ``None`` means plain causal attention with the queries being the last ``q_len`` keys.
    """
    if attention_mask is None:
        if q_len == 1:
            return None
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
        return (torch.arange(k_len, device=device)[None, :] <= q_pos[:, None])[None, None]
    mask = attention_mask[..., -k_len:]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def grouped(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(b, hq, q, d) -> (b, hkv, g, q, d): GQA without copying the keys ``g`` times."""
    b, hq, q, d = query.shape
    hkv = key.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} key/value heads")
    return query.view(b, hkv, hq // hkv, q, d)


def micro_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None,
    shards: int,
) -> torch.Tensor:
    """Attention of ``query`` (b, hq, q, d) over ``key``/``value`` (b, hkv, k, d) computed as
    ``shards`` micro-attentions over contiguous key ranges, merged through their LSEs.

    ``mask``: bool broadcastable to (b, 1, q, k), True = attend. Returns (b, hq, q, d) float32.
    """
    qg = grouped(query, key)  # (b, hkv, g, q, d)
    k5, v5 = key.unsqueeze(2), value.unsqueeze(2)  # (b, hkv, 1, k, d)
    m5 = mask.unsqueeze(2) if mask is not None else None  # (b, 1, 1, q, k)
    k_len = key.shape[-2]
    bounds = torch.linspace(0, k_len, min(shards, max(k_len, 1)) + 1).round().long().tolist()
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi <= lo:
            continue
        o, lse = partial_attention(
            qg,
            k5[..., lo:hi, :],
            v5[..., lo:hi, :],
            scale=scale,
            mask=None if m5 is None else m5[..., lo:hi],
        )
        outs.append(o)
        lses.append(lse)
    out, _ = merge(outs, lses)
    return out.reshape(query.shape)


class DistAttention(AttentionBackend):
    """``distattention``: every layer's attention as ``shards`` micro-attentions merged by LSE.

    Exact (same answer as dense up to float rounding); the single-process form of
    Infinite-LLM's DistAttention. Multi-process generation: :func:`distributed_generate`.
    """

    name: ClassVar[str] = "distattention"
    summary: ClassVar[str] = (
        "DistAttention (Infinite-LLM): micro-attention over KV shards, merged exactly by LSE"
    )
    Config = DistAttentionConfig

    def attention_function(self) -> Callable[..., Any]:
        shards = self.config.shards

        def attention(
            module: Any,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: torch.Tensor | None,
            scaling: float | None = None,
            dropout: float = 0.0,
            **kwargs: Any,
        ) -> tuple[torch.Tensor, None]:
            scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
            mask = as_bool_mask(attention_mask, query.shape[-2], key.shape[-2], query.device)
            out = micro_attention(query, key, value, scale=scale, mask=mask, shards=shards)
            return out.to(query.dtype).transpose(1, 2).contiguous(), None

        return attention


# ------------------------------------------------------------------------- distributed


@dataclass
class _LayerShard:
    keys: torch.Tensor | None = None  # (b, hkv, n, d)
    values: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # (n,) global positions of the entries


@dataclass
class ShardedKV:
    """This rank's shard of every layer's KV and the bookkeeping that places new entries.

    ``owner``: whether the tokens of the current forward are stored here; ``q_positions``:
    their global positions; ``replicated``: every rank runs the same queries (decode), so
    queries need not be exchanged.
    """

    rank: int
    world_size: int
    group: Any = None
    layers: dict[int, _LayerShard] = field(default_factory=dict)
    counts: list[int] = field(default_factory=list)  # entries held by each rank
    owner: bool = True
    replicated: bool = False
    q_positions: torch.Tensor | None = None
    timeout_s: float = 60.0

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for s in self.layers.values()
            for t in (s.keys, s.values)
            if t is not None
        )

    def _collective(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # gloo/NCCL raise RuntimeError or DistBackendError
            raise DistAttentionError(
                f"rank {self.rank}/{self.world_size}: {what} failed within {self.timeout_s:.0f}s "
                f"(a peer rank died or hung): {exc}"
            ) from exc

    def all_gather(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        import torch.distributed as dist

        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._collective(what, lambda: dist.all_gather(out, tensor.contiguous(), group=self.group))
        return out

    def store(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> _LayerShard:
        shard = self.layers.setdefault(layer_idx, _LayerShard())
        if self.owner and key.shape[-2] > 0:
            pos = self.q_positions.to(key.device)
            if shard.keys is None:
                shard.keys, shard.values, shard.positions = key, value, pos
            else:
                shard.keys = torch.cat([shard.keys, key], dim=-2)
                shard.values = torch.cat([shard.values, value], dim=-2)
                shard.positions = torch.cat([shard.positions, pos])
        return shard

    def attention(
        self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """One layer: store this rank's new KV, micro-attend every rank's queries over the
        local shard, exchange (output, lse) and merge this rank's rows exactly."""
        shard = self.store(module.layer_idx, key, value)
        b, hq, q_len, d = query.shape
        hkv = key.shape[1]
        if self.replicated:
            queries, q_pos = [query], [self.q_positions]
        else:  # prefill: chunks differ in length; pad to the longest, padded rows are dropped
            width = int(max(self.chunk_lengths))
            pad = width - q_len
            qp = torch.nn.functional.pad(query, (0, 0, 0, pad))
            pp = torch.nn.functional.pad(self.q_positions.to(query.device), (0, pad), value=-1)
            queries = self.all_gather(qp, f"layer {module.layer_idx} query exchange")
            q_pos = self.all_gather(pp, f"layer {module.layer_idx} position exchange")
        outs, lses = [], []
        for qj, pj in zip(queries, q_pos, strict=True):
            qg = qj.view(b, hkv, hq // hkv, qj.shape[-2], d)
            if shard.keys is None:
                o = torch.zeros(qg.shape, dtype=torch.float32, device=query.device)
                lse = torch.full(qg.shape[:-1], float("-inf"), device=query.device)
            else:
                mask = shard.positions[None, :] <= pj.to(shard.positions.device)[:, None]
                o, lse = partial_attention(
                    qg, shard.keys.unsqueeze(2), shard.values.unsqueeze(2), scale=scale, mask=mask
                )
            outs.append(o)
            lses.append(lse)
        # every rank now holds partials for every rank's rows; gather and keep our own rows
        mine = self.rank if not self.replicated else 0
        sent_o = torch.stack(outs)  # (n_q_owners, b, hkv, g, q, d)
        sent_l = torch.stack(lses)
        all_o = self.all_gather(sent_o, f"layer {module.layer_idx} output exchange")
        all_l = self.all_gather(sent_l, f"layer {module.layer_idx} lse exchange")
        out, _ = merge([o[mine] for o in all_o], [lse[mine] for lse in all_l])
        out = out[..., :q_len, :]
        return out.reshape(b, hq, q_len, d)

    chunk_lengths: list[int] = field(default_factory=list)


def sharded_attention_function(state: ShardedKV) -> Callable[..., Any]:
    """transformers-signature attention that routes through ``state`` (the model runs with
    ``use_cache=False``: the shard *is* the cache)."""

    def attention(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        out = state.attention(module, query, key, value, scale)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


def split_chunks(n: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous near-equal [lo, hi) chunks of ``n`` prompt tokens, one per rank."""
    if n < world_size:
        raise DistAttentionError(f"a prompt of {n} tokens cannot be split over {world_size} ranks")
    base, extra = divmod(n, world_size)
    out, lo = [], 0
    for r in range(world_size):
        hi = lo + base + (r < extra)
        out.append((lo, hi))
        lo = hi
    return out


@torch.inference_mode()
def generate_on_rank(
    model: Any,
    input_ids: list[int],
    max_new_tokens: int,
    state: ShardedKV,
    eos_ids: set[int] | None = None,
) -> dict[str, Any]:
    """Greedy generation of one sequence with the KV spread over the process group.

    Every rank calls this with the same ``input_ids``; returns the same tokens on every rank.
    """
    import torch.distributed as dist
    from apportion.host.attention import register_attention

    key = register_attention("apportion-distattention-ranks", sharded_attention_function(state))
    previous = model.config._attn_implementation
    model.set_attn_implementation(key)
    device = next(model.parameters()).device
    eos_ids = eos_ids or set()
    try:
        chunks = split_chunks(len(input_ids), state.world_size)
        state.chunk_lengths = [hi - lo for lo, hi in chunks]
        state.counts = list(state.chunk_lengths)
        lo, hi = chunks[state.rank]
        state.owner, state.replicated = True, False
        state.q_positions = torch.arange(lo, hi, device=device)
        t0 = time.perf_counter()
        out = model(
            input_ids=torch.tensor([input_ids[lo:hi]], device=device),
            position_ids=state.q_positions[None],
            use_cache=False,
            logits_to_keep=1,
        )
        # the last prompt token lives on the last rank: its logits start the decode
        logits = out.logits[:, -1, :].float().contiguous()
        state._collective(
            "prefill logits broadcast",
            lambda: dist.broadcast(logits, src=state.world_size - 1, group=state.group),
        )
        prefill_s = time.perf_counter() - t0
        tokens: list[int] = []
        position = len(input_ids)
        t1 = time.perf_counter()
        for step in range(max_new_tokens):
            nxt = int(logits.argmax(-1).item())
            tokens.append(nxt)
            if nxt in eos_ids or step == max_new_tokens - 1:
                break
            # the new entry goes to the least loaded rank (ties: lowest rank); all agree
            target = min(range(state.world_size), key=lambda r: (state.counts[r], r))
            state.counts[target] += 1
            state.owner, state.replicated = state.rank == target, True
            state.q_positions = torch.tensor([position], device=device)
            out = model(
                input_ids=torch.tensor([[nxt]], device=device),
                position_ids=state.q_positions[None],
                use_cache=False,
            )
            logits = out.logits[:, -1, :].float().contiguous()
            position += 1
        decode_s = time.perf_counter() - t1
        return {
            "tokens": tokens,
            "prefill_seconds": prefill_s,
            "decode_seconds": decode_s,
            "shard_entries": state.counts[state.rank],
            "shard_bytes": state.nbytes(),
        }
    finally:
        model.set_attn_implementation(previous)


# --------------------------------------------------------------------------- launcher


def launch(
    target: str,
    payload: dict[str, Any],
    *,
    world_size: int,
    backend: str = "gloo",
    timeout_s: float = 120.0,
) -> list[Any]:
    """Run ``target`` ("module:function", called as ``fn(rank, world_size, payload,
    timeout_s)`` inside an initialised process group) on ``world_size`` ranks started by
    :func:`apportion.host.launch.run_ranks`; return each rank's JSON-able result.

    A rank that raises, exits without a result (killed, crashed) or outlives ``timeout_s``
    is a :class:`DistAttentionError` naming it; the other ranks are stopped.
    """
    from apportion.host.launch import run_ranks

    try:
        return run_ranks(
            target, payload, world_size=world_size, backend=backend, timeout_s=timeout_s
        )
    except LaunchError as exc:
        raise DistAttentionError(str(exc)) from exc


def _generate_worker(
    rank: int, world_size: int, payload: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    from apportion.config import ModelSpec
    from apportion.host import load_model

    if payload.get("die_on_rank") == rank:  # fault injection for tests and the benchmark
        os._exit(17)
    torch.set_num_threads(max(1, int(payload.get("threads", 1))))
    device = payload.get("device", "cpu")
    if device == "cuda":  # one GPU per rank
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    loaded = load_model(
        ModelSpec(name=payload["model"], device=device, dtype=payload.get("dtype", "float32"))
    )
    import torch.distributed as dist

    state = ShardedKV(rank=rank, world_size=world_size, group=dist.group.WORLD, timeout_s=timeout_s)
    result = generate_on_rank(
        loaded.model,
        payload["input_ids"],
        int(payload["max_new_tokens"]),
        state,
        set(payload.get("eos_ids", [])),
    )
    if payload.get("text", True):
        result["text"] = loaded.tokenizer.decode(result["tokens"], skip_special_tokens=True).strip()
    return result


def distributed_generate(
    input_ids: list[int],
    *,
    world_size: int = 2,
    max_new_tokens: int = 16,
    model: str = "smollm2",
    dtype: str = "float32",
    eos_ids: list[int] | None = None,
    timeout_s: float = 180.0,
    backend: str = "gloo",
    threads: int = 1,
    die_on_rank: int | None = None,
) -> list[dict[str, Any]]:
    """Greedy generation with the KV cache spread over ``world_size`` processes (see module doc).

    Returns each rank's result: ``tokens`` (identical on all ranks), ``text``, prefill/decode
    seconds, and that rank's ``shard_entries``/``shard_bytes``. ``die_on_rank`` kills that
    rank at start (to exercise the failure path).
    """
    if not input_ids:
        raise DistAttentionError("input_ids is empty")
    if len(input_ids) < world_size:
        raise DistAttentionError(
            f"a prompt of {len(input_ids)} tokens cannot be split over {world_size} ranks"
        )
    payload = {
        "model": model,
        "dtype": dtype,
        "input_ids": list(map(int, input_ids)),
        "max_new_tokens": max_new_tokens,
        "eos_ids": sorted(eos_ids or []),
        "threads": threads,
        "die_on_rank": die_on_rank,
        "device": "cuda" if backend == "nccl" else "cpu",
    }
    return launch(
        "apportion_attention.distattention:_generate_worker",
        payload,
        world_size=world_size,
        backend=backend,
        timeout_s=timeout_s,
    )
