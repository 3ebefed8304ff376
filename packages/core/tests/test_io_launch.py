"""The shared primitives: atomic writes and what crashes leave, bounded JSON, the rank launcher."""

import os
import subprocess
import sys
import time

import pytest
from apportion.errors import LaunchError
from apportion.host import io


def test_atomic_write_replaces_whole_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    io.atomic_write(target, b"old")
    io.atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left

    class Full(Exception):
        pass

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    real = os.write
    os.write = disk_full
    try:
        with pytest.raises(Full):
            io.atomic_write(target, b"x" * 10, on_full=lambda exc, n: Full(f"need {n}"))
    finally:
        os.write = real
    assert target.read_bytes() == b"new contents"  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_reclaim_removes_only_the_temps_of_dead_writers(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    orphan = tmp_path / f".entry.bin{io.TEMP_MARK}{dead}-abcd"
    orphan.write_bytes(b"x" * 1000)
    live = io.temp_path(tmp_path / "other.bin")
    live.write_bytes(b"y" * 10)
    (tmp_path / "kept.bin").write_bytes(b"z")
    assert io.reclaim_temps(tmp_path) == (1, 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "kept.bin"])


def test_loads_json_bounds_depth_and_size():
    class Bad(Exception):
        pass

    assert io.loads_json(b'{"a": [1, 2]}', what="header", error=Bad) == {"a": [1, 2]}
    for raw in (b"[" * 100000 + b"]" * 100000, b"[" * 40 + b"]" * 40):
        with pytest.raises(Bad, match="header: JSON nested too deeply"):
            io.loads_json(raw, what="header", error=Bad)
    with pytest.raises(Bad, match="not valid JSON"):
        io.loads_json(b"\xff\xfe", what="header", error=Bad)
    with pytest.raises(Bad, match="exceed the limit"):
        io.loads_json(b"1" * 100, what="header", error=Bad, max_bytes=10)


WORKERS = """
import os


def allsum(rank, world, payload, timeout_s):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank + payload["add"])])
    dist.all_reduce(t)
    return {"rank": rank, "sum": float(t)}


def die(rank, world, payload, timeout_s):
    if rank == 1:
        os._exit(17)
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.ones(1))


def raises(rank, world, payload, timeout_s):
    if rank == 1:
        raise ValueError("bad payload")


def echo(rank, world, payload, timeout_s):
    import torch
    import torch.distributed as dist

    t = torch.zeros(1)
    dist.recv(t, src=0)
    dist.send(t * 2, dst=0)
    return float(t)
"""


@pytest.fixture
def workers(tmp_path, monkeypatch):
    (tmp_path / "launch_workers.py").write_text(WORKERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_run_ranks_returns_every_result(workers):
    from apportion.host.launch import run_ranks

    out = run_ranks("launch_workers:allsum", {"add": 1}, world_size=2, timeout_s=60)
    assert out == [{"rank": 0, "sum": 3.0}, {"rank": 1, "sum": 3.0}]


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("launch_workers:die", r"rank 1 died \(exit code 17\)"),
        ("launch_workers:raises", "rank 1 failed: ValueError: bad payload"),
    ],
)
def test_a_failed_rank_is_named_quickly(workers, target, match):
    from apportion.host.launch import run_ranks

    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=match):
        run_ranks(target, {}, world_size=2, timeout_s=60)
    assert time.monotonic() - t0 < 45  # not the collective's 60 s timeout


def test_rank_group_keeps_this_process_as_rank_zero(workers):
    import torch
    import torch.distributed as dist
    from apportion.host.launch import RankGroup

    with RankGroup("launch_workers:echo", {}, world_size=2, timeout_s=60) as group:
        dist.send(torch.tensor([3.0]), dst=1)
        back = torch.zeros(1)
        dist.recv(back, src=1)
    assert float(back) == 6.0 and group.results() == [3.0]
    assert not dist.is_initialized()


def test_bad_target_is_refused():
    from apportion.host.launch import run_ranks

    with pytest.raises(LaunchError, match="module:function"):
        run_ranks("no_colon", {}, world_size=1)
    with pytest.raises(LaunchError, match="world_size"):
        run_ranks("a:b", {}, world_size=0)
