"""The index of a shard file (Zarr v3 ``sharding_indexed``, index at the end), encoded and decoded.

A shard holds up to ``per`` chunks in any order, then per chunk ``(offset, nbytes)`` as
little-endian uint64 (both 2^64-1 for a chunk this shard does not hold), then the CRC-32C of that
index (little-endian uint32).
"""

from __future__ import annotations

import struct

import numpy as np

from gpupas.errors import IntegrityError
from gpupas.format.checksum import crc32c

EMPTY = np.uint64(2**64 - 1)


def index_nbytes(per: int) -> int:
    """Bytes of the index of a shard of ``per`` chunks (the CRC included)."""
    return per * 16 + 4


def empty_index(per: int) -> np.ndarray:
    return np.full((per, 2), EMPTY, np.uint64)


def encode_index(index: np.ndarray) -> bytes:
    tail = index.astype("<u8").tobytes()
    return tail + struct.pack("<I", crc32c(tail))


def decode_index(tail: bytes | memoryview, per: int, data_end: int, what: str) -> np.ndarray:
    """The (per, 2) index in ``tail`` (the shard's last bytes) after checking its CRC and that every
    chunk it lists lies within the ``data_end`` bytes before it."""
    if len(tail) != index_nbytes(per) or struct.unpack("<I", tail[-4:])[0] != crc32c(tail[:-4]):
        raise IntegrityError(f"the index of shard {what} is damaged or truncated")
    index = np.frombuffer(tail[:-4], "<u8").reshape(per, 2)
    used = index[:, 0] != EMPTY
    ends = index[used, 0].astype(object) + index[used, 1].astype(object)  # no uint64 wrap-around
    if used.any() and max(ends) > data_end:
        raise IntegrityError(f"the index of shard {what} points past its data")
    return index
