"""ByteScale's balance scheduler: mixed-length sequences onto data- and context-parallel ranks.

A training step's sequences have long-tailed lengths. Attention costs grow with the square of
the length, so two ranks holding the same number of *tokens* can differ several-fold in
*compute*, and every rank waits for the slowest at the gradient all-reduce.

:func:`balance` (ByteScale's data-aware sharding + balance scheduling):

1. A sequence longer than ``tokens_per_rank`` is split across a context-parallel (CP) group of
   ``k >= ceil(L / tokens_per_rank)`` ranks (each holds ``L/k`` tokens and, with zig-zag CP, a
   ``1/k`` share of the quadratic attention); ``k`` grows further when one piece would still
   outweigh a rank's fair share of the step. Shorter sequences stay whole on one rank (pure
   data parallelism). Groups are formed per sequence, not fixed for the whole job.
2. Pieces are placed by longest-processing-time first on *compute* (:class:`CostModel`):
   the largest sequences first, each CP group on the ``k`` least-loaded distinct ranks.
3. Each rank's pieces are packed into micro-batches of at most ``tokens_per_rank`` tokens; the
   pieces of one CP sequence share a micro-batch index on all their ranks.

:func:`naive_pack` is the usual baseline: sequences in loader order fill each rank's token
budget in turn (the same CP splitting, so only the placement differs); and
:func:`token_balanced` balances tokens instead of compute.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CostModel:
    """Forward+backward FLOPs of one sequence: ``linear * L + quadratic * L**2``.

    ``from_dims`` follows the usual dense-transformer count: 6 FLOPs per parameter per token
    for the matmuls (fwd + bwd) and, causal, ``6 * layers * hidden * L**2`` for attention
    scores and values (half of the full ``12 * layers * hidden * L**2``).
    """

    linear: float
    quadratic: float

    @classmethod
    def from_dims(
        cls, hidden: int = 4096, layers: int = 32, params: float | None = None
    ) -> CostModel:
        params = params if params is not None else 12 * layers * hidden**2
        return cls(linear=6.0 * params, quadratic=6.0 * layers * hidden)

    def __call__(self, length: float) -> float:
        return self.linear * length + self.quadratic * length * length


@dataclass
class Piece:
    seq: int  # index of the sequence in the input
    tokens: int
    cost: float
    cp_rank: int = 0  # position within its CP group
    cp_size: int = 1
    microbatch: int = 0


@dataclass
class Schedule:
    """Where every sequence (or CP piece) runs. ``loads`` are per-rank costs of the step."""

    n_ranks: int
    tokens_per_rank: int
    ranks: list[list[Piece]] = field(default_factory=list)
    cp_groups: dict[int, list[int]] = field(default_factory=dict)  # seq -> its ranks

    @property
    def loads(self) -> list[float]:
        return [sum(p.cost for p in r) for r in self.ranks]

    @property
    def tokens(self) -> list[int]:
        return [sum(p.tokens for p in r) for r in self.ranks]

    @property
    def imbalance(self) -> float:
        """max / mean of per-rank compute: 1.0 is perfect; the step runs at the max."""
        loads = self.loads
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean else 1.0

    @property
    def microbatches(self) -> list[int]:
        return [1 + max((p.microbatch for p in r), default=-1) for r in self.ranks]

    def check(self, lengths: Sequence[int]) -> None:
        """Every token placed exactly once; no piece over the per-rank budget."""
        got = [0] * len(lengths)
        for r in self.ranks:
            for p in r:
                got[p.seq] += p.tokens
                if p.tokens > self.tokens_per_rank:
                    raise AssertionError(f"piece of sequence {p.seq} holds {p.tokens} tokens")
        if got != list(lengths):
            raise AssertionError("a sequence's tokens were lost or duplicated")

    def summary(self) -> dict[str, float | int]:
        loads, tokens = self.loads, self.tokens
        return {
            "imbalance": round(self.imbalance, 4),
            "token_imbalance": round(max(tokens) / (sum(tokens) / len(tokens)), 4),
            "cp_sequences": len(self.cp_groups),
            "max_microbatches": max(self.microbatches),
            "max_load": max(loads),
        }


def _validate(lengths: Sequence[int], n_ranks: int, tokens_per_rank: int) -> list[int]:
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be at least 1, got {n_ranks}")
    if tokens_per_rank < 1:
        raise ValueError(f"tokens_per_rank must be at least 1, got {tokens_per_rank}")
    out = []
    for i, length in enumerate(lengths):
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(
                f"sequence {i} has length {length!r}; lengths must be positive integers"
            )
        if -(-length // tokens_per_rank) > n_ranks:
            raise ValueError(
                f"sequence {i} has {length} tokens: even split over all {n_ranks} ranks it exceeds "
                f"tokens_per_rank={tokens_per_rank}"
            )
        out.append(length)
    if not out:
        raise ValueError("no sequences to schedule")
    return out


def _split(seq: int, length: int, cap: int, cost: CostModel, width: int = 0) -> list[Piece]:
    k = max(width, -(-length // cap))
    base, extra = divmod(length, k)
    share = cost(length) / k  # zig-zag CP: an equal share of linear and attention work
    return [Piece(seq, base + (j < extra), share, j, k) for j in range(k)]


def balance(
    lengths: Sequence[int], n_ranks: int, tokens_per_rank: int, cost: CostModel | None = None
) -> Schedule:
    """Compute-balanced hybrid DP/CP schedule (see the module docstring)."""
    lengths = _validate(lengths, n_ranks, tokens_per_rank)
    cost = cost or CostModel.from_dims()
    sched = Schedule(n_ranks, tokens_per_rank, [[] for _ in range(n_ranks)])
    loads = [0.0] * n_ranks
    mean = sum(cost(x) for x in lengths) / n_ranks
    for seq in sorted(range(len(lengths)), key=lambda s: -cost(lengths[s])):
        # a sequence heavier than a rank's fair share gets a wider CP group than its memory
        # needs, so that no single piece outweighs the mean load
        width = min(
            n_ranks,
            lengths[seq],
            max(-(-lengths[seq] // tokens_per_rank), math.ceil(cost(lengths[seq]) / mean)),
        )
        pieces = _split(seq, lengths[seq], tokens_per_rank, cost, width)
        targets = heapq.nsmallest(len(pieces), range(n_ranks), key=lambda r: (loads[r], r))
        for piece, r in zip(pieces, targets, strict=True):
            sched.ranks[r].append(piece)
            loads[r] += piece.cost
        if len(pieces) > 1:
            sched.cp_groups[seq] = targets
    _assign_microbatches(sched)
    return sched


def _place_in_order(lengths: list[int], n_ranks: int, cap: int, cost: CostModel, pick) -> Schedule:
    sched = Schedule(n_ranks, cap, [[] for _ in range(n_ranks)])
    for seq, length in enumerate(lengths):
        pieces = _split(seq, length, cap, cost)
        targets = pick(sched, len(pieces))
        for piece, r in zip(pieces, targets, strict=True):
            sched.ranks[r].append(piece)
        if len(pieces) > 1:
            sched.cp_groups[seq] = targets
    _assign_microbatches(sched)
    return sched


def naive_pack(
    lengths: Sequence[int], n_ranks: int, tokens_per_rank: int, cost: CostModel | None = None
) -> Schedule:
    """Loader order; each rank's token share (total / n_ranks) is filled before the next."""
    lengths = _validate(lengths, n_ranks, tokens_per_rank)
    cost = cost or CostModel.from_dims()
    share = math.ceil(sum(lengths) / n_ranks)
    cursor = [0]

    def pick(sched: Schedule, k: int) -> list[int]:
        tokens = sched.tokens
        while cursor[0] < n_ranks - 1 and tokens[cursor[0]] >= share:
            cursor[0] += 1
        start = min(cursor[0], n_ranks - k)
        return list(range(start, start + k))

    return _place_in_order(lengths, n_ranks, tokens_per_rank, cost, pick)


def token_balanced(
    lengths: Sequence[int], n_ranks: int, tokens_per_rank: int, cost: CostModel | None = None
) -> Schedule:
    """Each sequence (or CP group) goes to the ranks holding the fewest tokens so far."""
    lengths = _validate(lengths, n_ranks, tokens_per_rank)
    cost = cost or CostModel.from_dims()

    def pick(sched: Schedule, k: int) -> list[int]:
        tokens = sched.tokens
        return heapq.nsmallest(k, range(n_ranks), key=lambda r: (tokens[r], r))

    return _place_in_order(lengths, n_ranks, tokens_per_rank, cost, pick)


def _assign_microbatches(sched: Schedule) -> None:
    """CP pieces first (aligned micro-batch index across their group), then first-fit
    decreasing of the whole sequences into each rank's micro-batches."""
    cap = sched.tokens_per_rank
    used: list[list[int]] = [[] for _ in range(sched.n_ranks)]  # rank -> tokens per micro-batch
    for seq, group in sched.cp_groups.items():
        pieces = [next(p for p in sched.ranks[r] if p.seq == seq) for r in group]
        m = 0
        while any(
            m < len(used[r]) and used[r][m] + p.tokens > cap
            for r, p in zip(group, pieces, strict=True)
        ):
            m += 1
        for r, p in zip(group, pieces, strict=True):
            while len(used[r]) <= m:
                used[r].append(0)
            used[r][m] += p.tokens
            p.microbatch = m
    for r, pieces in enumerate(sched.ranks):
        for p in sorted((p for p in pieces if p.cp_size == 1), key=lambda p: -p.tokens):
            m = next((i for i, u in enumerate(used[r]) if u + p.tokens <= cap), len(used[r]))
            if m == len(used[r]):
                used[r].append(0)
            used[r][m] += p.tokens
            p.microbatch = m


def long_tailed_lengths(
    n: int,
    *,
    seed: int = 0,
    median: int = 2048,
    sigma: float = 1.4,
    min_len: int = 128,
    max_len: int = 262_144,
) -> list[int]:
    """A realistic long-tailed length mix (log-normal, clipped): most sequences are a few
    thousand tokens, a few are hundreds of thousands, as in ByteScale's production data."""
    import random

    rng = random.Random(seed)
    return [
        int(min(max_len, max(min_len, rng.lognormvariate(math.log(median), sigma))))
        for _ in range(n)
    ]
