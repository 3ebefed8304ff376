"""NVMe swapper bandwidth vs the raw disk (``dd`` with O_DIRECT), measured in the same run.

Each round writes and reads the same number of bytes three ways on the same file system,
interleaved so that load changes on a shared machine hit all alike:

- ``dd oflag=direct`` / ``dd iflag=direct`` (8 MiB blocks): the raw sequential bandwidth;
- the ``nvme`` swapper with its defaults (O_DIRECT, 8 MiB blocks, 4 in flight, xxh3 per
  block, preallocated temp file, fdatasync and atomic rename: durable, unlike dd);
- DeepSpeed's aio handle (``deepspeed.ops.aio``, libaio) where its op builds here.

Target: the swapper reaches >= 80% of dd's bandwidth both ways (median over rounds).

    uv run --no-sync python benchmarks/offload_swap.py [--mib 1024] [--rounds 3] [--dir /tmp]
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


def deepspeed_aio(nbytes: int):
    """(handle, locked buffer) or (None, reason)."""
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import torch
        from deepspeed.ops.op_builder import AsyncIOBuilder

        builder = AsyncIOBuilder()
        if not builder.is_compatible(verbose=False):
            return None, "AsyncIOBuilder is not compatible here (libaio-dev missing?)"
        aio = builder.load(verbose=False)
        handle = aio.aio_handle(block_size=8 << 20, queue_depth=8, single_submit=False,
                                overlap_events=True, intra_op_parallelism=4)
        buf = handle.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))
        return (handle, buf), None
    except Exception as exc:  # reported in the output, not fatal
        return None, f"{type(exc).__name__}: {exc}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--no-deepspeed", action="store_true")
    args = ap.parse_args()
    import torch
    from apportion_offload.swap import NvmeSwapConfig, NvmeSwapper

    nbytes = args.mib << 20
    work = Path(tempfile.mkdtemp(prefix="apportion-swapbench-", dir=args.dir))
    swapper = NvmeSwapper(NvmeSwapConfig(directory=str(work / "swap"), pool_cap_bytes=2 * nbytes + (64 << 20)))
    src = swapper.allocate((nbytes,), torch.uint8)
    src.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    dst = swapper.allocate((nbytes,), torch.uint8)
    ds, ds_reason = (None, "skipped (--no-deepspeed)") if args.no_deepspeed else deepspeed_aio(nbytes)
    if ds is not None:
        ds[1].copy_(src)
    raw = work / "dd.bin"
    count = nbytes // (8 << 20)
    rows = []
    try:
        for r in range(args.rounds):
            row: dict = {"round": r, "bytes": nbytes}
            row["dd_write_gbps"] = dd(["if=/dev/zero", f"of={raw}", "bs=8M", f"count={count}", "oflag=direct"]) / 1e9
            t0 = time.perf_counter()
            swapper.swap_out("bench", src).result()
            row["ours_write_gbps"] = nbytes / (time.perf_counter() - t0) / 1e9
            if ds is not None:
                t0 = time.perf_counter()
                ds[0].sync_pwrite(ds[1], str(work / "ds.bin"))
                row["deepspeed_write_gbps"] = nbytes / (time.perf_counter() - t0) / 1e9
            row["dd_read_gbps"] = dd([f"if={raw}", "of=/dev/null", "bs=8M", "iflag=direct"]) / 1e9
            t0 = time.perf_counter()
            swapper.swap_in("bench", out=dst).result()
            row["ours_read_gbps"] = nbytes / (time.perf_counter() - t0) / 1e9
            if ds is not None:
                t0 = time.perf_counter()
                ds[0].sync_pread(ds[1], str(work / "ds.bin"))
                row["deepspeed_read_gbps"] = nbytes / (time.perf_counter() - t0) / 1e9
            if r == 0 and not torch.equal(src, dst):
                raise SystemExit("swap-in returned different bytes")
            row["write_ratio"] = row["ours_write_gbps"] / row["dd_write_gbps"]
            row["read_ratio"] = row["ours_read_gbps"] / row["dd_read_gbps"]
            row = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            rows.append(row)
            print(json.dumps(row))
            for f in (raw, work / "ds.bin"):
                f.unlink(missing_ok=True)
    finally:
        swapper.close()
        shutil.rmtree(work, ignore_errors=True)
    med = {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0] if k.endswith(("gbps", "ratio"))}
    summary = {"summary": True, "benchmark": "offload_swap", "bytes": nbytes, "rounds": len(rows),
               "direct_io": True, **{f"median_{k}": v for k, v in med.items()},
               "deepspeed_aio": "measured" if ds is not None else ds_reason,
               "target": {"median_write_ratio": ">= 0.8", "median_read_ratio": ">= 0.8"},
               "met": med["write_ratio"] >= 0.8 and med["read_ratio"] >= 0.8}
    if ds is not None:
        summary["ours_over_deepspeed_write"] = round(med["ours_write_gbps"] / med["deepspeed_write_gbps"], 4)
        summary["ours_over_deepspeed_read"] = round(med["ours_read_gbps"] / med["deepspeed_read_gbps"], 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
