"""CacheGen's streaming controller: per chunk, send text (and recompute) or KV, and at which
level.

CacheGen (Liu et al., SIGCOMM 2024, section 5.3) streams a context chunk by chunk. For each
chunk it picks, among the configurations ordered by quality (text, which is lossless and has
the receiver run the prefill, then encoding levels 0, 1, ...), the best one whose expected
delay, assumed for every chunk still to send, fits the time left before the SLO; if none fits
it takes the fastest. The bandwidth estimate is refreshed from the throughput of the chunks
already sent, so the choice adapts.

The costs are measured, not assumed: :meth:`CostModel.measure` times the model's prefill and
the codec's encode/decode at every level on a real KV and records the bitstream sizes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CostModel:
    """Per-token costs. ``level_bytes``/``decode_s``: per encoding level."""

    prefill_s: float  # seconds of prefill per context token
    level_bytes: list[float]  # bitstream bytes per token at each level
    decode_s: list[float]  # decode seconds per token at each level
    encode_s: list[float] = field(default_factory=list)  # encode seconds per token (offline cost)
    text_bytes: float = 4.0  # bytes per token to send text (token ids)
    #: e.g. reconstruction error per level (information only)
    quality: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def measure(cls, loaded: Any, input_ids: Any, codec: Any) -> CostModel:
        """Time a prefill of ``input_ids`` (1, n) and encode/decode of its KV at every level."""
        import torch
        from apportion.host.kv import KVPolicy

        from apportion_kvcache.cachegen.baselines import kv_error
        from apportion_kvcache.kv import kv_from_cache

        n = int(input_ids.shape[1])
        policy = KVPolicy()
        cache = policy.make_cache(loaded.model)
        with torch.inference_mode():
            t0 = time.perf_counter()
            policy.prefill(loaded.model, input_ids, torch.ones_like(input_ids), cache)
            prefill = time.perf_counter() - t0
        kv = kv_from_cache(cache)
        sizes, dec, enc, err = [], [], [], []
        for level in range(codec.n_levels):
            t0 = time.perf_counter()
            bs = codec.encode(kv, fingerprint=loaded.fingerprint, level=level)
            t1 = time.perf_counter()
            out = codec.decode(bs)
            t2 = time.perf_counter()
            sizes.append(len(bs) / n)
            enc.append((t1 - t0) / n)
            dec.append((t2 - t1) / n)
            err.append(kv_error(kv, out)["rel_rmse"])
        return cls(
            prefill_s=prefill / n, level_bytes=sizes, decode_s=dec, encode_s=enc, quality=err
        )


@dataclass
class Choice:
    chunk: int
    config: str  # "text" or "level-<i>"
    seconds: float  # expected delay of this chunk
    nbytes: float


class Controller:
    """Chooses text-vs-KV and the level for each chunk (CacheGen's adaptation logic).

    ``pipelined``: decoding overlaps the transfer of the next chunk (delay = max of the two)
    instead of following it (sum).
    """

    def __init__(self, costs: CostModel, *, pipelined: bool = False):
        self.costs = costs
        self.pipelined = pipelined

    def configs(self) -> list[str]:
        """All configurations, best quality first."""
        return ["text"] + [f"level-{i}" for i in range(len(self.costs.level_bytes))]

    def chunk_cost(self, config: str, tokens: int, bandwidth: float) -> tuple[float, float]:
        """(seconds, bytes) to deliver ``tokens`` tokens of context in ``config``."""
        if bandwidth <= 0:
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
        c = self.costs
        if config == "text":
            nbytes = c.text_bytes * tokens
            return nbytes / bandwidth + c.prefill_s * tokens, nbytes
        level = int(config.split("-", 1)[1])
        nbytes = c.level_bytes[level] * tokens
        send, dec = nbytes / bandwidth, c.decode_s[level] * tokens
        return (max(send, dec) if self.pipelined else send + dec), nbytes

    def choose(
        self, tokens: int, remaining_chunks: int, time_left: float | None, bandwidth: float
    ) -> Choice:
        """Best-quality configuration whose delay, for all ``remaining_chunks``, fits
        ``time_left`` (None: no SLO, take the fastest)."""
        options = [(cfg, *self.chunk_cost(cfg, tokens, bandwidth)) for cfg in self.configs()]
        if time_left is not None:
            for cfg, secs, nbytes in options:
                if secs * remaining_chunks <= time_left:
                    return Choice(-1, cfg, secs, nbytes)
        cfg, secs, nbytes = min(options, key=lambda o: o[1])
        return Choice(-1, cfg, secs, nbytes)

    def plan(
        self,
        n_tokens: int,
        chunk_tokens: int,
        bandwidths: list[float] | float,
        slo_s: float | None = None,
    ) -> list[Choice]:
        """Stream ``n_tokens`` in chunks under a bandwidth trace (one value per chunk, or a
        constant). The controller only knows the throughput of chunks already sent (the first
        chunk uses the first value as its prior), as in the paper's online setting."""
        n_chunks = max(1, -(-n_tokens // chunk_tokens))
        trace = (
            [bandwidths] * n_chunks if isinstance(bandwidths, (int, float)) else list(bandwidths)
        )
        if len(trace) < n_chunks:
            trace += [trace[-1]] * (n_chunks - len(trace))
        elapsed, estimate, out = 0.0, trace[0], []
        for i in range(n_chunks):
            tokens = min(chunk_tokens, n_tokens - i * chunk_tokens)
            left = None if slo_s is None else slo_s - elapsed
            choice = self.choose(tokens, n_chunks - i, left, estimate)
            secs, nbytes = self.chunk_cost(choice.config, tokens, trace[i])  # what really happens
            out.append(Choice(i, choice.config, secs, nbytes))
            elapsed += secs
            estimate = trace[i]  # measured throughput of the chunk just sent
        return out
