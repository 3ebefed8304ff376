"""DistKV across processes: rManagers as torch.distributed ranks (gloo on loopback).

Rank 0 is the home, this process: it runs the model and the gManager. :class:`Cluster` starts
ranks 1..N-1 with torch's launcher (:class:`apportion.host.launch.RankGroup`); each runs
:func:`serve`, holding lent blocks and answering attention queries over them. The home talks
to each rank through a :class:`RemoteInstance`, which has the same interface as the in-process
:class:`~apportion_kvcache.distkv.instances.RManager`, so
:class:`~apportion_kvcache.distkv.policy.DistKV` does not care where its instances are.

Every message is a fixed header (int64) followed by its tensors. Every wait is bounded: a
rank that dies or stalls turns into :class:`~apportion_kvcache.errors.DistKVError` naming it
within ``timeout_s``; closing the cluster then stops the surviving ranks, which exit cleanly,
as they also do when the home goes away. This module imports no transformers: lending ranks
stay light.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from apportion.errors import LaunchError
from apportion.host.launch import RankGroup

from apportion_kvcache.distkv.instances import RManager
from apportion_kvcache.errors import DistKVError

PUT, ATTEND, FREE, RELEASE, STOP = 1, 2, 3, 4, 5
HEADER = 10  # op, request, block, layer, b, h, n, d, extra, reserved
TARGET = "apportion_kvcache.distkv.ranks:serve"


def _wait(start: Any, timeout_s: float, what: str) -> None:
    """Run ``start()`` (an isend/irecv) and wait for it at most ``timeout_s``; any failure of
    the peer (closed connection, timeout) becomes a :class:`DistKVError` naming ``what``."""
    try:
        ok = start().wait(timedelta(seconds=timeout_s))
    except Exception as exc:  # gloo raises on a closed peer or a timeout
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DistKVError(f"{what}: {type(exc).__name__}: {first}") from None
    if ok is False:
        raise DistKVError(f"{what}: no answer within {timeout_s:g} s")


class RemoteInstance:
    """The home's handle on rank ``rank``'s rManager."""

    def __init__(self, rank: int, *, timeout_s: float = 30.0):
        self.id = rank
        self.rank = rank
        self.timeout_s = timeout_s
        self.failed = ""
        self._free = int(self._ask(FREE, reply=torch.zeros(1, dtype=torch.int64))[0])
        self.puts = self.attends = 0

    def _send(self, header: list[int], *tensors: torch.Tensor) -> None:
        h = torch.tensor(header + [0] * (HEADER - len(header)), dtype=torch.int64)
        for t in (h, *tensors):
            if self.failed:
                raise DistKVError(
                    f"instance {self.rank} (rank {self.rank}) failed earlier: {self.failed}"
                )
            try:
                _wait(
                    lambda t=t: dist.isend(t.contiguous(), dst=self.rank),
                    self.timeout_s,
                    f"instance {self.rank} (rank {self.rank}) failed while receiving",
                )
            except DistKVError as exc:
                self.failed = str(exc)
                raise

    def _recv(self, t: torch.Tensor) -> torch.Tensor:
        try:
            _wait(
                lambda: dist.irecv(t, src=self.rank),
                self.timeout_s,
                f"instance {self.rank} (rank {self.rank}) failed to answer",
            )
        except DistKVError as exc:
            self.failed = str(exc)
            raise
        return t

    def _ask(self, op: int, reply: torch.Tensor) -> torch.Tensor:
        self._send([op])
        return self._recv(reply)

    def free_blocks(self) -> int:
        return self._free

    def put(
        self,
        request: int,
        block: int,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor,
    ) -> None:
        b, h, n, d = k.shape
        self._send(
            [PUT, request, block, layer, b, h, n, d], k.float(), v.float(), valid.to(torch.uint8)
        )
        if layer == 0:
            self._free -= 1
        self.puts += 1

    def attend(
        self, request: int, layer: int, q: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, m, d = q.shape
        self._send(
            [ATTEND, request, 0, layer, b, h, m, d],
            q.float(),
            torch.tensor([scale], dtype=torch.float64),
        )
        out = self._recv(torch.empty(b, h, m, d))
        lse = self._recv(torch.empty(b, h, m))
        self.attends += 1
        return out, lse

    def release(self, request: int) -> None:
        self._send([RELEASE, request])
        self._free = int(self._ask(FREE, reply=torch.zeros(1, dtype=torch.int64))[0])

    def stop(self) -> None:
        if self.failed:
            return
        try:
            self._send([STOP])
        except DistKVError:
            pass


def _lend(capacity_blocks: int, *, idle_timeout_s: float, die_after: int | None = None) -> int:
    """A lending instance's loop: hold blocks, answer attention queries, until STOP.
    Returns the number of messages served. ``die_after`` (fault injection for tests) exits
    the process abruptly (exit code 3) after that many messages."""
    r = RManager(dist.get_rank(), capacity_blocks)
    served = 0
    while True:
        h = torch.empty(HEADER, dtype=torch.int64)
        _wait(lambda h=h: dist.irecv(h, src=0), idle_timeout_s, "home (rank 0) went away")
        op, request, block, layer, b, hh, n, d = (int(x) for x in h[:8])
        served += 1
        if die_after is not None and served > die_after:
            os._exit(3)
        if op == STOP:
            return served
        if op == FREE:
            dist.send(torch.tensor([r.free_blocks()], dtype=torch.int64), dst=0)
        elif op == RELEASE:
            r.release(request)
        elif op == PUT:
            k, v = torch.empty(b, hh, n, d), torch.empty(b, hh, n, d)
            valid = torch.empty(b, n, dtype=torch.uint8)
            for t in (k, v, valid):
                _wait(lambda t=t: dist.irecv(t, src=0), idle_timeout_s, "home (rank 0) went away")
            r.put(request, block, layer, k, v, valid.bool())
        elif op == ATTEND:
            q, scale = torch.empty(b, hh, n, d), torch.empty(1, dtype=torch.float64)
            for t in (q, scale):
                _wait(lambda t=t: dist.irecv(t, src=0), idle_timeout_s, "home (rank 0) went away")
            out, lse = r.attend(request, layer, q, float(scale))
            dist.send(out.contiguous(), dst=0)
            dist.send(lse.contiguous(), dst=0)
        else:
            raise DistKVError(f"rank {dist.get_rank()}: unknown op {op}")


def serve(rank: int, world_size: int, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """A lending rank (the :class:`~apportion.host.launch.RankGroup` target): serve until the
    home sends STOP. ``payload``: ``capacity_blocks``, ``timeout_s`` (the longest wait for the
    home's next message) and ``die_after`` (``{rank: messages}``, fault injection for tests).
    A home that goes away raises :class:`DistKVError`, so the rank exits."""
    die_after = (payload.get("die_after") or {}).get(str(rank))
    served = _lend(
        int(payload["capacity_blocks"]),
        idle_timeout_s=float(payload.get("timeout_s", timeout_s)),
        die_after=None if die_after is None else int(die_after),
    )
    return {"rank": rank, "served": served}


class Cluster:
    """Rank 0 side of a DistKV group on this machine::

        with Cluster(4, capacity_blocks=128) as cluster:
            policy = DistKV(config, instances=cluster.instances)

    ``world``: ranks, the home included; ``capacity_blocks``: blocks each other rank lends;
    ``timeout_s``: the longest wait for any one message (a rank that dies or stalls is a
    :class:`DistKVError` naming it within it); ``join_timeout_s``: the wait for the ranks to
    start and join (imports are slow on a busy machine); ``die_after``: fault injection for
    tests (``{rank: messages}`` after which that rank exits with code 3). :meth:`close` stops
    the ranks and returns their exit codes.
    """

    def __init__(
        self,
        world: int,
        capacity_blocks: int,
        *,
        timeout_s: float = 60.0,
        join_timeout_s: float = 180.0,
        die_after: dict[int, int] | None = None,
        backend: str = "gloo",
    ):
        self.world = world
        self.timeout_s = timeout_s
        self.instances: list[RemoteInstance] = []
        self.codes: list[int | None] = []
        #: what the launcher reported about the ranks when the cluster closed (a dead rank)
        self.error: str | None = None
        payload = {
            "capacity_blocks": int(capacity_blocks),
            "timeout_s": float(timeout_s),
            "die_after": {str(r): int(n) for r, n in (die_after or {}).items()},
        }
        self._group = RankGroup(
            TARGET,
            payload,
            world_size=world,
            backend=backend,
            timeout_s=join_timeout_s,
            join_timeout_s=join_timeout_s,
        )
        try:
            self._group.__enter__()
        except LaunchError as exc:
            raise DistKVError(f"the DistKV group of {world} ranks did not start: {exc}") from None
        self._open = True
        try:
            self.instances = [RemoteInstance(r, timeout_s=timeout_s) for r in range(1, world)]
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> list[int | None]:
        """Stop every live rank, leave the group, reap the processes; their exit codes."""
        if not self._open:
            return self.codes
        self._open = False
        for inst in self.instances:
            inst.stop()
        # stopped ranks leave on their own; wait for them before the launcher reaps the group
        # (it stops every rank still running as soon as it sees one that failed)
        stalled = not self._group.wait(self.timeout_s)
        try:
            # a rank that did not stop in time is stopped at once, not waited for
            self._group.__exit__(*((DistKVError, None, None) if stalled else (None, None, None)))
        except LaunchError as exc:
            self.error = str(exc)
        self.codes = self._group.exit_codes()
        return self.codes
