"""DistKV across processes: rManagers as torch.distributed ranks (gloo on CPU, NCCL on GPU).

Rank 0 is the home (it runs the model and the gManager); ranks 1..N-1 run :func:`serve`,
holding lent blocks and answering attention queries over them. The home talks to each rank
through a :class:`RemoteInstance`, which has the same interface as the in-process
:class:`~apportion_kvcache.distkv.RManager`, so :class:`~apportion_kvcache.distkv.DistKV`
does not care where its instances are.

Every message is a fixed header (int64) followed by its tensors. Every wait is bounded: a
rank that dies or stalls turns into :class:`~apportion_kvcache.distkv.DistKVError` naming
it within ``timeout_s``; the home then stops the surviving ranks, which exit cleanly, as
they also do when the home goes away.

Run a worker: ``python -m apportion_kvcache.distkv_dist --rank R --world N --port P``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from apportion_kvcache.distkv_instances import DistKVError, RManager

PUT, ATTEND, FREE, RELEASE, STOP = 1, 2, 3, 4, 5
HEADER = 10  # op, request, block, layer, b, h, n, d, extra, reserved


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init(
    rank: int, world: int, port: int, *, timeout_s: float = 30.0, backend: str | None = None
) -> None:
    """Join the DistKV group on loopback (or ``MASTER_ADDR``)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )


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


def serve(
    capacity_blocks: int, *, idle_timeout_s: float = 300.0, die_after: int | None = None
) -> int:
    """A lending instance's loop: hold blocks, answer attention queries, until STOP.
    Returns the number of messages served. ``die_after`` (fault injection for tests) exits
    the process abruptly after that many messages."""
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


def spawn_workers(
    world: int,
    port: int,
    capacity_blocks: int,
    *,
    timeout_s: float = 30.0,
    join_timeout_s: float = 180.0,
    die_after: dict[int, int] | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Start ranks 1..world-1 as processes on loopback; the caller is rank 0."""
    procs = []
    for rank in range(1, world):
        cmd = [
            sys.executable,
            "-m",
            "apportion_kvcache.distkv_dist",
            "--rank",
            str(rank),
            "--world",
            str(world),
            "--port",
            str(port),
            "--capacity-blocks",
            str(capacity_blocks),
            "--timeout",
            str(timeout_s),
            "--join-timeout",
            str(join_timeout_s),
        ]
        if die_after and rank in die_after:
            cmd += ["--die-after", str(die_after[rank])]
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    return procs


class Cluster:
    """Rank 0 side of a DistKV group on this machine: ``with Cluster(4, 128) as c: DistKV(cfg, c.instances)``."""

    def __init__(
        self,
        world: int,
        capacity_blocks: int,
        *,
        timeout_s: float = 60.0,
        join_timeout_s: float = 180.0,
        die_after: dict[int, int] | None = None,
    ):
        self.world = world
        self.port = free_port()
        self.timeout_s = timeout_s
        self.procs = spawn_workers(
            world,
            self.port,
            capacity_blocks,
            timeout_s=timeout_s,
            join_timeout_s=join_timeout_s,
            die_after=die_after,
        )
        self.instances: list[RemoteInstance] = []
        try:
            # joining waits for the ranks to start (imports are slow on a busy machine); every
            # later operation has its own ``timeout_s`` bound
            init(0, world, self.port, timeout_s=join_timeout_s)
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
        for inst in self.instances:
            inst.stop()
        codes: list[int | None] = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=self.timeout_s))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        if dist.is_initialized():
            dist.destroy_process_group()
        self.codes = codes
        return codes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="a DistKV lending instance (rManager)")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--capacity-blocks", type=int, default=1 << 16)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--join-timeout", type=float, default=180.0)
    ap.add_argument("--die-after", type=int, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    init(a.rank, a.world, a.port, timeout_s=a.join_timeout)
    try:
        serve(a.capacity_blocks, idle_timeout_s=a.timeout, die_after=a.die_after)
    except DistKVError as exc:
        print(f"distkv rank {a.rank}: {exc}; exiting", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
