"""Entry point of apportion-rl: registers its components by import path (nothing heavy here)."""

from apportion import hookimpl  # noqa: F401

APPORTION_API = ">=1.0,<2"
