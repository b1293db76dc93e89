"""Which codec codes each chunk: the rules, apart from the coders.

The rules (the same on every backend): each chunk is stored as the smallest of a frame of raw
blocks (no coder; read back with a copy), a coded Zstandard frame, and Deflate where Deflate is
tried; Deflate is kept only where it saves at least 1/2048 of the chunk over Zstandard (it decodes
~3x slower) and is never used for a zero-padded last chunk; ``try_all`` (the ``strong`` setting)
also tries a high Zstandard level and LZ Deflate. On the CPU, Deflate is tried only where
Zstandard's output lies between 5% and :data:`RAW_ABOVE` of the chunk and above the least
Huffman-only Deflate could need (:func:`huffman_floor`): shortcuts, not rules. A Deflate try knows its
exact length before it writes (its blocks are planned first) and writes only where it is kept.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpupas.codecs import registry
from gpupas.codecs.framing import raw_frame_size
from gpupas.codecs.zstd import raw_parts
from gpupas.format.checksum import crc32c

RAW_ABOVE = 0.995  # Zstandard saving less than this: Deflate will not save enough either
DEFLATE_MIN_GAIN = 1 / 2048


@dataclass(frozen=True)
class ChunkPolicy:
    """The codec choice of a setting: candidate codec ids and how hard to try."""

    codecs: tuple[str, ...] = ("zstd", "deflate")
    try_all: bool = False
    zstd_level: int = 19  # the extra Zstandard level ``try_all`` runs

    def table(self) -> dict[str, str]:
        return registry.table(list(self.codecs))


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


def encode_cpu(policy: ChunkPolicy, chunks: Sequence[np.ndarray], bounds: Sequence[Sequence[int]],
               size: int, parts: bool = False) -> list[tuple[str, Any]]:
    """(letter, stored bytes) of each chunk (uint8, at most ``size`` bytes), coded on the CPU; ``parts``: the
    stored bytes as a list of buffers to write back to back (a raw frame's blocks are views of the chunk)."""
    zstd = registry.get("zstd", "cpu")
    deflate = registry.get("deflate", "cpu") if "deflate" in policy.codecs else None
    out = []
    for data, b in zip(chunks, bounds):
        view = memoryview(data).cast("B")
        padded = size > len(data)
        raw = raw_frame_size(len(view), size)
        options: list[tuple[Any, list[Any] | None, int]] = [(zstd, None, raw)]  # the raw frame: built if kept
        z = zstd.encode_parts(view, b, size)
        zsize = sum(len(x) for x in z)
        options.append((zstd, z, zsize))
        if policy.try_all:
            options += [(zstd, [x], len(x)) for x in [_zstd_level(policy.zstd_level, view, b, size)]]
            if deflate is not None and not padded:
                options += [(deflate, [x], len(x)) for x in [deflate.encode_batch([view], [b], size)[0],
                                                              _deflate_lz(view, b)]]
        elif deflate is not None and not padded:
            if 0.05 < zsize / max(1, len(data)) < RAW_ABOVE and _above_floor(zsize, data, b):
                body = deflate.encode_within(view, b, math.floor(zsize - DEFLATE_MIN_GAIN * len(data)))
                if body is not None:  # at least 1/2048 of the chunk smaller than Zstandard's
                    options.append((deflate, body, sum(len(x) for x in body)))
        codec, kept, _ = min(options, key=lambda cb: cb[2])  # the first of the smallest: raw over coded on a tie
        pieces = raw_parts(view, size) if kept is None else list(kept)
        crc = 0
        for piece in pieces:
            crc = crc32c(piece, crc)
        pieces.append(struct.pack("<I", crc))
        out.append((codec.letter, pieces if parts else b"".join(pieces)))
    return out


def _above_floor(zsize: int, data: np.ndarray, bounds: Sequence[int]) -> bool:
    """``zsize > huffman_floor(data, bounds)``, with gpupas's compiled floor where it is built: its float
    differs from NumPy's only by rounding, so a size within a millionth of it is decided by NumPy's."""
    from gpupas.codecs.deflate import compiled

    fast = compiled()
    if fast is not None:
        floor = fast.huffman_floor(data, np.clip(np.asarray(bounds, np.int64), 0, len(data)), 4)
        if abs(zsize - floor) > 1e-6 * max(1.0, floor):
            return zsize > floor
    return zsize > huffman_floor(data, bounds)




def _zstd_level(level: int, view: memoryview, bounds: Sequence[int], size: int) -> bytes:
    from gpupas.codecs.zstd import code

    return code(view, bounds, size, level)


def _deflate_lz(view: memoryview, bounds: Sequence[int]) -> bytes:
    from gpupas.codecs.deflate import code

    return code(view, bounds, huffman_only=False)
