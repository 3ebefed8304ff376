"""DeepSpeed ZeRO integration: configs from a placement, and our pool as DeepSpeed's pinned memory.

:func:`zero_config` turns a :class:`~apportion_offload.stepmodel.Placement` into a ZeRO-3
config: ``params=cpu|nvme`` -> ``offload_param``, ``optimizer=cpu|cxl|nvme`` ->
``offload_optimizer`` (ZeRO-Offload / ZeRO-Infinity), ``activations=cpu|cxl`` -> CPU activation
checkpointing; NVMe buffers are sized from the model's largest parameter (DeepSpeed refuses a
``buffer_size`` below it) and the ``aio`` block matches the swapper's alignment.

:class:`PoolPinnedMemory` implements DeepSpeed's host pinned-memory backend interface
(``pin``, ``pin_empty``, ``is_pinned``, ``unpin``: the slot ``DS_PIN_MEMORY_BACKEND=native``
selects) over a :class:`~apportion_offload.pool.PinnedPool`; :func:`pool_as_pinned_memory`
installs it, so every partition, gradient and optimizer buffer ZeRO pins comes from the
pool, under its cap and in its statistics.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from typing import Any

from apportion_offload.pool import PinnedPool
from apportion_offload.stepmodel import Placement


def zero_config(
    placement: Placement | str,
    *,
    largest_param_numel: int,
    nvme_path: str | None = None,
    micro_batch: int = 1,
    grad_accum: int = 1,
    precision: str = "fp32",
    pin_memory: bool = True,
    aio_block_bytes: int = 1 << 20,
    aio_queue_depth: int = 8,
    aio_threads: int = 4,
) -> dict[str, Any]:
    """A DeepSpeed ZeRO stage-3 config for ``placement`` (see the module docstring)."""
    p = Placement.parse(placement) if isinstance(placement, str) else placement
    if largest_param_numel < 1:
        raise ValueError(f"largest_param_numel must be positive, got {largest_param_numel}")
    if "nvme" in (p.params, p.optimizer) and not nvme_path:
        raise ValueError(
            f"placement {p} puts state on NVMe: pass nvme_path (a directory on the NVMe drive)"
        )
    if p.gradients == "nvme":
        raise ValueError(
            "DeepSpeed keeps gradients in host memory; use gradients=cpu with NVMe offload"
        )
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    zero: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "stage3_param_persistence_threshold": 0 if p.params != "gpu" else 100_000,
        "stage3_prefetch_bucket_size": min(50_000_000, 2 * largest_param_numel),
        "stage3_max_live_parameters": max(100_000_000, 2 * largest_param_numel),
        "sub_group_size": max(100_000_000, largest_param_numel),
    }
    # NVMe buffers must hold the largest parameter; align to the aio block (elements of 2 B)
    buffer = -(-largest_param_numel // aio_block_bytes) * aio_block_bytes
    if p.params != "gpu":
        zero["offload_param"] = {
            "device": "nvme" if p.params == "nvme" else "cpu",
            "pin_memory": pin_memory,
        }
        if p.params == "nvme":
            zero["offload_param"].update(
                nvme_path=nvme_path, buffer_count=5, buffer_size=buffer, max_in_cpu=0
            )
    if p.optimizer != "gpu":
        zero["offload_optimizer"] = {
            "device": "nvme" if p.optimizer == "nvme" else "cpu",
            "pin_memory": pin_memory,
        }
        if p.optimizer == "nvme":
            zero["offload_optimizer"].update(nvme_path=nvme_path, buffer_count=4, fast_init=False)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero,
        "gradient_clipping": 1.0,
        # a torch optimizer is accepted on offloaded states (DeepSpeedCPUAdam is faster but
        # needs a C++ build); pass DeepSpeedCPUAdam yourself where it is built
        "zero_force_ds_cpu_optimizer": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 12}
    if "nvme" in (p.params, p.optimizer):
        config["aio"] = {
            "block_size": aio_block_bytes,
            "queue_depth": aio_queue_depth,
            "intra_op_parallelism": aio_threads,
            "single_submit": False,
            "overlap_events": True,
        }
    if p.activations != "gpu":
        config["activation_checkpointing"] = {
            "partition_activations": True,
            "cpu_checkpointing": True,
            "contiguous_memory_optimization": False,
        }
    return config


class PoolPinnedMemory:
    """DeepSpeed's native pinned-memory interface over a :class:`PinnedPool`.

    A pinned tensor's storage is a window on a pool buffer; the buffer goes back to the pool
    on :meth:`unpin` or when the tensor and every view of it are gone.
    """

    def __init__(self, pool: PinnedPool):
        self.pool = pool
        self._ranges: dict[int, tuple[int, Any, Any]] = {}  # begin -> (end, buffer, finalizer)
        self.pinned_requests = 0

    def _new(self, dtype: Any, shape: Any) -> Any:
        import torch

        shape = tuple(int(d) for d in shape)
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            out = torch.empty(shape, dtype=dtype)
            out.ds_pinned = True
            return out
        buf = self.pool.acquire(nbytes)
        # The tensor's storage holds ``window`` until its last view is gone (a Python tensor
        # object can die while views of it live on, so it cannot carry the finalizer).
        window = buf.view(nbytes)
        out = torch.frombuffer(window, dtype=torch.uint8).view(dtype).view(shape)
        begin = out.data_ptr()
        fin = weakref.finalize(window, self._release, begin)
        del window
        self._ranges[begin] = (begin + nbytes, buf, fin)
        out.ds_pinned = True
        out.ds_pin_base = begin
        self.pinned_requests += 1
        return out

    def _release(self, begin: int) -> None:
        entry = self._ranges.pop(begin, None)
        if entry is not None:
            self.pool.give_back(entry[1])

    def pin(self, tensor: Any, make_copy: bool = True, match_shape: bool = True) -> Any:
        out = self._new(tensor.dtype, tensor.shape if match_shape else (tensor.numel(),))
        if make_copy:
            out.copy_(tensor.reshape(out.shape))
        return out

    def pin_empty(self, example: Any, shape: Any) -> Any:
        return self._new(example.dtype, shape)

    def is_pinned(self, tensor: Any) -> bool:
        if getattr(tensor, "ds_pinned", False):
            return True
        if tensor.device.type != "cpu":
            return False
        ptr = tensor.data_ptr()
        return any(begin <= ptr < end for begin, (end, _, _) in self._ranges.items())

    def unpin(self, tensor: Any) -> bool:
        begin = getattr(tensor, "ds_pin_base", None) or tensor.data_ptr()
        entry = self._ranges.get(begin)
        if entry is None:
            return False
        entry[2].detach()
        self._release(begin)
        if hasattr(tensor, "ds_pinned"):
            tensor.ds_pinned = False
        return True


@contextlib.contextmanager
def pool_as_pinned_memory(pool: PinnedPool) -> Iterator[PoolPinnedMemory]:
    """Route DeepSpeed's host pinning through ``pool`` inside the block."""
    import deepspeed.utils.pin_memory as ds_pins

    backend = PoolPinnedMemory(pool)
    saved_env, saved_pins = os.environ.get("DS_PIN_MEMORY_BACKEND"), ds_pins._shared_native_pins
    os.environ["DS_PIN_MEMORY_BACKEND"] = "native"
    ds_pins._shared_native_pins = backend
    try:
        yield backend
    finally:
        ds_pins._shared_native_pins = saved_pins
        if saved_env is None:
            os.environ.pop("DS_PIN_MEMORY_BACKEND", None)
        else:
            os.environ["DS_PIN_MEMORY_BACKEND"] = saved_env


def init_single_process(port: int = 29533) -> None:
    """Initialise torch.distributed for one process (gloo) the way DeepSpeed expects.

    DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce on start; with a single
    rank there is nothing to reduce, so that optional op is marked unavailable instead of
    spending minutes in a C++ build.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(port)),
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
    ):
        os.environ.setdefault(key, value)
    import deepspeed
    import deepspeed.ops

    if os.environ["WORLD_SIZE"] == "1":
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    deepspeed.init_distributed(dist_backend="gloo")
