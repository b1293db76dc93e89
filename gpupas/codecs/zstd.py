"""Zstandard chunks (CPU): coded frames, and frames of raw blocks for bytes that will not shrink.

"Literal" Zstandard (level 0 here) uses a tiny match finder, so a chunk's bytes go through
Zstandard's Huffman literal coder: near their order-0 entropy at a fraction of Deflate's cost.
A raw frame is built without running a coder and read back with a copy.
"""

from __future__ import annotations

import itertools
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import zstandard

from gpupas.codecs.framing import ZSTD_BLOCK as BLOCK
from gpupas.errors import IntegrityError
from gpupas.format.checksum import crc32c

MAGIC = b"\x28\xb5\x2f\xfd"
_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
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


def pieces(data: memoryview, bounds: Sequence[int]) -> list[memoryview]:
    """``data`` cut at ``bounds`` (offsets inside it), empty pieces dropped."""
    edges = [0, *bounds, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def code(data: memoryview, bounds: Sequence[int], size: int, level: int) -> bytes:
    """A Zstandard frame of ``data`` zero-padded to ``size``, ending a block at each bound."""
    return b"".join(code_parts(data, bounds, size, level))


def code_parts(data: memoryview, bounds: Sequence[int], size: int, level: int) -> list[bytes]:
    """:func:`code` as the coder's outputs, to be written back to back (not joined: no copy)."""
    cobj = _compressor(level).compressobj(size=size)
    out = []
    for piece in pieces(data, bounds):
        out.append(cobj.compress(piece))
        out.append(cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    if size > len(data):
        out.append(cobj.compress(bytes(size - len(data))))
    out.append(cobj.flush())
    return [x for x in out if x]


def raw_frame(data: memoryview, size: int) -> bytes:
    """A Zstandard frame of raw blocks (plus RLE blocks of zero padding up to ``size``): no coder runs."""
    return b"".join(raw_parts(data, size))


def raw_parts(data: memoryview, size: int) -> list[Any]:
    """:func:`raw_frame` as its parts, the blocks views of ``data`` (not copied)."""
    out: list[Any] = [MAGIC, bytes([0xA0]), struct.pack("<I", size)]
    n = len(data)
    starts = list(range(0, n, BLOCK))
    for i, s in enumerate(starts):
        block = data[s : s + BLOCK]
        last = i == len(starts) - 1 and size == n
        out.append((last | (len(block) << 3)).to_bytes(3, "little"))
        out.append(block)
    pad = size - n
    while pad > 0:  # RLE blocks regenerate up to one block size each
        step = min(pad, BLOCK)
        pad -= step
        out.append(((pad == 0) | (1 << 1) | (step << 3)).to_bytes(3, "little") + b"\0")
    if size == 0:
        out.append((1).to_bytes(3, "little"))  # one empty last raw block
    return out


def raw_blocks(body: Any, size: int) -> list[tuple[int, int, int]] | None:
    """(block type, start, length) of a frame that :func:`raw_frame` wrote, else None."""
    if len(body) < 12 or bytes(body[:4]) != MAGIC or body[4] != 0xA0 or struct.unpack("<I", body[5:9])[0] != size:
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


def read_raw(read: Callable[[list[memoryview]], bool | None], out: np.ndarray) -> bool:
    """Decode a chunk stored as :func:`raw_frame` wrote it for ``out.size`` bytes (no padding) by reading it
    with ``read(views)`` straight into ``out`` (its block headers, frame header and CRC-32C into small
    buffers): no copy after the read. False where ``read`` does not read it so (None: not that long) or
    the bytes read are not such a frame (a coded frame of the same length: the caller decodes it the
    usual way); a CRC-32C that does not match raises IntegrityError."""
    if out.size == 0:
        return False
    views: list[memoryview] = []
    headers: list[tuple[bytearray, bytes]] = []  # (read into, what raw_frame writes there)
    for part in raw_parts(memoryview(out).cast("B"), out.size):  # its blocks are views of ``out``: read in place
        if isinstance(part, memoryview):
            views.append(part)
        else:
            got = bytearray(len(part))
            views.append(memoryview(got))
            headers.append((got, part))
    crc_bytes = bytearray(4)
    views.append(memoryview(crc_bytes))
    if not read(views):
        return False
    crc = 0
    for v in views[:-1]:
        crc = crc32c(v, crc)
    if crc != int.from_bytes(crc_bytes, "little"):
        raise IntegrityError("checksum mismatch")
    return all(got == want for got, want in headers)


def decode_into(body: Any, out: np.ndarray) -> None:
    """Decode one Zstandard frame into ``out`` (exactly its size; never more is produced)."""
    size = out.size
    blocks = raw_blocks(body, size)
    try:
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
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"undecodable zstd chunk: {exc}") from None


class Zstd:
    """Zstandard frames on the CPU (python-zstandard). Any Zstandard frame decodes."""

    codec_id: ClassVar[str] = "zstd"
    letter: ClassVar[str] = "z"
    backend: ClassVar[str] = "cpu"
    zarr_codecs: ClassVar[list[dict[str, Any]]] = [{"name": "zstd", "configuration": {"level": 1, "checksum": False}}]

    def __init__(self, level: int = 0):
        self.level = level

    def encode_batch(self, chunks: Sequence[Any], bounds: Sequence[Sequence[int]], size: int) -> list[bytes]:
        return [code(memoryview(c).cast("B"), b, size, self.level) for c, b in zip(chunks, bounds)]

    def encode_parts(self, chunk: Any, bounds: Sequence[int], size: int) -> list[bytes]:
        """One chunk's frame as parts to write back to back (:func:`code_parts`)."""
        return code_parts(memoryview(chunk).cast("B"), bounds, size, self.level)

    def decode_batch(self, bodies: Sequence[Any], outs: Sequence[np.ndarray]) -> None:
        for body, out in zip(bodies, outs):
            decode_into(body, out)
