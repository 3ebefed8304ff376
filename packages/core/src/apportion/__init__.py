"""apportion: a small plugin core for long-context LLM techniques.

Importing this package is cheap: it never imports torch. Plugins implement the hooks in
:mod:`apportion.hookspecs` and are found through the ``apportion`` entry-point group.
"""

from __future__ import annotations

import pluggy

__version__ = "0.2.0"

#: Version of the plugin-facing API (hook specs, registry, base classes). A plugin states the
#: range it supports as ``APPORTION_API = ">=1.0,<2"`` in its entry-point module.
API_VERSION = "2.0"

hookimpl = pluggy.HookimplMarker("apportion")

#: The six component kinds, in the order the CLI lists them.
KINDS: tuple[str, ...] = (
    "attention",
    "kv-policy",
    "allocator",
    "trainer-strategy",
    "prompt-strategy",
    "benchmark",
)

#: Run-config field -> the kind of component it names. The one map of it: config validation,
#: sweeps and the runner all read this.
FIELD_KINDS: dict[str, str] = {
    "attention": "attention",
    "kv_policy": "kv-policy",
    "prompt": "prompt-strategy",
    "allocator": "allocator",
}


def get_registry():  # noqa: ANN201 - re-exported lazily to keep import cheap
    """Return the process-wide :class:`~apportion.registry.Registry`, loading plugins once."""
    from apportion.plugins import get_registry as _get

    return _get()


__all__ = ["API_VERSION", "FIELD_KINDS", "KINDS", "__version__", "get_registry", "hookimpl"]
