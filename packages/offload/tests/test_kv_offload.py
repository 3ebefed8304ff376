"""The allocator of a run offloads the KV cache during generation: on the real model, every
tier gives the all-resident answer token for token, the resident KV stays within the budget
plus one layer, eviction composes with it, and faults are typed errors."""

from __future__ import annotations

import errno
import math
import os
import subprocess

import pytest
import torch
from apportion.base import Prompt
from apportion.config import parse_config
from apportion.errors import ConfigError
from apportion.host import Host
from apportion.host.attention import AttentionBackend
from apportion.host.kv import CompressionConfig, KVPolicy
from apportion.host.shared import layerwise_prefill
from apportion.runner import RunOptions, execute
from apportion.testing.contracts import QUESTION, _long_context
from apportion_offload.errors import KVOffloadError

TIERS = ["pinned-pool", "tiered", "nvme"]
NEW = 12


def _prompt(n: int = 30) -> Prompt:
    return Prompt(
        [{"role": "user", "content": f"{_long_context(n)}\n\n{QUESTION}"}], question=QUESTION
    )


def _options(name: str, budget: int, tmp_path, **extra) -> dict:
    opts = {"resident_kv_bytes": int(budget), **extra}
    if name == "nvme":
        opts["directory"] = str(tmp_path / "swap")
    else:
        opts["kv_spill_directory"] = str(tmp_path / "spill")
    return opts


def _capture(allocator) -> list:
    """The caches ``allocator`` builds (its own kv_cache, recorded)."""
    made = []
    build = allocator.kv_cache

    def kv_cache(model, cache):
        out = build(model, cache)
        made.append(out)
        return out

    allocator.kv_cache = kv_cache
    return made


def _layer_bytes(result, loaded) -> int:
    return result.peak_kv_bytes // loaded.model.config.num_hidden_layers


@pytest.fixture(scope="module")
def resident(smollm2):
    """The all-resident answer (the host's DynamicCache) of the long prompt."""
    return Host(smollm2).generate(_prompt(), max_new_tokens=NEW)[0]


@pytest.mark.parametrize("name", TIERS)
def test_every_tier_answers_token_for_token_within_budget(
    name, smollm2, registry, resident, tmp_path
):
    budget = resident.peak_kv_bytes // 4
    allocator = registry.create("allocator", name, _options(name, budget, tmp_path))
    made = _capture(allocator)
    got = Host(smollm2, allocator=allocator).generate(_prompt(), max_new_tokens=NEW)[0]
    assert got.text == resident.text
    assert got.new_tokens == resident.new_tokens and got.kv_tokens == resident.kv_tokens
    assert got.peak_kv_bytes == resident.peak_kv_bytes  # all of it exists, somewhere
    assert got.peak_resident_kv_bytes <= budget + _layer_bytes(resident, smollm2)
    assert resident.peak_resident_kv_bytes == resident.peak_kv_bytes
    placed = made[0].placement()
    assert placed["offloaded_layers"] and placed["pinned_layers"]
    assert placed["prefetch_hits"] > 0 and placed["demand_fetches"] == 0
    if name == "nvme":  # the swap files are the cache's: gone with it
        assert not list((tmp_path / "swap").glob("kv*.apswap"))


def test_plain_generate_with_the_offloaded_cache(smollm2, registry, resident, tmp_path):
    from transformers import DynamicCache

    model, tok = smollm2.model, smollm2.tokenizer
    text = tok.apply_chat_template(_prompt().messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    args = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW)
    args.update(do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        ref = model.generate(**args, cache=DynamicCache(config=model.config))
        allocator = registry.create(
            "allocator", "nvme", _options("nvme", resident.peak_kv_bytes // 4, tmp_path)
        )
        with allocator.kv_cache(model, DynamicCache(config=model.config)) as cache:
            got = model.generate(**args, cache=cache)
            assert cache.placement()["offloaded_layers"]
            assert cache.peak_resident_kv_bytes() < cache.kv_nbytes()
    assert torch.equal(ref, got)


class KeyNorm(KVPolicy):
    """Keeps the entries with the smallest key norm per KV head, and the question: a real
    layer-wise eviction policy (offload may not import the kvcache family's)."""

    name = "test-keynorm"
    Config = CompressionConfig
    layerwise = True

    def plan(self, attention_mask, question_len):
        length = attention_mask.shape[1]
        n_keep = math.ceil((length - question_len) * (1 - self.config.compression_ratio))
        n_keep += question_len
        return None if n_keep >= length else n_keep

    def evict_layer(self, inputs):
        scores = -inputs.keys.float().norm(dim=-1)
        if inputs.question_len:
            scores[..., -inputs.question_len :] = float("inf")
        idx = scores.topk(inputs.n_keep, dim=-1).indices.sort(dim=-1).values
        gather = idx[..., None].expand(-1, -1, -1, inputs.keys.shape[-1])
        return inputs.keys.gather(2, gather), inputs.values.gather(2, gather)

    def prefill(self, model, input_ids, attention_mask, cache, *, question_len=0):
        out = layerwise_prefill(model, input_ids, attention_mask, [self], question_len, [cache])
        return out[0].prefill


class KeepRecent(KVPolicy):
    """Evicts through forward hooks on the cache the model fills (as kvpress does): after a
    layer attended over the prompt it keeps the last half of the entries."""

    name = "test-keep-recent"

    def prefill(self, model, input_ids, attention_mask, cache, *, question_len=0):
        from apportion.host.kv import PrefillOutput, attention_modules

        n = input_ids.shape[1]
        keep = max(question_len, n // 2)

        def hook(module, args, output):
            layer = cache.layers[module.layer_idx]
            layer.keys, layer.values = layer.keys[:, :, -keep:], layer.values[:, :, -keep:]

        handles = [m.register_forward_hook(hook) for m in attention_modules(model)]
        try:
            logits, positions = self.forward_prompt(model, input_ids, attention_mask, cache)
        finally:
            for h in handles:
                h.remove()
        return PrefillOutput(logits, None, positions[:, -1] + 1)


@pytest.mark.parametrize(
    "policy", [KeyNorm(CompressionConfig(compression_ratio=0.5)), KeepRecent()]
)
@pytest.mark.parametrize("name", ["pinned-pool", "nvme"])
def test_eviction_first_then_offload_of_what_was_kept(name, policy, smollm2, registry, tmp_path):
    alone = Host(smollm2, kv_policy=policy).generate(_prompt(), max_new_tokens=NEW)[0]
    budget = alone.kv_tokens * 2 * 3 * 64 * 4 * 30 // 4  # a quarter of what was kept
    allocator = registry.create("allocator", name, _options(name, budget, tmp_path))
    made = _capture(allocator)
    got = Host(smollm2, kv_policy=policy, allocator=allocator).generate(
        _prompt(), max_new_tokens=NEW
    )[0]
    assert got.text == alone.text and got.kv_tokens == alone.kv_tokens
    layer = got.kv_tokens * 2 * 3 * 64 * 4  # one layer of what was kept
    assert made[0].placement()["offloaded_layers"]
    if isinstance(policy, KeepRecent):  # the full layer is in this cache until evicted
        layer *= 2
    assert got.peak_resident_kv_bytes <= budget + layer


def test_a_budget_smaller_than_one_layer_is_refused_before_loading(tmp_path, monkeypatch):
    import apportion.host

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(apportion.host, "load_model", no_load)
    cfg = parse_config(
        {
            "benchmarks": [{"name": "niah", "lengths": [512], "samples": 1}],
            "model": {"device": "cpu", "dtype": "float32"},
            "allocator": {"name": "pinned-pool", "resident_kv_bytes": 4096},
        }
    )
    with pytest.raises(ConfigError, match=r"resident_kv_bytes.*the minimum is (\d+)") as err:
        execute(cfg, tmp_path / "r", RunOptions(progress=False))
    # SmolLM2: 3 KV heads x 64 x float32 x (K, V) = 1536 bytes a token, 512 + answer tokens
    minimum = int(str(err.value).rsplit("the minimum is ", 1)[1].split()[0].rstrip(")"))
    assert minimum % 1536 == 0 and minimum >= 512 * 1536


def test_a_budget_smaller_than_one_layer_is_refused_by_the_cache(smollm2, registry, tmp_path):
    allocator = registry.create("allocator", "pinned-pool", _options("pinned-pool", 4096, tmp_path))
    with pytest.raises(ConfigError, match="smaller than one layer's KV.*the minimum is"):
        Host(smollm2, allocator=allocator).generate(_prompt(), max_new_tokens=2)


def test_a_run_records_resident_beside_total_kv(smollm2, tmp_path):
    cfg = parse_config(
        {
            "benchmarks": [{"name": "niah", "lengths": [256], "samples": 1}],
            "allocator": {"name": "pinned-pool", "resident_kv_bytes": 256 * 1536 * 10},
            "sweep": [
                {"label": "offloaded"},
                {"label": "resident", "allocator": {"name": "pageable"}},
            ],
        }
    )
    run = execute(cfg, tmp_path / "r", RunOptions(limit=1, progress=False), loaded=smollm2)
    by = {r["variant"]: r for r in run.records}
    assert "error" not in by["resident"], by["resident"]
    off = by["offloaded"]
    assert "error" not in off, off
    assert off["prediction"] == by["resident"]["prediction"]
    assert by["resident"]["peak_resident_kv_bytes"] == by["resident"]["peak_kv_bytes"]
    assert off["peak_resident_kv_bytes"] < 0.5 * off["peak_kv_bytes"]


def _break_a_swap_file(smollm2, registry, tmp_path, how: str):
    allocator = registry.create("allocator", "nvme", _options("nvme", 10 << 20, tmp_path))
    made = _capture(allocator)
    state = {"forwards": 0, "file": None, "layer": None}

    def after_forward(module, args, output):
        state["forwards"] += 1
        if state["forwards"] != 2:  # after the first decode step: the files all exist
            return
        tier = made[0].tier
        layer = made[0].placement()["offloaded_layers"][-3]
        path = tier.files(layer)[0]
        if how == "missing":
            os.unlink(path)
        else:
            with open(path, "r+b") as f:
                f.seek(-100, os.SEEK_END)
                f.write(b"\xff" * 50)
        state["file"], state["layer"] = path, layer

    handle = smollm2.model.register_forward_hook(after_forward)
    try:
        with pytest.raises(KVOffloadError) as err:
            Host(smollm2, allocator=allocator).generate(_prompt(), max_new_tokens=NEW)
    finally:
        handle.remove()
    assert err.value.layer == state["layer"] and err.value.path == state["file"]
    assert f"layer {state['layer']}" in str(err.value) and state["file"] in str(err.value)
    return err.value


def test_a_missing_swap_file_is_a_typed_error_naming_layer_and_file(smollm2, registry, tmp_path):
    err = _break_a_swap_file(smollm2, registry, tmp_path, "missing")
    assert "is missing" in str(err)


def test_a_corrupted_swap_file_is_a_typed_error_naming_layer_and_file(smollm2, registry, tmp_path):
    err = _break_a_swap_file(smollm2, registry, tmp_path, "corrupt")
    assert "checksum" in str(err)


def test_a_full_pool_spills_to_nvme(smollm2, registry, resident, tmp_path):
    layer = _layer_bytes(resident, smollm2)
    opts = _options("pinned-pool", resident.peak_kv_bytes // 4, tmp_path, cap_bytes=6 * layer)
    allocator = registry.create("allocator", "pinned-pool", opts)
    made = _capture(allocator)
    got = Host(smollm2, allocator=allocator).generate(_prompt(), max_new_tokens=NEW)[0]
    assert got.text == resident.text
    placed = made[0].placement()
    assert placed["spilled_layers"] and len(placed["spilled_layers"]) < len(
        placed["offloaded_layers"]
    )
    assert allocator.stats().peak_bytes <= 6 * layer


def test_a_full_pool_told_to_wait_fails_with_a_typed_error(smollm2, registry, resident, tmp_path):
    layer = _layer_bytes(resident, smollm2)
    opts = _options(
        "pinned-pool",
        resident.peak_kv_bytes // 4,
        tmp_path,
        cap_bytes=6 * layer,
        kv_on_full="wait",
        kv_wait_seconds=0.05,
    )
    allocator = registry.create("allocator", "pinned-pool", opts)
    with pytest.raises(KVOffloadError, match=r"layer \d+: the pinned-pool tier stayed full"):
        Host(smollm2, allocator=allocator).generate(_prompt(), max_new_tokens=NEW)
    assert allocator.stats().extra["live_bytes"] == 0  # the cache gave its buffers back


# ---------------------------------------------------------------- a full disk


def _small_fs(where, size: str) -> bool:
    """A real ``size`` tmpfs at ``where`` (root only); False where it cannot be mounted."""
    where.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    return done.returncode == 0


def _fill(where) -> None:
    """Take every byte left on ``where``'s file system."""
    fd = os.open(where / "filler", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)


def test_a_full_disk_during_generation_is_a_typed_error_naming_layer_and_file(
    smollm2, registry, tmp_path, monkeypatch
):
    mnt = tmp_path / "small"
    mounted = _small_fs(mnt, "64m")
    full = {"now": False}
    if not mounted:  # no tmpfs here: the disk says ENOSPC once it is "filled"
        real = os.posix_fallocate
        root = str(mnt.resolve())

        def fallocate(fd, offset, length):
            if full["now"] and os.readlink(f"/proc/self/fd/{fd}").startswith(root):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, offset, length)

        monkeypatch.setattr(os, "posix_fallocate", fallocate)
    try:
        opts = {"resident_kv_bytes": 10 << 20, "directory": str(mnt), "kv_segment_tokens": 4}
        allocator = registry.create("allocator", "nvme", opts)
        made = _capture(allocator)
        forwards = {"n": 0}

        def after_forward(module, args, output):
            forwards["n"] += 1
            if forwards["n"] == 3:  # two decode steps in: the prompt's files are all written
                if mounted:
                    _fill(mnt)
                full["now"] = True

        handle = smollm2.model.register_forward_hook(after_forward)
        answers = None
        try:
            with pytest.raises(KVOffloadError) as err:
                answers = Host(smollm2, allocator=allocator).generate(_prompt(), max_new_tokens=NEW)
        finally:
            handle.remove()
        assert answers is None  # no answer from partial KV
        exc = err.value
        assert exc.layer in made[0].placement()["offloaded_layers"]
        assert exc.path.startswith(str(mnt)) and exc.path.endswith(".apswap")
        assert f"layer {exc.layer}" in str(exc) and exc.path in str(exc)
        assert "no space left on the device" in str(exc)
        assert forwards["n"] < NEW  # it stopped the generation
        left = [p.name for p in mnt.iterdir() if p.name != "filler"]
        assert not [n for n in left if n.startswith("kv")], left  # the cache's files are gone
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)


# ---------------------------------------------------------------- non-dense attention


class TopKChunked(AttentionBackend):
    """A sparse attention backend for the test: each query attends to its ``TOP`` highest
    scoring keys only (plain torch), and the prompt is read in chunks of ``CHUNK`` tokens
    (its own prefill), so every layer's KV arrives in several pieces."""

    name = "test-topk-chunked"
    TOP, CHUNK = 48, 160

    def attention_function(self):
        def topk_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
            groups = query.shape[1] // key.shape[1]
            k = key.repeat_interleave(groups, 1)
            v = value.repeat_interleave(groups, 1)
            scores = (query @ k.transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
            q_len, k_len = scores.shape[-2:]
            if attention_mask is None:  # causal: the queries are the last q_len positions
                rows = torch.arange(q_len)[:, None] + (k_len - q_len)
                attention_mask = torch.arange(k_len)[None, :] <= rows
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask
            top = scores.topk(min(self.TOP, k_len), dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < top, float("-inf"))
            out = scores.softmax(-1) @ v
            return out.transpose(1, 2).contiguous(), None

        return topk_attention

    def prefill(self, model, input_ids, attention_mask, cache, *, question_len, inner):
        from apportion.host.kv import PrefillOutput, cache_kwargs, positions_from_mask

        positions = positions_from_mask(attention_mask)
        for start in range(0, input_ids.shape[1], self.CHUNK):
            end = start + self.CHUNK
            out = model(
                input_ids=input_ids[:, start:end],
                attention_mask=attention_mask[:, :end],
                position_ids=positions[:, start:end],
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(model, cache),
            )
        return PrefillOutput(out.logits[:, -1, :], None, positions[:, -1] + 1)


@pytest.mark.parametrize("name", ["pinned-pool", "nvme"])
def test_offload_under_a_sparse_attention_backend_that_reads_in_chunks(
    name, smollm2, registry, tmp_path
):
    backend = TopKChunked()
    alone = Host(smollm2, attention=backend).generate(_prompt(), max_new_tokens=NEW)[0]
    budget = alone.peak_kv_bytes // 4
    allocator = registry.create("allocator", name, _options(name, budget, tmp_path))
    made = _capture(allocator)
    got = Host(smollm2, attention=backend, allocator=allocator).generate(
        _prompt(), max_new_tokens=NEW
    )[0]
    assert got.text == alone.text and got.kv_tokens == alone.kv_tokens
    assert got.peak_kv_bytes == alone.peak_kv_bytes
    assert got.peak_resident_kv_bytes <= budget + _layer_bytes(alone, smollm2)
    placed = made[0].placement()
    assert placed["offloaded_layers"] and placed["pinned_layers"]
    # the chunks placed the layers small, then the prompt's growth moved pinned ones out
    assert placed["demoted"] > 0
