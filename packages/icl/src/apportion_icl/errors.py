"""Typed errors of apportion-icl (all are :class:`apportion.errors.ApportionError`)."""

from __future__ import annotations

from apportion.errors import ApportionError


class BudgetError(ApportionError, ValueError):
    """The token budget cannot hold even the query."""


class ControllerMissingError(ApportionError, FileNotFoundError):
    """The DynaICL controller artifact is absent; the message says how to train it."""


class ArtifactError(ApportionError, ValueError):
    """A stored artifact (controller, allocation model) is corrupt or of another version."""


class EmptyPoolWarning(UserWarning):
    """A strategy that selects demonstrations got none and fell back to zero-shot."""
