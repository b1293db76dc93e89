"""An archive on a store: its root, manifests (publish, revise, list), snapshot folders and shards.

Knows the layout of :mod:`gpupas.format.keys` and nothing of tensors or codecs. A snapshot exists
once its manifest does: folders are written first and published by the manifest, atomically
(create-if-absent for a new snapshot; a conditional replace for a revision). Folders no manifest
names are garbage for :meth:`ArchiveStore.remove_orphans`.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from gpupas.errors import (
    ArchiveExistsError,
    ArchiveNotFoundError,
    ConflictError,
    FormatError,
    GpupasError,
    IntegrityError,
    InvalidInputError,
    ReadOnlyError,
    SnapshotNotFoundError,
    StoreUnavailableError,
    TierNotFoundError,
    TierUnavailableError,
)
from gpupas.format import keys, zarr_meta
from gpupas.format.manifest import FORMAT, Manifest, Stream
from gpupas.store import tiers as _tiers
from gpupas.store.base import Store, is_remote, open_store
from gpupas.store.shards import ShardReader, ShardSink

REMOTE_MIN_AGE = 3600.0  # object stores have no locks: gc there leaves folders younger than this
TEMP_MIN_AGE = 600.0  # a write's temporary file (.<name>.<hex>.tmp) older than this was left by a killed process
_TEMP = re.compile(r"^[.].+[.][0-9a-f]{32}[.]tmp$")
_TEMP_PLACES = ("", keys.MANIFESTS, keys.VERSIONS, keys.TAGS, keys.FILES)  # where records are written atomically


_PARSED_MAX = 64  # manifests kept parsed, with their bytes, per open archive
_READ_AS = "their base, or the grand-base their 'pred' tensors extrapolate from"


def _unreachable(loc: str, exc: BaseException) -> StoreUnavailableError:
    """The error for a remote archive's store that failed (at its opening or later), with what to do."""
    if isinstance(exc, FileNotFoundError) and "bucket" in str(exc).lower():
        return StoreUnavailableError(f"cannot use {loc}: {exc}; create the bucket first (e.g. `aws s3 mb "
                                     f"{'/'.join(loc.split('/')[:3])}`): gpupas does not create buckets")
    return StoreUnavailableError(f"cannot reach {loc}: {type(exc).__name__}: {exc}; check that it is online and "
                                 "give its credentials and endpoint (storage_options, or the AWS_* environment "
                                 "variables for s3://); nothing half-written is visible: run the command again")


def of_snapshot(folder: str, sids: Iterable[str]) -> bool:
    """Whether stream folder ``folder`` (``<id>`` or ``<id>.<tag>``) belongs to one of ``sids`` (ids may hold
    dots themselves: ``ckpt.100.1a2b3c4d`` is ``ckpt.100``'s)."""
    return any(folder == s or folder.startswith(s + ".") for s in sids)


def built_on(m: Manifest, manifests: Mapping[str, Manifest]) -> list[str]:
    """The snapshots ``m`` may read (what gc keeps while ``m`` is kept): its base and its 'pred' tensors' grand-base
    (formats 1, 2: the base's base, whether or not a tensor is 'pred')."""
    out = [d for d in (m.base, m.grand) if d is not None]
    if m.implicit_grand and m.base is not None and m.base in manifests and (g := manifests[m.base].base) is not None:
        out.append(g)
    return out


def remote_floor(store: ArchiveStore, min_age: float) -> float:
    """The minimum age gc keeps things for in ``store``: ``min_age``, at least :data:`REMOTE_MIN_AGE` in an object
    store (no locks: a commit in flight there is safe by age alone; so is a delta on a snapshot dropped meanwhile)."""
    return max(min_age, REMOTE_MIN_AGE) if store.store.local_root is None else min_age


def _dependents_first(sids: set[str], manifests: Mapping[str, Manifest]) -> list[str]:
    """``sids`` ordered so that each comes before every one of them it is built on (else by id): a gc killed
    between deletions leaves no snapshot whose base is gone (verify would call that damage), only bases of none."""
    bases = {s: {b for b in built_on(manifests[s], manifests) if b in sids and b != s} for s in sids}
    waiting = dict.fromkeys(sids, 0)  # how many of sids not yet out are built on each
    for bs in bases.values():
        for b in bs:
            waiting[b] += 1
    ready = sorted((s for s, n in waiting.items() if n == 0), reverse=True)
    out = []
    while ready:
        sid = ready.pop()
        out.append(sid)
        for b in sorted(bases[sid], reverse=True):
            waiting[b] -= 1
            if waiting[b] == 0:
                ready.append(b)
    return out + sorted(set(sids) - set(out))  # (a loop, which no archive holds: by id, as before)


class ArchiveStore:
    """Manifests and chunk folders of one archive, and the tiers (second stores) some streams live in.

    ``tier_options``: storage options per tier name for this session (credentials; never written).
    """

    def __init__(self, store: Store, fmt: int = FORMAT, tier_options: Mapping[str, Mapping[str, Any]] | None = None):
        self.store = store
        self.format = fmt
        self.tier_options = {k: dict(v) for k, v in (tier_options or {}).items()}
        self._tier_stores: dict[str, Store] = {}
        self._tier_entries: dict[str, dict[str, Any]] = {}  # the root's entry of each tier opened here
        self._tier_lock = threading.Lock()
        self._parsed: OrderedDict[str, tuple[bytes, Manifest]] = OrderedDict()  # sid -> (its bytes, parsed)
        self._parsed_lock = threading.Lock()

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
             storage_options: dict[str, Any] | None = None, durable: bool = True,
             tier_options: Mapping[str, Mapping[str, Any]] | None = None) -> ArchiveStore:
        """The archive at ``location`` (a directory or an fsspec URL such as s3://bucket/path);
        ``tier_options``: storage options (credentials) of its tiers, by tier name."""
        loc = os.fspath(location)
        store = open_store(loc, create=create, durable=durable, storage_options=storage_options)
        if is_remote(loc):  # its client raises its own types (no credentials, no endpoint, a server gone)
            # a shard gone between its index and its chunks (a gc after a revision) is not an outage
            store = _tiers.GuardedStore(store, lambda exc: _unreachable(loc, exc),  # type: ignore[assignment]
                                        passes=lambda exc: isinstance(exc, FileNotFoundError)
                                        and "bucket" not in str(exc).lower())
        meta = store.get(keys.ROOT)
        if meta is None:
            if not create:
                raise ArchiveNotFoundError(f"no archive at {loc}: it has no zarr.json; create one with "
                                           f"`gpupas init {loc}`" + (" (in a bucket that exists: gpupas does not "
                                                                     "create buckets)" if is_remote(loc) else ""))
            if store.list(""):
                raise ArchiveExistsError(f"{loc} is not empty and not an archive; pick an empty location")
            self = cls(store, FORMAT, tier_options)
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
        return cls(store, fmt, tier_options)

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

        # the group first (formats 1, 2 had none): a process killed between the two writes leaves a root that still
        # says the old format, so the next write raises it again; the other way round, the group would never come
        self.store.create(f"{keys.SNAPSHOTS}/zarr.json", _json(zarr_meta.group()))
        self.store.update(keys.ROOT, change)
        self.format = FORMAT

    # -- manifests -----------------------------------------------------------------------------------------
    def read_manifest(self, sid: str) -> Manifest:
        """The manifest of ``sid``; SnapshotNotFoundError if it was never committed."""
        keys.check_name(sid)
        data = self.store.get(keys.manifest(sid))
        if data is None:
            raise SnapshotNotFoundError(f"no snapshot {sid!r} in archive {self.location}; "
                                        "list them with Archive.snapshots() (`gpupas show VERSION`: a version's)")
        with self._parsed_lock:
            seen = self._parsed.get(sid)
        if seen is not None and seen[0] == data:  # the same bytes as last time: the same (frozen) manifest
            return seen[1]
        m = Manifest.from_bytes(data, sid)
        self._remember(sid, data, m)
        return m

    def has_manifest(self, sid: str) -> bool:
        return self.store.exists(keys.manifest(keys.check_name(sid)))

    def changed(self, m: Manifest) -> GpupasError | None:
        """Asked when a chunk of ``m`` is missing, before calling it damaged: the error to raise where the
        snapshot was discarded since ``m`` was read (a commit that failed removes the snapshots it
        published), or revised (its old folders are gc's after a grace period, at once with
        ``--min-age 0``); None where the archive still holds ``m``."""
        try:
            now = self.read_manifest(m.id)
        except SnapshotNotFoundError:
            return SnapshotNotFoundError(f"snapshot {m.id} in {self.location} was discarded while it was being read "
                                         "(by discard or gc, or by a commit that failed: it removes the snapshots it "
                                         "wrote); nothing is damaged")
        except (IntegrityError, FormatError):
            return None
        if now.revision == m.revision:
            return None
        return ConflictError(f"snapshot {m.id} in {self.location} was revised (by compact or a tier move) while it "
                             "was being read, and gc removed its old form; nothing is damaged: read it again")

    def publish_manifest(self, m: Manifest) -> None:
        """Publish a new snapshot: atomic, and never over an existing one."""
        self.upgrade_format()
        data = m.to_bytes()
        try:
            created = self.store.create(keys.manifest(m.id), data)
        except StoreUnavailableError as exc:
            created = self._landed(m.id, data, exc)
        if not created:
            raise ArchiveExistsError(f"snapshot {m.id!r} already exists in {self.location}; choose another id")
        self._remember(m.id, data, m)  # the next commit reads it as its base: no parse (it reads back equal)

    def unpublish(self, sid: str) -> None:
        """Delete the manifest a commit has just published (its folders are the caller's to delete)."""
        self.store.delete(keys.manifest(keys.check_name(sid)))
        with self._parsed_lock:
            self._parsed.pop(sid, None)

    def _landed(self, sid: str, data: bytes, exc: StoreUnavailableError) -> bool:
        """True where manifest ``data`` of ``sid`` is stored although writing it failed with ``exc`` (it landed,
        its answer was lost); else raises ``exc``, or, where the store cannot tell, an error with
        ``maybe_published`` set: the caller keeps the folders that manifest names (gc's if it did not land)."""
        return self.landed(keys.manifest(sid), data, exc, f"snapshot {sid} was published",
                           "its data is kept: once the store is back, list the snapshots (`gpupas gc` removes the "
                           "data if it is not there)")

    def landed(self, key: str, data: bytes, exc: StoreUnavailableError, what: str, kept: str) -> bool:
        """True where ``key`` holds ``data`` although writing it failed with ``exc`` (it landed, its answer was
        lost); else raises ``exc``, or, where the store cannot tell, an error saying whether ``what`` cannot be
        told, and ``kept``, with ``maybe_published`` set: the caller keeps what the value names."""
        try:
            now = self.store.get(key)
        except StoreUnavailableError:
            err = StoreUnavailableError(f"cannot tell whether {what} in {self.location}: the store stopped answering "
                                        f"as {key} was written ({exc}); {kept}")
            err.maybe_published = True  # type: ignore[attr-defined]
            raise err from exc
        if now != data:
            raise exc
        return True

    def _remember(self, sid: str, data: bytes, m: Manifest) -> None:
        with self._parsed_lock:
            self._parsed[sid] = (data, m)
            self._parsed.move_to_end(sid)
            while len(self._parsed) > _PARSED_MAX:
                self._parsed.popitem(last=False)

    def replace_manifest(self, new: Manifest, expect_revision: int,
                         check: Callable[[], None] | None = None) -> bytes | None:
        """Switch snapshot ``new.id`` to ``new`` atomically, if it is still at ``expect_revision``.

        Readers see the old manifest or the new one, never a mix. ConflictError if another
        revision won; the old manifest's folders become garbage (after the grace period of gc).
        ``check``: called while no other replacement can publish (on a local archive: under the lock
        on the manifests' folder), to refuse by raising. Returns the bytes replaced (for :meth:`unreplace`).
        """
        self.upgrade_format()
        replaced: list[Manifest] = []
        was: list[bytes] = []

        def change(old: bytes | None) -> bytes:
            if old is None:
                raise SnapshotNotFoundError(f"snapshot {new.id!r} was discarded while being revised")
            have = Manifest.from_bytes(old, new.id)
            if have.revision != expect_revision:
                raise ConflictError(f"snapshot {new.id} was revised by another writer (revision {have.revision}, "
                                    f"expected {expect_revision}); run the job again")
            if check is not None:
                check()
            replaced[:], was[:] = [have], [old]
            return new.to_bytes()

        try:
            self.store.update(keys.manifest(new.id), change)
        except StoreUnavailableError as exc:
            self._landed(new.id, new.to_bytes(), exc)
            replaced[:] = replaced or [new]  # its answer lost: what it replaced is gc's after the grace period
        kept = {(s.tier, s.folder) for s in new.streams}
        self.mark_superseded([s for s in replaced[0].streams if (s.tier, s.folder) not in kept])
        return was[0] if was else None

    def unreplace(self, new: Manifest, old: bytes) -> None:
        """Put back ``old``, the manifest :meth:`replace_manifest` has just replaced by ``new`` (the caller deletes
        ``new``'s folders), unless the snapshot was discarded or revised again since."""

        def change(now: bytes | None) -> bytes | None:
            if now is None or Manifest.from_bytes(now, new.id).revision != new.revision:
                return None
            return old

        self.store.update(keys.manifest(new.id), change)
        with self._parsed_lock:
            self._parsed.pop(new.id, None)

    def mark_superseded(self, folders: Sequence[str | Stream]) -> None:
        """Note in each folder's group document (a stream's folder, in its tier) that a revision replaced
        it: gc's grace period counts from now (the folder's last write)."""
        when = datetime.now(UTC).isoformat()
        for f in folders:
            folder, tier = (f.folder, f.tier) if isinstance(f, Stream) else (f, None)
            try:
                self.tier_store(tier).put(f"{keys.folder(folder)}/zarr.json",
                                          _json(zarr_meta.group({"gpupas": {"superseded": when}})))
            except (OSError, *GpupasTierError):
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
            if sid in (m.base, m.grand) or (m.implicit_grand and m.has_pred and m.base is not None
                                             and self.base_of(m.base) == sid):
                out.append(other)
        return sorted(out)

    def base_of(self, sid: str) -> str | None:
        """The base of snapshot ``sid`` now (None where it is whole, or gone or unreadable)."""
        try:
            return self.read_manifest(sid).base
        except (SnapshotNotFoundError, IntegrityError, FormatError):
            return None

    def discard(self, sid: str, *, force: bool = False) -> None:
        """Remove snapshot ``sid``: its manifest first (so it disappears at once), then its folders.

        Refused while other snapshots read its bits (``force``: remove it anyway, they become
        unrestorable); waits for commits in flight, which may be using it as their base.
        SnapshotNotFoundError where there is no such snapshot.
        """
        with self.store.lock(keys.SNAPSHOTS, exclusive=True):
            try:
                streams: Sequence[Stream] = self.read_manifest(sid).streams
            except SnapshotNotFoundError:
                raise SnapshotNotFoundError(f"no snapshot {sid!r} in archive {self.location}; list them with "
                                            "Archive.snapshots()") from None
            except (IntegrityError, FormatError):
                streams = []  # its folders become orphans for gc
            users = [] if force else self.children(sid)
            if users:
                raise InvalidInputError(f"snapshot {sid} is read by {', '.join(users[:5])}"
                                        f"{'...' if len(users) > 5 else ''} ({_READ_AS}): discard those first (or "
                                        "force it)")
            data = self.store.get(keys.manifest(sid)) if self.store.local_root is None else None
            self.store.delete(keys.manifest(sid))
            if data is not None and not force and (users := self.children(sid)):
                # an object store has no lock: a commit on it may have published between the look above and the
                # delete (its own look after publishing sees it gone, or this one sees it): put it back
                self.store.create(keys.manifest(sid), data)
                raise ConflictError(f"snapshot {sid} came to be read by {', '.join(users[:5])} ({_READ_AS}) while it "
                                    "was being discarded; it is kept: discard those first (or force it)")
            self._delete_streams(self._owned(sid, streams))

    def _owned(self, sid: str, streams: Sequence[Stream]) -> list[Stream]:
        """The streams of ``sid`` whose folders are its own: named after it (``<sid>`` or ``<sid>.<tag>``) and
        named by no other manifest (a damaged or hostile manifest naming another snapshot's folder must not
        make a discard delete it)."""
        mine = [s for s in streams if of_snapshot(s.folder, [sid])]
        others: set[str] = set()
        for s in mine:  # only snapshots whose ids prefix the folder's name could name it as theirs
            parts = s.folder.split(".")
            for k in range(1, len(parts) + 1):
                other = ".".join(parts[:k])  # looked up one by one, not by listing every manifest per discard
                if other != sid and keys.is_name(other) and self.has_manifest(other):
                    try:
                        others.update(self.read_manifest(other).folders())
                    except (SnapshotNotFoundError, IntegrityError, FormatError):
                        continue
        return [s for s in mine if s.folder not in others]

    def _delete_streams(self, streams: Sequence[Stream]) -> None:
        """Delete the folders of streams whose manifest is gone; a tier that cannot be reached keeps
        its folders (orphans for gc once it is back) and says so."""
        for s in streams:
            try:
                self.delete_folder(s.folder, s.tier)
            except GpupasTierError as exc:
                warnings.warn(f"folder {s.folder} stays in tier {s.tier!r} until `gpupas gc` runs with the tier "
                              f"reachable ({exc})", stacklevel=3)

    # -- folders -------------------------------------------------------------------------------------------
    def delete_folder(self, folder: str, tier: str | None = None) -> None:
        """Delete a stream folder (in tier ``tier``; None: the archive's own store)."""
        if not keys.is_folder(folder):
            raise ValueError(f"bad folder name {folder!r}")
        self.tier_store(tier).delete_prefix(keys.folder(folder))

    def folders(self) -> list[str]:
        return [n for n in self.store.list(keys.SNAPSHOTS) if n != "zarr.json" and keys.is_folder(n)]

    def _manifests(self) -> tuple[dict[str, Manifest], list[str]]:
        """Every snapshot's manifest, and the ids of those that cannot be read (damaged, or newer)."""
        manifests: dict[str, Manifest] = {}
        unreadable: list[str] = []
        for sid in self.list_snapshots():
            try:
                manifests[sid] = self.read_manifest(sid)
            except (SnapshotNotFoundError, IntegrityError, FormatError):
                unreadable.append(sid)
        return manifests, unreadable

    @staticmethod
    def _kept(manifests: dict[str, Manifest], unreadable: list[str], wanted: Iterable[str]) -> list[str]:
        """The snapshots whose folders are kept though no manifest names them: those whose manifest cannot be
        read, and those a manifest (as its base) or ``wanted`` (a version record) names whose manifest is missing
        (a half-finished copy: the manifest may still come); verify reports both."""
        named = {d for m in manifests.values() for d in (m.base, m.grand) if d is not None} | set(wanted)
        return [*unreadable, *sorted(named - manifests.keys())]

    def folder_usage(self, name: str) -> int:
        """Bytes of a chunk folder as :meth:`orphan_folders` names it (``tier:folder`` in a tier); 0 where its tier
        cannot be reached."""
        tier, _, folder = name.rpartition(":")
        try:
            return self.tier_store(tier or None).usage(keys.folder(folder))
        except GpupasTierError:
            return 0

    def orphan_folders(self, wanted: Iterable[str] = ()) -> list[str]:
        """Chunk folders under ``snapshots/`` that no manifest names (killed commits, revised snapshots);
        those in a tier as ``tier:folder`` (tiers that cannot be reached are left out, with a warning). The
        folders of a snapshot whose manifest cannot be read, or is missing while a manifest or ``wanted`` (ids
        version records name) names it, are not listed: gc keeps them, verify reports it."""
        manifests, unreadable = self._manifests()
        unreadable = self._kept(manifests, unreadable, wanted)
        named = {(s.tier, s.folder) for m in manifests.values() for s in m.streams}

        def orphans(tier: str | None, have: list[str]) -> list[str]:
            return [f for f in sorted(have) if (tier, f) not in named and not of_snapshot(f, unreadable)]

        out = orphans(None, self.folders())
        for name in sorted(self.tier_table()):
            try:
                out += [f"{name}:{f}" for f in orphans(name, self.tier_folders(name))]
            except GpupasTierError as exc:
                warnings.warn(f"orphans in tier {name!r} not listed: {exc}", stacklevel=2)
        return out

    def remove_orphans(self, min_age: float, dry_run: bool = False) -> list[str]:
        """Delete folders no manifest names that were untouched for ``min_age`` seconds; their names. (Also deletes,
        unlisted, the temporary files killed writes left: see :meth:`collect`.)"""
        return [name for kind, name, _ in self.collect(None, min_age, dry_run) if kind == "folder"]

    def collect(self, is_root: Callable[[Manifest], bool] | None, min_age: float, dry_run: bool = False,
                wanted: Callable[[], Iterable[str]] | None = None) -> list[tuple[str, str, int]]:
        """Delete what nothing needs, untouched for ``min_age`` seconds: folders no manifest names, and
        (where ``is_root`` is given) snapshots that no root snapshot depends on, and, in a local archive, the
        temporary files of killed record writes (:meth:`_sweep_temp`). Returns (kind, name, bytes) of each: kind
        "snapshot", "folder" or "temp". ``wanted`` (read under the lock): ids that version records name, whose
        folders stay where their manifest is missing (see :meth:`_kept`).

        Commits and revisions in flight hold a shared lock that this takes exclusively, so what they
        are writing is never taken for garbage, whatever ``min_age``; the age keeps readers of a
        just-revised snapshot safe. Object stores have no locks: there the age is at least
        :data:`REMOTE_MIN_AGE`, longer than a commit takes.
        """
        if isinstance(min_age, bool) or not isinstance(min_age, numbers.Real) or not min_age >= 0:
            raise InvalidInputError(f"min_age={min_age!r}: give a number of seconds, at least 0 (0: whatever the age)")
        if remote_floor(self, min_age) != min_age:
            warnings.warn(f"{self.location} is an object store (no locks): gc keeps what is younger than "
                          f"{REMOTE_MIN_AGE:.0f} s there, whatever the minimum age asked ({min_age:g} s)", stacklevel=3)
            min_age = REMOTE_MIN_AGE
        out: list[tuple[str, str, int]] = []
        with self.store.lock(keys.SNAPSHOTS, exclusive=True):
            manifests, unreadable = self._manifests()  # the unreadable kept, with their folders: verify reports them
            unreadable = self._kept(manifests, unreadable, () if wanted is None else wanted())
            gone: set[tuple[str | None, str]] = set()
            if is_root is not None:
                young = {sid for sid in manifests if (self.store.age(keys.manifest(sid)) or 0.0) < min_age}
                todo = [sid for sid, m in manifests.items() if sid in young or is_root(m)]
                reachable: set[str] = set()
                while todo:
                    sid = todo.pop()
                    if sid in reachable or sid not in manifests:
                        continue
                    reachable.add(sid)
                    todo += built_on(manifests[sid], manifests)
                for sid in _dependents_first(set(manifests) - reachable, manifests):
                    m = manifests.pop(sid)
                    out.append(("snapshot", sid, self.snapshot_usage(sid, m)))
                    gone.update((s.tier, s.folder) for s in m.streams)  # removed with it, not counted again below
                    if not dry_run:
                        self.store.delete(keys.manifest(sid))
                        self._delete_streams(m.streams)
            named = {(s.tier, s.folder) for m in manifests.values() for s in m.streams} | gone
            for tier in [None, *sorted(self.tier_table())]:
                try:
                    out += self._sweep(tier, named, unreadable, min_age, dry_run)
                except GpupasTierError as exc:
                    warnings.warn(f"tier {tier!r} was not swept: {exc}", stacklevel=2)
            if self.store.local_root is not None:
                out += self._sweep_temp(max(min_age, TEMP_MIN_AGE), dry_run)
        return out

    def snapshot_usage(self, sid: str, m: Manifest) -> int:
        """Bytes a snapshot takes (its manifest, its folders' documents, shards and indexes, in tiers too), as
        a folder's are counted; a tier out of reach counts its streams' ``stored``."""
        total = self.store.usage(keys.manifest(sid))
        for st in m.streams:
            try:
                total += self.tier_store(st.tier).usage(keys.folder(st.folder))
            except GpupasTierError:
                total += st.stored
        return total

    def _sweep_temp(self, min_age: float, dry_run: bool) -> list[tuple[str, str, int]]:
        """Delete (or list) the temporary files of record writes (manifests, versions, tags, file blobs, the
        root document) that a killed process left: nothing else removes them. Writes of tags and file blobs
        take no lock, so the age (at least :data:`TEMP_MIN_AGE`, longer than a write takes) keeps those in
        flight."""
        out = []
        for place in _TEMP_PLACES:
            for name in sorted(self.store.list(place)):
                key = f"{place}/{name}" if place else name
                if not _TEMP.fullmatch(name) or (age := self.store.age(key)) is None or age < min_age:
                    continue
                out.append(("temp", key, self.store.usage(key)))
                if not dry_run:
                    self.store.delete(key)
        return out

    def _sweep(self, tier: str | None, named: set[tuple[str | None, str]], unreadable: list[str], min_age: float,
               dry_run: bool) -> list[tuple[str, str, int]]:
        """Delete (or list) the folders of one store (the archive's, or a tier's) that nothing names."""
        store = self.tier_store(tier)
        have = self.folders() if tier is None else self.tier_folders(tier)
        out = []
        for name in sorted(have):
            if (tier, name) in named or of_snapshot(name, unreadable):
                continue
            age = store.age(keys.folder(name))
            if age is not None and age < min_age:
                continue
            out.append(("folder", name if tier is None else f"{tier}:{name}", store.usage(keys.folder(name))))
            if not dry_run:
                store.delete_prefix(keys.folder(name))
        return out

    def create_stream(self, stream: Stream, inner: dict[str, list[dict[str, Any]]]) -> list[str]:
        """Write the Zarr documents of a stream's folder (in its tier): a group and one sharded array per
        codec; :meth:`sync_stream` makes them durable. Returns their keys."""
        store = self.tier_store(stream.tier)
        base = keys.folder(stream.folder)
        written = [f"{base}/zarr.json"]
        store.put(written[0], _json(zarr_meta.group()), sync=False)
        for codec_id in stream.codecs.values():
            doc = zarr_meta.sharded_array(stream.length, stream.chunk_size, stream.shard_chunks,
                                          [*inner[codec_id], {"name": "crc32c"}])
            written.append(f"{keys.array(stream.folder, codec_id)}/zarr.json")
            store.put(written[-1], _json(doc), sync=False)
        return written

    def sync_stream(self, stream: Stream, files: Sequence[str]) -> None:
        """Make a written stream durable, its ``files`` (documents and shards) and its folders' entries, all at
        once (before a manifest names it)."""
        store = self.tier_store(stream.tier)
        base = keys.folder(stream.folder)
        arrays = [keys.array(stream.folder, c) for c in stream.codecs.values()]
        shards = [f"{a}/c" for a in arrays if any(f.startswith(f"{a}/c/") for f in files)]  # known: not listed
        store.sync([*files, *shards, *arrays, base, keys.SNAPSHOTS])

    def missing_documents(self, m: Manifest) -> list[str]:
        """The Zarr documents missing of ``m``'s stream folders (a group, an array per codec) and of the
        ``snapshots/`` group above them (``tier:key`` in a tier; a tier out of reach is left out): gpupas reads
        without them, stock Zarr cannot (a copy that skipped them, FORMAT.md 2)."""
        wanted: dict[tuple[str | None, str], None] = {}
        for s in m.streams:
            if s.tier is not None or self.format >= FORMAT:  # formats 1, 2 had no group at snapshots/
                wanted[s.tier, f"{keys.SNAPSHOTS}/zarr.json"] = None
            wanted[s.tier, f"{keys.folder(s.folder)}/zarr.json"] = None
            wanted.update(((s.tier, f"{keys.array(s.folder, c)}/zarr.json"), None) for c in s.codecs.values())
        out = []
        for tier, key in wanted:
            try:
                if not self.tier_store(tier).exists(key):
                    out.append(key if tier is None else f"{tier}:{key}")
            except GpupasTierError:
                continue
        return out

    def sink(self, stream: Stream, background: Callable[..., Future[Any]] | None = None) -> ShardSink:
        return ShardSink(self.tier_store(stream.tier), stream, background)

    def reader(self, stream: Stream) -> ShardReader:
        """A reader of ``stream``'s chunks, from the store it lives in (a tier is opened on first use)."""
        return ShardReader(self.tier_store(stream.tier), stream)

    # -- tiers ---------------------------------------------------------------------------------------------
    def _root_attribute(self, name: str) -> Any:
        """``attributes.gpupas[name]`` of the archive's root document ({} where absent or unreadable)."""
        try:
            return json.loads(self.store.get(keys.ROOT) or b"{}").get("attributes", {}).get("gpupas", {}).get(name, {})
        except (ValueError, AttributeError):
            return {}

    def _removed_tiers(self) -> dict[str, str]:
        """Tiers this archive removed: name -> the id its location's marker holds."""
        got = self._root_attribute("removed_tiers")
        return {k: v for k, v in got.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(got, dict) \
            else {}

    def tier_table(self) -> dict[str, dict[str, Any]]:
        """The archive's tiers: name -> {"url", "options" (non-secret storage options), "id"}."""
        got = self._root_attribute("tiers")
        return {k: v for k, v in got.items()
                if keys.is_name(k) and isinstance(v, dict) and isinstance(v.get("url"), str)}

    def tier_store(self, tier: str | None) -> Store:
        """The store of tier ``tier`` (None: the archive's own), opened on first use and kept.

        TierNotFoundError where the archive defines no such tier; TierUnavailableError where it cannot
        be opened or does not hold that tier (names the remedy).
        """
        if tier is None:
            return self.store
        with self._tier_lock:
            got = self._tier_stores.get(tier)
            if got is None:
                got = self._tier_stores[tier] = self._open_tier(tier)
            return got

    def check_tiers(self, names: Iterable[str | None]) -> None:
        """TierNotFoundError for a tier in ``names`` the archive no longer defines (removed by another
        process since this session opened it); called under :meth:`writing`, where no removal can land."""
        wanted = {n for n in names if n is not None}
        if not wanted:
            return
        table = self.tier_table()
        for name in sorted(wanted):
            if name not in table:
                with self._tier_lock:
                    self._tier_stores.pop(name, None)
                raise TierNotFoundError(f"archive {self.location} has no tier {name!r} (removed meanwhile?); add "
                                        f"it with `gpupas tier add {name} URL`, or write elsewhere")

    def _open_tier(self, name: str) -> Store:
        entry = self.tier_table().get(name)
        if entry is None:
            raise TierNotFoundError(f"archive {self.location} has no tier {name!r} (its data names it): add it with "
                                    f"`gpupas tier add {name} URL` pointing at where that tier's data is")
        self._tier_entries[name] = entry
        url = entry["url"]
        try:
            env = _tiers.env_options(name)
        except InvalidInputError as exc:  # its credentials are malformed: a tier that cannot be used, not damage
            raise _tiers.unreachable(name, url, exc) from None
        options = _tiers.merge(entry.get("options"), env, self.tier_options.get(name))
        if not is_remote(url) and not os.path.isdir(url):
            raise _tiers.unreachable(name, url, TierUnavailableError("the directory does not exist"))
        try:
            store = open_store(url, storage_options=options if is_remote(url) else None,
                               durable=self.store.durable)
            found = _tiers.read_marker(store)
        except GpupasTierError:
            raise
        except Exception as exc:
            raise _tiers.unreachable(name, url, exc) from exc
        if found is None or found.get("id") != entry.get("id"):
            why = ("it holds no gpupas tier" if found is None
                   else f"it holds tier {found.get('name')!r} of another archive")
            raise _tiers.unreachable(name, url, TierUnavailableError(why))
        # a tier that refuses writes (read-only) is one that cannot be used, as one that is offline: discard and gc
        # leave its folders with a warning, a move names the tier (not "the archive is read-only")
        return _tiers.GuardedStore(store, lambda exc: _tiers.unreachable(name, url, exc),  # type: ignore[return-value]
                                   wraps=(ReadOnlyError,))

    def add_tier(self, name: str, url: str, storage_options: Mapping[str, Any] | None = None, *,
                 force: bool = False) -> dict[str, Any]:
        """Define tier ``name`` at ``url`` (a directory or an fsspec URL), creating its root there.

        Only storage options that are not secrets are written into the archive; secrets given here
        are used for this session only. ``force``: point an existing tier at a new location that holds
        a copy of its data (same tier id). Returns the tier's entry.
        """
        _tiers.check_tier_name(name)
        url = _tiers.normalize_url(url)
        if _tiers.inside(url, self.store.location):
            raise InvalidInputError(f"tier location {url} lies inside archive {self.store.location}, whose gc would "
                                    "take its data for garbage; pick a location outside the archive")
        keep, secret = _tiers.split_secrets(storage_options)
        table = self.tier_table()
        twin = next((t for t in table if t != name and _tiers.env_var(t) == _tiers.env_var(name)), None)
        if twin is not None:  # one $GPUPAS_TIER_OPTIONS_... (credentials) would serve both
            raise InvalidInputError(f"tier name {name!r} shares ${_tiers.env_var(name)} with tier {twin!r}: one "
                                    "tier's storage options (credentials) would be used for the other; choose a "
                                    "name that differs in more than case and punctuation")
        old = table.get(name)
        if old is not None and not force:
            if old["url"] == url and not keep:
                return old
            raise InvalidInputError(f"tier {name!r} already points at {old['url']}; to point it at a copy of its data "
                                    "elsewhere, add it again with force (`--force`)")
        options = _tiers.merge(keep, secret, _tiers.env_options(name), self.tier_options.get(name))
        try:
            store = open_store(url, create=True, storage_options=options if is_remote(url) else None,
                               durable=self.store.durable)
            found = _tiers.read_marker(store)
        except (InvalidInputError, TierNotFoundError):
            raise
        except Exception as exc:
            raise _tiers.unreachable(name, url, exc) from exc
        removed = self._removed_tiers() if old is None and found is not None else {}
        if old is not None:  # re-pointing: the new location must hold this tier
            if found is None or found.get("id") != old.get("id"):
                raise InvalidInputError(f"{url} does not hold a copy of tier {name!r} (id {old.get('id')}); copy the "
                                        "tier's data there first")
            tier_id = old["id"]
        elif found is not None and not (force and removed.get(name) == found.get("id")):
            mine = removed.get(str(found.get("name"))) == found.get("id")
            raise InvalidInputError(f"{url} already holds tier {found.get('name')!r} of another archive; a tier needs "
                                    "a location of its own" if not mine else
                                    f"{url} holds tier {found.get('name')!r}, removed from this archive: add it "
                                    f"back under its name {found.get('name')!r} with force (`--force`)")
        elif found is not None:  # a tier this archive removed (its id recorded then), added back with its data
            tier_id = found["id"]
        else:
            tier_id = _tiers.new_id()
            try:
                store.put(keys.ROOT, _json(_tiers.marker(name, tier_id)))
                store.put(f"{keys.SNAPSHOTS}/zarr.json", _json(zarr_meta.group()))
            except Exception as exc:
                raise _tiers.unreachable(name, url, exc) from exc
        entry = {"url": url, "options": keep, "id": tier_id}

        def change(data: bytes | None) -> bytes:
            doc = json.loads(data) if data else zarr_meta.group()
            attrs = doc.setdefault("attributes", {}).setdefault("gpupas", {})
            attrs.setdefault("tiers", {})[name] = entry
            attrs.get("removed_tiers", {}).pop(name, None)
            return _json(doc)

        self.store.update(keys.ROOT, change)
        if secret:
            self.tier_options[name] = _tiers.merge(self.tier_options.get(name), secret)
        with self._tier_lock:
            self._tier_stores.pop(name, None)
        return entry

    def keep_tiers(self, m: Manifest) -> None:
        """After ``m`` is published (call it outside any cleanup that would remove ``m``'s folders: ``m`` is
        live): put back, with a warning, a tier ``m`` has planes in that another process removed meanwhile. An
        object store has no lock to keep `tier remove` from crossing a write into the tier; this look or the
        removal's own second look (:meth:`remove_tier`) sees the other. Never raises but for the warnings."""
        named = sorted({s.tier for s in m.streams if s.tier is not None})
        if not named or self.store.local_root is not None:  # locally the lock keeps a removal from crossing
            return
        said: list[str] = []
        try:
            table = self.tier_table()
            for name in named:
                entry = self._tier_entries.get(name)
                if entry is None:
                    continue
                now = table.get(name)
                if now is None:
                    self._put_tier_back(name, entry)
                    said.append(f"tier {name!r} was removed by another process while snapshot {m.id} was written "
                                "into it; it is added back (the snapshot has planes there)")
                elif now.get("id") != entry.get("id"):
                    said.append(f"tier {name!r} was removed and defined again at {now['url']} by other processes "
                                f"while snapshot {m.id} was written into its old location {entry['url']}: the "
                                "snapshot's planes there cannot be read while the tier names the new location")
        except (OSError, GpupasError, ValueError) as exc:
            said.append(f"could not check that the tiers snapshot {m.id} has planes in ({', '.join(named)}) are "
                        f"still defined ({exc}); `gpupas tier list` shows them")
        for text in said:
            warnings.warn(f"{self.location}: {text}", stacklevel=3)

    def _put_tier_back(self, name: str, entry: dict[str, Any]) -> None:
        def change(data: bytes | None) -> bytes | None:
            doc = json.loads(data) if data else zarr_meta.group()
            attrs = doc.setdefault("attributes", {}).setdefault("gpupas", {})
            if name in attrs.get("tiers", {}):
                return None  # added again meanwhile (perhaps elsewhere): that entry stands
            attrs.setdefault("tiers", {})[name] = entry
            attrs.get("removed_tiers", {}).pop(name, None)
            return _json(doc)

        self.store.update(keys.ROOT, change)

    def remove_tier(self, name: str) -> None:
        """Forget tier ``name`` (its location is left as it is); refused while a snapshot has data there.
        Waits for commits and revisions in flight (a tier move publishing into it, say)."""
        if name not in self.tier_table():
            raise TierNotFoundError(f"archive {self.location} has no tier {name!r}; list them with `gpupas tier list`")

        removed: list[dict[str, Any]] = []

        def change(data: bytes | None) -> bytes:
            doc = json.loads(data) if data else zarr_meta.group()
            attrs = doc.setdefault("attributes", {}).setdefault("gpupas", {})
            gone = attrs.get("tiers", {}).pop(name, None)
            if isinstance(gone, dict) and isinstance(gone.get("id"), str):  # what `tier add --force` may take back
                attrs.setdefault("removed_tiers", {})[name] = gone["id"]
                removed[:] = [gone]
            return _json(doc)

        def users() -> str:
            found = sorted(sid for sid in self.list_snapshots() if any(s.tier == name for s in self._streams_of(sid)))
            return ", ".join(found[:5]) + ("..." if len(found) > 5 else "")

        with self.store.lock(keys.SNAPSHOTS, exclusive=True):
            if using := users():
                raise InvalidInputError(f"snapshot(s) {using} have planes in tier {name!r}: move them back first "
                                        "(`gpupas tier move ... --to local`)")
            self.store.update(keys.ROOT, change)
            if removed and self.store.local_root is None and (using := users()):  # no lock: a move may have crossed
                self._put_tier_back(name, removed[0])
                raise ConflictError(f"snapshot(s) {using} put planes in tier {name!r} while it was being removed; the "
                                    "tier is kept: move them back first (`gpupas tier move ... --to local`)")
        with self._tier_lock:
            self._tier_stores.pop(name, None)

    def _streams_of(self, sid: str) -> tuple[Stream, ...]:
        try:
            return self.read_manifest(sid).streams
        except (SnapshotNotFoundError, IntegrityError, FormatError):
            return ()

    def tier_folders(self, name: str) -> list[str]:
        """Stream folders in tier ``name`` (those of snapshots and any orphans)."""
        store = self.tier_store(name)
        return [n for n in store.list(keys.SNAPSHOTS) if n != "zarr.json" and keys.is_folder(n)]


GpupasTierError = (TierNotFoundError, TierUnavailableError)


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()  # one line: the C encoder (an indent takes the pure-Python one)
