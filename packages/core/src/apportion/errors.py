"""Typed errors. Every user-facing failure is one of these, with a message naming what was wrong."""

from __future__ import annotations


class ApportionError(Exception):
    """Base class of every error apportion raises on purpose."""


class PluginError(ApportionError):
    """A plugin failed to load, its hook raised, or it declared an incompatible API."""


class DuplicateComponentError(ApportionError):
    """Two providers registered the same kind/name."""


class UnknownComponentError(ApportionError, KeyError):
    """A component name that no installed plugin provides."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConfigError(ApportionError, ValueError):
    """A run config or component config failed validation. ``errors`` holds (location, message)."""

    def __init__(self, message: str, errors: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.errors = errors or []


class ModelNotFoundError(ApportionError, FileNotFoundError):
    """The requested model path or id cannot be found locally."""


class ModelLoadError(ApportionError):
    """A model was found but could not be loaded (damaged weights, a config transformers
    cannot read)."""


class LaunchError(ApportionError):
    """A rank of a multi-process run failed, died or gave no result within its timeout."""


class PromptTooLongError(ApportionError, ValueError):
    """A prompt (plus the tokens to generate) does not fit the model's context window."""


class PromptEmbedsError(ApportionError, ValueError):
    """A prompt's input embeddings (``Prompt.embeds``) are malformed (a placeholder missing,
    repeated or inside the question; a tensor of the wrong shape), or the components of the
    run cannot read them (an attention backend or KV policy that runs the prompt in pieces)."""
