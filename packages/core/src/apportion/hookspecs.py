"""Hook specifications: the whole contract between the core and its plugins.

A plugin is a module listed in the ``apportion`` entry-point group, by convention
``apportion_<family>.plugin``. It implements any of these hooks with
:data:`apportion.hookimpl` and may declare the core API range it supports::

    # apportion_myplugin/plugin.py
    from apportion import hookimpl

    APPORTION_API = ">=2.0,<3"


    @hookimpl
    def apportion_register_kv_policies(register):
        register("apportion_myplugin.my_policy:MyPolicy", name="my-policy")

The class carries the rest (``summary``, ``Config``, ``incompatible_with``: see
:class:`apportion.base.Component`); it is imported only when the component is used.

Registration hooks are called once per process, each plugin in isolation: a hook that
raises is reported by ``apportion plugins`` and skipped (fatal under
``APPORTION_STRICT_PLUGINS=1``); a name another plugin registered first is reported against
the second plugin, for that name only. Keep the entry-point module tiny: pass import paths
as strings so that listing plugins never imports torch, and register nothing into a host
(transformers, vLLM) at import: that is an explicit call the host makes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from apportion.registry import Register

hookspec = pluggy.HookspecMarker("apportion")


# --------------------------------------------------------------------------- registration
# Each registration hook receives ``register(component, *, name=None, replace=False)``
# (:class:`apportion.registry.Register`): ``component`` is the class or ``"module:Class"``.


@hookspec
def apportion_register_attention(register: Register) -> None:
    """Register attention backends (kind ``attention``): subclasses of
    :class:`apportion.host.attention.AttentionBackend`."""


@hookspec
def apportion_register_kv_policies(register: Register) -> None:
    """Register KV-cache policies (kind ``kv-policy``): subclasses of
    :class:`apportion.host.kv.KVPolicy`."""


@hookspec
def apportion_register_allocators(register: Register) -> None:
    """Register memory allocators (kind ``allocator``): subclasses of
    :class:`apportion.base.Allocator`."""


@hookspec
def apportion_register_trainer_strategies(register: Register) -> None:
    """Register RL trainer strategies (kind ``trainer-strategy``): subclasses of
    :class:`apportion.base.TrainerStrategy`."""


@hookspec
def apportion_register_prompt_strategies(register: Register) -> None:
    """Register prompt strategies (kind ``prompt-strategy``): subclasses of
    :class:`apportion.base.PromptStrategy`.

    A strategy returns chat messages (:class:`apportion.base.Prompt`); it may hand the host
    part of the prompt as input embeddings instead of text (``Prompt.embeds``: a placeholder
    in the messages and an ``(n, hidden)`` tensor the host reads in its place during the
    prefill), as learned context compressors do. The question always stays text."""


@hookspec
def apportion_register_benchmarks(register: Register) -> None:
    """Register benchmarks (kind ``benchmark``): subclasses of :class:`apportion.base.Benchmark`."""


@hookspec
def apportion_register_commands(app: Any) -> None:
    """Add sub-commands to the ``apportion`` CLI. ``app`` is the root :class:`typer.Typer`."""


# ----------------------------------------------------------------------------- lifecycle


@hookspec
def apportion_check_run(config: Any) -> list[str] | None:
    """Veto a run config before anything loads.

    ``config`` is a validated :class:`apportion.config.RunConfig`. Return a list of problems
    (each naming the components involved) or ``None``. Use this for combinations that a
    component's ``incompatible_with`` cannot express.
    """


@hookspec(firstresult=True)
def apportion_kv_store(url: str, max_bytes: int | None) -> Any:
    """Open the KV store at ``url`` (a directory, or ``redis://host:port/db``).

    Return an object implementing :class:`apportion.host.store.KVStore`, or ``None`` if the
    URL is not yours. Components that reuse KV across prompts ask the core for a store
    (:func:`apportion.host.store.open_store`) instead of importing the family that provides it.
    """


@hookspec(firstresult=True)
def apportion_report(run: Any, console: Any) -> Path | None:
    """Render a finished run: print its summary on ``console`` and, unless the run's
    ``[harness] report`` is false, write a report file into the run directory.

    ``run`` is the :class:`apportion.runner.RunResult` (config, records, run directory,
    notes). Return the report's path, or ``None`` when no file was written. The core prints a
    plain table when no plugin implements this hook.
    """


@hookspec(firstresult=True)
def apportion_plan_offload(plan: Any, placement: str, hardware: Any) -> Any:
    """Extend ``apportion plan --offload PLACEMENT`` with a placement's step-time estimate.

    ``plan`` is the core's :class:`apportion.plan.Plan` (model, hardware, the long-context cost
    figures); return a mapping of extra named figures to print, or ``None`` if the placement
    is not yours.
    """


@hookspec(firstresult=True)
def apportion_default_config() -> Path | None:
    """The run config ``apportion run`` uses when it is given none and the working directory
    has no ``examples/default.toml``: return the path of a TOML file your plugin ships, or
    ``None``. The benchmark family provides the default study this way.
    """


@hookspec
def apportion_model_loaded(loaded: Any) -> None:
    """Called once after the host loads a model (an :class:`apportion.host.LoadedModel`).

    For side work such as warming a kernel. Components get the model through
    :meth:`apportion.base.Component.bind`, not through this hook.
    """


@hookspec
def apportion_run_finished(config: Any, run_dir: Path, records: list[dict[str, Any]]) -> None:
    """Called after a run wrote all its records and its report."""
