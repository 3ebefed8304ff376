"""Compress once, ask many: a context compressed before its questions, stored in a real
directory or a real redis-server, answered in this process and in others."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from apportion.base import Prompt
from apportion.errors import ConfigError
from apportion.host import Host
from apportion_kvcache.errors import KVMismatchError, KVNotFoundError
from apportion_kvcache.reuse import (
    StoredContext,
    ask,
    compress_context,
    load_context,
    store_key,
)
from apportion_kvcache.store import LocalStore, RedisStore

ROOM = "The meeting room is called Orchid Hall."
CAPTAIN = "The ship's captain is named Mira Kovac."
Q_ROOM = "What is the meeting room called? Answer with the name only."
Q_CAPTAIN = "What is the name of the ship's captain? Answer with the name only."


def _context(n: int) -> str:
    """niah-style: ``n`` haystack sentences with two facts at a third and two thirds."""
    from apportion.baselines.haystack import sentences

    body = list(sentences()[:n])
    body.insert(2 * n // 3, ROOM)
    body.insert(n // 3, CAPTAIN)
    return " ".join(body)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "apportion.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_ask_many_equals_query_agnostic_host_per_question(smollm2, registry, tmp_path):
    """Each stored-cache answer is token for token what the host generates with the question
    fed after the same policy's compressed context, one at a time or as a batch of rows."""
    context = _context(12)
    options = {"compression_ratio": 0.5}
    handle = compress_context(smollm2, context, "probe", LocalStore(tmp_path), options=options)
    meta = handle.meta
    assert meta["policy"]["name"] == "probe" and meta["policy"]["compression_ratio"] == 0.5
    assert meta["codec"] == {"name": "none"} and meta["model"] == smollm2.fingerprint
    assert meta["kept_tokens"] < 0.6 * meta["context_tokens"]
    assert handle.stats["stored_bytes"] >= handle.stats["kv_bytes"]  # raw KV, plus headers
    stored = load_context(smollm2, handle.handle, store=tmp_path.as_posix())
    questions = [Q_ROOM, Q_CAPTAIN]
    one_by_one = ask(smollm2, stored, questions, max_new_tokens=16, batch_size=1)
    as_rows = ask(smollm2, stored, questions, max_new_tokens=16, batch_size=8)
    host = Host(
        smollm2,
        kv_policy=registry.create("kv-policy", "probe", options),
        question_in_prefill=False,
    )
    for q, single, row in zip(questions, one_by_one, as_rows, strict=True):
        prompt = Prompt([{"role": "user", "content": f"{context}\n\n{q}"}], question=q)
        want = host.generate(prompt, max_new_tokens=16)[0]
        assert single.text == want.text and single.new_tokens == want.new_tokens, q
        assert single.kv_tokens == want.kv_tokens == meta["kept_tokens"]
        assert single.prompt_tokens == want.prompt_tokens
        assert row.text == want.text, q  # rows over one shared cache change no token here
    assert "Orchid" in one_by_one[0].text
    # the stored state is never written: asking again answers the same
    assert ask(smollm2, stored, [Q_ROOM], max_new_tokens=16)[0].text == one_by_one[0].text


def test_cachegen_coded_entry_in_redis_answers(smollm2, tmp_path, redis_server):
    store = RedisStore(redis_server(), namespace="reuse-cachegen")
    handle = compress_context(
        smollm2, _context(24), "snapkv", store, options={"compression_ratio": 0.5}, codec_level=1
    )
    assert handle.meta["codec"]["name"] == "cachegen" and handle.meta["codec"]["level"] == 1
    assert handle.stats["stored_bytes"] < handle.stats["kv_bytes"] / 3
    room, captain = ask(smollm2, handle, [Q_ROOM, Q_CAPTAIN], max_new_tokens=16)
    assert "Orchid" in room.text and "Mira" in captain.text, (room.text, captain.text)


def test_answers_across_processes_local_and_redis(smollm2, tmp_path, redis_server):
    """Compressed here, asked by `apportion kv ask` in other processes: the same answers."""
    context = _context(12)
    local = tmp_path / "kv"
    url = redis_server()
    by_name = compress_context(smollm2, context, "probe", local.as_posix(), name="orchid doc")
    by_key = compress_context(smollm2, context, "snapkv", url)
    assert by_name.handle == "orchid doc" and by_name.key == store_key("orchid doc")
    assert len(by_key.handle) == 64 and by_key.handle == by_key.key
    for handle, where in ((by_name, local.as_posix()), (by_key, url)):
        here = [r.text for r in ask(smollm2, handle, [Q_ROOM, Q_CAPTAIN], max_new_tokens=12)]
        out = _cli(
            "kv", "ask", handle.handle, Q_ROOM, Q_CAPTAIN, "--store", where,
            "--max-new-tokens", "12", "--device", "cpu", "--json",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        there = json.loads(out.stdout)
        assert [r["question"] for r in there] == [Q_ROOM, Q_CAPTAIN]
        assert [r["text"] for r in there] == here, where


def test_compress_cli_prints_a_handle_that_ask_uses(tmp_path):
    ctx = tmp_path / "context.txt"
    ctx.write_text(_context(6))
    store = (tmp_path / "kv").as_posix()
    out = _cli(
        "kv", "compress", str(ctx), "--store", store, "--kv-policy", "snapkv",
        "-o", "compression_ratio=0.5", "--codec-level", "0", "--name", "six", "--device", "cpu",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "six" and "kept (snapkv, codec cachegen)" in out.stderr
    entry = LocalStore(store).get(store_key("six"))
    assert entry is not None and entry.kind == "cachegen"
    assert entry.manifest["meta"]["policy"]["compression_ratio"] == 0.5


def test_mismatch_names_both_sides_and_damage_is_a_miss(smollm2, tmp_path):
    store = LocalStore(tmp_path)
    handle = compress_context(
        smollm2, _context(4), "snapkv", store, options={"compression_ratio": 0.5}
    )
    h = handle.handle
    with pytest.raises(KVMismatchError, match=r"compression ratio 0\.5; the current .* is 0\.75"):
        load_context(smollm2, h, store=store, expect_ratio=0.75)
    with pytest.raises(
        KVMismatchError, match="kv-policy 'snapkv'; the current kv-policy is 'probe'"
    ):
        ask(smollm2, handle, "Where?", expect_policy="probe")
    tok = handle.meta["tokenizer"]
    with pytest.raises(KVMismatchError, match=f"tokenizer {tok}; the current tokenizer is 0{{16}}"):
        load_context(smollm2, h, store=store, tokenizer_fingerprint="0" * 16)
    other = dataclasses.replace(smollm2, fingerprint="f" * 16)  # another model's identity
    with pytest.raises(KVMismatchError, match=f"model {smollm2.fingerprint}; .* is f{{16}}"):
        load_context(other, h, store=store)
    stored = load_context(smollm2, h, store=store, expect_policy="snapkv", expect_ratio=0.5)
    assert isinstance(stored, StoredContext)
    with pytest.raises(KVMismatchError, match="current model is f{16}"):
        ask(other, stored, "Where?")
    # a plain (uncompressed) entry is not a compressed context
    plain = store.save_kv("fp", [1, 2], [(k[..., :2, :], v[..., :2, :]) for k, v in stored.kv])
    with pytest.raises(KVMismatchError, match="plain kv KV, not a compressed context"):
        load_context(smollm2, plain, store=store)
    # a flipped byte: never an answer, a miss that says why
    payload = next(tmp_path.glob(f"??/{handle.key}*.bin"))
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x40
    payload.write_bytes(bytes(data))
    with pytest.raises(KVNotFoundError, match="damaged and has been set aside"):
        ask(smollm2, h, "Where?", store=store)
    assert store.stats["corrupt"] == 1
    with pytest.raises(KVNotFoundError, match="never stored"):
        load_context(smollm2, h, store=store)
    with pytest.raises(ConfigError, match="empty"):
        compress_context(smollm2, "  \n", "snapkv", store)
    with pytest.raises(ConfigError, match="looks like a store key"):
        compress_context(smollm2, "text", "snapkv", store, name="a" * 64)


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    ctx = tmp_path / "context.txt"
    ctx.write_text("A short context.")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    store = (tmp_path / "kv").as_posix()
    cases = [
        (["compress", str(tmp_path / "missing.txt"), "--store", store], "does not exist"),
        (["compress", str(empty), "--store", store], "is empty"),
        (["compress", str(ctx), "--store", store, "--kv-policy", "snapkvv"], "mean 'snapkv'"),
        (["compress", str(ctx), "--store", store, "-o", "ratio"], "must look like key=value"),
        (["compress", str(ctx), "--store", store, "--codec-level", "7"], "out of range"),
        (["ask", "no-such-doc", "Where?", "--store", store], "no compressed context 'no-such-doc'"),
    ]  # fmt: skip
    for args, message in cases:
        out = _cli("kv", *args)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2, (args, out.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert not Path(store).exists() or not list(Path(store).glob("??/*.json"))
    # registering the commands (what `apportion --help` does) imports no torch
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, typer; from apportion.plugins import get_plugin_host; "
            "get_plugin_host().hook.apportion_register_commands(app=typer.Typer()); "
            "print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.strip() == "False", probe.stderr


def test_every_policy_and_option_gets_its_own_store_entry(smollm2, tmp_path):
    """Compressed contexts of one text under different policies, ratios or options never
    share a store key: each loads back its own kept tokens and its own policy."""
    context = _context(12)
    store = LocalStore(tmp_path)
    variants = [
        ("probe", {"compression_ratio": 0.5}),
        ("probe", {"compression_ratio": 0.75}),
        ("streaming", {"compression_ratio": 0.5}),
        ("streaming", {"compression_ratio": 0.5, "n_sink": 8}),
    ]
    handles = [compress_context(smollm2, context, p, store, options=o) for p, o in variants]
    assert len({h.key for h in handles}) == len(variants)
    assert len(list(store.keys())) == len(variants)
    for (policy, options), h in zip(variants, handles, strict=True):
        loaded = load_context(smollm2, h.handle, store=tmp_path.as_posix())
        assert loaded.meta["policy"]["name"] == policy
        for k, v in options.items():
            assert loaded.meta["policy"]["options"][k] == v
        assert loaded.meta["kept_tokens"] == h.meta["kept_tokens"]
    assert handles[1].meta["kept_tokens"] < handles[0].meta["kept_tokens"]


# ------------------------------------------------------------------------------- vLLM


def test_rope_shift_moves_keys_as_transformers_rotates_them(smollm2):
    """Keys rotated at positions p, moved by ``rope_shift``, equal the same keys rotated at
    p + shift by the model's own rotary embedding (both directions)."""
    import torch
    from apportion_kvcache.kv import rope_shift
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = smollm2.model
    rotary = model.model.rotary_emb
    cfg = model.config
    dim = cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(1, cfg.num_key_value_heads, 40, dim, generator=g, dtype=torch.float64)
    at = torch.arange(100, 140)[None]

    def rotated(pos):
        cos, sin = rotary(raw.float(), pos)
        return apply_rotary_pos_emb(raw, raw, cos.double(), sin.double())[1]

    for shift in (-77, 513):
        got = rope_shift(rotated(at), shift, cfg)
        # transformers takes its angles in float32: about 1e-4 off at these positions
        assert torch.allclose(got, rotated(at + shift), atol=1e-3), shift
        assert not torch.allclose(got, rotated(at + shift + 1), atol=1e-2)
    # a scaled RoPE is refused, not silently moved wrong
    import types

    scaled = types.SimpleNamespace(rope_theta=1e5, rope_scaling={"rope_type": "llama3"})
    with pytest.raises(ValueError, match="llama3"):
        rope_shift(rotated(at), 5, scaled)


def test_vllm_request_begins_with_one_slot_per_kept_entry(smollm2, tmp_path):
    from apportion_kvcache.reuse import vllm_request
    from apportion_kvcache.vllm_names import CONTEXT_PARAM, CONTEXT_SLOTS_PARAM

    handle = compress_context(
        smollm2,
        "The vault code is 4417.",
        "streaming",
        str(tmp_path),
        options={"compression_ratio": 0.5},
    )
    prompt, params = vllm_request(
        str(tmp_path), handle, "What is the vault code?", smollm2.tokenizer
    )
    kept = handle.meta["kept_tokens"]
    ids = prompt["prompt_token_ids"]
    assert params == {CONTEXT_PARAM: handle.handle, CONTEXT_SLOTS_PARAM: kept}
    assert prompt["cache_salt"] == handle.key
    tail = smollm2.tokenizer.encode(
        "What is the vault code?" + handle.meta["question_suffix"], add_special_tokens=False
    )
    assert ids[kept:] == tail and len(set(ids[:kept])) == 1
    with pytest.raises(KVNotFoundError):
        vllm_request(str(tmp_path), "nothing-here", "What?", smollm2.tokenizer)
    with pytest.raises(ConfigError, match="empty"):
        vllm_request(str(tmp_path), handle, "  ", smollm2.tokenizer)
