"""The ``nvme`` allocator: direct-I/O (``O_DIRECT``) asynchronous swapping of host tensors to
NVMe files, in the manner of MemAscend.

:class:`NvmeSwapper` (:mod:`.allocator`) is the registered component: ``swap_out(key,
tensor)`` and ``swap_in(key)`` return futures; files are preallocated, written in aligned
blocks on a thread pool, xxh3-checksummed per block, ``fdatasync``-ed and renamed into place.
Its file format, and the validation a reader applies before trusting a file, is
:mod:`.fileformat`.
"""

from apportion_offload.nvme.allocator import NvmeSwapConfig, NvmeSwapper
from apportion_offload.nvme.fileformat import MAGIC, SUFFIX, VERSION, SwapHeader, read_header

__all__ = [
    "MAGIC",
    "SUFFIX",
    "VERSION",
    "NvmeSwapConfig",
    "NvmeSwapper",
    "SwapHeader",
    "read_header",
]
