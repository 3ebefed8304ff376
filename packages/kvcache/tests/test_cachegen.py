"""CacheGen codec: round trip, bitstream layout, independence of chunks, and hostile input."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from apportion_kvcache.cachegen import (
    MAGIC,
    VERSION,
    CacheGenCodec,
    CodecConfig,
    kv_error,
    uniform_per_token,
)
from apportion_kvcache.errors import CorruptKVError, KVMismatchError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def _kv(layers=4, batch=1, heads=3, tokens=95, dim=16, seed=0):
    """KV with the structure real caches have: per-channel offsets/scales, slow drift along
    tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        pair = []
        for _ in range(2):
            offset = torch.randn(1, heads, 1, dim, generator=g) * 3
            scale = torch.rand(1, heads, 1, dim, generator=g) * 2 + 0.1
            drift = torch.randn(batch, heads, tokens, dim, generator=g).cumsum(2) * 0.05
            pair.append(
                offset + scale * (drift + 0.2 * torch.randn(batch, heads, tokens, dim, generator=g))
            )
        out.append((pair[0], pair[1]))
    return out


SMALL = CodecConfig(chunk_tokens=40, group_size=10)


def test_round_trip_error_falls_with_level():
    kv = _kv()
    codec = CacheGenCodec(SMALL)
    errs, sizes = [], []
    for level in range(codec.n_levels):
        bs = codec.encode(kv, fingerprint="m", level=level)
        out = codec.decode(bs, fingerprint="m")
        assert [tuple(k.shape) for k, _ in out] == [tuple(k.shape) for k, _ in kv]
        errs.append(kv_error(kv, out)["rel_rmse"])
        sizes.append(len(bs))
    assert errs == sorted(errs) and errs[0] < 0.02
    assert sizes == sorted(sizes, reverse=True)


def test_smaller_than_8bit_uniform_and_fp16():
    kv = _kv(tokens=400, dim=64)
    codec = CacheGenCodec()
    _, u8_bytes = uniform_per_token(kv)
    fp16 = sum(k.numel() * 2 * 2 for k, _ in kv)
    sizes = [len(codec.encode(kv, level=i)) for i in range(codec.n_levels)]
    assert sizes[1] < u8_bytes and sizes[-1] < fp16 / 3


def test_header_names_everything_and_chunks_decode_alone():
    kv = _kv(tokens=95)
    codec = CacheGenCodec(SMALL)
    bs = codec.encode(kv, fingerprint="model-a", level=1)
    h = codec.read_header(bs)
    assert (h.version, h.fingerprint, h.dtype, h.layers, h.kv_heads, h.tokens, h.level) == (
        VERSION,
        "model-a",
        "float32",
        4,
        3,
        95,
        1,
    )
    assert [c.tokens for c in h.chunks] == [40, 40, 15]
    whole = torch.stack([torch.stack([k, v]) for k, v in codec.decode(bs)])
    for i, c in enumerate(h.chunks):
        part = codec.decode_chunk(bs, i, header=h)
        torch.testing.assert_close(part, whole[..., c.start : c.start + c.tokens, :])


def test_decodes_into_hf_cache_and_checks_model(smollm2):
    cfg = smollm2.model.config
    kv = _kv(
        layers=cfg.num_hidden_layers, heads=cfg.num_key_value_heads, dim=cfg.head_dim, tokens=12
    )
    codec = CacheGenCodec(SMALL)
    bs = codec.encode(kv, fingerprint="fp")
    cache = codec.decode_into_cache(bs, smollm2.model, fingerprint="fp")
    assert cache.get_seq_length() == 12 and len(cache.layers) == cfg.num_hidden_layers
    with pytest.raises(KVMismatchError, match="another|not for"):
        codec.decode(bs, fingerprint="other")
    wrong = codec.encode(_kv(layers=3, heads=cfg.num_key_value_heads, dim=cfg.head_dim, tokens=12))
    with pytest.raises(KVMismatchError, match="layers=3"):
        codec.decode_into_cache(wrong, smollm2.model)


def test_bad_input_to_encoder():
    codec = CacheGenCodec()
    kv = _kv(layers=2)
    with pytest.raises(ValueError, match="level"):
        codec.encode(kv, level=99)
    bad = [(kv[0][0].clone(), kv[0][1])]
    bad[0][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(bad)


def _rewrite_header(bs: bytes, **changes) -> bytes:
    magic, version, hlen = struct.unpack_from("<8sHI", bs, 0)
    header = json.loads(bs[14 : 14 + hlen])
    header.update(changes)
    hb = json.dumps(header).encode()
    return (
        struct.pack("<8sHI", magic, version, len(hb))
        + hb
        + struct.pack("<I", zlib.crc32(hb))
        + bs[14 + hlen + 4 :]
    )


@pytest.fixture(scope="module")
def stream():
    return CacheGenCodec(SMALL).encode(_kv(layers=2, tokens=50), fingerprint="m")


def test_truncated_corrupt_foreign_future(stream):
    codec = CacheGenCodec(SMALL)
    for cut in (0, 5, 20, len(stream) // 2, len(stream) - 1):
        with pytest.raises(CorruptKVError):
            codec.decode(stream[:cut])
    flipped = bytearray(stream)
    flipped[-10] ^= 0xFF
    with pytest.raises(CorruptKVError, match="checksum"):
        codec.decode(bytes(flipped))
    with pytest.raises(CorruptKVError, match="magic"):
        codec.decode(b"PK\x03\x04" + stream[4:])
    future = struct.pack("<8sHI", MAGIC, VERSION + 1, 0) + stream[14:]
    with pytest.raises(CorruptKVError, match=f"version {VERSION + 1}"):
        codec.decode(future)
    with pytest.raises(CorruptKVError, match="trailing"):
        codec.decode(stream + b"\0")


def test_version_1_streams_still_decode(monkeypatch):
    """v1 wrote uint32 symbol counts; a v2 build reads them, and refuses uint16 counts under v1."""
    import apportion_kvcache.cachegen.codec as cg

    kv = _kv(layers=2, tokens=50)
    codec = CacheGenCodec(SMALL)
    monkeypatch.setattr(cg, "_compact", lambda counts: counts.astype(np.uint32))
    wide = codec.encode(kv, fingerprint="m")
    monkeypatch.undo()
    as_v1 = _with_version(_rewrite_header(wide, version=1), 1)
    torch.testing.assert_close(codec.decode(as_v1), codec.decode(wide))
    narrow = _with_version(_rewrite_header(codec.encode(kv, fingerprint="m"), version=1), 1)
    with pytest.raises(CorruptKVError, match="counts"):
        codec.decode(narrow)


def _with_version(bs: bytes, version: int) -> bytes:
    magic, _, hlen = struct.unpack_from("<8sHI", bs, 0)
    return struct.pack("<8sHI", magic, version, hlen) + bs[14:]


def test_header_lies_never_allocate(stream):
    codec = CacheGenCodec(SMALL)
    with pytest.raises(CorruptKVError, match="cap|tokens"):
        codec.decode(_rewrite_header(stream, tokens=1 << 26, layers=4096))
    with pytest.raises(CorruptKVError):
        codec.decode(_rewrite_header(stream, head_dim=-1))
    with pytest.raises(CorruptKVError):
        codec.decode(_rewrite_header(stream, batch=2))  # chunk fields then do not fit
    with pytest.raises(CorruptKVError):
        codec.decode(_rewrite_header(stream, bins=[3]))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_decoder_raises_only_corrupt(stream, data):
    """Random edits anywhere never crash or hang the decoder: it returns or raises
    CorruptKVError."""
    codec = CacheGenCodec(SMALL)
    buf = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del buf[pos : pos + data.draw(st.integers(1, 64))]
        else:
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    try:
        codec.decode(bytes(buf))
    except CorruptKVError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(blob):
    with pytest.raises(CorruptKVError):
        CacheGenCodec().decode(MAGIC + blob if blob[:1] == b"\0" else blob)


# ----------------------------------------------------------------------- hostile, consistent


def _bomb() -> bytes:
    """A fully consistent stream (valid digest and CRC) built with the codec's own writers:
    a real one-element-wide KV, then the shape blown up (batch 2, 2**26 tokens: 2**28 values)
    and degenerate symbol tables (one symbol of probability one) that decode it for free."""
    import hashlib

    from apportion_kvcache.cachegen.codec import _compact
    from safetensors.numpy import save

    real = CacheGenCodec().encode(_kv(layers=1, heads=1, tokens=40, dim=1))
    b, t, g = 2, 1 << 26, 1 << 20
    n_anchor = b * (t // g)
    n_resid = b * t - n_anchor
    blob = save(
        {
            "mean": np.zeros((1, 2, 1, 1), np.float16),
            "step": np.ones((1, 2), np.float16),
            "use_delta": np.zeros((1, 2, 1, 1), np.uint8),
            "tables": np.array([[0, 2]] * 4, np.int32),
            "counts": _compact(np.array([n_anchor, 0, n_resid, 0] * 2, np.uint32)),
            "words": np.zeros(1, np.uint32),
        }
    )
    chunk = {
        "start": 0,
        "tokens": t,
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    bomb = _rewrite_header(real, batch=b, tokens=t, group_size=g, chunks=[chunk])
    _, _, hlen = struct.unpack_from("<8sHI", bomb, 0)
    return bomb[: 14 + hlen + 4] + blob


def test_a_consistent_decompression_bomb_fails_fast():
    import resource
    import time

    bomb = _bomb()
    assert len(bomb) < 2048
    codec = CacheGenCodec()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(CorruptKVError, match="justif|cap"):
        codec.read_header(bomb)
    with pytest.raises(CorruptKVError, match="justif|cap"):
        codec.decode(bomb)
    assert time.perf_counter() - t0 < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200 << 10  # KiB


def test_the_output_cap_is_configurable(stream):
    h = CacheGenCodec(SMALL).read_header(stream)
    values = 2 * h.layers * h.batch * h.kv_heads * h.tokens * h.head_dim
    assert CacheGenCodec(SMALL, max_elements=values).decode(stream)
    with pytest.raises(CorruptKVError, match="cap"):
        CacheGenCodec(SMALL, max_elements=values - 1).decode(stream)


def test_a_deeply_nested_header_is_corrupt_not_a_recursion_error(stream):
    magic, version, hlen = struct.unpack_from("<8sHI", stream, 0)
    text = stream[14 : 14 + hlen].decode()
    assert '"meta":{}' in text
    hb = text.replace('"meta":{}', '"meta":' + "[" * 100_000 + "]" * 100_000).encode()
    bad = struct.pack("<8sHI", magic, version, len(hb)) + hb + struct.pack("<I", zlib.crc32(hb))
    bad += stream[14 + hlen + 4 :]
    with pytest.raises(CorruptKVError, match="nested"):
        CacheGenCodec(SMALL).decode(bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda: [(torch.zeros(1, 3, 50, 16), torch.zeros(1, 3, 50, 16)) for _ in range(3)],
        lambda: [(torch.full((1, 3, 50, 16), 3.5), torch.full((1, 3, 50, 16), -2.0))] * 3,
        lambda: _kv(layers=3, tokens=50)[:2] + [(torch.zeros(1, 3, 50, 16),) * 2],
        lambda: [(k, torch.full_like(v, 0.1)) for k, v in _kv(layers=3, tokens=50)],
        lambda: [(torch.full((2, 3, 1, 16), 7.0), torch.zeros(2, 3, 1, 16))],  # one token
    ],
    ids=["all-zero", "constant", "one-zero-layer", "constant-values", "one-token"],
)
def test_constant_layers_encode_and_round_trip(make):
    kv = make()
    codec = CacheGenCodec(SMALL)
    for level in range(codec.n_levels):
        bs = codec.encode(kv, fingerprint="m", level=level)
        out = codec.decode(bs, fingerprint="m")
        for (k, v), (k2, v2) in zip(kv, out, strict=True):
            for a, b in ((k, k2), (v, v2)):
                if bool((a == a.flatten()[0]).all()) and float(a.flatten()[0]) in (
                    0.0,
                    3.5,
                    -2.0,
                    7.0,
                ):
                    assert torch.equal(a, b)  # a constant fp16 can hold is exact
                else:
                    assert (a - b).abs().max() <= 0.05 * a.abs().max() + 1e-3


def test_a_layer_that_quantizes_to_one_symbol_encodes():
    """Coarse bins over one layer of tiny spread next to a wide one: every value of that layer
    falls in one bin (a one-symbol table), which the range coder cannot model directly."""
    kv = _kv(layers=2, tokens=50)
    kv[1] = (kv[1][0] * 1e-4, kv[1][1] * 1e-4)
    codec = CacheGenCodec(CodecConfig(levels=[[2]], chunk_tokens=40, group_size=10))
    out = codec.decode(codec.encode(kv))
    assert kv_error(kv, out)["rel_rmse"] < 1.0
