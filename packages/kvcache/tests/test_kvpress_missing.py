"""Without kvpress installed, no ``kvpress:*`` policy is registered, and asking for one
by its short name says what is missing. (With kvpress, ``nox -s kvpress`` runs the adapter.)"""

from __future__ import annotations

import importlib.util

import pytest
from apportion.errors import ConfigError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("kvpress") is not None, reason="kvpress is installed here"
)


def test_no_press_is_registered(registry):
    assert not [n for n in registry.names("kv-policy") if n.startswith("kvpress:")]


def test_asking_for_a_press_names_it_and_the_install():
    from apportion_kvcache.kvpress_adapter import kvpress_policy

    with pytest.raises(ConfigError, match=r"'kvpress:snapkv' needs kvpress.*pip install kvpress"):
        kvpress_policy("snapkv", compression_ratio=0.5)
