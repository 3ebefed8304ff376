"""pinned-pool: size classes, reuse, the hard cap, pinning and its recorded fallback."""

import pytest
import torch
from apportion.testing.contracts import AllocatorContract
from apportion_offload.errors import PoolCapacityError
from apportion_offload.pool import PinnedPool, PinnedPoolConfig, size_class


class TestPinnedPoolContract(AllocatorContract):
    component = "pinned-pool"


@pytest.mark.parametrize(
    "n", [1, 4095, 4096, 4097, 12345, 1 << 20, (1 << 20) + 1, 3 * (1 << 27) + 5]
)
@pytest.mark.parametrize("per", [1, 4, 8])
def test_size_class_bounds(n, per):
    c = size_class(n, 4096, per)
    assert c >= n and c % 4096 == 0
    if n > 4096:
        assert (c - n) / n < 1 / per + 4096 / n  # waste bounded by the class spacing


def test_buffers_are_page_aligned_and_reused():
    pool = PinnedPool(PinnedPoolConfig(cap_bytes=1 << 24, pin="none"))
    a = pool.allocate((1000, 7), torch.float32)
    assert a.data_ptr() % 4096 == 0
    ptr = a.data_ptr()
    pool.free(a)
    b = pool.allocate((990, 7), torch.float32)  # same size class: the cached buffer comes back
    assert b.data_ptr() == ptr
    extra = pool.stats().extra
    assert extra["hits"] == 1 and extra["misses"] == 1


def test_cap_is_enforced_without_touching_memory():
    pool = PinnedPool(PinnedPoolConfig(cap_bytes=1 << 20, pin="none"))
    with pytest.raises(PoolCapacityError, match="cap_bytes=1048576"):
        pool.allocate((1 << 40,), torch.float32)  # 4 TiB: refused, not an OOM
    keep = pool.allocate((600 * 1024,), torch.uint8)
    with pytest.raises(PoolCapacityError, match="live in 1 tensors"):
        pool.allocate((600 * 1024,), torch.uint8)
    pool.free(keep)
    again = pool.allocate((700 * 1024,), torch.uint8)  # cached buffer is trimmed to make room
    assert pool.stats().current_bytes <= 1 << 20
    pool.free(again)


def test_cached_buffers_are_released_under_the_cap():
    pool = PinnedPool(PinnedPoolConfig(cap_bytes=4 << 20, pin="none"))
    for size in (1 << 20, 3 << 19, 2 << 20, 3 << 20):
        t = pool.allocate((size,), torch.uint8)
        pool.free(t)
        assert pool.stats().current_bytes <= 4 << 20
    assert pool.stats().extra["trimmed_bytes"] > 0
    cached = pool.stats().extra["cached_bytes"]
    assert cached > 0 and pool.trim() == cached
    assert pool.stats().current_bytes == 0


def test_bad_input_is_named():
    pool = PinnedPool(PinnedPoolConfig(pin="none"))
    with pytest.raises(ValueError, match="non-negative"):
        pool.allocate((4, -1), torch.float32)
    with pytest.raises(TypeError, match="torch.dtype"):
        pool.allocate((4,), "float32")
    with pytest.raises(TypeError, match="shape"):
        pool.allocate(("a",), torch.float32)
    with pytest.raises(ValueError, match="did not allocate"):
        pool.free(torch.zeros(3))


def test_mlock_pins_or_records_why():
    pool = PinnedPool(PinnedPoolConfig(pin="mlock"))
    t = pool.allocate((1 << 16,), torch.uint8)
    extra = pool.stats().extra
    if extra["pinned_bytes"]:
        assert extra["pin_fallback"] is None and extra["pin_modes"] == {"mlock": 65536}
        assert _locked_kb() >= 64
    else:
        assert "mlock" in extra["pin_fallback"]
    pool.free(t)
    pool.close()


def test_mlock_refused_falls_back_to_pageable():
    """Under a tiny RLIMIT_MEMLOCK (and without CAP_IPC_LOCK) mlock fails for real."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import json, os, resource, torch
        from apportion_offload.pool import PinnedPool, PinnedPoolConfig
        pool = PinnedPool(PinnedPoolConfig(pin="auto"))
        warm = pool.allocate((1,), torch.uint8)  # import everything lazy before dropping root
        pool.free(warm)
        pool.close()
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
        if os.geteuid() == 0:  # root keeps CAP_IPC_LOCK; become nobody to lose it
            os.setgid(65534)
            os.setuid(65534)
        t = pool.allocate((1 << 20,), torch.uint8)
        t.fill_(7)
        assert int(t.sum()) == 7 << 20
        print(json.dumps(pool.stats().extra))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    extra = json.loads(proc.stdout.strip().splitlines()[-1])
    assert extra["pageable_bytes"] > 0 and extra["pinned_bytes"] == 0
    assert "mlock" in extra["pin_fallback"] and "RLIMIT_MEMLOCK" in extra["pin_fallback"]


def _locked_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    return 0


def test_plan_makes_exact_classes():
    pool = PinnedPool(PinnedPoolConfig(cap_bytes=1 << 26, pin="none"))
    n = 2 * 1024 * 2816  # a bf16 1024 x 2816 weight: 5.5 MiB, between regular classes
    assert pool.size_class_of(n) == size_class(n, 4096, 4) > n
    assert pool.plan([((1024, 2816), torch.bfloat16), 12345]) == [12288 + 4096, n]
    assert pool.size_class_of(n) == n and pool.size_class_of(n - 100) == n  # no rounding waste
    assert pool.size_class_of(n + 1) == size_class(n + 1, 4096, 4)  # others: regular classes
    t = pool.allocate((1024, 2816), torch.bfloat16)
    assert pool.buffer_of(t).nbytes == n and pool.stats().extra["planned_classes"] == 2
    with pytest.raises(TypeError, match="inventory entry"):
        pool.plan(["big"])
    with pytest.raises(ValueError, match="negative"):
        pool.plan([-1])


def test_footprint_follows_peak_need_not_every_size():
    """Sizes the workload moved on from are released (least recently freed first) instead of
    piling up under a loose cap; retain_headroom=None keeps the old caching-until-the-cap."""
    sizes = [(8 + 4 * i) << 20 for i in range(6)]  # a growing activation size per "step"
    peaks = {}
    for headroom in (0.0, None):
        pool = PinnedPool(PinnedPoolConfig(cap_bytes=1 << 30, pin="none", retain_headroom=headroom))
        for size in sizes:
            ts = [pool.allocate((size,), torch.uint8) for _ in range(2)]
            for t in ts:
                pool.free(t)
        s = pool.stats()
        peaks[headroom] = s.peak_bytes
        assert s.extra["peak_in_use_bytes"] == 2 * size_class(sizes[-1], 4096, 4)
    assert peaks[0.0] == 2 * size_class(sizes[-1], 4096, 4)  # what the largest step needed
    assert peaks[None] >= 2 * sum(size_class(s, 4096, 4) for s in sizes[-3:])


def test_reserve_pins_up_front_and_keeps_its_buffers():
    pool = PinnedPool(PinnedPoolConfig(cap_bytes=16 << 20, pin="none"))
    assert pool.reserve([(1 << 20) + 5] * 3) == 3 * ((1 << 20) + 4096)
    assert pool.stats().extra["cached_bytes"] == 3 * ((1 << 20) + 4096)
    for _ in range(3):  # other sizes come and go: the reserved buffers are not released for them
        pool.free(pool.allocate((3 << 20,), torch.uint8))
    ts = [pool.allocate(((1 << 20) + 5,), torch.uint8) for _ in range(3)]
    extra = pool.stats().extra
    assert extra["misses"] == 4 and extra["hits"] == 5 and extra["evictions"] == 0
    for t in ts:
        pool.free(t)
    with pytest.raises(PoolCapacityError, match="reserving 3 buffers"):
        pool.reserve([8 << 20] * 3)  # over the cap: refused before any memory is touched
    assert pool.stats().extra["misses"] == 4
    big = pool.allocate((15 << 20,), torch.uint8)  # the hard cap still releases reserved buffers
    assert pool.stats().current_bytes <= 16 << 20
    pool.free(big)
    pool.close()
