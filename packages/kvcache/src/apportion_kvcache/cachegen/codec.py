"""The CacheGen codec (Liu et al., "CacheGen: KV Cache Compression and Streaming for Fast
Large Language Model Serving", SIGCOMM 2024): a KV cache as a compact, streamable bitstream.

The pipeline, per chunk of ``chunk_tokens`` tokens (chunks decode independently):

1. **Token-group deltas** (the paper's locality): tokens are grouped by ``group_size``; the
   first token of each group is its *anchor*. Every other token is coded as its difference
   from the *reconstructed* anchor of its group (closed loop: errors never accumulate), on
   the channels where that residual is smaller than the token itself (RoPE makes the fast
   rotating key channels poor delta candidates; the choice is a per-channel bit).
2. **Layer-group quantization**: the layers are split into ``len(levels[i])`` equal groups and
   level ``i`` gives each group its number of bins over +-2 RMS of the *whole* chunk's KV
   (centred per channel). One reference for every layer and for K and V alike means equal bins
   give one uniform step everywhere, which is what minimises the total squared error for an
   entropy-coded size (reverse water-filling: a layer with a small spread spends few bits
   rather than getting a finer step); early layers, which later ones build on, get more bins.
3. **Entropy coding** with ``constriction``'s range coder: one categorical model per
   (layer, K/V) for anchors and one for deltas, fitted to the chunk's own symbol counts, which
   travel with the chunk (as uint16 where they fit, which is nearly always).

Bitstream (all lengths little-endian)::

    b"APKVCG\\r\\n" | u16 version | u32 header length | header JSON | u32 crc32(header JSON)
    | chunk 0 | chunk 1 | ...

The header names the format version, the model fingerprint, the KV shapes and dtype, the level
and its per-layer bins, and for each chunk its token range, byte length and sha256. A chunk is
a safetensors blob (scales, symbol counts and the coder's words), so nothing is unpickled and
nothing is allocated from an unchecked size: the header is validated (types, ranges, sums,
nesting, an element cap) before any tensor is made, and each chunk is checked against its
digest before it is parsed. Every inconsistency raises :class:`CorruptKVError`.

Work and memory are bounded by the stream's length, not only by what its header claims: a chunk
may declare at most ``MAX_EXPANSION`` values per byte it occupies (a real KV costs about one
byte per value; the encoder pads the rare chunk that codes below the bound, such as a constant
layer, with a ``pad`` array every reader ignores), and the whole KV at most ``max_elements``
values. A stream that claims more fails at once, before anything is allocated or decoded.
A symbol table of a single symbol (a constant layer) is coded as two symbols, the second with
a count of zero.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from apportion.base import ComponentConfig
from apportion.host.io import loads_json
from pydantic import Field, field_validator

from apportion_kvcache.errors import CorruptKVError, KVMismatchError
from apportion_kvcache.kv import KV, cache_from_kv, check_kv_shape, kv_from_cache

MAGIC = b"APKVCG\r\n"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # v1: per-layer RMS steps, uint32 counts (still decodes)
MAX_HEADER_BYTES = 1 << 24
_PREAMBLE = struct.Struct("<8sHI")
_SYM = 32767  # symbols are clamped to +-_SYM steps (beyond ~16000 RMS: never in a real KV)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: the most decoded values a chunk may declare per byte of the stream it occupies
MAX_EXPANSION = 64


class CodecConfig(ComponentConfig):
    """Options of the CacheGen codec."""

    levels: list[list[int]] = Field(
        [[160, 144, 128], [96, 84, 76], [40, 34, 28], [24, 20, 16]],
        description="per level, delta bins of each layer group (earliest layers first); "
        "level 0 is the finest",
    )
    group_size: int = Field(
        10, ge=1, le=1024, description="tokens per delta group (one anchor each)"
    )
    chunk_tokens: int = Field(
        1024, ge=1, le=1 << 20, description="tokens per independently decodable chunk"
    )

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[list[int]]) -> list[list[int]]:
        if not v or any(not lv for lv in v):
            raise ValueError("levels must be a non-empty list of non-empty bin lists")
        if any(b < 2 or b > 65535 for lv in v for b in lv):
            raise ValueError("every bin count must be in [2, 65535]")
        return v


@dataclass
class ChunkInfo:
    start: int
    tokens: int
    nbytes: int
    sha256: str


@dataclass
class Header:
    """The validated header of a bitstream."""

    version: int
    fingerprint: str
    dtype: str
    layers: int
    batch: int
    kv_heads: int
    head_dim: int
    tokens: int
    level: int
    bins: list[int]
    group_size: int
    chunks: list[ChunkInfo]
    payload_offset: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def raw_fp16_bytes(self) -> int:
        return 2 * 2 * self.layers * self.batch * self.kv_heads * self.tokens * self.head_dim

    def chunk_offsets(self) -> list[int]:
        out, pos = [], self.payload_offset
        for c in self.chunks:
            out.append(pos)
            pos += c.nbytes
        return out


# --------------------------------------------------------------------------- helpers


def layer_bins(levels: Sequence[int], n_layers: int) -> list[int]:
    """Spread a level's per-group bins over ``n_layers`` (equal consecutive groups)."""
    groups = len(levels)
    return [int(levels[min(groups - 1, i * groups // max(n_layers, 1))]) for i in range(n_layers)]


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise CorruptKVError(f"corrupt CacheGen bitstream: {what}")


def _int(obj: dict, key: str, lo: int, hi: int) -> int:
    v = obj.get(key)
    _check(
        isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
        f"header field {key!r} is {v!r}, expected an integer in [{lo}, {hi}]",
    )
    return int(v)


# --------------------------------------------------------------------------- the codec


class CacheGenCodec:
    """Encode a KV cache into a CacheGen bitstream and back. Thread-safe (no state but config)."""

    #: decoded tensors may hold at most this many elements (guards allocations from headers)
    max_elements: int = 1 << 31
    #: a chunk may declare at most this many values per byte it occupies in the stream
    max_expansion: int = MAX_EXPANSION

    def __init__(
        self,
        config: CodecConfig | None = None,
        *,
        max_elements: int | None = None,
        max_expansion: int | None = None,
    ):
        """``max_elements`` caps the values of a decoded KV (the output cap) and
        ``max_expansion`` the values a chunk may declare per byte of the stream; both fail a
        stream that claims more with :class:`CorruptKVError` before anything is decoded."""
        self.config = config or CodecConfig()
        if max_elements is not None:
            self.max_elements = int(max_elements)
        if max_expansion is not None:
            self.max_expansion = int(max_expansion)

    @property
    def n_levels(self) -> int:
        return len(self.config.levels)

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        kv: KV | Any,
        *,
        fingerprint: str = "",
        level: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> bytes:
        """Encode per-layer (keys, values) — or a transformers cache — at ``level``."""
        if hasattr(kv, "layers"):
            kv = kv_from_cache(kv)
        if not kv:
            raise ValueError("nothing to encode: the KV has no layers")
        if not 0 <= level < self.n_levels:
            raise ValueError(
                f"level {level} out of range: this codec has levels 0..{self.n_levels - 1}"
            )
        k0 = kv[0][0]
        shape = tuple(k0.shape)
        if len(shape) != 4:
            raise ValueError(f"keys must be (batch, kv_heads, tokens, head_dim), got {shape}")
        for i, (k, v) in enumerate(kv):
            if tuple(k.shape) != shape or tuple(v.shape) != shape:
                raise ValueError(
                    f"layer {i} has shapes {tuple(k.shape)}/{tuple(v.shape)}, expected {shape}"
                )
        dtype = str(k0.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported KV dtype {k0.dtype}")
        b, h, t, d = shape
        n_layers = len(kv)
        bins = layer_bins(self.config.levels[level], n_layers)
        x = torch.stack([torch.stack([k, v]) for k, v in kv]).detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("the KV holds NaN or inf values; refusing to encode it")
        step = max(
            self.config.group_size,
            self.config.chunk_tokens // self.config.group_size * self.config.group_size,
        )
        chunks, blobs = [], []
        for start in range(0, t, step):
            stop = min(t, start + step)
            blob = self._encode_chunk(x[..., start:stop, :], bins)
            blobs.append(blob)
            chunks.append(
                {
                    "start": start,
                    "tokens": stop - start,
                    "bytes": len(blob),
                    "sha256": hashlib.sha256(blob).hexdigest(),
                }
            )
        header = {
            "format": "apportion-cachegen",
            "version": VERSION,
            "model": fingerprint,
            "dtype": dtype,
            "layers": n_layers,
            "batch": b,
            "kv_heads": h,
            "head_dim": d,
            "tokens": t,
            "level": level,
            "bins": bins,
            "group_size": self.config.group_size,
            "chunks": chunks,
            "meta": meta or {},
        }
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        return b"".join(
            [
                _PREAMBLE.pack(MAGIC, VERSION, len(hbytes)),
                hbytes,
                struct.pack("<I", zlib.crc32(hbytes)),
                *blobs,
            ]
        )

    def _encode_chunk(self, x: torch.Tensor, bins: list[int]) -> bytes:
        import constriction
        from safetensors.numpy import save

        n_layers, _, b, h, t, d = x.shape
        g = self.config.group_size
        is_anchor = torch.zeros(t, dtype=torch.bool)
        is_anchor[::g] = True
        owner = (torch.arange(t) // g) * g  # each token's anchor
        mean = x.mean(dim=(2, 4)).to(torch.float16).float()  # (L, 2, H, D) channel offsets
        m = mean[:, :, None, :, None, :]
        centred = x - m
        rms = centred.pow(2).mean().sqrt()  # one reference for the whole chunk (see the docstring)
        nbins = torch.tensor(bins, dtype=torch.float32)[:, None].expand(n_layers, 2)
        step = (4.0 * rms / nbins).clamp(min=1e-6).to(torch.float16).float()  # bins over +-2 RMS
        st = step[:, :, None, None, None, None]
        qa = torch.round(centred[..., is_anchor, :] / st).clamp(-_SYM, _SYM)
        a_hat = torch.zeros_like(x)
        a_hat[..., is_anchor, :] = qa * st + m
        delta = (x - a_hat[..., owner, :])[..., ~is_anchor, :]
        raw = centred[..., ~is_anchor, :]
        # per channel, code against the group's anchor only where that is the smaller residual
        use_delta = delta.pow(2).mean(dim=(2, 4)) < raw.pow(2).mean(dim=(2, 4))  # (L, 2, H, D)
        resid = torch.where(use_delta[:, :, None, :, None, :], delta, raw)
        qr = torch.round(resid / st).clamp(-_SYM, _SYM)
        encoder = constriction.stream.queue.RangeEncoder()
        # one table per (layer, K/V, anchors|residuals), fitted to the chunk's own symbols
        tables: list[tuple[int, int]] = []
        counts_all: list[np.ndarray] = []
        for li in range(n_layers):
            for s in range(2):
                for q in (qa, qr):
                    if q[li, s].numel():
                        sym = q[li, s].reshape(-1).to(torch.int32).numpy()
                        lo = int(sym.min())
                        counts = np.bincount(sym - lo)
                        if len(counts) == 1:  # one symbol: the coder needs a second (count 0)
                            counts = np.append(counts, 0)
                        tables.append((lo, len(counts)))
                        counts_all.append(counts.astype(np.uint32))
                        encoder.encode((sym - lo).astype(np.int32), _model(counts))
        arrays = {
            "mean": mean.to(torch.float16).numpy(),
            "step": step.to(torch.float16).numpy(),
            "use_delta": use_delta.to(torch.uint8).numpy(),
            "tables": np.array(tables, dtype=np.int32).reshape(-1, 2),
            "counts": _compact(
                np.concatenate(counts_all) if counts_all else np.zeros(0, dtype=np.uint32)
            ),
            "words": np.ascontiguousarray(encoder.get_compressed(), dtype=np.uint32),
        }
        blob = save(arrays)
        # a chunk coding below one byte per MAX_EXPANSION values (a constant layer) is padded
        # up to the bound, so that every reader can refuse a stream that claims more
        need = -(-x.numel() // MAX_EXPANSION)
        while len(blob) < need:
            arrays["pad"] = np.zeros(need - len(blob) + len(arrays.get("pad", ())), np.uint8)
            blob = save(arrays)
        return blob

    # ------------------------------------------------------------------ decode
    def read_header(self, data: bytes | memoryview) -> Header:
        """Parse and validate the header; raises :class:`CorruptKVError` on anything wrong."""
        data = memoryview(data)
        _check(len(data) >= _PREAMBLE.size, f"only {len(data)} bytes, shorter than the preamble")
        magic, version, hlen = _PREAMBLE.unpack_from(data, 0)
        _check(magic == MAGIC, "bad magic: not a CacheGen bitstream")
        if version not in READABLE_VERSIONS:
            raise CorruptKVError(
                f"CacheGen bitstream version {version} is not supported "
                f"(this build reads versions {READABLE_VERSIONS}); upgrade apportion-kvcache"
                if version > VERSION
                else f"unsupported CacheGen bitstream version {version}"
            )
        _check(hlen <= MAX_HEADER_BYTES, f"header length {hlen} exceeds {MAX_HEADER_BYTES}")
        end = _PREAMBLE.size + hlen
        _check(len(data) >= end + 4, "truncated header")
        hbytes = bytes(data[_PREAMBLE.size : end])
        (crc,) = struct.unpack_from("<I", data, end)
        _check(zlib.crc32(hbytes) == crc, "header checksum mismatch")
        obj = loads_json(
            hbytes,
            what="corrupt CacheGen bitstream: header",
            error=CorruptKVError,
            max_bytes=MAX_HEADER_BYTES,
        )
        _check(
            isinstance(obj, dict) and obj.get("format") == "apportion-cachegen", "foreign header"
        )
        _check(obj.get("version") == version, "header version disagrees with the preamble")
        layers = _int(obj, "layers", 1, 4096)
        batch = _int(obj, "batch", 1, 1 << 16)
        heads = _int(obj, "kv_heads", 1, 4096)
        head_dim = _int(obj, "head_dim", 1, 1 << 16)
        tokens = _int(obj, "tokens", 1, 1 << 26)
        per_token = layers * 2 * batch * heads * head_dim  # values of one token
        _check(
            per_token * tokens <= self.max_elements,
            f"the declared KV of {per_token * tokens} values exceeds the decoder's cap of "
            f"{self.max_elements}",
        )
        dtype = obj.get("dtype")
        _check(dtype in _DTYPES, f"unknown dtype {dtype!r}")
        bins = obj.get("bins")
        _check(
            isinstance(bins, list)
            and len(bins) == layers
            and all(isinstance(x, int) and 2 <= x <= 65535 for x in bins),
            "bad per-layer bins",
        )
        group = _int(obj, "group_size", 1, 1 << 20)
        level = _int(obj, "level", 0, 1024)
        fp = obj.get("model")
        _check(isinstance(fp, str), "model fingerprint is not a string")
        raw = obj.get("chunks")
        _check(isinstance(raw, list) and 1 <= len(raw) <= tokens, "bad chunk table")
        chunks, pos, total = [], 0, 0
        for c in raw:
            _check(isinstance(c, dict), "bad chunk entry")
            start = _int(c, "start", 0, tokens)
            n = _int(c, "tokens", 1, tokens)
            nb = _int(c, "bytes", 1, 1 << 40)
            digest = c.get("sha256")
            _check(isinstance(digest, str) and len(digest) == 64, "bad chunk digest")
            _check(start == pos, "chunks are not contiguous")
            _check(n % group == 0 or start + n == tokens, "chunk not aligned to token groups")
            _check(
                per_token * n <= self.max_expansion * nb,
                f"chunk {len(chunks)} declares {per_token * n} values, more than its {nb} bytes "
                f"can justify (at most {self.max_expansion} values per byte)",
            )
            pos += n
            total += nb
            chunks.append(ChunkInfo(start, n, nb, digest))
        _check(pos == tokens, f"chunks cover {pos} tokens, header says {tokens}")
        offset = end + 4
        _check(
            len(data) - offset >= total,
            f"truncated: {len(data) - offset} payload bytes, expected {total}",
        )
        _check(len(data) - offset == total, "trailing bytes after the last chunk")
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        return Header(
            version,
            fp,
            dtype,
            layers,
            batch,
            heads,
            head_dim,
            tokens,
            level,
            bins,
            group,
            chunks,
            payload_offset=offset,
            meta=meta,
        )

    def decode(
        self, data: bytes | memoryview, *, fingerprint: str | None = None, device: Any = "cpu"
    ) -> KV:
        """Decode every chunk; returns per-layer (keys, values) in the stored dtype."""
        header = self.read_header(data)
        _check_model(header, fingerprint)
        parts = [self.decode_chunk(data, i, header=header) for i in range(len(header.chunks))]
        x = torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]
        x = x.to(device=device, dtype=_DTYPES[header.dtype])
        return [(x[i, 0].contiguous(), x[i, 1].contiguous()) for i in range(header.layers)]

    def decode_into_cache(
        self, data: bytes | memoryview, model: Any = None, *, fingerprint: str | None = None
    ) -> Any:
        """Decode straight into a transformers ``DynamicCache`` for ``model`` (shapes checked)."""
        header = self.read_header(data)
        if model is not None:
            check_kv_shape(header.layers, header.kv_heads, header.head_dim, model.config)
        kv = self.decode(
            data,
            fingerprint=fingerprint,
            device=getattr(model, "device", "cpu") if model is not None else "cpu",
        )
        if model is not None:
            kv = [(k.to(model.dtype), v.to(model.dtype)) for k, v in kv]
        return cache_from_kv(kv, model.config if model is not None else None)

    def decode_chunk(
        self, data: bytes | memoryview, index: int, *, header: Header | None = None
    ) -> torch.Tensor:
        """Decode chunk ``index`` alone: a float32 tensor
        (layers, 2, batch, heads, tokens, head_dim)."""
        import constriction
        from safetensors.numpy import load

        header = header or self.read_header(data)
        if not 0 <= index < len(header.chunks):
            raise IndexError(f"chunk {index} out of range (0..{len(header.chunks) - 1})")
        info = header.chunks[index]
        off = header.chunk_offsets()[index]
        blob = bytes(memoryview(data)[off : off + info.nbytes])
        _check(hashlib.sha256(blob).hexdigest() == info.sha256, f"chunk {index} checksum mismatch")
        try:
            arrays = load(blob)
        except Exception as exc:  # safetensors raises its own error types
            raise CorruptKVError(
                f"corrupt CacheGen bitstream: chunk {index} unreadable ({exc})"
            ) from None
        n_layers, b, h, d, t = (
            header.layers,
            header.batch,
            header.kv_heads,
            header.head_dim,
            info.tokens,
        )
        g = header.group_size
        expect = {
            "mean": ((n_layers, 2, h, d), np.float16),
            "step": ((n_layers, 2), np.float16),
            "use_delta": ((n_layers, 2, h, d), np.uint8),
            "tables": (None, np.int32),
            "counts": (None, np.uint32),
            "words": (None, np.uint32),
        }
        for name, (shape, dt) in expect.items():
            arr = arrays.get(name)
            ok_dtype = arr is not None and (
                arr.dtype == dt
                or (name == "counts" and header.version >= 2 and arr.dtype == np.uint16)
            )
            _check(
                ok_dtype
                and (
                    tuple(arr.shape) == shape
                    if shape
                    else arr.ndim == (2 if name == "tables" else 1)
                ),
                f"chunk {index} field {name!r} missing or misshapen",
            )
        mean = torch.from_numpy(arrays["mean"].astype(np.float32))
        step = torch.from_numpy(arrays["step"].astype(np.float32))
        _check(
            bool(torch.isfinite(mean).all() and torch.isfinite(step).all()),
            f"chunk {index} has non-finite scales",
        )
        table_rows, flat = arrays["tables"], arrays["counts"]
        _check(
            table_rows.shape[-1] == 2
            and bool((np.abs(table_rows[:, 0]) <= _SYM).all())
            and bool((table_rows[:, 1] >= 1).all() and (table_rows[:, 1] <= 2 * _SYM + 1).all())
            and int(table_rows[:, 1].astype(np.int64).sum()) == flat.shape[0],
            f"chunk {index} symbol tables",
        )
        use_delta = torch.from_numpy(arrays["use_delta"].astype(bool))
        is_anchor = torch.zeros(t, dtype=torch.bool)
        is_anchor[::g] = True
        n_anchor = int(is_anchor.sum())
        shapes = {"a": (b, h, n_anchor, d), "r": (b, h, t - n_anchor, d)}
        out = {tag: torch.zeros((n_layers, 2, *shape)) for tag, shape in shapes.items()}
        try:
            decoder = constriction.stream.queue.RangeDecoder(arrays["words"])
            ti = cursor = 0
            for li in range(n_layers):
                for s in range(2):
                    for tag in ("a", "r"):
                        shape = shapes[tag]
                        if math.prod(shape) == 0:
                            continue
                        _check(ti < table_rows.shape[0], f"chunk {index} has too few symbol tables")
                        lo, width = (int(v) for v in table_rows[ti])
                        counts = flat[cursor : cursor + width].astype(np.int64)
                        ti, cursor = ti + 1, cursor + width
                        n = math.prod(shape)
                        _check(int(counts.sum()) == n, f"chunk {index} symbol counts")
                        sym = decoder.decode(_model(counts), n).astype(np.float32) + lo
                        out[tag][li, s] = torch.from_numpy(sym).view(shape)
            _check(ti == table_rows.shape[0], f"chunk {index} has extra symbol tables")
        except CorruptKVError:
            raise
        except Exception as exc:
            raise CorruptKVError(
                f"corrupt CacheGen bitstream: chunk {index} does not decode ({exc})"
            ) from None
        qa, qr = out["a"], out["r"]
        st = step[:, :, None, None, None, None]
        m = mean[:, :, None, :, None, :]
        x = torch.empty(n_layers, 2, b, h, t, d)
        x[..., is_anchor, :] = qa * st + m
        owner = (torch.arange(t) // g) * g
        base = torch.where(
            use_delta[:, :, None, :, None, :], x[..., owner, :][..., ~is_anchor, :], m
        )
        x[..., ~is_anchor, :] = base + qr * st
        return x


def _compact(counts: np.ndarray) -> np.ndarray:
    """Symbol counts as uint16 when every count fits (a chunk's tables cost half as much)."""
    return counts.astype(np.uint16) if counts.size == 0 or int(counts.max()) <= 0xFFFF else counts


def _model(counts: np.ndarray) -> Any:
    import constriction

    return constriction.stream.model.Categorical(counts.astype(np.float64) + 0.0, perfect=False)


def _check_model(header: Header, fingerprint: str | None) -> None:
    if fingerprint is not None and header.fingerprint and header.fingerprint != fingerprint:
        raise KVMismatchError(
            f"this KV was encoded for model {header.fingerprint[:16]}…, "
            f"not for the loaded model {fingerprint[:16]}…"
        )
