"""Writing stored data atomically, reclaiming what a crash left, and parsing outside data with
bounds. Torch-free.

Every file apportion stores (KV entries, swap files, pools, controllers, run records and
reports) is written through :func:`atomic_write`: the bytes go to a temporary file in the same
folder, are fsynced, and replace the target with one ``os.replace``, so a reader sees the old
file or the new one, whole. The temporary file's name carries the writer's pid
(``.NAME.tmp-PID-RANDOM``); :func:`reclaim_temps` removes those whose writer is gone, so a
kill -9 or a full disk leaves nothing behind for long.

JSON and TOML from outside (headers, manifests, configs) are parsed with
:func:`loads_json`, which bounds size and nesting and raises the caller's typed error.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary path beside ``path`` that :func:`reclaim_temps` recognises."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | str,
    *,
    fsync: bool = True,
    on_full: Callable[[OSError, int], BaseException] | None = None,
) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, ``os.replace``).

    On any failure the temporary file is removed. A full disk (``ENOSPC``/``EDQUOT``) is
    turned into ``on_full(exc, nbytes)`` when given (a store raises its ``StoreFullError``).
    """
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(raw)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if on_full is not None and isinstance(exc, OSError) and is_disk_full(exc):
            raise on_full(exc, len(raw)) from exc
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **kwargs: Any) -> None:
    """:func:`atomic_write` of ``obj`` as indented, key-sorted JSON."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", **kwargs)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def reclaim_temps(folder: str | os.PathLike[str], *, recursive: bool = False) -> tuple[int, int]:
    """Remove the temporary files of :func:`atomic_write` in ``folder`` whose writer process is
    gone. Returns (files removed, bytes freed). Call it under the folder's lock, on open."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0, 0
    files = folder.rglob(f".*{TEMP_MARK}*") if recursive else folder.glob(f".*{TEMP_MARK}*")
    removed = freed = 0
    for tmp in files:
        try:
            pid = int(tmp.name.rsplit(TEMP_MARK, 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if _pid_alive(pid):
            continue
        try:
            size = tmp.stat().st_size
            tmp.unlink()
        except FileNotFoundError:
            continue
        removed += 1
        freed += size
    return removed, freed


# ----------------------------------------------------------------------------- parsing


def depth(obj: Any) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), computed without recursion."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def loads_json(
    raw: bytes | str,
    *,
    what: str,
    error: Callable[[str], BaseException] = ValueError,
    max_bytes: int = 1 << 24,
    max_depth: int = 32,
) -> Any:
    """Parse outside JSON with bounds: at most ``max_bytes`` and ``max_depth`` levels of
    nesting. Any failure raises ``error(message)`` naming ``what``."""
    if len(raw) > max_bytes:
        raise error(f"{what}: {len(raw)} bytes of JSON exceed the limit of {max_bytes}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        obj = json.loads(text)
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply (more than {max_depth} levels)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{what}: not valid JSON ({exc})") from None
    if depth(obj) > max_depth:
        raise error(f"{what}: JSON nested too deeply (more than {max_depth} levels)")
    return obj
