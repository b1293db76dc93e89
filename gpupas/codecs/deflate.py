"""Deflate chunks (CPU): a gzip member (RFC 1952) holding Huffman-only Deflate.

The stream nvCOMP writes with ``algorithm="Deflate", algorithm_type=0``, in the gzip framing that
Zarr's ``gzip`` codec reads. zlib-ng writes it, ISA-L reads it (both faster than zlib: BENCHMARKS.md).
"""

from __future__ import annotations

import importlib
import os
import struct
from collections.abc import Sequence
from typing import Any, ClassVar, cast, overload

import numpy as np
from isal import isal_zlib
from zlib_ng import zlib_ng

from gpupas.codecs.zstd import pieces
from gpupas.errors import IntegrityError

_ISAL_ERROR = cast("type[Exception]", isal_zlib.error)  # (its stub types it as an instance)


@overload
def code(data: memoryview, bounds: Sequence[int], huffman_only: bool = ..., limit: None = ...) -> bytes: ...
@overload
def code(data: memoryview, bounds: Sequence[int], huffman_only: bool = ..., limit: int | None = ...
         ) -> bytes | None: ...
def code(data: memoryview, bounds: Sequence[int], huffman_only: bool = True, limit: int | None = None) -> bytes | None:
    """A gzip member of Deflate of ``data``, ending a block at each bound; None where ``limit`` is given
    and the member would be longer than ``limit`` bytes (the compiled encoder then writes nothing)."""
    if huffman_only and compiled() is not None:
        got = code_parts(data, bounds, limit)
        return None if got is None else b"".join(got)
    strategy = zlib_ng.Z_HUFFMAN_ONLY if huffman_only else zlib_ng.Z_DEFAULT_STRATEGY
    cobj = zlib_ng.compressobj(9, zlib_ng.DEFLATED, 31, 9, strategy)
    out = []
    for piece in pieces(data, bounds):
        out.append(cobj.compress(piece))
        out.append(cobj.flush(zlib_ng.Z_BLOCK))
    out.append(cobj.flush(zlib_ng.Z_FINISH))
    member = b"".join(out)
    return None if limit is not None and len(member) > limit else member


def code_parts(data: memoryview, bounds: Sequence[int], limit: int | None = None) -> list[bytes] | None:
    """:func:`code` of Huffman-only Deflate by gpupas's compiled encoder (the same bytes, faster: BENCHMARKS.md;
    gpupas/_fastc_deflate.h), as its header, body and trailer, not joined: no copy of the body."""
    cuts = np.clip(np.asarray(bounds, np.int64), 0, len(data))  # as pieces() cuts: sorted, inside
    if limit is not None and limit < FRAMING:
        return None
    body = _FAST[0].deflate_huffman(data, cuts, -1 if limit is None else limit - FRAMING)
    if body is None:
        return None
    return [_HEADER[0], body, struct.pack("<II", zlib_ng.crc32(data), len(data) & 0xFFFFFFFF)]


FRAMING = 18  # a gzip member's header (10 bytes, no name or extra fields) and trailer (CRC-32, size)
_FAST: list[Any] = []
_HEADER: list[bytes] = []


def compiled() -> Any:
    """gpupas's compiled Huffman-only encoder (``gpupas._fastc``), where it was built and ``GPUPAS_FAST`` is
    not 0; it writes exactly zlib-ng's stream (tests/test_fast.py compares them)."""
    if not _FAST:
        mod = None
        if os.environ.get("GPUPAS_FAST", "1") != "0":
            try:
                mod = importlib.import_module("gpupas._fastc")
            except ImportError:
                pass
        cobj = zlib_ng.compressobj(9, zlib_ng.DEFLATED, 31, 9, zlib_ng.Z_HUFFMAN_ONLY)
        _HEADER[:] = [(cobj.compress(b"") + cobj.flush(zlib_ng.Z_FINISH))[:10]]  # zlib-ng's gzip header here
        _FAST[:] = [mod]
    return _FAST[0]


def decode_into(body: Any, out: np.ndarray) -> None:
    """Inflate one gzip member into ``out``; stops at one byte past its size (no inflation bombs)."""
    size = out.size
    try:
        d = isal_zlib.decompressobj(31)
        data = d.decompress(body, size + 1)
        complete = d.eof and not d.unused_data
    except (_ISAL_ERROR, OSError, ValueError) as exc:
        raise IntegrityError(f"undecodable deflate chunk: {exc}") from None
    if len(data) != size or not complete:
        raise IntegrityError(f"deflate chunk does not hold exactly {size} bytes")
    out[:] = np.frombuffer(data, np.uint8)


class Deflate:
    """Huffman-only Deflate in a gzip member, on the CPU."""

    codec_id: ClassVar[str] = "deflate"
    letter: ClassVar[str] = "d"
    backend: ClassVar[str] = "cpu"
    zarr_codecs: ClassVar[list[dict[str, Any]]] = [{"name": "gzip", "configuration": {"level": 6}}]

    def __init__(self, huffman_only: bool = True):
        self.huffman_only = huffman_only

    def encode_batch(self, chunks: Sequence[Any], bounds: Sequence[Sequence[int]], size: int) -> list[bytes]:
        """Bodies for chunks of exactly ``size`` bytes (Deflate has no cheap zero padding)."""
        return [code(memoryview(c).cast("B"), b, self.huffman_only) for c, b in zip(chunks, bounds)]

    def encode_within(self, chunk: Any, bounds: Sequence[int], limit: int) -> list[bytes] | None:
        """The body of one chunk, in parts to be written back to back, where it takes at most ``limit``
        bytes, else None (cheaper than coding it: the compiled encoder knows the length before it writes
        a bit)."""
        view = memoryview(chunk).cast("B")
        if self.huffman_only and compiled() is not None:
            return code_parts(view, bounds, limit)
        body = code(view, bounds, self.huffman_only, limit)
        return None if body is None else [body]

    def decode_batch(self, bodies: Sequence[Any], outs: Sequence[np.ndarray]) -> None:
        for body, out in zip(bodies, outs):
            decode_into(body, out)
