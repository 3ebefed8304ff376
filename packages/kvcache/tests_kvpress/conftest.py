"""Fixtures for the kvpress-adapter tests (run by the ``kvpress`` nox session, with kvpress
and its transformers pin): the embedded SmolLM2 and the registry."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["apportion.testing.fixtures"]
