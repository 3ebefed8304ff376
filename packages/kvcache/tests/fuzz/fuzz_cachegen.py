"""libFuzzer target (atheris) for the CacheGen decoder: any bytes either decode or raise
:class:`CorruptKVError` / :class:`KVMismatchError`; anything else, a hang (``-timeout``) or an
allocation past ``-rss_limit_mb`` is a finding.

    python fuzz_cachegen.py CORPUS_DIR -runs=20000 -rss_limit_mb=2048 -timeout=10

``CORPUS_DIR`` should hold a few valid streams (see ``seed``), so that the mutations explore
inputs whose magic, header CRC and JSON are nearly right, which is where a decoder breaks.
Each input is also decoded after :func:`repair` recomputes its checksums, or mutations would
never get past the header CRC and the chunk digests to the JSON validation, the safetensors
parser and the range decoder.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import zlib

import atheris
import torch  # not instrumented: coverage is wanted in the decoder, not in torch

with atheris.instrument_imports(include=["apportion_kvcache"]):
    from apportion_kvcache.cachegen import CacheGenCodec, CodecConfig
    from apportion_kvcache.errors import CorruptKVError, KVMismatchError

CODEC = CacheGenCodec(CodecConfig(levels=[[32, 16], [8, 4]], group_size=4, chunk_tokens=16))
CODEC.max_elements = 1 << 22  # a header may claim more; the decoder must refuse, not allocate


def seed(path: str) -> None:
    """Write two small valid streams (one and several chunks) into ``path``."""
    g = torch.Generator().manual_seed(0)
    kv = [
        (torch.randn(1, 2, 37, 8, generator=g), torch.randn(1, 2, 37, 8, generator=g))
        for _ in range(2)
    ]
    for i, level in enumerate((0, 1)):
        with open(f"{path}/seed{i}", "wb") as f:
            f.write(CODEC.encode(kv, fingerprint="fuzz", level=level))


def repair(data: bytes) -> bytes:
    """``data`` with its header CRC and (where the chunk table parses) chunk digests made right."""
    if len(data) < 14:
        return data
    magic, version, hlen = struct.unpack_from("<8sHI", data, 0)
    hb, rest = data[14 : 14 + hlen], data[14 + hlen + 4 :]
    try:
        header = json.loads(hb)
    except (ValueError, UnicodeDecodeError, RecursionError):
        header = None
    if isinstance(header, dict) and isinstance(header.get("chunks"), list):
        pos = 0
        for c in header["chunks"]:
            if (
                isinstance(c, dict)
                and isinstance(c.get("bytes"), int)
                and 0 <= c["bytes"] <= len(rest)
            ):
                c["sha256"] = hashlib.sha256(rest[pos : pos + c["bytes"]]).hexdigest()
                pos += c["bytes"]
        hb = json.dumps(header).encode()
    return (
        struct.pack("<8sHI", magic, version, len(hb))
        + hb
        + struct.pack("<I", zlib.crc32(hb))
        + rest
    )


def one_input(data: bytes) -> None:
    for candidate in (data, repair(data)):
        try:
            CODEC.decode(candidate, fingerprint="fuzz")
        except (CorruptKVError, KVMismatchError):
            pass


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--seed":
        seed(sys.argv[2])
        sys.exit(0)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
