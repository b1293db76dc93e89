"""Chunk coders: standard formats only, each chunk checksummed (CRC32C, as Zarr's codec).

Two stored kinds, one Zarr array each:
- ``zstd``: a Zstandard frame (a real coder's frame, or one of raw blocks for bytes that will
  not shrink, built here without running a coder);
- ``deflate``: a gzip member of Huffman-only (or LZ) Deflate, the stream nvCOMP writes with
  ``algorithm_type=0`` wrapped in the gzip header and trailer.
Group boundaries inside a chunk end a block, so each group is coded with tables of its own.
"""

from __future__ import annotations

import itertools
import struct
import threading
import zlib
from collections.abc import Sequence

import numpy as np
import zstandard

from gpupas.errors import IntegrityError
from gpupas.pas.settings import Setting

try:  # ISA-L inflates the same streams 2-3x faster than zlib, and its CRC-32 runs at ~25 GB/s
    from isal import isal_zlib as _inflater
except ImportError:  # pragma: no cover - depends on the environment
    _inflater = zlib
crc32 = _inflater.crc32
try:  # CRC-32C that reads any buffer (a view of a memory-mapped shard) in place
    from crc32c import crc32c
except ImportError:  # pragma: no cover - depends on the environment
    import google_crc32c

    def crc32c(data: bytes | memoryview) -> int:
        return google_crc32c.value(bytes(data))
try:  # zlib-ng writes the same Huffman-only stream as zlib, twice as fast
    from zlib_ng import zlib_ng as _deflater
except ImportError:  # pragma: no cover - depends on the environment
    _deflater = zlib

CHUNK_SIZE = 1 << 18
KINDS = ("zstd", "deflate")
RAW_ABOVE = 0.995  # store a chunk raw when a coder could not save even 0.5%
DEFLATE_MIN_GAIN = 1 / 2048  # Deflate decodes ~3x slower than literal Zstandard: it must save this much
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_BLOCK = 1 << 17
_local = threading.local()


def _zstd(level: int) -> zstandard.ZstdCompressor:
    """A per-thread compressor; level 0 is "literal" Zstandard: a tiny, fast match finder, so the
    block's bytes go through Zstandard's Huffman literal coder (near order-0 entropy, ~850 MB/s on
    an exponent plane here against 150 MB/s for zlib's Huffman-only Deflate)."""
    cache = _local.__dict__.setdefault("zstd", {})
    if level not in cache:
        if level == 0:
            params = zstandard.ZstdCompressionParameters(
                window_log=17, chain_log=6, hash_log=6, search_log=1, min_match=7, target_length=0,
                strategy=zstandard.STRATEGY_FAST, write_content_size=True)
        else:
            params = zstandard.ZstdCompressionParameters.from_level(level, write_content_size=True)
        cache[level] = zstandard.ZstdCompressor(compression_params=params)
    return cache[level]


def _pieces(data: memoryview, bounds: Sequence[int]) -> list[memoryview]:
    edges = [0, *bounds, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def code_zstd(data: memoryview, bounds: Sequence[int], size: int, level: int) -> bytes:
    """A Zstandard frame of ``data`` zero-padded to ``size``, ending a block at each bound."""
    cobj = _zstd(level).compressobj(size=size)
    out = []
    for piece in _pieces(data, bounds):
        out.append(cobj.compress(piece))
        out.append(cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    if size > len(data):
        out.append(cobj.compress(bytes(size - len(data))))
    out.append(cobj.flush())
    return b"".join(out)


def raw_zstd(data: memoryview, size: int) -> bytes:
    """A Zstandard frame of raw blocks (plus one RLE block of zero padding): no coder runs."""
    out = [_ZSTD_MAGIC, bytes([0xA0]), struct.pack("<I", size)]
    n = len(data)
    starts = list(range(0, n, _ZSTD_BLOCK))
    for i, s in enumerate(starts):
        block = data[s : s + _ZSTD_BLOCK]
        last = i == len(starts) - 1 and size == n
        out.append((last | (len(block) << 3)).to_bytes(3, "little"))
        out.append(block)
    if size > n:
        pad = size - n
        while pad:  # RLE blocks regenerate up to one block size each
            step = min(pad, _ZSTD_BLOCK)
            pad -= step
            out.append(((pad == 0) | (1 << 1) | (step << 3)).to_bytes(3, "little") + b"\0")
    if size == 0:
        out.append((1).to_bytes(3, "little"))  # one empty last raw block
    return b"".join(out)


def code_deflate(data: memoryview, bounds: Sequence[int], huffman_only: bool = True) -> bytes:
    """A gzip member of Deflate, ending a block at each bound."""
    strategy = _deflater.Z_HUFFMAN_ONLY if huffman_only else _deflater.Z_DEFAULT_STRATEGY
    cobj = _deflater.compressobj(9, _deflater.DEFLATED, 31, 9, strategy)
    out = []
    for piece in _pieces(data, bounds):
        out.append(cobj.compress(piece))
        out.append(cobj.flush(_deflater.Z_BLOCK))
    out.append(cobj.flush(_deflater.Z_FINISH))
    return b"".join(out)


def huffman_floor(data: np.ndarray, bounds: Sequence[int], stride: int = 4) -> float:
    """Bytes that Huffman-only Deflate needs at least for ``data`` (every ``stride``-th byte
    sampled): per group, its order-0 entropy, but never under one bit a byte (a Huffman code's
    shortest). A plug-in estimate from a sample is biased low, so it seldom stops a try that pays."""
    edges = [0, *bounds, len(data)]
    counts = [np.bincount(data[a:b:stride], minlength=256) for a, b in itertools.pairwise(edges) if b > a]
    if not counts:
        return 0.0
    cnt = np.array(counts, np.float64)
    tot = cnt.sum(axis=1)
    bits = np.log2(tot) - (cnt * np.log2(np.maximum(cnt, 1))).sum(axis=1) / tot
    return float((tot * np.maximum(bits, 1.0)).sum()) * stride / 8


def encode_chunk(data: np.ndarray, bounds: Sequence[int], size: int, setting: Setting) -> tuple[str, bytes]:
    """Code one chunk of ``data`` (uint8, at most ``size``); returns (kind, payload + CRC32C)."""
    view = memoryview(data).cast("B")
    padded = size > len(data)
    options = [("zstd", raw_zstd(view, size))]
    if setting.try_all:
        options.append(("zstd", code_zstd(view, bounds, size, 0)))
        options.append(("zstd", code_zstd(view, bounds, size, setting.zstd_level)))
        if not padded:
            options += [("deflate", code_deflate(view, bounds)), ("deflate", code_deflate(view, bounds, False))]
    else:  # literal zstd runs at GB/s on bytes that do not shrink, so no estimate decides "raw";
        # Deflate (5x slower) runs only where Zstandard is above what Huffman-only Deflate could reach
        options.append(("zstd", code_zstd(view, bounds, size, 0)))
        zstd_size = len(options[-1][1])
        if not padded and 0.05 < zstd_size / max(1, len(data)) < RAW_ABOVE and zstd_size > huffman_floor(data, bounds):
            deflated = code_deflate(view, bounds)
            if len(deflated) + DEFLATE_MIN_GAIN * len(data) <= zstd_size:
                options.append(("deflate", deflated))
    kind, body = min(options, key=lambda kb: len(kb[1]))
    return kind, body + struct.pack("<I", crc32c(body))


_CRC32C_RESIDUE = 0x48674BC7  # CRC-32C of any bytes followed by their own CRC-32C (little-endian)


def check_crc(payload: bytes | memoryview) -> memoryview:
    """The body of a stored chunk after verifying its CRC32C (no copy); raises IntegrityError."""
    if len(payload) < 4 or crc32c(payload) != _CRC32C_RESIDUE:
        raise IntegrityError("checksum mismatch")
    return memoryview(payload)[:-4]


def _raw_blocks(body: bytes, size: int) -> list[tuple[int, int, int]] | None:
    """(block type, start, length) of a frame that :func:`raw_zstd` wrote, else None."""
    if len(body) < 12 or body[:4] != _ZSTD_MAGIC or body[4] != 0xA0 or struct.unpack("<I", body[5:9])[0] != size:
        return None
    blocks, pos, filled = [], 9, 0
    while pos + 3 <= len(body):
        head = int.from_bytes(body[pos : pos + 3], "little")
        btype, n = (head >> 1) & 3, head >> 3
        pos += 3
        if btype not in (0, 1) or pos + (n if btype == 0 else 1) > len(body):
            return None
        blocks.append((btype, pos, n))
        pos += n if btype == 0 else 1
        filled += n
        if head & 1:
            return blocks if pos == len(body) and filled == size else None
    return None


def decode_chunk(kind: str, payload: bytes | memoryview, out: np.ndarray) -> None:
    """Decode a stored chunk into ``out`` (uint8, its full size); raises IntegrityError on damage.

    Frames of raw blocks (incompressible bytes) are copied straight into ``out``.
    """
    body = check_crc(payload)
    size = out.size
    try:
        if kind == "zstd":
            blocks = _raw_blocks(body, size)
            if blocks is not None:
                filled = 0
                for btype, start, n in blocks:
                    if btype == 0:
                        out[filled : filled + n] = np.frombuffer(body, np.uint8, n, start)
                    else:
                        out[filled : filled + n] = body[start]
                    filled += n
                return
            dctx = _local.__dict__.get("dctx") or _local.__dict__.setdefault("dctx", zstandard.ZstdDecompressor())
            reader, view, filled = dctx.stream_reader(body), memoryview(out), 0
            while filled < size:  # straight into ``out``: no intermediate bytes object
                got = reader.readinto(view[filled:])
                if not got:
                    break
                filled += got
            if filled != size or reader.read(1):
                raise IntegrityError(f"zstd chunk does not hold exactly {size} bytes")
            return
        elif kind == "deflate":
            data = _inflater.decompress(body, 31)
        else:
            raise IntegrityError(f"unknown chunk kind {kind!r}")
    except (zstandard.ZstdError, zlib.error, _inflater.error, OSError) as exc:
        raise IntegrityError(f"undecodable {kind} chunk: {exc}") from exc
    if len(data) != size:
        raise IntegrityError(f"{kind} chunk holds {len(data)} bytes, expected {size}")
    out[:] = np.frombuffer(data, np.uint8)
