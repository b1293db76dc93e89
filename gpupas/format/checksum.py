"""Checksums the format uses: CRC-32 of tensors (gzip's polynomial), CRC-32C of chunks and metadata.

Both read any buffer (a chunk just read, a NumPy array) in place, without a copy.
"""

from __future__ import annotations

from crc32c import crc32c
from isal.isal_zlib import crc32, crc32_combine

from gpupas.errors import IntegrityError

__all__ = ["CRC32C_RESIDUE", "check_crc32c_suffix", "crc32", "crc32_combine", "crc32c"]

CRC32C_RESIDUE = 0x48674BC7  # CRC-32C of any bytes followed by their own CRC-32C (little-endian)


def check_crc32c_suffix(payload: bytes | memoryview) -> memoryview:
    """The body of ``payload`` (body + little-endian CRC-32C of the body) after checking it; no copy."""
    if len(payload) < 4 or crc32c(payload) != CRC32C_RESIDUE:
        raise IntegrityError("checksum mismatch")
    return memoryview(payload)[:-4]
