"""What a chunk codec is: an id stored on disk, and batch encode/decode of equal-sized chunks.

Two implementations may share a ``codec_id`` only if each decodes the other's output (the rule of
numcodecs); tests check every such pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol


class ChunkCodec(Protocol):
    """A chunk coder for one backend.

    ``encode_batch`` codes chunks of at most ``size`` bytes each as if zero-padded to ``size``,
    ending a coder block at each offset in the chunk's ``bounds`` where the format allows it (so
    each group gets tables of its own); it returns the coded bodies (no checksum). ``decode_batch``
    fills each output (exactly ``size`` bytes) from a body and raises IntegrityError when a body
    is undecodable or does not decode to exactly that many bytes (never writing past it).
    """

    codec_id: ClassVar[str]  # the name on disk: a stream's codec table, the Zarr array's name
    letter: ClassVar[str]  # the chunk code in a stream's "chunks" string
    backend: ClassVar[str]  # "cpu" or "gpu"
    zarr_codecs: ClassVar[list[dict[str, Any]]]  # how stock Zarr decodes a body (crc32c follows)

    def encode_batch(self, chunks: Sequence[Any], bounds: Sequence[Sequence[int]], size: int) -> list[bytes]: ...

    def decode_batch(self, bodies: Sequence[Any], outs: Sequence[Any]) -> None: ...
