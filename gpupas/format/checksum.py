"""Checksums the format uses: CRC-32 of tensors (gzip's polynomial), CRC-32C of chunks and metadata.

Both read any buffer (a chunk just read, a NumPy array) in place, without a copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from crc32c import crc32c
from isal.isal_zlib import crc32, crc32_combine

from gpupas.errors import IntegrityError

__all__ = ["CRC32C_RESIDUE", "check_crc32c_suffix", "crc32", "crc32_combine", "crc32_pieces", "crc32c"]

CRC32C_RESIDUE = 0x48674BC7  # CRC-32C of any bytes followed by their own CRC-32C (little-endian)


def check_crc32c_suffix(payload: bytes | memoryview) -> memoryview:
    """The body of ``payload`` (body + little-endian CRC-32C of the body) after checking it; no copy."""
    if len(payload) < 4 or crc32c(payload) != CRC32C_RESIDUE:
        raise IntegrityError("checksum mismatch")
    return memoryview(payload)[:-4]


PIECE = 1 << 22  # bytes of one CRC-32 task in :func:`crc32_pieces`


def crc32_pieces(views: Sequence[memoryview], map_fn: Callable[[Callable[[Any], int], list[Any]], list[int]],
                 piece: int = PIECE) -> list[int]:
    """CRC-32 of each byte view, its pieces of at most ``piece`` bytes computed by ``map_fn`` (an executor's
    map: the CRC runs without the GIL) and joined with :func:`crc32_combine`: one large tensor uses
    every core."""
    parts = [(i, v[a : a + piece]) for i, v in enumerate(views) for a in range(0, len(v), piece)]
    crcs = map_fn(lambda x: crc32(x[1]), parts)
    out = [0] * len(views)
    for (i, part), c in zip(parts, crcs):
        out[i] = crc32_combine(out[i], c, len(part))
    return out
