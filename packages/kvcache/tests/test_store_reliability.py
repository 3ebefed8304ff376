"""KV store reliability: damaged and torn entries are misses (quarantined, counted), leaked files
are reclaimed, a full disk or a full Redis is a StoreFullError, a bad URL a ConfigError. Real
files, real child processes killed with SIGKILL, a real small filesystem, real redis-servers."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest
import torch
from apportion.errors import ApportionError, ConfigError
from apportion_kvcache.errors import StoreFullError
from apportion_kvcache.store import LocalStore, RedisStore, prefix_key

TOKENS = list(range(20))


def _kv(layers=2, tokens=20, heads=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(1, heads, tokens, dim, generator=g),
            torch.randn(1, heads, tokens, dim, generator=g),
        )
        for _ in range(layers)
    ]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(k, k2) and torch.equal(v, v2) for (k, v), (k2, v2) in zip(a, b, strict=True)
    )


def _payloads(root: Path, key: str) -> list[Path]:
    return sorted(root.glob(f"??/{key}*.bin"))


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _on_disk(root: Path) -> int:
    return sum(p.stat().st_size for p in _files(root))


# ------------------------------------------------------------------------ damaged entries


def test_damaged_payload_is_a_miss_quarantined_and_counted(tmp_path, caplog):
    store = LocalStore(tmp_path)
    key = store.save_kv("fp", TOKENS, _kv())
    (payload,) = _payloads(tmp_path, key)
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x55
    payload.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="apportion_kvcache.store"):
        assert store.load_kv("fp", TOKENS) is None
    assert store.stats["corrupt"] == 1
    assert "checksum" in caplog.text and key[:12] in caplog.text
    assert key not in store.keys() and not _payloads(tmp_path, key)
    quarantined = list((tmp_path / "quarantine").iterdir())
    assert quarantined and all(key in p.name for p in quarantined)
    assert store.load_kv("fp", TOKENS) is None and store.stats["corrupt"] == 1  # a plain miss
    store.save_kv("fp", TOKENS, _kv(seed=1))  # the context works again
    assert _same(store.load_kv("fp", TOKENS), _kv(seed=1))


@pytest.mark.parametrize(
    "damage",
    ["truncate", "manifest-garbage", "manifest-future", "manifest-nested", "payload-missing"],
)
def test_every_kind_of_damage_is_a_counted_miss(tmp_path, damage):
    store = LocalStore(tmp_path)
    key = store.save_kv("fp", TOKENS, _kv())
    (payload,) = _payloads(tmp_path, key)
    manifest = payload.parent / f"{key}.json"
    if damage == "truncate":
        payload.write_bytes(payload.read_bytes()[:10])
    elif damage == "manifest-garbage":
        manifest.write_text("not json")
    elif damage == "manifest-future":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 99}))
    elif damage == "manifest-nested":  # deep nesting: a typed failure, never RecursionError
        manifest.write_text(
            '{"format": "apportion-kvstore", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
        )
    else:
        payload.unlink()
    assert store.load_kv("fp", TOKENS) is None
    assert store.stats["corrupt"] == 1
    assert store.get(key) is None
    store.save_kv("fp", TOKENS, _kv(seed=3))
    assert _same(store.load_kv("fp", TOKENS), _kv(seed=3))


def test_a_consistent_entry_that_does_not_decode_is_a_counted_miss(tmp_path):
    """Right digest, wrong content (a foreign writer): decoding fails -> a miss, not an error."""
    store = LocalStore(tmp_path)
    key = prefix_key("fp", TOKENS)
    store.put(key, "cachegen", b"not a bitstream at all", fingerprint="fp", tokens=len(TOKENS))
    assert store.load_kv("fp", TOKENS) is None
    assert store.stats["corrupt"] == 1 and key not in store.keys()


def test_torn_overwrite_bytes_is_a_miss_never_an_error(tmp_path, caplog):
    """The state a kill -9 left between the payload rename and the manifest rename of an
    overwrite under the old layout (one payload name per key): the new version's payload under
    the old version's manifest. The manifest's digest no longer matches, so the entry is a
    miss, set aside, counted and logged, and the context works again."""
    store = LocalStore(tmp_path / "a")
    key = store.save_kv("fp", TOKENS, _kv(seed=1))
    other = LocalStore(tmp_path / "b")
    other.save_kv("fp", TOKENS, _kv(seed=2))
    (mine,) = _payloads(tmp_path / "a", key)
    (theirs,) = _payloads(tmp_path / "b", key)
    torn = theirs.read_bytes()
    assert len(torn) == mine.stat().st_size and torn != mine.read_bytes()  # only the digest tells
    mine.write_bytes(torn)
    with caplog.at_level(logging.WARNING, logger="apportion_kvcache.store"):
        assert store.load_kv("fp", TOKENS) is None
    assert store.stats["corrupt"] == 1
    (warning,) = [r for r in caplog.records if r.name == "apportion_kvcache.store"]
    assert warning.levelno == logging.WARNING
    assert key[:12] in warning.getMessage() and "checksum mismatch" in warning.getMessage()
    assert "reads as a miss" in warning.getMessage()
    assert key not in store.keys() and not _payloads(tmp_path / "a", key)
    aside = {p.name.split("-", 1)[1] for p in (tmp_path / "a" / "quarantine").iterdir()}
    assert aside == {f"{key}.json", mine.name}
    store.save_kv("fp", TOKENS, _kv(seed=2))
    assert _same(store.load_kv("fp", TOKENS), _kv(seed=2))
    assert store.stats["corrupt"] == 1


def _die_after_payload(root: str, seed: int) -> None:
    """Overwrite an entry and SIGKILL this process right after the payload is in place,
    before the manifest is committed."""
    import apportion_kvcache.store as st

    real = st.atomic_write

    def write(path, data, **kw):
        real(path, data, **kw)
        if str(path).endswith(".bin"):
            os.kill(os.getpid(), signal.SIGKILL)

    st.atomic_write = write
    st.LocalStore(root).save_kv("fp", TOKENS, _kv(seed=seed))


def _die_mid_write(root: str, seed: int) -> None:
    """SIGKILL this process while the payload's temporary file is being written."""
    import apportion.host.io as io

    def fsync(fd):
        os.kill(os.getpid(), signal.SIGKILL)

    io.os.fsync = fsync
    LocalStore(root).save_kv("fp", [7] * 20, _kv(seed=seed))


def _run_killed(target, *args) -> None:
    proc = mp.get_context("spawn").Process(target=target, args=args)
    proc.start()
    proc.join(300)
    assert proc.exitcode == -signal.SIGKILL


def test_kill_between_payload_and_manifest_keeps_the_old_version(tmp_path):
    store = LocalStore(tmp_path)
    store.save_kv("fp", TOKENS, _kv(seed=1))
    _run_killed(_die_after_payload, str(tmp_path), 2)
    got = store.load_kv("fp", TOKENS)  # the old version, whole (or at worst a miss)
    assert got is not None and _same(got, _kv(seed=1))
    assert store.stats["corrupt"] == 0


def test_reopen_reclaims_temps_and_orphans_and_counts_every_byte(tmp_path):
    store = LocalStore(tmp_path)
    store.save_kv("fp", TOKENS, _kv(seed=1))
    # a writer killed between its payload and its manifest leaves an orphan payload
    _run_killed(_die_after_payload, str(tmp_path), 2)
    assert len(list(tmp_path.glob("??/*.bin"))) == 2 and len(store.keys()) == 1
    again = LocalStore(tmp_path)
    assert len(list(tmp_path.glob("??/*.bin"))) == 1
    assert again.stats["reclaimed_files"] == 1 and again.stats["reclaimed_bytes"] > 0
    assert again.total_bytes() == _on_disk(tmp_path)
    # a writer killed while writing leaves its temporary file
    _run_killed(_die_mid_write, str(tmp_path), 3)
    leaked = [p for p in _files(tmp_path) if ".tmp-" in p.name]
    leaked_bytes = sum(p.stat().st_size for p in leaked)
    assert leaked and leaked_bytes > 0
    again = LocalStore(tmp_path)
    assert not [p for p in _files(tmp_path) if ".tmp-" in p.name]
    assert again.stats["reclaimed_files"] == len(leaked)
    assert again.stats["reclaimed_bytes"] == leaked_bytes
    assert len(list(tmp_path.glob("??/*.bin"))) == len(again.keys()) == 1
    assert again.total_bytes() == _on_disk(tmp_path)
    assert _same(again.load_kv("fp", TOKENS), _kv(seed=1))


def test_the_size_cap_counts_every_byte_on_disk(tmp_path):
    store = LocalStore(tmp_path, max_bytes=30_000)
    for i in range(8):
        store.save_kv("fp", [i] * 20, _kv(seed=i))
        assert store.total_bytes() == _on_disk(tmp_path) <= 30_000


# ------------------------------------------------------------------------ a full disk


def test_a_full_disk_is_store_full_error_and_leaves_nothing(small_fs):
    store = LocalStore(small_fs.path)
    small_fs.fill(leave=64 << 10)
    big = _kv(tokens=20, heads=32, dim=128)  # ~1.3 MB of payload
    with pytest.raises(StoreFullError) as err:
        store.save_kv("fp", TOKENS, big)
    exc = err.value
    assert isinstance(exc, ApportionError)
    assert str(small_fs.path) in str(exc.path) and exc.needed > 64 << 10
    assert str(exc.needed) in str(exc) and str(exc.path) in str(exc)
    assert not [p for p in small_fs.files() if p.name != ".lock"], "no temp, no orphan left"
    store.save_kv("fp", TOKENS, _kv())  # a small entry still fits: the disk was not kept full
    assert _same(store.load_kv("fp", TOKENS), _kv())


def test_a_full_disk_at_the_manifest_keeps_the_old_entry(small_fs):
    store = LocalStore(small_fs.path)
    store.save_kv("fp", TOKENS, _kv(seed=1))
    small_fs.fill(leave=8192)
    free = small_fs.free()
    key = prefix_key("fp", TOKENS)
    with pytest.raises(
        StoreFullError
    ) as err:  # the payload takes the last page, the manifest fails
        store.put(key, "kv", b"\0" * free, fingerprint="fp", tokens=len(TOKENS))
    assert str(small_fs.path) in str(err.value.path)
    assert not [p for p in small_fs.files() if ".tmp-" in p.name]
    assert len(_payloads(small_fs.path, key)) == 1
    assert _same(store.load_kv("fp", TOKENS), _kv(seed=1))


def test_no_room_for_the_lock_file_is_store_full_error(small_fs):
    """Opening a store needs its lock file: a filesystem with no room for one more file is a
    StoreFullError naming that file, like any other full disk; a store opened before keeps
    reading, and its writes fail the same typed way."""
    kept = LocalStore(small_fs.path / "kept")
    kept.save_kv("fp", TOKENS, _kv(seed=1))
    root = small_fs.path / "new"
    root.mkdir()
    small_fs.use_up_inodes()
    with pytest.raises(StoreFullError) as err:
        LocalStore(root)
    lock = root / ".lock"
    assert isinstance(err.value, ApportionError)
    assert err.value.path == str(lock) and str(lock) in str(err.value)
    assert not lock.exists()
    assert _same(kept.load_kv("fp", TOKENS), _kv(seed=1))
    with pytest.raises(StoreFullError):
        kept.save_kv("fp", TOKENS, _kv(seed=2))
    assert not [p for p in small_fs.files() if ".tmp-" in p.name]
    assert _same(kept.load_kv("fp", TOKENS), _kv(seed=1))


def test_a_run_on_a_full_disk_records_store_full_per_sample(small_fs, smollm2, tmp_path):
    from apportion.config import parse_config
    from apportion.runner import RunOptions, execute

    small_fs.fill(leave=32 << 10)
    cfg = parse_config(
        {
            "name": "full-disk",
            "benchmarks": [{"name": "niah", "lengths": [256], "depths": [0.5], "samples": 2}],
            "kv_policy": {"name": "cachegen", "level": 3, "store": str(small_fs.path)},
            "generation": {"max_new_tokens": 4},
        }
    )
    records = execute(cfg, tmp_path / "run", RunOptions(progress=False), loaded=smollm2)
    assert len(records) == 2
    for rec in records:
        assert rec["error"].startswith("StoreFullError") and str(small_fs.path) in rec["error"]
    assert not [p for p in small_fs.files() if p.name != ".lock"], "no temp, no orphan left"


# ------------------------------------------------------------------------ redis


def test_redis_damaged_entry_is_a_counted_miss(redis_server):
    import redis

    url = redis_server()
    store = RedisStore(url, namespace="dmg")
    r = redis.Redis.from_url(url)
    key = store.save_kv("fp", TOKENS, _kv())
    r.set(f"dmg:p:{key}", b"garbage")
    assert store.load_kv("fp", TOKENS) is None
    assert store.stats["corrupt"] == 1 and key not in store.keys()
    key = store.save_kv("fp", TOKENS, _kv(seed=4))
    assert _same(store.load_kv("fp", TOKENS), _kv(seed=4))
    r.set(
        f"dmg:m:{key}",
        b'{"format": "apportion-kvstore", "m": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    )
    assert store.load_kv("fp", TOKENS) is None and store.stats["corrupt"] == 2


def test_redis_out_of_memory_is_store_full_error(redis_server):
    url = redis_server("--maxmemory", "1mb", "--maxmemory-policy", "noeviction")
    store = RedisStore(url, namespace="oom")
    with pytest.raises(StoreFullError) as err:
        for i in range(20):
            store.save_kv("fp", [i] * 20, _kv(tokens=20, heads=8, dim=128, seed=i))
    assert url in str(err.value) and err.value.needed > 0


@pytest.mark.parametrize("url", ["redis://[::1", "redis://127.0.0.1:notaport/0"])
def test_a_malformed_redis_url_is_a_config_error(url):
    from apportion.host.store import open_store

    with pytest.raises(ConfigError, match=r"\[::1|notaport"):
        RedisStore(url)
    with pytest.raises(ConfigError, match=r"\[::1|notaport"):
        open_store(url)


def test_entries_of_the_previous_layout_still_load_and_are_replaced_cleanly(tmp_path):
    """Version 1 manifests name ``<key>.bin``; an overwrite moves the entry to the new layout."""
    import hashlib
    import time

    from safetensors.torch import save

    key = prefix_key("fp", TOKENS)
    payload = save(
        {f"{s}.{i}": t for i, kv in enumerate(_kv()) for s, t in zip("kv", kv, strict=True)}
    )
    d = tmp_path / key[:2]
    d.mkdir()
    (d / f"{key}.bin").write_bytes(payload)
    manifest = {
        "format": "apportion-kvstore",
        "version": 1,
        "key": key,
        "kind": "kv",
        "model": "fp",
        "tokens": len(TOKENS),
        "nbytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "created": time.time(),
        "meta": {},
    }
    (d / f"{key}.json").write_text(json.dumps(manifest))
    store = LocalStore(tmp_path)
    assert _same(store.load_kv("fp", TOKENS), _kv())
    store.save_kv("fp", TOKENS, _kv(seed=5))
    assert not (d / f"{key}.bin").exists() and len(_payloads(tmp_path, key)) == 1
    assert _same(store.load_kv("fp", TOKENS), _kv(seed=5))
    assert json.loads((d / f"{key}.json").read_text())["version"] == 2
