"""The archive on disk: a Zarr v3 hierarchy of chunk arrays plus one JSON manifest per snapshot.

Layout (every path a key of a Zarr store: a local directory, or fsspec for remote stores)::

    zarr.json                        root group; attributes {"gpupas": {"format": 1}}
    snapshots/<id>/zstd/             uint8 array, codecs bytes -> zstd -> crc32c
    snapshots/<id>/deflate/          uint8 array, codecs bytes -> gzip -> crc32c
    manifests/<id>.json              written last: a snapshot exists once its manifest does

Both arrays of a snapshot span the same logical byte stream (all its tensors' planes, one after
the other) cut into the same chunks; each chunk is stored in exactly one of them, so stock
``zarr`` reads the stream as ``zstd[:] | deflate[:]`` (a missing chunk reads as zeros).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.codecs import Crc32cCodec, GzipCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import Buffer
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from gpupas.errors import (
    ArchiveExistsError,
    ArchiveNotFoundError,
    GpupasError,
    InvalidInputError,
    SnapshotNotFoundError,
)
from gpupas.pas.codecs import CHUNK_SIZE, KINDS

FORMAT = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CODECS = {"zstd": [ZstdCodec(level=1), Crc32cCodec()], "deflate": [GzipCodec(level=6), Crc32cCodec()]}


def check_name(name: str, what: str = "snapshot id") -> str:
    """``name`` if it is safe as one path component of the store, else InvalidInputError."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InvalidInputError(
            f"{what} {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def new_id() -> str:
    """A fresh, unique snapshot id."""
    return uuid.uuid4().hex[:16]


class ArchiveStore:
    """Reads and writes chunks and manifests of one archive; knows nothing of tensors."""

    def __init__(self, store: Store, location: str):
        self.store = store
        self.location = location
        self._local_root = Path(store.root) if isinstance(store, LocalStore) else None

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, location: str | os.PathLike[str], *, create: bool = False,
             storage_options: dict[str, Any] | None = None) -> ArchiveStore:
        """Open the archive at ``location`` (a directory or an fsspec URL such as s3://b/a)."""
        loc = os.fspath(location)
        if "://" in loc and not loc.startswith("file://"):
            store: Store = FsspecStore.from_url(loc, storage_options=storage_options or {})
        else:
            path = Path(loc.removeprefix("file://")).expanduser()
            if create:
                path.mkdir(parents=True, exist_ok=True)
            elif not path.is_dir():
                raise ArchiveNotFoundError(
                    f"no archive at {loc}: the directory does not exist; create one with "
                    f"`gpupas init {loc}` or gpupas.create_archive({loc!r})"
                )
            store = LocalStore(path)
        self = cls(store, loc)
        meta = self._get("zarr.json")
        if meta is None:
            if not create:
                raise ArchiveNotFoundError(
                    f"no archive at {loc}: it has no zarr.json; create one with `gpupas init {loc}`"
                )
            if sync(self._list("")):
                raise ArchiveExistsError(f"{loc} is not empty and not an archive; pick an empty location")
            zarr.create_group(store=store, attributes={"gpupas": {"format": FORMAT}})
        else:
            attrs = json.loads(meta).get("attributes", {})
            fmt = attrs.get("gpupas", {}).get("format")
            if fmt is None:
                raise ArchiveNotFoundError(f"{loc} holds a Zarr hierarchy that is not a gpupas archive")
            if fmt > FORMAT:
                raise GpupasError(f"archive {loc} has format {fmt}; this gpupas reads up to {FORMAT}: upgrade gpupas")
        return self

    # -- raw key access ------------------------------------------------------------------
    def _get(self, key: str) -> bytes | None:
        buf = sync(self.store.get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    async def _list(self, prefix: str) -> list[str]:
        return [k async for k in self.store.list_dir(prefix)]

    # -- chunks ----------------------------------------------------------------------------
    def create_arrays(self, sid: str, length: int) -> None:
        """Zarr metadata of a snapshot's chunk arrays (before any chunk is written)."""
        group = zarr.create_group(store=self.store, path=f"snapshots/{sid}")
        for kind in KINDS:
            group.create_array(kind, shape=(length,), chunks=(CHUNK_SIZE,), dtype="uint8",
                               compressors=_CODECS[kind], fill_value=0)

    def write_chunks(self, sid: str, chunks: Iterable[tuple[str, int, bytes]]) -> None:
        """Write whole chunks ``(kind, index, payload)`` of snapshot ``sid``."""
        async def put_all() -> None:
            await asyncio.gather(*(self.store.set(f"snapshots/{sid}/{kind}/c/{i}", Buffer.from_bytes(p))
                                   for kind, i, p in chunks))
        sync(put_all())

    def read_chunks(self, sid: str, refs: Sequence[tuple[str, int]]) -> list[bytes | None]:
        """Payloads of chunks ``(kind, index)`` of ``sid``, None where a chunk is missing."""
        proto = default_buffer_prototype()

        async def get_all() -> list[Any]:
            return await asyncio.gather(*(self.store.get(f"snapshots/{sid}/{k}/c/{i}", prototype=proto)
                                          for k, i in refs))
        return [None if b is None else b.to_bytes() for b in sync(get_all())]

    # -- manifests ---------------------------------------------------------------------------
    def write_manifest(self, sid: str, manifest: dict[str, Any]) -> None:
        """Publish ``manifest``: atomic, and never over an existing snapshot."""
        data = json.dumps(manifest, separators=(",", ":")).encode()
        key = f"manifests/{sid}.json"
        if self._local_root is not None:
            final = self._local_root / key
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{sid}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, final)  # atomic create-if-absent
            except FileExistsError:
                raise ArchiveExistsError(f"snapshot {sid!r} already exists; choose another id") from None
            finally:
                tmp.unlink()
        else:
            if self._get(key) is not None:
                raise ArchiveExistsError(f"snapshot {sid!r} already exists; choose another id")
            sync(self.store.set(key, Buffer.from_bytes(data)))

    def has_manifest(self, sid: str) -> bool:
        return self._get(f"manifests/{sid}.json") is not None

    def read_manifest(self, sid: str) -> dict[str, Any]:
        """The manifest of ``sid``; SnapshotNotFoundError if it was never committed."""
        check_name(sid)
        data = self._get(f"manifests/{sid}.json")
        if data is None:
            raise SnapshotNotFoundError(f"no snapshot {sid!r} in archive {self.location}; "
                                        "list them with Archive.snapshots()")
        return json.loads(data)

    def list_snapshots(self) -> list[str]:
        """Ids of every committed snapshot, in no particular order."""
        names = sync(self._list("manifests"))
        return [n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")]
