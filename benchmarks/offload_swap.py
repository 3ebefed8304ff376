"""NVMe swapper bandwidth vs the raw disk (``dd`` and ``fio`` with O_DIRECT) and DeepSpeed's aio.

Each round writes and reads the same number of bytes, from and to page-locked buffers, on the
same file system, interleaved so that load changes on a shared machine hit all alike (and
each round starts with a different method, so none is always first or last):

- ``dd oflag=direct`` / ``dd iflag=direct`` (8 MiB blocks, one in flight): raw sequential
  bandwidth, the baseline the target is stated against;
- ``fio`` (libaio, O_DIRECT, 8 MiB blocks, 8 in flight, random buffer contents): what the
  disk gives to a queue of requests;
- the ``nvme`` swapper with its defaults (O_DIRECT, 8 MiB blocks, 4 in flight, xxh3 per
  block, preallocated temp file, fdatasync and atomic rename: durable, unlike the others),
  and the same without ``fdatasync`` (``ours_nosync``), to show what durability costs;
- DeepSpeed's aio handle (``deepspeed.ops.aio``, libaio; ``sync_pwrite``/``sync_pread`` of a
  locked tensor, 8 MiB blocks, queue depth 8 on each of 4 threads: up to 32 in flight) where
  its op builds here; else the summary names why not. No checksums, no fsync, no atomic
  rename. ``--io-threads 32`` gives the swapper as many blocks in flight.

Target: the swapper reaches >= 80% of dd's bandwidth both ways (median over rounds).
DeepSpeed's op is JIT-built on first use (libaio-dev needed; about half an hour on 2 cores).

    uv run --no-sync python benchmarks/offload_swap.py --mib 1024 --rounds 5 --dir /tmp

(``--io-threads N`` sets the swapper's blocks in flight.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def dd(args: list[str]) -> float:
    """Bytes per second that dd reports."""
    proc = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    m = re.search(r"^(\d+) bytes .* copied, ([\d.]+) s", proc.stderr, re.M)
    if not m:
        raise RuntimeError(f"cannot read dd's report: {proc.stderr}")
    return int(m.group(1)) / float(m.group(2))


def fio(path: Path, rw: str, nbytes: int) -> float:
    """Bytes per second that fio reports for one sequential O_DIRECT pass over ``path``."""
    proc = subprocess.run(
        [
            "fio",
            "--name=bench",
            f"--filename={path}",
            f"--rw={rw}",
            "--bs=8M",
            f"--size={nbytes}",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=8",
            "--numjobs=1",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
    return float(job["read" if rw == "read" else "write"]["bw_bytes"])


def deepspeed_aio(nbytes: int):
    """((handle, write buffer, read buffer), None) or (None, reason)."""
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import torch
        from deepspeed.ops.op_builder import AsyncIOBuilder

        builder = AsyncIOBuilder()
        if not builder.is_compatible(verbose=False):
            return None, "AsyncIOBuilder is not compatible here (libaio-dev missing?)"
        aio = builder.load(verbose=False)
        handle = aio.aio_handle(
            block_size=8 << 20,
            queue_depth=8,
            single_submit=False,
            overlap_events=True,
            intra_op_parallelism=4,
        )
        example = torch.empty(0, dtype=torch.uint8)
        return (
            handle,
            handle.new_cpu_locked_tensor(nbytes, example),
            handle.new_cpu_locked_tensor(nbytes, example),
        ), None
    except Exception as exc:  # reported in the output, not fatal
        return None, f"{type(exc).__name__}: {exc}"


def _order(item: tuple) -> tuple:
    """Rows read alike whatever order a round ran in: round, bytes, then writes, reads, ratios."""
    k = item[0]
    return (
        ("round", "bytes").index(k) if k in ("round", "bytes") else 2,
        "ratio" in k,
        "_read_" in k,
        k,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument(
        "--io-threads",
        type=int,
        default=None,
        help="the swapper's blocks in flight (default: its own)",
    )
    ap.add_argument("--no-deepspeed", action="store_true")
    args = ap.parse_args()
    import torch
    from apportion_offload.nvme import NvmeSwapConfig, NvmeSwapper

    nbytes = args.mib << 20
    work = Path(tempfile.mkdtemp(prefix="apportion-swapbench-", dir=args.dir))
    threads = {} if args.io_threads is None else {"io_threads": args.io_threads}
    swapper = NvmeSwapper(
        NvmeSwapConfig(
            directory=str(work / "swap"), pool_cap_bytes=2 * nbytes + (64 << 20), **threads
        )
    )
    src = swapper.allocate((nbytes,), torch.uint8)
    src.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    dst = swapper.allocate((nbytes,), torch.uint8)
    ds, ds_reason = (
        (None, "skipped (--no-deepspeed)") if args.no_deepspeed else deepspeed_aio(nbytes)
    )
    if ds is not None:
        ds[1].copy_(src)
    raw = work / "dd.bin"
    count = nbytes // (8 << 20)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return nbytes / (time.perf_counter() - t0)

    def ours_nosync() -> float:
        swapper.config.fsync = False  # the same swapper and source buffer, without fdatasync
        try:
            return timed(lambda: swapper.swap_out("nosync", src).result())
        finally:
            swapper.config.fsync = True

    writers = {
        "dd": lambda: dd(["if=/dev/zero", f"of={raw}", "bs=8M", f"count={count}", "oflag=direct"]),
        "fio": lambda: fio(work / "fio.bin", "write", nbytes),
        "ours": lambda: timed(lambda: swapper.swap_out("bench", src).result()),
        "ours_nosync": ours_nosync,
    }
    readers = {
        "dd": lambda: dd([f"if={raw}", "of=/dev/null", "bs=8M", "iflag=direct"]),
        "fio": lambda: fio(work / "fio.bin", "read", nbytes),
        "ours": lambda: timed(lambda: swapper.swap_in("bench", out=dst).result()),
    }
    if ds is not None:
        writers["deepspeed"] = lambda: timed(lambda: ds[0].sync_pwrite(ds[1], str(work / "ds.bin")))
        readers["deepspeed"] = lambda: timed(lambda: ds[0].sync_pread(ds[2], str(work / "ds.bin")))
    rows = []
    try:
        for r in range(args.rounds):
            row: dict = {"round": r, "bytes": nbytes}
            # Each round starts with a different method, so that whichever runs first or last
            # (the file written last is the warmest in the host's caches) is not always the same.
            for way, methods in (("write", writers), ("read", readers)):
                names = list(methods)
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    row[f"{name}_{way}_gbps"] = methods[name]() / 1e9
            if r == 0 and not torch.equal(src, dst):
                raise SystemExit("swap-in returned different bytes")
            if r == 0 and ds is not None and not torch.equal(ds[1], ds[2]):
                raise SystemExit("DeepSpeed's aio read back different bytes")
            for way in ("write", "read"):
                row[f"{way}_ratio"] = row[f"ours_{way}_gbps"] / row[f"dd_{way}_gbps"]
                row[f"{way}_ratio_fio"] = row[f"ours_{way}_gbps"] / row[f"fio_{way}_gbps"]
                if ds is not None:
                    row[f"{way}_ratio_deepspeed"] = (
                        row[f"ours_{way}_gbps"] / row[f"deepspeed_{way}_gbps"]
                    )
            row["write_ratio_nosync"] = row["ours_nosync_write_gbps"] / row["dd_write_gbps"]
            if ds is not None:  # like for like: neither makes the data durable
                row["write_ratio_nosync_deepspeed"] = (
                    row["ours_nosync_write_gbps"] / row["deepspeed_write_gbps"]
                )
            row = {
                k: round(v, 4) if isinstance(v, float) else v
                for k, v in sorted(row.items(), key=_order)
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            for f in (raw, work / "fio.bin", work / "ds.bin", swapper.path("nosync")):
                f.unlink(
                    missing_ok=True
                )  # at the round's end: no file system work during the reads
    finally:
        swapper.close()
        shutil.rmtree(work, ignore_errors=True)
    med = {
        k: round(statistics.median(r[k] for r in rows), 4)
        for k in rows[0]
        if k.endswith("gbps") or "ratio" in k
    }
    summary = {
        "summary": True,
        "benchmark": "offload_swap",
        "bytes": nbytes,
        "rounds": len(rows),
        "direct_io": swapper.direct,
        "io_threads": swapper.config.io_threads,
        **{f"median_{k}": v for k, v in med.items()},
        "deepspeed_aio": "measured" if ds is not None else ds_reason,
        "target": {"median_write_ratio": ">= 0.8", "median_read_ratio": ">= 0.8"},
        "met": med["write_ratio"] >= 0.8 and med["read_ratio"] >= 0.8,
    }
    if ds is not None:
        for way in ("write", "read"):
            summary[f"deepspeed_over_fio_{way}"] = round(
                med[f"deepspeed_{way}_gbps"] / med[f"fio_{way}_gbps"], 4
            )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
