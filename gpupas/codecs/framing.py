"""The framing around chunk bodies that the CPU codecs, the GPU codecs and the GPU kernels share: a
Zstandard frame of raw blocks (its size) and a gzip member around raw Deflate (RFC 1952). Pure
arithmetic on bytes and NumPy arrays; ``backend/kernels_ref.py`` mirrors the kernels with it."""

from __future__ import annotations

from typing import Any

import numpy as np

ZSTD_BLOCK = 1 << 17  # largest Zstandard block
GZIP_HEAD = bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 0xFF])  # no flags, no time, OS unknown


def raw_frame_size(n: Any, size: Any) -> Any:
    """Bytes of the Zstandard frame of raw blocks that holds ``n`` bytes padded to ``size`` (arrays too):
    ``len(zstd.raw_frame(data, size))`` for ``n`` bytes of data, without building the frame."""
    if not (isinstance(n, int) and isinstance(size, int)):  # plain ints (a chunk at a time) stay plain: fast
        n, size = np.asarray(n, np.int64), np.asarray(size, np.int64)
    out = 9 + 3 * (-(-n // ZSTD_BLOCK)) + n + 4 * (-(-(size - n) // ZSTD_BLOCK)) + 3 * (size == 0)
    return out if isinstance(out, np.ndarray) and out.ndim else int(out)


def gzip_member(deflate: bytes, crc: int, size: int) -> bytes:
    """What pack_payloads writes around raw Deflate data (for tests and the codecs' slow path)."""
    return GZIP_HEAD + bytes(deflate) + crc.to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")


def gzip_header_size(body: Any) -> int:
    """Bytes of a gzip member's header (RFC 1952: optional extra field, name, comment, header CRC);
    -1 where ``body`` does not start a gzip member of Deflate data."""
    b = memoryview(body).cast("B")
    if len(b) < 18 or b[0] != 0x1F or b[1] != 0x8B or b[2] != 8:
        return -1
    flags, at = b[3], 10
    if flags & 4:  # FEXTRA
        if at + 2 > len(b):
            return -1
        at += 2 + (b[at] | b[at + 1] << 8)
    for bit in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & bit:
            end = bytes(b[at:]).find(b"\0")
            if end < 0:
                return -1
            at += end + 1
    if flags & 2:  # FHCRC
        at += 2
    return at if at + 8 <= len(b) else -1
