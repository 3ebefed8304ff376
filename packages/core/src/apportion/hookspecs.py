"""Hook specifications: the whole contract between the core and its plugins.

A plugin is a module listed in the ``apportion`` entry-point group. It implements any of
these hooks with :data:`apportion.hookimpl` and may declare the core API range it supports::

    # apportion_myplugin/plugin.py
    from apportion import hookimpl

    APPORTION_API = ">=1.0,<2"

    @hookimpl
    def apportion_register_kv_policies(register):
        register(
            "my-policy",
            "apportion_myplugin.my_policy:MyPolicy",   # imported only when used
            config="apportion_myplugin.my_policy:MyPolicyConfig",
            summary="Keeps the tokens I like.",
        )

Registration hooks are called once per process, each plugin in isolation: a hook that
raises is reported by ``apportion plugins`` and skipped (fatal under
``APPORTION_STRICT_PLUGINS=1``). Keep the entry-point module tiny: pass import paths as
strings so that listing plugins never imports torch.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("apportion")


# --------------------------------------------------------------------------- registration
# Each registration hook receives ``register(name, factory, *, config=None, summary="",
# replace=False, incompatible_with=None)``:
#
# - ``name``: the component's name within its kind (lower-case, dashes).
# - ``factory``: a class or callable taking one argument, the validated config instance,
#   or a ``"module:attr"`` string naming one (imported lazily).
# - ``config``: a pydantic model class (or ``"module:attr"``) whose fields all have defaults,
#   so the component is constructible by name alone. ``None`` means "no options".
# - ``summary``: one line for ``apportion list``.
# - ``replace``: a plugin may replace a *core baseline* of the same name, never another
#   plugin's component. Without it a duplicate name is an error naming both providers.
# - ``incompatible_with``: ``{kind: [names]}`` this component cannot run beside; a run config
#   that combines them is refused at validation, before any model loads.


@hookspec
def apportion_register_attention(register: Any) -> None:
    """Register attention backends (kind ``attention``).

    The factory returns an :class:`apportion.host.attention.AttentionBackend`.
    """


@hookspec
def apportion_register_kv_policies(register: Any) -> None:
    """Register KV-cache policies (kind ``kv-policy``).

    The factory returns an :class:`apportion.host.kv.KVPolicy`.
    """


@hookspec
def apportion_register_allocators(register: Any) -> None:
    """Register memory allocators (kind ``allocator``).

    The factory returns an :class:`apportion.base.Allocator`.
    """


@hookspec
def apportion_register_trainer_strategies(register: Any) -> None:
    """Register RL trainer strategies (kind ``trainer-strategy``).

    The factory returns an :class:`apportion.base.TrainerStrategy`.
    """


@hookspec
def apportion_register_prompt_strategies(register: Any) -> None:
    """Register prompt strategies (kind ``prompt-strategy``).

    The factory returns an :class:`apportion.base.PromptStrategy`.
    """


@hookspec
def apportion_register_benchmarks(register: Any) -> None:
    """Register benchmarks (kind ``benchmark``).

    The factory returns an :class:`apportion.base.Benchmark`.
    """


@hookspec
def apportion_register_commands(app: Any) -> None:
    """Add sub-commands to the ``apportion`` CLI. ``app`` is the root :class:`typer.Typer`."""


# ----------------------------------------------------------------------------- lifecycle


@hookspec
def apportion_check_run(config: Any) -> list[str] | None:
    """Veto a run config before anything loads.

    ``config`` is a validated :class:`apportion.config.RunConfig`. Return a list of problems
    (each naming the components involved) or ``None``. Use this for combinations that
    ``incompatible_with`` cannot express.
    """


@hookspec(firstresult=True)
def apportion_run(config: Any, run_dir: Any, options: Any) -> Any:
    """Execute a run config; the first plugin returning non-``None`` wins.

    The eval package implements the full harness here. Without it the core's minimal
    runner (:mod:`apportion.runner`) is used. ``options`` is a :class:`apportion.runner.RunOptions`.
    """


@hookspec(firstresult=True)
def apportion_plan_offload(plan: Any, placement: str, hardware: Any) -> Any:
    """Extend ``apportion plan --offload PLACEMENT`` with a placement's step-time estimate.

    ``plan`` is the core's :class:`apportion.plan.Plan` (model, hardware, the long-context cost
    figures); return a mapping of extra named figures to print, or ``None`` if the placement
    is not yours.
    """


@hookspec
def apportion_model_loaded(model: Any, tokenizer: Any, spec: Any) -> None:
    """Called once after the host loads a model (e.g. to attach a store or warm a kernel)."""


@hookspec
def apportion_run_finished(config: Any, run_dir: Any, records: Any) -> None:
    """Called after a run wrote all its records (e.g. to render a report)."""
