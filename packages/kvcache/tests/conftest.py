"""Shared fixtures: real redis-servers on loopback and a real small filesystem."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytest_plugins = ["apportion.testing.fixtures"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """Start a real redis-server on a free loopback port: ``redis_server(*extra_args)`` returns
    its URL. Every server started is terminated at the end of the session."""
    from apportion_kvcache.errors import StoreUnavailableError
    from apportion_kvcache.store import RedisStore

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (Debian package redis-server)")
    procs: list[subprocess.Popen] = []

    def start(*extra: str) -> str:
        port = free_port()
        workdir = tmp_path_factory.mktemp("redis")
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            + ["--dir", str(workdir), *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.time() + 20
        while True:
            try:
                RedisStore(url, timeout=0.5).ping()
                return url
            except StoreUnavailableError:
                if time.time() > deadline or proc.poll() is not None:
                    proc.kill()
                    pytest.fail("redis-server did not start")
                time.sleep(0.1)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


class SmallFS:
    """A 2 MiB filesystem at ``path``: a real tmpfs where this process may mount one (root),
    else ENOSPC injected at ``os.write`` for files under ``path`` once they would hold more
    than ``capacity`` bytes (``mounted`` says which)."""

    capacity = 2 << 20

    def __init__(self, path: Path, mounted: bool, monkeypatch: pytest.MonkeyPatch):
        self.path = path
        self.mounted = mounted
        self._monkeypatch = monkeypatch

    def used(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def free(self) -> int:
        if self.mounted:
            st = os.statvfs(self.path)
            return st.f_bavail * st.f_frsize
        return self.capacity - self.used()

    def fill(self, leave: int) -> None:
        """Write a filler file so that about ``leave`` bytes stay free (whole pages)."""
        size = max(0, (self.free() - leave) // 4096 * 4096)
        with open(self.path / "filler", "ab") as f:
            f.write(b"\0" * size)

    def use_up_inodes(self) -> None:
        """Leave no room for one more file or folder (a full inode table: ``ENOSPC`` on
        create): the tmpfs is remounted with as many inodes as it uses; without a mount,
        ``ENOSPC`` is injected at ``os.open``/``os.mkdir`` creating anything under ``path``."""
        if self.mounted:
            st = os.statvfs(self.path)
            subprocess.run(
                ["mount", "-o", f"remount,nr_inodes={st.f_files - st.f_ffree}", str(self.path)],
                check=True,
                capture_output=True,
            )
            return
        root = str(self.path.resolve())
        real_open, real_mkdir = os.open, os.mkdir

        def new(path) -> bool:
            return str(Path(path).resolve()).startswith(root) and not os.path.exists(path)

        def open_(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and new(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real_open(path, flags, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            if new(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real_mkdir(path, *args, **kwargs)

        self._monkeypatch.setattr(os, "open", open_)
        self._monkeypatch.setattr(os, "mkdir", mkdir)

    def files(self) -> list[Path]:
        """What the store left there (the filler aside)."""
        return sorted(p for p in self.path.rglob("*") if p.is_file() and p.name != "filler")


@pytest.fixture
def small_fs(tmp_path, monkeypatch):
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = (
        os.geteuid() == 0
        and shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        == 0
    )
    fs = SmallFS(mnt, mounted, monkeypatch)
    if not mounted:
        real_write = os.write
        root = str(mnt.resolve())

        def write(fd: int, data) -> int:
            target = ""
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(root) and fs.used() + len(data) > fs.capacity:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
    try:
        yield fs
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
