"""The HF host on the real embedded model."""

import time

import pytest
from apportion.base import Prompt
from apportion.errors import ModelNotFoundError, PromptTooLongError
from apportion.host import Host, load_model


def test_generates_an_answer_with_stats(smollm2):
    r = Host(smollm2).generate(
        "What is the capital of France? Answer in one word.", max_new_tokens=16
    )[0]
    assert "paris" in r.text.lower()
    assert r.prompt_tokens > 10 and 0 < r.new_tokens <= 16
    assert r.kv_tokens == r.prompt_tokens
    # 30 layers x 3 KV heads x 64 dims x (K+V) x fp32, for every cached token
    per_token = 30 * 3 * 64 * 2 * 4
    # the eos token that ended generation is never fed back, so it is never cached
    assert r.finish_reason == "stop"
    assert r.peak_kv_bytes == per_token * (r.prompt_tokens + r.new_tokens)
    assert r.prefill_seconds > 0 and r.decode_tokens_per_s > 0


def test_batch_matches_single(smollm2):
    host = Host(smollm2)
    prompts = ["Name a colour.", "What is two plus two? Reply with a number and explain briefly."]
    batch = host.generate(prompts, max_new_tokens=10)
    single = [host.generate(p, max_new_tokens=10)[0] for p in prompts]
    assert [b.text for b in batch] == [s.text for s in single]


def test_question_is_split_off(smollm2):
    host = Host(smollm2)
    enc = host.encode(Prompt([{"role": "user", "content": "ctx ctx\n\nWhat?"}], question="What?"))
    assert 0 < enc.question_len < len(enc.ids)
    assert host.tokenizer.decode(enc.ids[-enc.question_len :]).startswith("What?")


def test_prompt_longer_than_context_refused_before_compute(smollm2):
    host = Host(smollm2)
    t0 = time.perf_counter()
    with pytest.raises(PromptTooLongError, match="exceeds"):
        host.generate("word " * 9000, max_new_tokens=8)
    assert time.perf_counter() - t0 < 5


def test_missing_model_path():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model("./no/such/model-dir")
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        load_model("some-org/some-model-that-is-not-cached")


def test_cached_load_is_fast(smollm2):
    """The safetensors cache exists after the session fixture; a reload reads it."""
    again = load_model("smollm2")
    assert again.fingerprint == smollm2.fingerprint
    assert again.max_context == 8192


def test_lse_merge_is_exact():
    import torch
    from apportion.host.lse import merge, partial_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 37, 16), torch.randn(2, 3, 37, 16)
    full, _ = partial_attention(q, k, v)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    assert torch.allclose(full, ref, atol=1e-5)
    cuts = [0, 10, 11, 30, 37]
    parts = [
        partial_attention(q, k[..., a:b, :], v[..., a:b, :])
        for a, b in zip(cuts, cuts[1:], strict=False)
    ]
    merged, _ = merge([p[0] for p in parts], [p[1] for p in parts])
    assert torch.allclose(merged, ref, atol=1e-5)
    empty = partial_attention(q, k[..., :0, :], v[..., :0, :])
    merged2, _ = merge([full, empty[0]], [_full_lse(q, k), empty[1]])
    assert torch.allclose(merged2, ref, atol=1e-5)


def _full_lse(q, k):
    import torch

    return torch.logsumexp(q @ k.transpose(-1, -2) / 4.0, -1)


def test_converted_folder_is_hf_layout_and_a_stale_one_is_replaced(tmp_path, monkeypatch):
    """The conversion stores the tied embedding as ``model.embed_tokens.weight`` (what vLLM and
    other loaders read) with ``architectures``; a folder in an older layout is replaced whole."""
    import json

    from apportion.host import model as host_model
    from safetensors import safe_open

    monkeypatch.setenv("APPORTION_CACHE_DIR", str(tmp_path))
    target = host_model.converted_embedded()
    (target / "apportion.json").write_text(json.dumps({"format": 1}))
    (target / "model.safetensors").write_bytes(b"old layout")
    again = host_model.converted_embedded()
    manifest = json.loads((target / "apportion.json").read_text())
    assert again == target and manifest["format"] == host_model.CONVERTED_FORMAT
    assert json.loads((target / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(target / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == [target.name]
    # a flipped byte in the weights, or in the manifest, is caught by the checksums: the
    # next load converts again instead of loading damaged weights
    assert host_model._check_converted(target) is None
    weights = target / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    weights.write_bytes(bytes(raw))
    assert "checksum mismatch" in host_model._check_converted(target)
    raw[len(raw) // 2] ^= 0x10
    weights.write_bytes(bytes(raw))
    assert host_model._check_converted(target) is None
    (target / "apportion.json").write_text(json.dumps(manifest | {"source": "tampered"}))
    assert "damaged manifest" in host_model._check_converted(target)
