"""Zarr v3 metadata documents of an archive: groups, and one sharded uint8 array per chunk codec.

Written as plain JSON (what ``zarr.create_array`` would write), so stock Zarr readers list the
archive (``zarr.open_group(archive).tree()``) and read every chunk, and no Zarr import is needed to
write them.
"""

from __future__ import annotations

from typing import Any


def group(attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


def sharded_array(length: int, chunk_size: int, shard_chunks: int, inner: list[dict[str, Any]]) -> dict[str, Any]:
    """A 1-d uint8 array of ``length`` bytes in shards of ``shard_chunks`` chunks of ``chunk_size``
    bytes, each inner chunk coded with codecs ``inner`` (e.g. zstd then crc32c)."""
    return {
        "zarr_format": 3, "node_type": "array", "shape": [length], "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_chunks * chunk_size]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [chunk_size], "codecs": [{"name": "bytes"}, *inner],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}],
        "attributes": {},
    }
