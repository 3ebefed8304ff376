"""Session fixtures for contract suites and plugin tests (``pytest_plugins`` this module)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct on the CPU (float32), loaded once per session."""
    from apportion.config import ModelSpec
    from apportion.host import load_model

    return load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def registry():
    from apportion.plugins import get_registry

    return get_registry()
