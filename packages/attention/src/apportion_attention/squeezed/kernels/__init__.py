"""Kernels of Squeezed Attention's online stage, each as a Triton kernel and a torch reference.

==================  ===========================================  ==========================
step                Triton (``triton_kernels``)                  torch (``reference``)
==================  ===========================================  ==========================
centroid scoring    :func:`~.triton_kernels.centroid_scores`     :func:`~.reference.centroid_scores`
index compaction    :func:`~.triton_kernels.compact`             :func:`~.reference.compact`
sparse decode       :func:`~.triton_kernels.sparse_decode`       :func:`~.reference.sparse_decode`
==================  ===========================================  ==========================

Layout shared by all of them: one *row* per (batch, KV head); ``G`` query heads share a row
(GQA). ``q`` is (rows, G, d); keys/values are (rows, n, d); index lists are (rows, width)
int32 whose first ``counts[row]`` entries are valid (the rest is -1).

The Triton module is imported lazily (set ``TRITON_INTERPRET=1`` *before* importing it to
run the kernels on CPU tensors). :func:`dispatch` picks the implementation.
"""

from __future__ import annotations

import os
from types import ModuleType


def triton_usable(device_type: str) -> bool:
    """True if the Triton kernels can run on tensors of this device type here."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if device_type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def dispatch(kernels: str, device_type: str) -> ModuleType:
    """The module implementing the kernels: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton on
    CUDA, the torch path elsewhere). Asking for Triton where it cannot run is an error."""
    if kernels == "torch" or (kernels == "auto" and not triton_usable(device_type)):
        from apportion_attention.squeezed.kernels import reference

        return reference
    if kernels in ("triton", "auto"):
        if not triton_usable(device_type):
            raise RuntimeError(
                f"kernels='triton' needs CUDA tensors (got {device_type!r}) or TRITON_INTERPRET=1"
            )
        from apportion_attention.squeezed.kernels import triton_kernels

        return triton_kernels
    raise ValueError(f"kernels must be 'auto', 'torch' or 'triton', got {kernels!r}")
