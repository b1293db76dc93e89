"""An archive on a store: its root, manifests (publish, revise, list), snapshot folders and shards.

Knows the layout of :mod:`gpupas.format.keys` and nothing of tensors or codecs. A snapshot exists
once its manifest does: folders are written first and published by the manifest, atomically
(create-if-absent for a new snapshot; a conditional replace for a revision). Folders no manifest
names are garbage for :meth:`ArchiveStore.remove_orphans`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from gpupas.errors import (
    ArchiveExistsError,
    ArchiveNotFoundError,
    ConflictError,
    FormatError,
    IntegrityError,
    InvalidInputError,
    SnapshotNotFoundError,
)
from gpupas.format import keys, zarr_meta
from gpupas.format.manifest import FORMAT, Manifest, Stream
from gpupas.store.base import Store, open_store
from gpupas.store.shards import ShardReader, ShardSink

REMOTE_MIN_AGE = 3600.0  # object stores have no locks: gc there leaves folders younger than this


class ArchiveStore:
    """Manifests and chunk folders of one archive."""

    def __init__(self, store: Store, fmt: int = FORMAT):
        self.store = store
        self.format = fmt

    @property
    def location(self) -> str:
        return self.store.location

    @property
    def local_root(self) -> str | None:
        return self.store.local_root

    @property
    def durable(self) -> bool:
        return self.store.durable

    # -- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, location: str | os.PathLike[str], *, create: bool = False,
             storage_options: dict[str, Any] | None = None, durable: bool = True) -> ArchiveStore:
        """The archive at ``location`` (a directory or an fsspec URL such as s3://bucket/path)."""
        loc = os.fspath(location)
        store = open_store(loc, create=create, durable=durable, storage_options=storage_options)
        meta = store.get(keys.ROOT)
        if meta is None:
            if not create:
                raise ArchiveNotFoundError(f"no archive at {loc}: it has no zarr.json; create one with "
                                           f"`gpupas init {loc}`")
            if store.list(""):
                raise ArchiveExistsError(f"{loc} is not empty and not an archive; pick an empty location")
            self = cls(store, FORMAT)
            self._write_groups()
            return self
        try:
            attrs = json.loads(meta).get("attributes", {})
            fmt = attrs.get("gpupas", {}).get("format")
        except (ValueError, AttributeError):
            raise ArchiveNotFoundError(f"{loc}: its zarr.json is not a Zarr group document") from None
        if not isinstance(fmt, int) or isinstance(fmt, bool):
            raise ArchiveNotFoundError(f"{loc} holds a Zarr hierarchy that is not a gpupas archive")
        if fmt > FORMAT:
            raise FormatError(f"archive {loc} has format {fmt}; this gpupas reads formats up to {FORMAT}: "
                              "upgrade gpupas (pip install -U gpupas)")
        return cls(store, fmt)

    def _write_groups(self) -> None:
        self.store.put(keys.ROOT, _json(zarr_meta.group({"gpupas": {"format": FORMAT}})))
        self.store.put(f"{keys.SNAPSHOTS}/zarr.json", _json(zarr_meta.group()))

    def upgrade_format(self) -> None:
        """Mark the archive format 3 before writing anything older readers cannot read (they refuse it)."""
        if self.format >= FORMAT:
            return

        def change(old: bytes | None) -> bytes:
            doc = json.loads(old) if old else zarr_meta.group()
            doc.setdefault("attributes", {}).setdefault("gpupas", {})["format"] = FORMAT
            return _json(doc)

        self.store.update(keys.ROOT, change)
        self.store.create(f"{keys.SNAPSHOTS}/zarr.json", _json(zarr_meta.group()))  # formats 1, 2 had none
        self.format = FORMAT

    # -- manifests -----------------------------------------------------------------------------------------
    def read_manifest(self, sid: str) -> Manifest:
        """The manifest of ``sid``; SnapshotNotFoundError if it was never committed."""
        keys.check_name(sid)
        data = self.store.get(keys.manifest(sid))
        if data is None:
            raise SnapshotNotFoundError(f"no snapshot {sid!r} in archive {self.location}; "
                                        "list them with Archive.snapshots()")
        return Manifest.from_bytes(data, sid)

    def has_manifest(self, sid: str) -> bool:
        return self.store.exists(keys.manifest(keys.check_name(sid)))

    def publish_manifest(self, m: Manifest) -> None:
        """Publish a new snapshot: atomic, and never over an existing one."""
        self.upgrade_format()
        if not self.store.create(keys.manifest(m.id), m.to_bytes()):
            raise ArchiveExistsError(f"snapshot {m.id!r} already exists in {self.location}; choose another id")

    def replace_manifest(self, new: Manifest, expect_revision: int) -> None:
        """Switch snapshot ``new.id`` to ``new`` atomically, if it is still at ``expect_revision``.

        Readers see the old manifest or the new one, never a mix. ConflictError if another
        revision won; the old manifest's folders become garbage (after the grace period of gc).
        """
        self.upgrade_format()
        replaced: list[Manifest] = []

        def change(old: bytes | None) -> bytes:
            if old is None:
                raise SnapshotNotFoundError(f"snapshot {new.id!r} was discarded while being revised")
            have = Manifest.from_bytes(old, new.id)
            if have.revision != expect_revision:
                raise ConflictError(f"snapshot {new.id} was revised by another writer (revision {have.revision}, "
                                    f"expected {expect_revision}); run the job again")
            replaced[:] = [have]
            return new.to_bytes()

        self.store.update(keys.manifest(new.id), change)
        kept = set(new.folders())
        self.mark_superseded([f for f in replaced[0].folders() if f not in kept])

    def mark_superseded(self, folders: Sequence[str]) -> None:
        """Note in each folder's group document that a revision replaced it: gc's grace period counts
        from now (the folder's last write)."""
        when = datetime.now(UTC).isoformat()
        for f in folders:
            try:
                self.store.put(f"{keys.folder(f)}/zarr.json", _json(zarr_meta.group({"gpupas": {"superseded": when}})))
            except OSError:
                pass  # best effort: gc then counts from the folder's first write

    def list_snapshots(self) -> list[str]:
        """Ids of every committed snapshot, in no particular order (stray files are skipped)."""
        return [n[:-5] for n in self.store.list(keys.MANIFESTS)
                if n.endswith(".json") and keys.is_name(n[:-5]) and not n.startswith(".")]

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Held while a commit or revision reads its bases, writes folders and publishes: gc and
        discard (which take it exclusively) wait, so they never win against a commit in flight."""
        with self.store.lock(keys.SNAPSHOTS):
            yield

    def children(self, sid: str) -> list[str]:
        """Snapshots that read ``sid``'s bits: deltas on it, and 'pred' tensors that extrapolate from it."""
        out = []
        for other in self.list_snapshots():
            try:
                m = self.read_manifest(other)
            except (SnapshotNotFoundError, IntegrityError, FormatError):
                continue
            if sid in (m.base, m.grand) or (m.format < FORMAT and m.has_pred and m.base is not None
                                             and self._base_of(m.base) == sid):
                out.append(other)
        return sorted(out)

    def _base_of(self, sid: str) -> str | None:
        try:
            return self.read_manifest(sid).base
        except (SnapshotNotFoundError, IntegrityError, FormatError):
            return None

    def discard(self, sid: str, *, force: bool = False) -> None:
        """Remove snapshot ``sid``: its manifest first (so it disappears at once), then its folders.

        Refused while other snapshots read its bits (``force``: remove it anyway, they become
        unrestorable); waits for commits in flight, which may be using it as their base.
        """
        with self.store.lock(keys.SNAPSHOTS, exclusive=True):
            try:
                folders = self.read_manifest(sid).folders()
            except SnapshotNotFoundError:
                return
            except (IntegrityError, FormatError):
                folders = []  # its folders become orphans for gc
            users = [] if force else self.children(sid)
            if users:
                raise InvalidInputError(f"snapshot {sid} is the base of {', '.join(users[:5])}"
                                        f"{'...' if len(users) > 5 else ''}: discard those first (or force it)")
            self.store.delete(keys.manifest(sid))
            for f in folders:
                self.store.delete_prefix(keys.folder(f))

    # -- folders -------------------------------------------------------------------------------------------
    def delete_folder(self, folder: str) -> None:
        if not keys.is_folder(folder):
            raise ValueError(f"bad folder name {folder!r}")
        self.store.delete_prefix(keys.folder(folder))

    def folders(self) -> list[str]:
        return [n for n in self.store.list(keys.SNAPSHOTS) if n != "zarr.json" and keys.is_folder(n)]

    def referenced_folders(self) -> set[str]:
        named: set[str] = set()
        for sid in self.list_snapshots():
            try:
                named.update(self.read_manifest(sid).folders())
            except (SnapshotNotFoundError, IntegrityError, FormatError):
                continue
        return named

    def orphan_folders(self) -> list[str]:
        """Chunk folders under ``snapshots/`` that no manifest names (killed commits, revised snapshots)."""
        return sorted(set(self.folders()) - self.referenced_folders())

    def remove_orphans(self, min_age: float, dry_run: bool = False) -> list[str]:
        """Delete folders no manifest names that were untouched for ``min_age`` seconds; their names."""
        return [name for kind, name, _ in self.collect(None, min_age, dry_run) if kind == "folder"]

    def collect(self, is_root: Callable[[Manifest], bool] | None, min_age: float, dry_run: bool = False
                ) -> list[tuple[str, str, int]]:
        """Delete what nothing needs, untouched for ``min_age`` seconds: folders no manifest names, and
        (where ``is_root`` is given) snapshots that no root snapshot depends on. Returns (kind, name,
        bytes) of each: kind "snapshot" or "folder".

        Commits and revisions in flight hold a shared lock that this takes exclusively, so what they
        are writing is never taken for garbage, whatever ``min_age``; the age keeps readers of a
        just-revised snapshot safe. Object stores have no locks: there the age is at least
        :data:`REMOTE_MIN_AGE`, longer than a commit takes.
        """
        if self.store.local_root is None:
            min_age = max(min_age, REMOTE_MIN_AGE)
        out: list[tuple[str, str, int]] = []
        with self.store.lock(keys.SNAPSHOTS, exclusive=True):
            manifests: dict[str, Manifest] = {}
            unreadable: list[str] = []
            gone: set[str] = set()
            for sid in self.list_snapshots():
                try:
                    manifests[sid] = self.read_manifest(sid)
                except (SnapshotNotFoundError, IntegrityError, FormatError):
                    unreadable.append(sid)  # kept, with its folders: verify reports it
            if is_root is not None:
                young = {sid for sid in manifests if (self.store.age(keys.manifest(sid)) or 0.0) < min_age}
                todo = [sid for sid, m in manifests.items() if sid in young or is_root(m)]
                reachable: set[str] = set()
                while todo:
                    sid = todo.pop()
                    if sid in reachable or sid not in manifests:
                        continue
                    reachable.add(sid)
                    m = manifests[sid]
                    todo += [d for d in (m.base, m.grand) if d is not None]
                    if m.format < FORMAT and m.base in manifests:  # formats 1, 2: 'pred' reads the base's base
                        todo += [d for d in (manifests[m.base].base,) if d is not None]
                for sid in sorted(set(manifests) - reachable):
                    m = manifests.pop(sid)
                    out.append(("snapshot", sid, sum(st.stored for st in m.streams)))
                    gone.update(m.folders())  # removed with it, not counted again below
                    if not dry_run:
                        self.store.delete(keys.manifest(sid))
                        for f in m.folders():
                            self.store.delete_prefix(keys.folder(f))
            named = {f for m in manifests.values() for f in m.folders()} | gone
            if unreadable:
                named |= {f for f in self.folders() if f.split(".", 1)[0] in unreadable}
            for name in sorted(set(self.folders()) - named):
                age = self.store.age(keys.folder(name))
                if age is not None and age < min_age:
                    continue
                out.append(("folder", name, self.store.usage(keys.folder(name))))
                if not dry_run:
                    self.store.delete_prefix(keys.folder(name))
        return out

    def create_stream(self, stream: Stream, inner: dict[str, list[dict[str, Any]]]) -> None:
        """Write the Zarr documents of a stream's folder: a group and one sharded array per codec."""
        base = keys.folder(stream.folder)
        self.store.put(f"{base}/zarr.json", _json(zarr_meta.group()))
        for codec_id in stream.codecs.values():
            doc = zarr_meta.sharded_array(stream.length, stream.chunk_size, stream.shard_chunks,
                                          [*inner[codec_id], {"name": "crc32c"}])
            self.store.put(f"{keys.array(stream.folder, codec_id)}/zarr.json", _json(doc))

    def sync_stream(self, stream: Stream) -> None:
        """Make a written stream's folder entries durable (before a manifest names it)."""
        base = keys.folder(stream.folder)
        arrays = [keys.array(stream.folder, c) for c in stream.codecs.values()]
        self.store.sync([*(f"{a}/c" for a in arrays if self.store.list(f"{a}/c")), *arrays, base, keys.SNAPSHOTS])

    def sink(self, stream: Stream, background: Callable[..., Future[Any]] | None = None) -> ShardSink:
        return ShardSink(self.store, stream, background)

    def reader(self, stream: Stream) -> ShardReader:
        return ShardReader(self.store, stream)


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1).encode()
