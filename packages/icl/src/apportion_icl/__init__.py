"""apportion-icl."""

__version__ = "0.1.0"
