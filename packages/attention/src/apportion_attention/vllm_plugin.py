"""vLLM entry point of apportion-attention (``vllm.general_plugins``): registers the
``squeezed`` backend in vLLM's attention-backend registry.

vLLM calls :func:`register` in each of its processes. It always adds the backend under the
name ``APPORTION_SQUEEZED`` (``register_backend("APPORTION_SQUEEZED", ...)``). Selecting it:

- ``APPORTION_VLLM_ATTENTION=squeezed`` in the environment of the process that starts vLLM
  (its engine and worker processes inherit it): on vLLM's CPU platform the plugin also
  registers the backend as the override of ``CPU_ATTN``. This is needed because the CPU
  platform ignores any requested backend (``vllm/platforms/cpu.py``,
  ``get_attn_backend_cls``: ``if selected_backend and selected_backend !=
  AttentionBackendEnum.CPU_ATTN: logger.info("Cannot use %s backend on CPU.", ...)`` and it
  returns ``CPU_ATTN.get_path()``, which honours registry overrides).
- ``APPORTION_VLLM_SQUEEZED='{"budget": 0.1, ...}'``: the backend's
  :class:`~apportion_attention.squeezed.SqueezedConfig` as JSON (validated; defaults otherwise).

The backend itself (:mod:`apportion_attention.vllm_backend`) extends vLLM's CPU attention
backend, so it runs where vLLM runs on a CPU; on other platforms the variable is refused
with a logged reason and vLLM keeps its own backend. Importing this module imports neither
vLLM nor torch (the package's ``__init__`` has no side effects); :func:`register` imports
vLLM's registry, and vLLM imports the backend module when it builds the layers.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("apportion_attention.vllm")

NAME = "APPORTION_SQUEEZED"
PATH = "apportion_attention.vllm_backend.SqueezedBackend"
ENV_SELECT = "APPORTION_VLLM_ATTENTION"
ENV_CONFIG = "APPORTION_VLLM_SQUEEZED"


def register() -> None:
    """Add ``APPORTION_SQUEEZED`` to vLLM's registry; with ``APPORTION_VLLM_ATTENTION=squeezed``
    on a CPU platform, also make it the platform's attention backend. Safe to call twice."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if NAME not in AttentionBackendEnum.__members__:
        register_backend(NAME, PATH)
    choice = os.environ.get(ENV_SELECT, "").strip().lower()
    if not choice:
        return
    if choice != "squeezed":
        raise ValueError(
            f"{ENV_SELECT}={choice!r}: the only apportion attention backend for vLLM is 'squeezed'"
        )
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        log.warning(
            "%s=squeezed: the squeezed vLLM backend extends vLLM's CPU backend and this is a %s "
            "platform; vLLM keeps its own attention backend",
            ENV_SELECT,
            current_platform.device_type,
        )
        return
    register_backend(AttentionBackendEnum.CPU_ATTN, PATH)
