"""Fairness-aware preemptive scheduling (VTC-style virtual token counters).

Every ``priority_interval`` iterations each conversation's priority is recomputed from the
service it has received (weighted prefill + decode tokens) minus an aging credit for the
time it has waited: the least-served, longest-waiting conversation runs first. When a
higher-priority request cannot get device blocks, the lowest-priority running requests are
preempted (swapped out) to make room; if even that is not enough the request waits
(admission control), it is never admitted into memory that is not there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

State = Literal["waiting", "running", "swapped", "swapping", "done"]


@dataclass
class Request:
    id: str
    conversation: str
    arrival: float
    prompt_tokens: int  # new tokens this turn
    output_tokens: int
    history_tokens: int = 0  # earlier turns' context, prefilled again unless kept on the host
    state: State = "waiting"
    generated: int = 0
    priority: float = 0.0
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_at: float | None = None
    ready_at: float = 0.0  # when a pending swap-in lands
    prefilled: bool = False
    reused_history: bool = False
    preemptions: int = 0

    @property
    def context(self) -> int:
        return self.history_tokens + self.prompt_tokens + self.generated


class FairScheduler:
    """Priorities from per-conversation service counters, with aging."""

    def __init__(
        self,
        *,
        priority_interval: int = 4,
        prefill_weight: float = 1.0,
        decode_weight: float = 2.0,
        aging_per_s: float = 50.0,
    ):
        self.priority_interval = priority_interval
        self.prefill_weight = prefill_weight
        self.decode_weight = decode_weight
        self.aging_per_s = aging_per_s
        self.service: dict[str, float] = {}
        self.iteration = 0

    def served(self, req: Request, prefill: int = 0, decode: int = 0) -> None:
        s = self.service.get(req.conversation, 0.0)
        self.service[req.conversation] = (
            s + self.prefill_weight * prefill + self.decode_weight * decode
        )

    def update(self, active: list[Request], now: float) -> bool:
        """Recompute priorities on the interval; True if it did."""
        self.iteration += 1
        if (self.iteration - 1) % self.priority_interval:
            return False
        # a newcomer starts at the lowest active counter (VTC), not at zero
        floor = min(
            (
                self.service.get(r.conversation, 0.0)
                for r in active
                if r.conversation in self.service
            ),
            default=0.0,
        )
        for r in active:
            self.service.setdefault(r.conversation, floor)
            wait = now - r.arrival if r.state != "running" else 0.0
            r.priority = -self.service[r.conversation] + self.aging_per_s * wait
        return True

    @staticmethod
    def order(active: list[Request]) -> list[Request]:
        return sorted(active, key=lambda r: (-r.priority, r.arrival, r.id))
