"""Reward functions that misbehave: raise, return NaN, or return the wrong number of rewards.

:func:`guard_reward_function` wraps a reward function with TRL's signature
(``f(prompts=..., completions=..., **columns) -> list[float | None]``, sync or async) and
applies one policy to every way it can fail:

- ``on_error="raise"``: a :class:`~apportion_rl.errors.RewardFunctionError` naming the
  function and what went wrong (the original exception chained), so a run stops at the first
  bad reward instead of deep inside the trainer;
- ``on_error="skip"``: the affected rewards become ``None`` (TRL's "unscorable": excluded from
  the group statistics, advantage 0) and the step goes on. All of them when the function
  raised or returned the wrong number of rewards; only the bad ones when some were NaN,
  infinite or not numbers. Each incident is appended to ``issues`` as a :class:`RewardIssue`
  and logged as a warning.

``None`` is a valid reward (the function declares a completion unscorable) and never an
incident.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from apportion_rl.errors import RewardFunctionError

logger = logging.getLogger(__name__)

OnRewardError = Literal["raise", "skip"]


@dataclass
class RewardIssue:
    """One misbehaviour of a reward function, as recorded with ``on_error="skip"``."""

    function: str
    kind: str  # raised | non_finite | not_a_number | wrong_length
    detail: str
    affected: int  # rewards replaced by None
    total: int  # rewards the call should have returned

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def function_name(fn: Any) -> str:
    """The name TRL logs a reward function under (a partial: its function's)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


def _expected(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """How many rewards the call owes: one per completion (TRL passes keywords; a direct
    call may pass the completions, or the prompts, first)."""
    for seq in (kwargs.get("completions"), kwargs.get("prompts"), args[0] if args else None):
        if seq is not None and hasattr(seq, "__len__"):
            return len(seq)
    return None


class _Checker:
    def __init__(self, name: str, on_error: OnRewardError, issues: list[RewardIssue] | None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_reward_error must be 'raise' or 'skip', got {on_error!r}")
        self.name, self.on_error, self.issues = name, on_error, issues

    def incident(self, kind: str, detail: str, affected: int, total: int) -> None:
        if self.on_error == "raise":
            raise RewardFunctionError(
                f"reward function {self.name!r} {detail}", function=self.name, kind=kind
            )
        issue = RewardIssue(self.name, kind, detail, affected, total)
        if self.issues is not None:
            self.issues.append(issue)
        logger.warning(
            "reward function %r %s: %d of %d rewards set to None",
            self.name,
            detail,
            affected,
            total,
        )

    def failed(self, exc: BaseException, n: int | None) -> list[float | None]:
        detail = f"raised {type(exc).__name__}: {exc}"
        if self.on_error == "raise":
            raise RewardFunctionError(
                f"reward function {self.name!r} {detail}", function=self.name, kind="raised"
            ) from exc
        if n is None:  # no way to know how many rewards to stand in for
            raise RewardFunctionError(
                f"reward function {self.name!r} {detail}, and the call gave no completions to "
                "count the rewards it owed",
                function=self.name,
                kind="raised",
            ) from exc
        self.incident("raised", detail, n, n)
        return [None] * n

    def check(self, out: Any, n: int | None) -> list[float | None]:
        listlike = hasattr(out, "__len__") and not isinstance(out, (str, bytes, dict))
        values = list(out) if listlike else None
        if values is None or (n is not None and len(values) != n):
            got = f"{len(values)} rewards" if values is not None else f"a {type(out).__name__}"
            detail = f"returned {got} for {n} completions"
            if n is None:
                raise RewardFunctionError(
                    f"reward function {self.name!r} {detail}",
                    function=self.name,
                    kind="wrong_length",
                )
            self.incident("wrong_length", detail, n, n)
            return [None] * n
        clean: list[float | None] = []
        bad: dict[str, list[int]] = {}
        for i, v in enumerate(values):
            if v is None:
                clean.append(None)
                continue
            try:
                x = float(v)
            except (TypeError, ValueError):
                bad.setdefault("not_a_number", []).append(i)
                clean.append(None)
                continue
            if not math.isfinite(x):
                bad.setdefault("non_finite", []).append(i)
                clean.append(None)
                continue
            clean.append(x)
        for kind, where in bad.items():
            what = "non-finite rewards" if kind == "non_finite" else "non-numeric rewards"
            sample = [values[i] for i in where[:3]]
            self.incident(
                kind,
                f"returned {len(where)} {what} (at {where[:5]}, e.g. {sample!r})",
                len(where),
                len(values),
            )
        return clean


def guard_reward_function(
    fn: Callable[..., Any],
    on_error: OnRewardError = "raise",
    issues: list[RewardIssue] | None = None,
) -> Callable[..., Any]:
    """``fn`` wrapped so that its failures follow ``on_error`` (see the module doc). The
    wrapper keeps ``fn``'s name (TRL logs rewards by it) and is async when ``fn`` is."""
    name = function_name(fn)
    checker = _Checker(name, on_error, issues)
    inner = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    if inspect.iscoroutinefunction(inner) or inspect.iscoroutinefunction(
        getattr(inner, "__call__", None)  # noqa: B004 - an async callable object
    ):

        async def guarded_async(*args: Any, **kwargs: Any) -> list[float | None]:
            n = _expected(args, kwargs)
            try:
                out = await fn(*args, **kwargs)
            except Exception as exc:
                return checker.failed(exc, n)
            return checker.check(out, n)

        guarded_async.__name__ = guarded_async.__qualname__ = name
        return guarded_async

    def guarded(*args: Any, **kwargs: Any) -> list[float | None]:
        n = _expected(args, kwargs)
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:
            return checker.failed(exc, n)
        return checker.check(out, n)

    guarded.__name__ = guarded.__qualname__ = name
    guarded.__doc__ = getattr(fn, "__doc__", None)
    return guarded
