"""nvme: the reliability fixes (large headers, readers racing writers, leaked files, full
disks, nested headers), each on real swap files in a real directory."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import xxhash
from apportion_offload.errors import SwapChecksumError, SwapFormatError, SwapSpaceError
from apportion_offload.hostmem import round_up
from apportion_offload.nvme import NvmeSwapConfig, NvmeSwapper, fileformat
from apportion_offload.nvme.fileformat import MAGIC, PREFIX, VERSION, read_header


def _swapper(directory: Path, **cfg) -> NvmeSwapper:
    cfg.setdefault("block_bytes", 1 << 16)
    cfg.setdefault("pin", "none")
    return NvmeSwapper(NvmeSwapConfig(directory=str(directory), **cfg))


def _on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# ---------------------------------------------------------------- 4. headers over 64 KiB


def test_header_over_64k_round_trips(tmp_path):
    """A header grows with the block count (19 bytes a block): 4,000 blocks of 4 KiB make a
    76 KB header, past the 64 KiB a reader used to look at."""
    s = _swapper(tmp_path, block_bytes=4096, fsync=False)
    src = torch.arange(4000 * 1024, dtype=torch.int32)  # 16 MB: 4,000 blocks of 4 KiB
    path = s.swap_out("big", src).result()
    header = read_header(path)
    assert header.header_bytes > fileformat.HEAD_READ and header.header_bytes % 4096 == 0
    assert len(header.blocks) == 4000
    back = s.swap_in("big").result()
    assert torch.equal(back, src)
    s.free(back)
    s.close()


def test_header_over_the_limit_is_refused_up_front(tmp_path):
    """A swap whose header would pass the reader's limit is refused before a byte is written,
    with a typed error naming the limit (a meta tensor: no memory is touched)."""
    s = _swapper(tmp_path, block_bytes=4096)
    huge = torch.empty(1 << 38, dtype=torch.uint8, device="meta")  # 64 M blocks of 4 KiB
    limit = fileformat.MAX_HEADER_BYTES
    with pytest.raises(SwapFormatError, match=f"limit of {limit} bytes.*block_bytes"):
        s.swap_out("huge", huge)
    assert list(tmp_path.iterdir()) == []
    s.close()


# ---------------------------------------------------------------- 5. readers racing writers


def test_swap_in_racing_swap_out_sees_one_whole_version(tmp_path):
    """Replacing a key is atomic for a reader too: a swap-in that starts while the key is
    being replaced reads the old version or the new one, whole, never a checksum error."""
    s = _swapper(tmp_path, block_bytes=1 << 16, fsync=False)
    n = 1 << 16  # 256 KiB of float32: 4 blocks, so a mixed read would fail a block checksum
    versions = [torch.full((n,), float(v)) for v in range(8)]
    s.swap_out("k", versions[0]).result()
    stop = threading.Event()
    writes = [0]
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set():
                i += 1
                s.swap_out("k", versions[i % len(versions)]).result()
                writes[0] += 1
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    reads = bad = 0
    deadline = time.monotonic() + 3.0
    try:
        while time.monotonic() < deadline:
            try:
                back = s.swap_in("k").result()
            except SwapChecksumError:
                bad += 1
                continue
            v = int(back[0])
            assert 0 <= v < len(versions) and torch.equal(back, versions[v])
            s.free(back)
            reads += 1
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert bad == 0, f"{bad} false checksum errors in {reads + bad} reads"
    assert reads > 20 and writes[0] > 20
    s.close()


# ---------------------------------------------------------------- 6. leaked files

_KILLED_WRITER = textwrap.dedent(
    """
    import sys, threading, torch
    from apportion_offload.nvme import NvmeSwapConfig, NvmeSwapper

    s = NvmeSwapper(NvmeSwapConfig(directory=sys.argv[1], block_bytes=1 << 16, pin="none"))
    hold = threading.Event()
    for _ in range(s.config.io_threads):  # keep the I/O threads busy: the swap stays mid-write
        s._io.submit(hold.wait)
    s.swap_out("big", torch.ones(64 << 20, dtype=torch.uint8))
    print("writing", flush=True)
    hold.wait()
    """
)


def test_kill_9_mid_write_leaves_nothing_after_the_next_open(tmp_path):
    s = _swapper(tmp_path)
    s.swap_out("keep", torch.ones(1000)).result()
    s.close()
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".big.apswap.tmp-")]
        assert temps and temps[0].stat().st_size >= 64 << 20  # preallocated, mid-write
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    s = _swapper(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.apswap"]
    assert s.reclaimed["temp_files"] == 1 and s.reclaimed["temp_bytes"] >= 64 << 20
    assert s.total_bytes() == _on_disk(tmp_path)
    assert torch.equal(s.swap_in("keep").result(), torch.ones(1000))
    s.close()


def test_orphan_payloads_are_reclaimed_and_reported(tmp_path):
    """A ``.apswap`` file without a valid header (truncated, foreign, a header that fails its
    checksum) left before the swapper opened is nothing it can ever read: reclaimed on open
    and reported; a valid swap and files that are not the swapper's are left alone."""
    s = _swapper(tmp_path)
    s.swap_out("good", torch.randn(5000)).result()
    s.swap_out("cut", torch.randn(5000)).result()
    s.close()
    cut = tmp_path / "cut.apswap"
    cut.write_bytes(cut.read_bytes()[:-4096])  # a payload whose header no longer matches
    (tmp_path / "blank.apswap").write_bytes(b"\0" * 8192)  # a data file with no header
    flipped = bytearray((tmp_path / "good.apswap").read_bytes())
    flipped[40] ^= 1
    (tmp_path / "flip.apswap").write_bytes(bytes(flipped))  # header fails its checksum
    (tmp_path / "notes.txt").write_text("not the swapper's")
    orphan_bytes = sum((tmp_path / f"{k}.apswap").stat().st_size for k in ("cut", "blank", "flip"))

    s = _swapper(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.apswap", "notes.txt"]
    assert sorted(s.reclaimed["orphans"]) == ["blank.apswap", "cut.apswap", "flip.apswap"]
    assert s.reclaimed["orphan_bytes"] == orphan_bytes
    assert s.stats().extra["reclaimed"]["orphan_bytes"] == orphan_bytes
    assert s.keys() == ["good"]
    s.close()


def test_total_bytes_counts_every_file_the_swapper_owns(tmp_path):
    """Swaps, in-flight temporaries and temporaries it cannot reclaim yet (a live writer's)
    are all on the disk, so all are in ``total_bytes()``; files that are not its own are not."""
    s = _swapper(tmp_path, block_bytes=1 << 16)
    s.swap_out("a", torch.randn(10_000)).result()
    live = tmp_path / f".x.apswap.tmp-{os.getpid()}-0123abcd"  # a live writer's: kept
    live.write_bytes(b"\0" * 12345)
    assert s.total_bytes() == _on_disk(tmp_path)
    hold = threading.Event()
    stalls = [s._io.submit(hold.wait) for _ in range(s.config.io_threads)]
    pending = s.swap_out("b", torch.randn(1 << 20))  # preallocated, waiting for the I/O threads
    try:
        assert any(p.name.startswith(".b.apswap.tmp-") for p in tmp_path.iterdir())
        assert s.total_bytes() == _on_disk(tmp_path) > (4 << 20)
    finally:
        hold.set()
    pending.result()
    assert all(f.result() for f in stalls)
    (tmp_path / "notes.txt").write_text("not the swapper's")
    assert s.total_bytes() == _on_disk(tmp_path) - len("not the swapper's")
    assert s.stats().extra["disk_bytes"] == s.total_bytes()
    s.close()


# ---------------------------------------------------------------- full disk


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    return done.returncode == 0


def test_full_disk_names_the_path_and_bytes_and_leaves_nothing(tmp_path):
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "1m"):
        pytest.skip("needs root to mount a 1 MiB tmpfs")
    try:
        s = _swapper(mnt, block_bytes=1 << 16)
        s.swap_out("fits", torch.ones(50_000)).result()  # 200 KB
        before = _on_disk(mnt)
        with pytest.raises(SwapSpaceError) as info:
            s.swap_out("big", torch.ones(1 << 19)).result()  # 2 MiB on a 1 MiB file system
        msg = str(info.value)
        need = 4096 + (2 << 20)  # header + data
        assert str(mnt / "big.apswap") in msg and f"{need} bytes" in msg
        assert sorted(p.name for p in mnt.iterdir()) == ["fits.apswap"]
        assert s.total_bytes() == _on_disk(mnt) == before
        assert torch.equal(s.swap_in("fits").result(), torch.ones(50_000))
        s.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---------------------------------------------------------------- nested JSON


def _crafted(path: Path, body: bytes, alignment: int = 4096) -> None:
    """A swap file whose header is ``body`` with a valid prefix and checksum."""
    size = round_up(PREFIX.size + len(body), alignment)
    prefix = PREFIX.pack(MAGIC, VERSION, size, len(body), xxhash.xxh3_64_intdigest(body))
    path.write_bytes((prefix + body).ljust(size, b"\0") + b"\0" * alignment)


@pytest.mark.parametrize("levels", [10_000, 40_000])  # 20 KB and 80 KB (past 64 KiB) headers
def test_deeply_nested_header_is_a_format_error(tmp_path, levels):
    _crafted(tmp_path / "deep.apswap", b"[" * levels + b"]" * levels)
    with pytest.raises(SwapFormatError, match="nested too deeply"):
        read_header(tmp_path / "deep.apswap")
    nested = b'{"key":"deep","x":' + b"[" * levels + b"]" * levels + b"}"
    _crafted(tmp_path / "deep.apswap", nested)
    with pytest.raises(SwapFormatError, match="nested too deeply"):
        read_header(tmp_path / "deep.apswap")
    s = _swapper(tmp_path)  # and on open it is an orphan: reclaimed, not a crash
    assert s.reclaimed["orphans"] == ["deep.apswap"]
    s.close()
