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


def _flip_byte(path, at):
    with path.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


def test_load_model_converts_a_damaged_cache_again_with_progress(
    tmp_path, monkeypatch, caplog, capfd
):
    """The converted cache of the embedded model is checked on every load: flipped weights are
    found, said, and converted again (the one conversion here, with its progress on stderr),
    and the model loads from intact weights in HF layout (the tied embedding stored as
    ``model.embed_tokens.weight``, ``architectures`` set, as vLLM and other loaders read). A
    folder of an older layout, or with a tampered or hostile manifest, is caught the same way."""
    import json
    import logging
    import shutil

    from apportion.config import ModelSpec
    from apportion.host import model as host_model
    from safetensors import safe_open

    source = host_model.converted_embedded()  # the user cache: converted once per machine
    monkeypatch.setenv("APPORTION_CACHE_DIR", str(tmp_path))
    target = tmp_path / "models" / source.name
    shutil.copytree(source, target)
    assert host_model.converted_embedded() == target  # intact: used as it is
    weights = target / "model.safetensors"
    _flip_byte(weights, weights.stat().st_size // 2)  # a weight, not the header
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="apportion.host.model"):
        loaded = load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))
    err = capfd.readouterr().err
    assert f"converted model at {target} has a damaged model.safetensors" in caplog.text
    assert "converting again" in caplog.text
    progress = [line for line in err.splitlines() if line.startswith("apportion: ")]
    assert progress[0].startswith("apportion: converting the embedded model to safetensors")
    for n in (1, 2, 3):
        assert sum(f"  [{n}/3] " in line for line in progress) == 1, progress
    assert progress[-1].startswith("apportion: converted in ") and str(target) in progress[-1]
    assert loaded.path == str(target) and host_model._check_converted(target) is None
    manifest = json.loads((target / "apportion.json").read_text())
    assert manifest["files"] == json.loads((source / "apportion.json").read_text())["files"]
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == [target.name]
    assert json.loads((target / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(weights), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    # a manifest of an older layout, tampered with, or hostile: the next load converts again
    (target / "apportion.json").write_text(json.dumps({"format": 1}))
    assert host_model._check_converted(target) == "is from another layout"
    (target / "apportion.json").write_text(json.dumps(manifest | {"source": "tampered"}))
    assert host_model._check_converted(target) == "has a damaged manifest"
    (target / "apportion.json").write_text('{"files": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert host_model._check_converted(target) == "has an unreadable manifest"


@pytest.mark.parametrize("damage", ["not-safetensors", "truncated"])
def test_a_broken_safetensors_file_is_a_model_load_error(tmp_path, damage):
    """A model folder whose weights file is not safetensors, or is cut short, fails with
    ModelLoadError naming the folder (one line at the CLI), never safetensors' own error."""
    import shutil

    from apportion.config import ModelSpec
    from apportion.errors import ModelLoadError
    from apportion.host import model as host_model

    source = host_model.converted_embedded()
    folder = tmp_path / "model"
    folder.mkdir()
    for p in source.iterdir():
        if p.suffix != ".safetensors":
            shutil.copy(p, folder)
    with (source / "model.safetensors").open("rb") as f:
        head = f.read(1 << 20)
    broken = b"\xff" * 64 + b" not a safetensors file" if damage == "not-safetensors" else head
    (folder / "model.safetensors").write_bytes(broken)
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelSpec(name=str(folder), device="cpu", dtype="float32"))
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"max_position_embeddings": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}",
        b"[8192]",
        b'{"text_config": {"num_attention_heads": 0, "hidden_size": 8, "num_hidden_layers": 2}}',
        b"\xff\xfe",
    ],
    ids=["deeper-than-the-parser", "deep", "not-an-object", "wrong-types", "not-utf-8"],
)
def test_a_hostile_config_json_is_a_model_load_error_before_loading(tmp_path, raw):
    """The window and KV shape are read from config.json before any weights: a hostile file is
    ModelLoadError naming it, never RecursionError, AttributeError or ZeroDivisionError."""
    from apportion.config import ModelSpec
    from apportion.errors import ModelLoadError
    from apportion.host.model import kv_bytes_per_token, model_window

    (tmp_path / "config.json").write_bytes(raw)
    spec = ModelSpec(name=str(tmp_path), device="cpu")
    with pytest.raises(ModelLoadError, match="config.json"):
        model_window(spec)
    with pytest.raises(ModelLoadError, match="config.json"):
        kv_bytes_per_token(spec)


def test_prefill_context_then_generate_after_is_query_agnostic_generate(smollm2):
    """A context prefilled alone (its probe appended, then dropped) and a question fed after it
    later answers exactly as ``generate`` with ``question_in_prefill=False``."""
    import math

    import torch
    from apportion.errors import ConfigError
    from apportion.host.kv import CompressionConfig, KVPolicy, PrefillOutput
    from apportion.testing.contracts import QUESTION, _long_context

    class ProbedKeyNorm(KVPolicy):
        """Keeps the context entries of smallest key norm (and the protected tail), scored
        after the prefill; has a probe."""

        name = "test-probed-keynorm"
        Config = CompressionConfig

        def probe(self):
            return "What does the text say?"

        def prefill(self, model, input_ids, attention_mask, cache, *, question_len=0):
            pre = super().prefill(
                model, input_ids, attention_mask, cache, question_len=question_len
            )
            n = input_ids.shape[1] - question_len
            keep = math.ceil(n * (1 - self.config.compression_ratio))
            for layer in cache.layers:
                scores = -layer.keys[..., :n, :].norm(dim=-1)
                idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
                tail = torch.arange(n, input_ids.shape[1]).expand(*idx.shape[:2], -1)
                idx = torch.cat([idx, tail], -1)[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
                layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
            return PrefillOutput(pre.logits, None, pre.next_position)

    policy = ProbedKeyNorm(CompressionConfig(compression_ratio=0.5))
    host = Host(smollm2, kv_policy=policy, question_in_prefill=False)
    context = _long_context(12)
    prompt = Prompt([{"role": "user", "content": f"{context}\n\n{QUESTION}"}], question=QUESTION)
    enc = host.encode(prompt)
    ctx_ids, q_ids = enc.ids[: -enc.question_len], enc.ids[-enc.question_len :]
    want = host.generate(prompt, max_new_tokens=12)[0]
    cache, pre = host.prefill_context([ctx_ids])
    assert int(pre.next_position[0]) == len(ctx_ids)  # positions continue uncompressed
    assert pre.info["peak_kv_bytes"] > 0
    got = host.generate_after(cache, pre, [q_ids], max_new_tokens=12)[0]
    assert got.text == want.text and got.new_tokens == want.new_tokens
    assert got.kv_tokens == want.kv_tokens == math.ceil(len(ctx_ids) * 0.5)
    assert got.prompt_tokens == want.prompt_tokens == len(enc.ids)
    with pytest.raises(ConfigError, match="2 questions for a cache of 1 rows"):
        host.generate_after(cache, pre, [q_ids, q_ids])
    with pytest.raises(ConfigError, match="empty"):
        host.prefill_context([[]])
    with pytest.raises(PromptTooLongError):
        host.generate_after(cache, pre, [q_ids], max_new_tokens=9000)


def test_fingerprint_of_folder_matches_the_loaded_model(smollm2, tmp_path):
    """Read from the saved folder without loading it, the fingerprint equals the loaded
    model's (float32); a folder missing a parameter's weights is a ModelLoadError."""
    import shutil

    from apportion.errors import ModelLoadError
    from apportion.host.model import fingerprint_of_folder
    from safetensors.torch import load_file, save_file

    assert fingerprint_of_folder(smollm2.path) == smollm2.fingerprint
    broken = tmp_path / "broken"
    shutil.copytree(smollm2.path, broken)
    weights = next(broken.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors.pop("model.norm.weight")
    save_file(tensors, weights)
    with pytest.raises(ModelLoadError, match="model.norm.weight"):
        fingerprint_of_folder(broken)
    with pytest.raises(ModelLoadError, match="no transformers model"):
        fingerprint_of_folder(tmp_path / "nothing")
