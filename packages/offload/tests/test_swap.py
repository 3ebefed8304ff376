"""nvme: round trips, atomicity, checksums, refusal of foreign files, and a really full disk."""

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from apportion.testing.contracts import AllocatorContract
from apportion_offload.errors import (
    PoolCapacityError,
    SwapChecksumError,
    SwapFormatError,
    SwapSpaceError,
)
from apportion_offload.nvme import NvmeSwapConfig, NvmeSwapper
from apportion_offload.nvme.fileformat import MAGIC, PREFIX, SwapHeader


class TestNvmeContract(AllocatorContract):
    component = "nvme"


@pytest.fixture
def swapper(tmp_path):
    s = NvmeSwapper(
        NvmeSwapConfig(directory=str(tmp_path / "swap"), block_bytes=1 << 16, pin="none")
    )
    yield s
    s.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8])
def test_round_trip_staged(swapper, dtype):
    src = (torch.randn(37, 1001) * 100).to(dtype)  # not aligned in a pool: goes through staging
    swapper.swap_out("t", src).result()
    back = swapper.swap_in("t").result()
    assert back.dtype == dtype and back.shape == src.shape and torch.equal(back, src)
    assert back.data_ptr() % 4096 == 0
    swapper.free(back)


def test_round_trip_zero_copy_and_views(swapper):
    src = swapper.allocate((300, 700), torch.float32)
    src.normal_()
    swapper.swap_out("a", src).result()
    out = torch.empty(300, 700)
    swapper.swap_in("a", out=out).result()  # foreign destination: staged read
    assert torch.equal(out, src)
    swapper.swap_out("b", src.t()).result()  # non-contiguous source
    assert torch.equal(swapper.swap_in("b").result(), src.t().contiguous())
    swapper.swap_out("z", torch.empty(0, 5)).result()
    assert swapper.swap_in("z").result().shape == (0, 5)
    extra = swapper.stats().extra
    assert extra["zero_copy_out"] >= 1 and extra["zero_copy_in"] >= 1
    assert sorted(swapper.keys()) == ["a", "b", "z"]
    with pytest.raises(ValueError, match="out is"):
        swapper.swap_in("a", out=torch.empty(3))


def test_file_layout_is_aligned(swapper):
    swapper.swap_out("x", torch.arange(12345, dtype=torch.int32)).result()
    path = swapper.path("x")
    assert path.stat().st_size % 4096 == 0
    assert path.read_bytes()[:8] == MAGIC
    header = swapper.read_header(path)
    assert header.nbytes == 12345 * 4 and header.dtype == "int32"
    assert len(header.blocks) == 1


def test_corruption_is_caught(swapper):
    swapper.swap_out("c", torch.randn(200_000)).result()  # 800 KB: 13 blocks of 64 KiB
    path = swapper.path("c")
    data = bytearray(path.read_bytes())
    data[-5000] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(SwapChecksumError, match=r"block 12 .* fails its checksum"):
        swapper.swap_in("c").result()
    data[-5000] ^= 0x40
    data[40] ^= 0x01  # inside the header's JSON
    path.write_bytes(bytes(data))
    with pytest.raises(SwapChecksumError, match="header"):
        swapper.swap_in("c")
    assert (
        swapper.stats().extra["pool"]["live_bytes"] == 0
    )  # the failed reads gave their buffers back


def test_foreign_truncated_and_unaligned_files_are_refused(swapper):
    foreign = swapper.directory / "f.apswap"
    foreign.write_bytes(b"not a swap file at all" * 400)
    with pytest.raises(SwapFormatError, match="not an apportion swap file"):
        swapper.swap_in("f")
    swapper.swap_out("g", torch.randn(5000)).result()
    good = swapper.path("g").read_bytes()
    swapper.path("g").write_bytes(good[:-100])  # truncated and no longer aligned
    with pytest.raises(SwapFormatError, match="truncated, extended or unaligned"):
        swapper.swap_in("g")
    swapper.path("g").write_bytes(good + b"\0" * 4096)
    with pytest.raises(SwapFormatError, match="truncated, extended or unaligned"):
        swapper.swap_in("g")
    with pytest.raises(ValueError, match="swap key"):
        swapper.swap_out("../escape", torch.zeros(1))
    with pytest.raises(FileNotFoundError, match="no swap file"):
        swapper.swap_in("missing")


def _rewrite_header(path: Path, edit, version: int | None = None) -> None:
    """Give ``path`` a header whose checksum holds but whose content ``edit`` changed."""
    import json

    data = path.read_bytes()
    _, _, header_bytes, json_bytes, _ = PREFIX.unpack_from(data)
    meta = json.loads(data[PREFIX.size : PREFIX.size + json_bytes])
    edit(meta)
    header = bytearray(SwapHeader.encode(meta, 4096))
    if version is not None:
        header[8:12] = version.to_bytes(4, "little")
    path.write_bytes(bytes(header) + data[header_bytes:])


@pytest.mark.parametrize(
    ("edit", "version", "match"),
    [
        (lambda m: None, 2, "format version 2"),
        (lambda m: m.update(alignment=1000), None, "not aligned"),
        (lambda m: m.update(alignment=256, block_bytes=256), None, "not aligned"),
        (lambda m: m.pop("blocks"), None, "malformed header: field 'blocks'"),
        (lambda m: m.update(nbytes=8), None, "nbytes 8 does not match"),
        (lambda m: m.update(shape=[-4, 3]), None, "not a list of non-negative integers"),
        (lambda m: m.update(dtype="Tensor"), None, "unknown dtype 'Tensor'"),
        (lambda m: m.update(checksum="md5"), None, "unknown checksum"),
        (lambda m: m.update(blocks=["zz"]), None, "16 hex digits"),
    ],
)
def test_headers_that_checksum_but_lie_are_refused(swapper, edit, version, match):
    """A header from a foreign or buggy writer can pass its own checksum: every field the
    reader relies on is checked before a byte of data is read or a buffer allocated."""
    swapper.swap_out("h", torch.randn(3, 1000)).result()
    _rewrite_header(swapper.path("h"), edit, version)
    with pytest.raises(SwapFormatError, match=match):
        swapper.swap_in("h")
    assert swapper.stats().extra["pool"]["live_bytes"] == 0


def test_swap_in_over_the_pool_cap_is_an_error_not_an_oom(tmp_path):
    s = NvmeSwapper(
        NvmeSwapConfig(
            directory=str(tmp_path), block_bytes=1 << 16, pool_cap_bytes=1 << 20, pin="none"
        )
    )
    big = torch.randn(1 << 19)  # 2 MiB: swapped out through 64 KiB staging blocks, under the cap
    s.swap_out("big", big).result()
    with pytest.raises(PoolCapacityError, match="cap_bytes=1048576"):
        s.swap_in("big")  # its own buffer would cross the cap: refused in the caller
    out = torch.empty(1 << 19)
    assert torch.equal(s.swap_in("big", out=out).result(), big)  # a caller's buffer: staged
    with pytest.raises(PoolCapacityError):
        s.allocate((1 << 30,), torch.float32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        s.swap_out("x", [1.0, 2.0])
    assert s.keys() == ["big"]
    s.close()


def test_replacing_a_key_is_atomic(swapper):
    swapper.swap_out("k", torch.zeros(1000)).result()
    swapper.swap_out("k", torch.ones(1000)).result()
    assert torch.equal(swapper.swap_in("k").result(), torch.ones(1000))
    assert [p.name for p in swapper.directory.iterdir()] == ["k.apswap"]


def _mount_tiny_ext4(where: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        return False
    img = where.parent / "tiny.img"
    where.mkdir()
    subprocess.run(["truncate", "-s", "8M", str(img)], check=True)
    mk = subprocess.run(["mkfs.ext4", "-q", str(img)], capture_output=True)
    mount = subprocess.run(["mount", "-o", "loop", str(img), str(where)], capture_output=True)
    return mk.returncode == 0 and mount.returncode == 0


def test_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path):
    mnt = tmp_path / "mnt"
    if not _mount_tiny_ext4(mnt):
        pytest.skip("needs root and loop devices to mount a tiny file system")
    try:
        s = NvmeSwapper(NvmeSwapConfig(directory=str(mnt), block_bytes=1 << 20, pin="none"))
        s.swap_out("fits", torch.ones(1 << 19)).result()  # 2 MiB
        with pytest.raises(SwapSpaceError, match="no space left on the device.*'big'"):
            s.swap_out("big", torch.ones(4 << 20)).result()  # 16 MiB on a 6 MiB fs
        assert sorted(p.name for p in mnt.iterdir() if p.name != "lost+found") == ["fits.apswap"]
        assert torch.equal(s.swap_in("fits").result(), torch.ones(1 << 19))
        with pytest.raises(SwapSpaceError, match="'fits'"):  # replacing a key that no longer fits
            s.swap_out("fits", torch.full((4 << 20,), 2.0)).result()
        assert torch.equal(
            s.swap_in("fits").result(), torch.ones(1 << 19)
        )  # the old swap is intact
        assert sorted(p.name for p in mnt.iterdir() if p.name != "lost+found") == ["fits.apswap"]
        s.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_file_size_limit_is_a_clear_error(tmp_path):
    """RLIMIT_FSIZE is real for any user: the kernel refuses the preallocation (EFBIG; Python
    ignores SIGXFSZ). Lowered in-process for the duration of the test only."""
    import resource

    s = NvmeSwapper(NvmeSwapConfig(directory=str(tmp_path), pin="none"))
    saved = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, saved[1]))
    try:
        s.swap_out("small", torch.ones(1000)).result()
        with pytest.raises(SwapSpaceError, match=r"file size limit.*'big'") as info:
            s.swap_out("big", torch.ones(1 << 20)).result()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, saved)
    assert info.value.errno == errno.EFBIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.apswap"]
    s.close()


def test_temporaries_of_a_dead_writer_are_removed_on_open(tmp_path):
    """A swap-out killed mid-write leaves its hidden temporary file; the next swapper to open
    the directory removes it, and leaves a live writer's alone."""
    child = subprocess.Popen(["true"])
    child.wait()  # its pid now names a writer that is gone
    stale = tmp_path / f".k.apswap.tmp-{child.pid}-0123abcd"
    stale.write_bytes(b"\0" * 4096)
    live = tmp_path / f".j.apswap.tmp-{os.getpid()}-0123abcd"
    live.write_bytes(b"\0")
    s = NvmeSwapper(NvmeSwapConfig(directory=str(tmp_path), pin="none"))
    assert not stale.exists() and live.exists()
    s.close()
