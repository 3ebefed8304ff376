"""Our swap files through DeepSpeed's aio (libaio, O_DIRECT), both ways: proof that the data
region sits at offsets and lengths any O_DIRECT reader or writer accepts.

Runs only where DeepSpeed's ``async_io`` op is already built (a wheel built with it, or a JIT
build in torch's extension cache from the same torch). Building it takes about half an hour on
two cores, so a test never does: it skips and says how to build it.
"""

import ctypes
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
from apportion_offload.errors import SwapChecksumError
from apportion_offload.hostmem import round_up
from apportion_offload.nvme import NvmeSwapConfig, NvmeSwapper

BUILD_HINT = (
    "build it once with: DS_ACCELERATOR=cpu uv run --no-sync python -c "
    '"from deepspeed.ops.op_builder import AsyncIOBuilder; AsyncIOBuilder().load()" '
    "(needs libaio-dev)"
)


def built_async_io():
    """DeepSpeed's async_io module without compiling anything, or a skip naming why not."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except Exception as exc:  # an absent or broken DeepSpeed is a reason to skip, named
        pytest.skip(f"DeepSpeed does not import: {type(exc).__name__}: {exc}")
    if installed_ops.get("async_io"):
        return AsyncIOBuilder().load(verbose=False)  # prebuilt in the wheel: nothing to compile
    # Loading a JIT build through the builder re-runs ninja, which rebuilds from scratch when
    # this environment's include paths (a nox venv) or ninja differ from the ones that built
    # it: load the libraries themselves, once sure they were built against this very torch.
    # The pin manager lives in pin_memory.so, which async_io.so resolves globally (as
    # DeepSpeed's own AsyncIOBuilder.load arranges).
    ctypes.CDLL(str(_jit_built("pin_memory")), mode=ctypes.RTLD_GLOBAL)
    so = _jit_built("async_io")
    spec = importlib.util.spec_from_file_location("async_io", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jit_built(name: str) -> Path:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        so = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
    except Exception as exc:
        pytest.skip(f"cannot locate torch's extension cache: {exc}")
    if not so.exists():
        pytest.skip(f"DeepSpeed's {name} op is not built ({so} is missing); {BUILD_HINT}")
    ninja = (so.parent / "build.ninja").read_text()
    include = re.search(r"-isystem (\S+)/torch/include\s", ninja)
    version_file = Path(include.group(1)) / "torch" / "version.py" if include else None
    built_for = None
    if version_file is not None and version_file.exists():
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_file.read_text())
        built_for = m.group(1) if m else None
    if built_for != torch.__version__:
        pytest.skip(
            f"the {name} op in {so.parent} was built for torch {built_for}, "
            f"not {torch.__version__}; {BUILD_HINT}"
        )
    return so


def test_deepspeed_aio_reads_and_writes_our_swap_files(tmp_path):
    aio = built_async_io()
    swapper = NvmeSwapper(NvmeSwapConfig(directory=str(tmp_path), block_bytes=1 << 16, pin="none"))
    src = torch.randn(1000, 301)  # 1,204,000 bytes: not a multiple of the alignment
    swapper.swap_out("w", src).result()
    path = swapper.path("w")
    header = swapper.read_header(path)
    nbytes = header.nbytes
    padded = round_up(nbytes, header.alignment)
    handle = aio.aio_handle(
        block_size=1 << 16,
        queue_depth=4,
        single_submit=False,
        overlap_events=False,
        intra_op_parallelism=1,
    )
    buf = handle.new_cpu_locked_tensor(padded, torch.empty(0, dtype=torch.uint8))
    try:
        # DeepSpeed reads our data region with O_DIRECT at the header's (aligned) length.
        assert handle.sync_pread(buf, str(path), header.header_bytes) >= 1
        assert torch.equal(buf[:nbytes], src.reshape(-1).view(torch.uint8))
        assert not buf[nbytes:].any()  # the padding is zeros
        # And writes it: wipe our data region, let DeepSpeed write it back in place (it opens
        # without O_TRUNC), and our reader's per-block checksums accept the result.
        with open(path, "r+b") as f:
            f.seek(header.header_bytes)
            f.write(b"\0" * padded)
        with pytest.raises(SwapChecksumError):
            swapper.swap_in("w").result()
        assert handle.sync_pwrite(buf, str(path), header.header_bytes) >= 1
        assert path.stat().st_size == header.header_bytes + padded
        assert torch.equal(swapper.swap_in("w").result(), src)
    finally:
        handle.free_cpu_locked_tensor(buf)
        swapper.close()
