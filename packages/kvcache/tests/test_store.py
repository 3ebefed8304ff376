"""KV store: local directory and Redis backends, with real processes and a real redis-server."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from apportion_kvcache.cachegen import CacheGenCodec, CodecConfig
from apportion_kvcache.errors import KVMismatchError, StoreUnavailableError
from apportion_kvcache.store import LocalStore, RedisStore, StoreFullError, prefix_key


def _kv(layers=2, tokens=20, heads=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(1, heads, tokens, dim, generator=g),
            torch.randn(1, heads, tokens, dim, generator=g),
        )
        for _ in range(layers)
    ]


def test_keys_depend_on_model_and_every_token():
    assert prefix_key("m", [1, 2, 3]) != prefix_key("m", [1, 2, 4])
    assert prefix_key("m", [1, 2, 3]) != prefix_key("n", [1, 2, 3])
    assert prefix_key("m", [1, 2, 3]) == prefix_key("m", (1, 2, 3))


def test_local_round_trip_kv_and_bitstream(tmp_path):
    store = LocalStore(tmp_path)
    kv = _kv()
    store.save_kv("fp", list(range(20)), kv)
    got = store.load_kv("fp", list(range(20)))
    for (k, v), (k2, v2) in zip(kv, got, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    assert store.load_kv("fp", list(range(19))) is None
    assert store.load_kv("other", list(range(20))) is None
    codec = CacheGenCodec(CodecConfig(chunk_tokens=10))
    bs = codec.encode(kv, fingerprint="fp")
    store.save_bitstream("fp", list(range(100, 120)), bs)
    dec = store.load_kv("fp", list(range(100, 120)), codec=codec)
    assert dec[0][0].shape == kv[0][0].shape
    with pytest.raises(KVMismatchError):
        store.save_bitstream("another-model", [1, 2], bs)
    assert not list(Path(tmp_path).rglob(".*.tmp-*"))


def test_local_corruption_is_a_counted_miss(tmp_path, caplog):
    """Damage is never returned and never raised: the entry is set aside, the reason logged."""
    store = LocalStore(tmp_path)
    cases = [
        ("flip", "checksum"),
        ("cut", "bytes"),
        ('{"format": "apportion-kvstore", "version": 9}', "version 9"),
        ("not json", "JSON"),
    ]
    for n, (damage, reason) in enumerate(cases, 1):
        key = store.save_kv("fp", [1, 2, 3], _kv(tokens=3))
        payload = next(Path(tmp_path).glob(f"??/{key}*.bin"))
        manifest = payload.parent / f"{key}.json"
        data = bytearray(payload.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0x55
            payload.write_bytes(bytes(data))
        elif damage == "cut":
            payload.write_bytes(bytes(data[:10]))
        else:
            manifest.write_text(damage)
        caplog.clear()
        with caplog.at_level("WARNING", logger="apportion_kvcache.store"):
            assert store.get(key) is None
        assert store.stats["corrupt"] == n and reason in caplog.text, (damage, caplog.text)


def test_token_count_must_match(tmp_path):
    with pytest.raises(ValueError, match="3 tokens"):
        LocalStore(tmp_path).save_kv("fp", [1, 2], _kv(tokens=3))


def test_mismatched_model_shape_on_load(tmp_path, smollm2):
    store = LocalStore(tmp_path)
    store.save_kv("fp", [1, 2, 3], _kv(layers=2, tokens=3, heads=3, dim=64))
    with pytest.raises(KVMismatchError, match="layers=2"):
        store.load_kv("fp", [1, 2, 3], model=smollm2.model)


def test_lru_cap_never_evicts_the_entry_being_written(tmp_path):
    one = len(
        __import__("safetensors.torch", fromlist=["save"]).save(
            {f"{s}.{i}": t for i, (k, v) in enumerate(_kv()) for s, t in (("k", k), ("v", v))}
        )
    )
    store = LocalStore(tmp_path, max_bytes=int(one * 2.5))
    keys = [store.save_kv("fp", [i] * 20, _kv(tokens=20)) for i in range(2)]
    time.sleep(0.05)
    store.get(keys[0])  # refresh: key 1 is now the least recently used
    k3 = store.save_kv("fp", [2] * 20, _kv(tokens=20))
    assert set(store.keys()) == {keys[0], k3}
    assert store.total_bytes() <= store.max_bytes
    with pytest.raises(StoreFullError, match="cap"):
        LocalStore(tmp_path / "tiny", max_bytes=10).save_kv("fp", [1] * 20, _kv())


def _writer(root: str, worker: int, n: int) -> None:
    store = LocalStore(root, max_bytes=40_000)
    for i in range(n):
        # half the keys are shared by all workers (same key, racing writers), half are private
        tokens = [i] * 20 if i % 2 else [1000 * worker + i] * 20
        store.save_kv("fp", tokens, _kv(tokens=20, seed=worker * 100 + i))
        got = store.load_kv("fp", tokens)
        assert got is None or got[0][0].shape == (1, 3, 20, 8)


def test_concurrent_writers_in_several_processes(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 8)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(400)
        assert p.exitcode == 0
    store = LocalStore(tmp_path, max_bytes=40_000)
    keys = store.keys()
    assert keys and store.total_bytes() <= 40_000
    for key in keys:  # every surviving entry is whole and consistent
        entry = store.get(key)
        assert entry is not None and entry.kind == "kv"
    assert not list(Path(tmp_path).rglob(".*.tmp-*"))


# ------------------------------------------------------------------------------------- redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port, killed after the module."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (Debian package redis-server)")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.time() + 20
    while True:
        try:
            RedisStore(url, timeout=0.5).ping()
            break
        except StoreUnavailableError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


def _redis_writer(url: str, worker: int) -> None:
    store = RedisStore(url, namespace="share")
    store.save_kv("fp", [worker, 7] * 10, _kv(seed=worker))


def test_redis_processes_share_contexts(redis_url):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_redis_writer, args=(redis_url, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(400)
        assert p.exitcode == 0
    store = RedisStore(redis_url, namespace="share")
    for w in range(3):
        got = store.load_kv("fp", [w, 7] * 10)
        assert torch.equal(got[1][1], _kv(seed=w)[1][1])


def test_redis_cap_and_corruption(redis_url):
    import redis

    store = RedisStore(redis_url, namespace="cap", max_bytes=9_000)
    keys = [store.save_kv("fp", [i] * 20, _kv()) for i in range(3)]
    assert keys[-1] in store.keys() and len(store.keys()) < 3
    r = redis.Redis.from_url(redis_url)
    r.set(f"cap:p:{keys[-1]}", b"garbage")
    assert store.get(keys[-1]) is None and store.stats["corrupt"] == 1
    assert keys[-1] not in store.keys()


def test_redis_down_is_a_clear_error():
    store = RedisStore(f"redis://127.0.0.1:{_free_port()}/0", timeout=0.5)
    with pytest.raises(StoreUnavailableError, match="cannot reach the Redis KV store"):
        store.save_kv("fp", [1] * 20, _kv())
