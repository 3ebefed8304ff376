"""apportion-attention: attention backends for apportion's host and for plain transformers.

Importing the package has no side effects. The host registers a backend's attention function
in transformers when it installs the backend; to use the backends in plain transformers
(``attn_implementation="apportion-squeezed"``), call :func:`apportion_attention.hf.register`
once.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
