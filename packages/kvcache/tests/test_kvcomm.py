"""KVCOMM: RoPE de/re-rotation, anchor-corrected reuse, the pool's persistence and model check."""

from __future__ import annotations

import pytest
import torch
from apportion.base import Prompt
from apportion.host import Host
from apportion.host.kv import KVPolicy, cache_kwargs
from apportion.host.model import fingerprint
from apportion.host.rope import apply as rotate
from apportion.host.rope import cos_sin as rope_cos_sin
from apportion.host.rope import unapply as derotate
from apportion.testing.contracts import KVPolicyContract
from apportion_kvcache.kvcomm import (
    KVCOMM,
    Anchor,
    AnchorMismatchError,
    AnchorPool,
    AnchorPoolFileError,
)
from apportion_kvcache.kvcomm.agents import make_tasks, round2_prompt


class TestKVCOMMContract(KVPolicyContract):
    """With no shared segment declared, kvcomm prefills like ``full`` (batches always do)."""

    component = "kvcomm"


def test_derotate_inverts_the_models_rope(smollm2):
    x = torch.randn(3, 20, 64)
    cos, sin = rope_cos_sin(smollm2.model, torch.arange(100, 120), torch.float32)
    assert torch.allclose(derotate(rotate(x, cos, sin), cos, sin), x, atol=1e-5)
    # and rotate is what the model applies: keys at position p equal rotate(raw key, p)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    _, k = apply_rotary_pos_emb(x[None], x[None], cos[None], sin[None])
    assert torch.allclose(k[0], rotate(x, cos, sin), atol=1e-5)


def _logits(smollm2, policy, prompt):
    host = Host(smollm2, kv_policy=policy)
    enc = host.encode(prompt)
    ids = torch.tensor([enc.ids])
    with torch.inference_mode():
        cache = policy.make_cache(smollm2.model)
        return policy.prefill(
            smollm2.model, ids, torch.ones_like(ids), cache, question_len=enc.question_len
        ).logits[0]


@pytest.fixture(scope="module")
def team(smollm2):
    """Two tasks; task 0's prompts fill the pool, task 1's reuse it."""
    tasks = make_tasks(2, sentences_per_doc=6, seed=5)
    policy = KVCOMM()
    messages = {
        "Researcher": "The answer is in the second sentence of the document, I checked it twice.",
        "Critic": "I agree with the Researcher and found no other number that matches the "
        "question.",
    }
    return policy, tasks, messages


def test_same_slot_reuse_matches_full_prefill(smollm2, team):
    policy, tasks, messages = team
    for t in tasks:
        policy.share(t.document, smollm2.tokenizer)
    for m in messages.values():
        policy.share(m, smollm2.tokenizer)
    # task 0: every occurrence is new -> prefilled exactly, anchors recorded
    p0 = round2_prompt("Analyst", tasks[0], messages)
    full0 = _logits(smollm2, KVPolicy(), p0)
    got0 = _logits(smollm2, policy, p0)
    assert policy.last_info["occurrences"] == 3 and policy.last_info["reused"] == 0
    assert (got0 - full0).abs().max() < 1e-3
    assert len(policy.pool) == 3
    # task 1: a different document of another length in the same slots: everything reused,
    # messages shifted to new positions (RoPE re-rotated), offsets blended from the anchors
    p1 = round2_prompt("Analyst", tasks[1], messages)
    full1 = _logits(smollm2, KVPolicy(), p1)
    got1 = _logits(smollm2, policy, p1)
    info = policy.last_info
    # the document's first tokens were recomputed: the occurrence counts only as its reused share
    assert info["recomputed_tokens"] > 0 and 2.9 < info["reused"] < 3
    seg_tokens = sum(
        len(s.ids) for s in policy.segments if s.text in (tasks[1].document, *messages.values())
    )
    assert info["reused_tokens"] + info["recomputed_tokens"] == seg_tokens
    assert int(got1.argmax()) == int(full1.argmax())
    kl = torch.nn.functional.kl_div(
        got1.log_softmax(-1), full1.log_softmax(-1), log_target=True, reduction="sum"
    )
    assert kl < 0.5, float(kl)


def test_generation_with_reuse(smollm2, team):
    policy, tasks, messages = team
    prompt = round2_prompt("Analyst", tasks[1], messages)
    got = Host(smollm2, kv_policy=policy).generate(prompt, max_new_tokens=12)[0]
    ref = Host(smollm2, kv_policy=KVPolicy()).generate(prompt, max_new_tokens=12)[0]
    assert policy.last_info["occurrences"] == 3 and policy.last_info["reused"] > 2.9
    assert tasks[1].answer in ref.text
    assert tasks[1].answer in got.text


def test_pool_round_trip_and_model_check(smollm2, team, tmp_path):
    policy, _, _ = team
    fp = fingerprint(smollm2.model)
    path = policy.pool.save(tmp_path / "anchors.safetensors")
    again = AnchorPool.load(path, fingerprint=fp)
    assert len(again) == len(policy.pool) and again.fingerprint == fp
    assert all(
        a.base_k is not None for v in again.slots.values() for a in v
    )  # 'nearest' mode needs them
    with pytest.raises(AnchorMismatchError, match="recorded with model"):
        AnchorPool.load(path, fingerprint="0" * 16)
    foreign = Anchor(
        "slot",
        4,
        torch.zeros(384),
        torch.zeros(1, 1, 4, 2),
        torch.zeros(1, 1, 4, 2),
        "feedfacefeedface",
    )
    with pytest.raises(AnchorMismatchError, match="feedfacefeedface"):
        again.add(foreign)
    # a pool from another model is refused when used with this one
    other = KVCOMM(pool=AnchorPool("feedfacefeedface"))
    other.share(_doc := make_tasks(1, seed=9)[0].document, smollm2.tokenizer)
    ids = torch.tensor([Host(smollm2).encode(Prompt([{"role": "user", "content": _doc}])).ids])
    with pytest.raises(AnchorMismatchError):
        other.prefill(smollm2.model, ids, torch.ones_like(ids), other.make_cache(smollm2.model))
    # damage is detected, never silently loaded
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(AnchorPoolFileError, match="checksum"):
        AnchorPool.load(bad)


def test_base_prefix_is_a_chat_prompt_opening(smollm2):
    policy = KVCOMM()
    policy.bind_tokenizer(smollm2.tokenizer)
    ids = policy._base_prefix_ids(smollm2.model)
    assert ids[0] == smollm2.tokenizer.bos_token_id
    text = smollm2.tokenizer.decode(ids)
    assert "system" in text and text.endswith("user\nContext:\n")
    plain = KVCOMM(KVCOMM.Config(base_chat=False, base_bos=False))
    plain.bind_tokenizer(smollm2.tokenizer)
    assert smollm2.tokenizer.decode(plain._base_prefix_ids(smollm2.model)) == "Context:\n"


def test_recomputed_head_is_exact_and_counted_out(smollm2):
    """With anchors present, the head of a reused segment is computed exactly (here the segment
    is the first one, so its head KV equals full prefill's) and is not counted as reused."""
    task = make_tasks(2, sentences_per_doc=6, seed=3)
    policy = KVCOMM(KVCOMM.Config(recompute_head=0.1))
    for t in task:
        policy.share(t.document, smollm2.tokenizer)
    host = Host(smollm2, kv_policy=policy)
    _logits(
        smollm2,
        policy,
        Prompt([{"role": "user", "content": f"Document:\n{task[0].document}\n\nWhat?"}]),
    )
    prompt = Prompt([{"role": "user", "content": f"Document:\n{task[1].document}\n\nWhat?"}])
    ids = torch.tensor([host.encode(prompt).ids])
    with torch.inference_mode():
        cache = policy.make_cache(smollm2.model)
        policy.prefill(smollm2.model, ids, torch.ones_like(ids), cache)
        ref = KVPolicy().make_cache(smollm2.model)
        smollm2.model(input_ids=ids, use_cache=True, **cache_kwargs(smollm2.model, ref))
    seg = next(s for s in policy.segments if s.text == task[1].document)
    n, head = len(seg.ids), int(len(seg.ids) * 0.1)
    info = policy.last_info
    assert info["recomputed_tokens"] == head and info["reused_tokens"] == n - head
    assert info["reused"] == pytest.approx((n - head) / n)
    start = next(i for i in range(ids.shape[1]) if ids[0, i : i + n].tolist() == seg.ids)
    for layer in (0, len(cache.layers) // 2, len(cache.layers) - 1):
        got, want = (
            cache.layers[layer].keys[0, :, start : start + head],
            ref.layers[layer].keys[0, :, start : start + head],
        )
        assert torch.allclose(got, want, atol=1e-4)
        # past the head the KV is reused (approximate): not bit-identical to full prefill
        assert (
            not torch.allclose(
                cache.layers[layer].keys[0, :, start + head : start + n],
                ref.layers[layer].keys[0, :, start + head : start + n],
                atol=1e-4,
            )
            or layer == 0
        )


def test_message_base_after_its_document_is_closer_to_its_kv_in_a_prompt(smollm2):
    """A message shared with ``context=`` (the document it was written about) has its base KV
    computed after that document: much closer to its KV in a team prompt than a base after the
    neutral prefix alone, so the offset left to the anchors is smaller."""
    task = make_tasks(1, sentences_per_doc=6, seed=5)[0]
    msg = f"The answer is {task.answer}, I found it in the document and checked it twice."
    messages = {
        "Researcher": msg,
        "Critic": "I agree with the Researcher and found no other number to confuse.",
    }
    prompt = round2_prompt("Analyst", task, messages)
    ids = Host(smollm2).encode(prompt).ids
    with torch.inference_mode():
        ref = KVPolicy().make_cache(smollm2.model)
        smollm2.model(
            input_ids=torch.tensor([ids]), use_cache=True, **cache_kwargs(smollm2.model, ref)
        )
    dist = []
    for context in (None, task.document):
        policy = KVCOMM()
        policy.share(task.document, smollm2.tokenizer)
        seg = policy.share(msg, smollm2.tokenizer, context=context)
        with torch.inference_mode():
            policy._base(smollm2.model, seg, policy._base_prefix_ids(smollm2.model))
        start = next(i for i in range(len(ids)) if ids[i : i + len(seg.ids)] == seg.ids)
        cos, sin = rope_cos_sin(
            smollm2.model, torch.arange(start, start + len(seg.ids)), torch.float32
        )
        true_k = torch.stack(
            [
                derotate(c.keys[0, :, start : start + len(seg.ids)].float(), cos, sin)
                for c in ref.layers
            ]
        )
        dist.append(float((true_k - seg.base_k).norm(dim=-1).mean()))
    assert dist[1] < 0.7 * dist[0], dist


# ----------------------------------------------------------------------- pool files, hostile


def _pool(fp: str = "feedfacefeedface") -> AnchorPool:
    g = torch.Generator().manual_seed(0)
    pool = AnchorPool(fp, max_per_slot=4)
    for i, slot in enumerate(["doc", "doc", "msg"]):
        emb = torch.nn.functional.normalize(torch.randn(384, generator=g), dim=0)
        dk, dv = (torch.randn(2, 1, 5 + i, 4, generator=g).half() for _ in range(2))
        base = torch.randn(2, 1, 5 + i, 4, generator=g).half() if i == 0 else None
        pool.add(Anchor(slot, 5 + i, emb, dk, dv, fp, base_k=base))
    return pool


def _same_pool(a: AnchorPool, b: AnchorPool) -> bool:
    rows = [
        [(x.slot, x.length, x.fingerprint, x.delta_k.tolist()) for v in p.slots.values() for x in v]
        for p in (a, b)
    ]
    return (a.fingerprint, a.max_per_slot, rows[0]) == (b.fingerprint, b.max_per_slot, rows[1])


def test_every_bit_flip_of_the_pool_metadata_is_a_typed_error(tmp_path):
    """The checksum covers the metadata (format, version, fingerprint, anchors, cap) and the
    tensors' names, dtypes and shapes: no flip in the header region loads, none escapes
    untyped."""
    pool = _pool()
    path = pool.save(tmp_path / "pool.safetensors")
    assert _same_pool(AnchorPool.load(path), pool)
    raw = path.read_bytes()
    region = 8 + int.from_bytes(raw[:8], "little")
    bad = tmp_path / "bad.safetensors"
    untyped, loaded = [], []
    for pos in range(region):
        for bit in range(8):
            data = bytearray(raw)
            data[pos] ^= 1 << bit
            bad.write_bytes(bytes(data))
            try:
                got = AnchorPool.load(bad)
            except AnchorPoolFileError:
                continue
            except Exception as exc:  # noqa: BLE001 - what the test looks for
                untyped.append((pos, bit, repr(exc)[:120]))
            else:
                loaded.append((pos, bit, _same_pool(got, pool)))
    assert not untyped, untyped[:10]
    assert not loaded, loaded[:10]


def test_pool_values_are_validated(tmp_path):
    pool = _pool()
    pool.slots["doc"][0].length = -3
    with pytest.raises(AnchorPoolFileError, match="length"):
        AnchorPool.load(pool.save(tmp_path / "a.safetensors"))
    pool = _pool()
    stranger = _pool("0123456789abcdef").slots["msg"][0]
    pool.slots["msg"].append(stranger)  # bypasses add(): a file that contradicts itself
    with pytest.raises(AnchorPoolFileError, match="fingerprint"):
        AnchorPool.load(pool.save(tmp_path / "b.safetensors"))
    pool = _pool()
    pool.slots["doc"][1].delta_v = pool.slots["doc"][1].delta_v[:, :, :2]
    with pytest.raises(AnchorPoolFileError, match="shape"):
        AnchorPool.load(pool.save(tmp_path / "c.safetensors"))


def test_deeply_nested_pool_metadata_is_a_typed_error(tmp_path, monkeypatch):
    import json

    import apportion_kvcache.kvcomm.pool as pool_mod

    class NestedJSON:
        """json whose dump of the anchor list is 50,000 levels deep (a hostile writer)."""

        def __getattr__(self, name):
            return getattr(json, name)

        @staticmethod
        def dumps(obj, **kw):
            if isinstance(obj, list) and obj and isinstance(obj[0], dict) and "slot" in obj[0]:
                return "[" * 50_000 + "]" * 50_000
            return json.dumps(obj, **kw)

    monkeypatch.setattr(pool_mod, "json", NestedJSON())
    path = _pool().save(tmp_path / "deep.safetensors")
    monkeypatch.undo()
    with pytest.raises(AnchorPoolFileError, match="nested"):
        AnchorPool.load(path)


def test_version_2_pools_still_load(tmp_path):
    """Version 2 files (checksum over the tensors only) load, their values checked."""
    import json

    from apportion_kvcache.kvcomm.pool import _digest
    from safetensors.torch import save

    pool = _pool()
    tensors, meta = {}, []
    for i, a in enumerate(a for v in pool.slots.values() for a in v):
        tensors.update({f"{i}.dk": a.delta_k, f"{i}.dv": a.delta_v, f"{i}.emb": a.embedding})
        if a.base_k is not None:
            tensors[f"{i}.bk"] = a.base_k
        meta.append({"slot": a.slot, "length": a.length, "fingerprint": a.fingerprint})
    header = {
        "format": "apportion-kvcomm-anchors",
        "version": "2",
        "fingerprint": pool.fingerprint,
        "anchors": json.dumps(meta),
        "sha256": _digest(tensors),
        "max_per_slot": str(pool.max_per_slot),
    }
    path = tmp_path / "v2.safetensors"
    path.write_bytes(save(tensors, metadata=header))
    assert _same_pool(AnchorPool.load(path), pool)


@pytest.mark.parametrize("version", ["3", "2"])
def test_a_zero_dim_tensor_in_a_pool_is_a_typed_error(tmp_path, version):
    """A 0-dim float tensor (a crafted file) is checksummed like any other, then refused by the
    value checks; a wrong digest over it is a checksum mismatch. Never a raw RuntimeError."""
    import json

    from apportion_kvcache.kvcomm.pool import _digest, _digest_v3
    from safetensors.torch import save

    pool = _pool()
    tensors, meta = {}, []
    for i, a in enumerate(a for v in pool.slots.values() for a in v):
        tensors.update({f"{i}.dk": a.delta_k, f"{i}.dv": a.delta_v, f"{i}.emb": a.embedding})
        meta.append({"slot": a.slot, "length": a.length, "fingerprint": a.fingerprint})
    tensors["1.emb"] = torch.tensor(0.5)  # 0-dim float32
    header = {
        "format": "apportion-kvcomm-anchors",
        "version": version,
        "fingerprint": pool.fingerprint,
        "anchors": json.dumps(meta),
        "max_per_slot": str(pool.max_per_slot),
    }
    header["sha256"] = _digest_v3(header, tensors) if version == "3" else _digest(tensors)
    path = tmp_path / "zero-dim.safetensors"
    path.write_bytes(save(tensors, metadata=header))
    with pytest.raises(AnchorPoolFileError, match="anchor 1: tensor shapes"):
        AnchorPool.load(path)
    path.write_bytes(save(tensors, metadata={**header, "sha256": "0" * 64}))
    with pytest.raises(AnchorPoolFileError, match="checksum mismatch"):
        AnchorPool.load(path)
    # a pool holding one saves (the digest takes any shape) and is refused the same way
    pool.slots["doc"][1].embedding = torch.tensor(0.5)
    with pytest.raises(AnchorPoolFileError, match="anchor 1: tensor shapes"):
        AnchorPool.load(pool.save(tmp_path / "saved.safetensors"))
