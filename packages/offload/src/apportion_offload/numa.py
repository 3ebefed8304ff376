"""NUMA topology from sysfs, and page placement through ``mbind``/``move_pages`` (ctypes).

Far memory (CXL Type-3 expanders) shows up on Linux as NUMA nodes *without CPUs*; local
DRAM is the nodes with CPUs. libnuma is used when it is installed, else the raw syscalls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE = 0, 1, 2, 3
MPOL_MF_STRICT, MPOL_MF_MOVE = 1, 2
_SYSCALLS = {
    "x86_64": {"mbind": 237, "move_pages": 279},
    "aarch64": {"mbind": 235, "move_pages": 239},
}
SYSFS = Path("/sys/devices/system/node")


@dataclass(frozen=True)
class Node:
    id: int
    cpus: tuple[int, ...]
    mem_bytes: int
    distances: tuple[int, ...]  # to node 0, 1, ... (SLIT: 10 = local)

    @property
    def has_cpus(self) -> bool:
        return bool(self.cpus)


def _parse_list(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def topology(root: Path = SYSFS) -> list[Node]:
    """The machine's NUMA nodes; one node with every CPU where sysfs has none."""
    nodes = []
    for d in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cpus = _parse_list((d / "cpulist").read_text())
            mem = 0
            for line in (d / "meminfo").read_text().splitlines():
                if "MemTotal:" in line:
                    mem = int(line.split()[-2]) * 1024
            dist = tuple(int(x) for x in (d / "distance").read_text().split())
        except (OSError, ValueError):
            continue
        nodes.append(Node(int(d.name[4:]), cpus, mem, dist))
    if not nodes:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        nodes = [Node(0, tuple(range(os.cpu_count() or 1)), mem, (10,))]
    return nodes


class _Numa:
    def __init__(self) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        path = ctypes.util.find_library("numa")
        self.lib = None
        if path:
            try:
                self.lib = ctypes.CDLL(path, use_errno=True)
            except OSError:
                self.lib = None
        self.numbers = _SYSCALLS.get(platform.machine(), {})

    def call(self, name: str, *args: Any) -> int:
        if self.lib is not None and hasattr(self.lib, name):
            fn = getattr(self.lib, name)
            return fn(*args)
        if name not in self.numbers:
            raise OSError(f"no {name} on {platform.machine()} without libnuma")
        return self.libc.syscall(ctypes.c_long(self.numbers[name]), *args)

    @property
    def via(self) -> str:
        return "libnuma" if self.lib is not None else "syscall"


_numa: _Numa | None = None


def numa() -> _Numa:
    global _numa
    if _numa is None:
        _numa = _Numa()
    return _numa


def mbind(address: int, length: int, mode: int, nodes: list[int]) -> None:
    """Set the memory policy of ``[address, address + length)`` before its pages are touched."""
    maxnode = max(nodes) + 2 if nodes else 1
    words = (maxnode + 63) // 64
    mask = (ctypes.c_ulong * words)()
    for n in nodes:
        mask[n // 64] |= 1 << (n % 64)
    rc = numa().call(
        "mbind",
        ctypes.c_void_p(address),
        ctypes.c_ulong(length),
        ctypes.c_int(mode),
        mask,
        ctypes.c_ulong(maxnode),
        ctypes.c_uint(0),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mbind(mode={mode}, nodes={nodes}) failed: {os.strerror(err)}")


def page_nodes(address: int, length: int, page: int = 4096) -> list[int]:
    """The node each page of the range sits on (``move_pages`` query mode); negative entries
    are errnos (e.g. -ENOENT for a page not yet touched)."""
    count = -(-length // page)
    pages = (ctypes.c_void_p * count)(*[address + i * page for i in range(count)])
    status = (ctypes.c_int * count)()
    rc = numa().call(
        "move_pages", ctypes.c_int(0), ctypes.c_ulong(count), pages, None, status, ctypes.c_int(0)
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"move_pages query failed: {os.strerror(err)}")
    return list(status)
