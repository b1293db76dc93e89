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

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import Buffer
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from gpupas.errors import (
    ArchiveExistsError,
    ArchiveNotFoundError,
    GpupasError,
    IntegrityError,
    InvalidInputError,
    SnapshotNotFoundError,
)
from gpupas.pas.codecs import CHUNK_SIZE, KINDS

FORMAT = 2  # 2: manifests may hold 'pred' tensors and row masks ("kept")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CODECS = {  # what stock zarr reads the chunks with (the levels only matter to writers)
    "zstd": [{"name": "zstd", "configuration": {"level": 1, "checksum": False}}, {"name": "crc32c"}],
    "deflate": [{"name": "gzip", "configuration": {"level": 6}}, {"name": "crc32c"}],
}


def check_name(name: str, what: str = "snapshot id") -> str:
    """``name`` if it is safe as one path component of the store, else InvalidInputError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidInputError(
            f"{what} {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def sharding_codecs(inner: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Zarr v3 codec list of a sharded uint8 array whose inner chunks use codecs ``inner``."""
    return [{"name": "sharding_indexed", "configuration": {
        "chunk_shape": [CHUNK_SIZE], "codecs": [{"name": "bytes"}, *inner],
        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
        "index_location": "end"}}]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(final: Path, data: bytes, *, replace: bool = False, durable: bool = True) -> bool:
    """Put ``data`` at ``final`` atomically: readers see the old state or all of ``data``.

    A temporary file (fsync'd when ``durable``) is linked into place, which refuses an existing
    ``final`` (returns False), or with ``replace`` renamed over it; then the folder is fsync'd.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    if replace:
        os.replace(tmp, final)
    else:
        try:
            os.link(tmp, final)  # atomic create-if-absent
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
    if durable:
        _fsync_dir(final.parent)
    return True


def new_id() -> str:
    """A fresh, unique snapshot id."""
    return uuid.uuid4().hex[:16]


class ArchiveStore:
    """Reads and writes chunks and manifests of one archive; knows nothing of tensors."""

    def __init__(self, store: Store, location: str, durable: bool = True):
        self.store = store
        self.location = location
        self.durable = durable  # fsync chunks and folders before a manifest names them
        self._local_root = Path(store.root) if isinstance(store, LocalStore) else None

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, location: str | os.PathLike[str], *, create: bool = False,
             storage_options: dict[str, Any] | None = None, durable: bool = True) -> ArchiveStore:
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
        self = cls(store, loc, durable)
        self.format = FORMAT
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
            self.format = fmt
        return self

    def upgrade_format(self) -> None:
        """Mark the archive with this gpupas's format before writing what older readers cannot read."""
        if self.format < FORMAT:
            zarr.open_group(store=self.store, mode="r+").attrs["gpupas"] = {"format": FORMAT}
            self.format = FORMAT

    @property
    def local_root(self) -> Path | None:
        """The archive's directory for a local store, else None."""
        return self._local_root

    def discard(self, sid: str) -> None:
        """Remove snapshot ``sid``: its manifest first (so it disappears at once), then its chunks."""
        try:
            data = self.read_manifest(sid).get("data", sid)
        except SnapshotNotFoundError:
            data = None
        if self._local_root is not None:
            (self._local_root / self.manifest_key(sid)).unlink(missing_ok=True)
            if data is not None:
                shutil.rmtree(self._local_root / "snapshots" / data, ignore_errors=True)
            return

        async def remove_all() -> None:
            await self.store.delete(self.manifest_key(sid))
            if data is not None:
                await self.store.delete_dir(f"snapshots/{data}")
        sync(remove_all())

    # -- raw key access ------------------------------------------------------------------
    def _get(self, key: str) -> bytes | None:
        buf = sync(self.store.get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    async def _list(self, prefix: str) -> list[str]:
        return [k async for k in self.store.list_dir(prefix)]

    # -- chunks ----------------------------------------------------------------------------
    def create_arrays(self, data: str, length: int, per_shard: int) -> None:
        """Zarr metadata of a snapshot's group and sharded chunk arrays under ``snapshots/<data>``.

        ``data`` is the snapshot id plus a unique suffix, so two commits never write one folder.
        Written as plain Zarr v3 documents: zarr's own API costs ~3 ms per array here.
        """
        sid = data
        docs = {f"snapshots/{sid}/zarr.json": {"zarr_format": 3, "node_type": "group", "attributes": {}}}
        for kind in KINDS:
            docs[f"snapshots/{sid}/{kind}/zarr.json"] = {
                "zarr_format": 3, "node_type": "array", "shape": [length], "data_type": "uint8",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [per_shard * CHUNK_SIZE]}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                "fill_value": 0, "codecs": sharding_codecs(_CODECS[kind]), "attributes": {},
            }
        if self._local_root is not None:
            for kind in KINDS:
                (self._local_root / "snapshots" / sid / kind / "c").mkdir(parents=True, exist_ok=True)
        for key, doc in docs.items():
            self.put(key, json.dumps(doc).encode())

    def put(self, key: str, data: bytes) -> None:
        """Write one whole key (a plain file write on local stores)."""
        if self._local_root is not None:
            path = self._local_root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
                if self.durable:
                    os.fsync(f.fileno())
        else:
            sync(self.store.set(key, Buffer.from_bytes(data)))

    def get(self, key: str) -> bytes | None:
        """One whole key, or None where it is missing."""
        if self._local_root is not None:
            try:
                return (self._local_root / key).read_bytes()
            except FileNotFoundError:
                return None
        return self._get(key)

    def sync_dirs(self, data: str) -> None:
        """fsync the folders of a snapshot's chunks, so their entries survive a power loss."""
        if self._local_root is None or not self.durable:
            return
        base = self._local_root / "snapshots" / data
        for d in [base, *(base / k for k in KINDS), *(base / k / "c" for k in KINDS), base.parent]:
            _fsync_dir(d)

    @staticmethod
    def chunk_key(data: str, kind: str, index: int) -> str:
        """Key of Zarr chunk ``index`` (a shard file) of a snapshot's ``kind`` array."""
        return f"snapshots/{data}/{kind}/c/{index}"

    @staticmethod
    def manifest_key(sid: str) -> str:
        """Key of snapshot ``sid``'s manifest."""
        return f"manifests/{sid}.json"

    # -- manifests ---------------------------------------------------------------------------
    def write_manifest(self, sid: str, manifest: dict[str, Any]) -> None:
        """Publish ``manifest``: atomic, and never over an existing snapshot."""
        data = json.dumps(manifest, separators=(",", ":")).encode()
        key = self.manifest_key(sid)
        if self._local_root is not None:
            if not publish_file(self._local_root / key, data, durable=self.durable):
                raise ArchiveExistsError(f"snapshot {sid!r} already exists; choose another id")
        else:
            if self._get(key) is not None:
                raise ArchiveExistsError(f"snapshot {sid!r} already exists; choose another id")
            sync(self.store.set(key, Buffer.from_bytes(data)))

    def has_manifest(self, sid: str) -> bool:
        if self._local_root is not None:  # a file test; Zarr's store API costs ~0.3 ms a call here
            return (self._local_root / self.manifest_key(sid)).is_file()
        return self._get(self.manifest_key(sid)) is not None

    def read_manifest(self, sid: str) -> dict[str, Any]:
        """The manifest of ``sid``; SnapshotNotFoundError if it was never committed."""
        check_name(sid)
        data = self.get(self.manifest_key(sid))
        if data is None:
            raise SnapshotNotFoundError(f"no snapshot {sid!r} in archive {self.location}; "
                                        "list them with Archive.snapshots()")
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"manifest of snapshot {sid!r} in {self.location} is damaged ({exc}); "
                                 "restore the archive from a copy") from None

    def orphan_folders(self) -> list[str]:
        """Chunk folders under ``snapshots/`` that no manifest names (killed or failed commits)."""
        folders = set(sync(self._list("snapshots"))) - {"zarr.json"}
        named = {self.read_manifest(s).get("data", s) for s in self.list_snapshots()}
        return sorted(folders - named)

    def remove_orphans(self, min_age: float) -> list[str]:
        """Delete orphan chunk folders last written at least ``min_age`` seconds ago; their names.

        The age keeps commits still in progress (another process's) safe. Object stores do not
        say when a folder was written, so there only ``min_age=0`` removes anything.
        """
        removed = []
        for name in self.orphan_folders():
            if self._local_root is not None:
                folder = self._local_root / "snapshots" / name
                newest = max((p.stat().st_mtime for p in [folder, *folder.rglob("*")]), default=0.0)
                if time.time() - newest < min_age:
                    continue
                shutil.rmtree(folder, ignore_errors=True)
            elif min_age > 0:
                continue
            else:
                sync(self.store.delete_dir(f"snapshots/{name}"))
            removed.append(name)
        return removed

    def list_snapshots(self) -> list[str]:
        """Ids of every committed snapshot, in no particular order."""
        names = sync(self._list("manifests"))
        return [n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")]
