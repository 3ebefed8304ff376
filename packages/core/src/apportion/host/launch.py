"""Starting the ranks of a multi-process run on this machine, with torch's own launcher.

Ranks are started by :func:`torch.multiprocessing.start_processes` (spawn) and meet in a
``torch.distributed`` process group through a :class:`~torch.distributed.FileStore` in a fresh
temporary folder, so no port is picked or raced for. Two shapes:

- :func:`run_ranks`: every rank runs ``target(rank, world_size, payload, timeout_s)`` and
  returns a JSON-able result; the caller gets the list of results.
- :class:`RankGroup`: the calling process is rank 0 and stays in control (it runs the model);
  ranks 1..N-1 run ``target(rank, world_size, payload, timeout_s)`` until it returns.

Either way a rank that raises, dies or gives no result within the timeout is a
:class:`~apportion.errors.LaunchError` naming the rank, and the other ranks are stopped.
Across machines, start the same worker under ``torchrun`` instead.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from apportion.errors import LaunchError

GRACE_S = 30.0  # a rank's own collective timeouts fire first; this bounds the whole run


def _join_group(rank: int, world_size: int, folder: str, backend: str, timeout_s: float) -> None:
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        backend,
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def _entry(
    index: int,
    offset: int,
    world_size: int,
    folder: str,
    backend: str,
    timeout_s: float,
    target: str,
    payload: str,
    threads: int | None,
) -> None:
    """One spawned rank: join the group, run ``target``, leave its result in ``folder``."""
    import torch
    import torch.distributed as dist

    rank = index + offset
    if threads:
        torch.set_num_threads(threads)
    try:
        _join_group(rank, world_size, folder, backend, timeout_s)
        module, _, attr = target.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        result = fn(rank, world_size, json.loads(payload), timeout_s)
        tmp = Path(folder) / f".rank{rank}.json"
        tmp.write_text(json.dumps({"result": result}))
        os.replace(tmp, Path(folder) / f"rank{rank}.json")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _start(
    nprocs: int,
    offset: int,
    world_size: int,
    folder: str,
    backend: str,
    timeout_s: float,
    target: str,
    payload: dict[str, Any],
    threads: int | None,
) -> Any:
    import torch.multiprocessing as mp

    if ":" not in target:
        raise LaunchError(f"target {target!r} must look like 'package.module:function'")
    args = (offset, world_size, folder, backend, timeout_s, target, json.dumps(payload), threads)
    return mp.start_processes(_entry, args=args, nprocs=nprocs, join=False, start_method="spawn")


def _check(context: Any, offset: int, wait_s: float) -> bool:
    """Poll the spawned ranks; True once all exited cleanly. A failed rank is a LaunchError."""
    import torch.multiprocessing as mp

    try:
        return bool(context.join(timeout=wait_s))
    except mp.ProcessRaisedException as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "an exception"
        raise LaunchError(f"rank {exc.error_index + offset} failed: {last}") from None
    except mp.ProcessExitedException as exc:
        raise LaunchError(
            f"rank {exc.error_index + offset} died (exit code {exc.exit_code}) without a result"
        ) from None


def _stop(context: Any) -> None:
    for p in context.processes:
        if p.is_alive():
            p.terminate()
    for p in context.processes:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _check_world(world_size: int, backend: str) -> None:
    if world_size < 1:
        raise LaunchError(f"world_size must be >= 1, got {world_size}")
    if backend == "nccl":
        import torch

        if torch.cuda.device_count() < world_size:
            raise LaunchError(f"nccl needs {world_size} GPUs, {torch.cuda.device_count()} visible")


def run_ranks(
    target: str,
    payload: dict[str, Any],
    *,
    world_size: int,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    threads: int | None = None,
) -> list[Any]:
    """Run ``target`` on ``world_size`` spawned ranks and return each rank's result.

    ``target``: ``"module:function"``, called as ``fn(rank, world_size, payload, timeout_s)``
    inside an initialised process group; ``payload`` and the result must be JSON-able.
    ``threads``: torch threads per rank. Raises :class:`LaunchError` naming the rank if one
    raises, dies, or the whole run outlives ``timeout_s`` (+ a grace of 30 s).
    """
    _check_world(world_size, backend)
    folder = tempfile.mkdtemp(prefix="apportion-ranks-")
    context = None
    try:
        context = _start(
            world_size, 0, world_size, folder, backend, timeout_s, target, payload, threads
        )
        deadline = time.monotonic() + timeout_s + GRACE_S
        while not _check(context, 0, 0.1):
            if time.monotonic() > deadline:
                alive = [i for i, p in enumerate(context.processes) if p.is_alive()]
                raise LaunchError(
                    f"ranks {alive} gave no result within {timeout_s:g} s "
                    f"(+{GRACE_S:g} s grace); stopped"
                )
        results = []
        for rank in range(world_size):
            path = Path(folder) / f"rank{rank}.json"
            if not path.is_file():
                raise LaunchError(f"rank {rank} exited without a result")
            results.append(json.loads(path.read_text())["result"])
        return results
    finally:
        if context is not None:
            _stop(context)
        shutil.rmtree(folder, ignore_errors=True)


class RankGroup:
    """This process as rank 0 of a ``world_size`` group; ranks 1..N-1 spawned running
    ``target(rank, world_size, payload, timeout_s)``.

    ::

        with RankGroup("pkg.worker:serve", {"capacity": 64}, world_size=3) as group:
            ...  # torch.distributed calls with ranks 1 and 2
            group.check()  # raises LaunchError if a rank died

    ``join_timeout_s`` bounds the wait for every rank to join (imports are slow on a busy
    machine) and, on exit, for the workers to return.
    """

    def __init__(
        self,
        target: str,
        payload: dict[str, Any],
        *,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = 60.0,
        join_timeout_s: float = 180.0,
        threads: int | None = 1,
    ):
        _check_world(world_size, backend)
        self.target, self.payload = target, payload
        self.world_size, self.backend = world_size, backend
        self.timeout_s, self.join_timeout_s, self.threads = timeout_s, join_timeout_s, threads
        self._folder: str | None = None
        self._context: Any = None
        self._results: list[Any] = []

    def __enter__(self) -> RankGroup:
        import torch.distributed as dist

        self._folder = tempfile.mkdtemp(prefix="apportion-ranks-")
        try:
            if self.world_size > 1:
                self._context = _start(
                    self.world_size - 1,
                    1,
                    self.world_size,
                    self._folder,
                    self.backend,
                    self.timeout_s,
                    self.target,
                    self.payload,
                    self.threads,
                )
            _join_group(0, self.world_size, self._folder, self.backend, self.join_timeout_s)
        except BaseException as exc:
            self._close(wait=False)
            if isinstance(exc, LaunchError):
                raise
            self.check()
            raise LaunchError(f"the group of {self.world_size} ranks did not form: {exc}") from exc
        if not dist.is_initialized():  # pragma: no cover - init raises instead
            raise LaunchError("the process group did not initialise")
        return self

    def check(self) -> None:
        """Raise :class:`LaunchError` naming a worker rank that failed or died."""
        if self._context is not None:
            _check(self._context, 1, 0.0)

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every worker rank to exit on its own (a rank that
        failed stops no other one here); True when all have exited."""
        deadline = time.monotonic() + timeout_s
        for p in self.processes:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(p.is_alive() for p in self.processes)

    @property
    def processes(self) -> list[Any]:
        """The worker ranks' processes (rank 1 first)."""
        return list(self._context.processes) if self._context is not None else []

    def exit_codes(self) -> list[int | None]:
        """Each worker rank's exit code (rank 1 first; ``None`` while it runs)."""
        return [p.exitcode for p in self.processes]

    def results(self) -> list[Any]:
        """Each worker rank's result (rank 1 first; ``None`` for a rank that left none), once
        the ``with`` block ended."""
        return list(self._results)

    def _collect(self) -> None:
        self._results = []
        for rank in range(1, self.world_size):
            path = Path(self._folder or "") / f"rank{rank}.json"
            self._results.append(json.loads(path.read_text())["result"] if path.is_file() else None)

    def __exit__(self, *exc: object) -> None:
        self._close(wait=exc[0] is None)

    def _close(self, *, wait: bool) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        try:
            if self._context is not None and wait:
                deadline = time.monotonic() + self.join_timeout_s
                while not _check(self._context, 1, 0.1):
                    if time.monotonic() > deadline:
                        raise LaunchError(
                            f"worker ranks did not return within {self.join_timeout_s:g} s"
                        )
        finally:
            if self._context is not None:
                _stop(self._context)
            if self._folder is not None:
                self._collect()
                shutil.rmtree(self._folder, ignore_errors=True)
