"""Model versions, lineage, tags, files and metadata on top of the PAS archive (the dlv layer).

A **version** is ``(name, id, parents, network, snapshots, metadata, files)``: a running integer
id, any number of parent versions (lineage), a network definition (a DAG of layers), one or
more time-ordered snapshots of its weights (PAS snapshots; one is latest, one may be marked
best), hyperparameters and metric series, and files stored by content hash. Everything lives in
the archive's store (a local directory or S3); a SQLite catalog indexes it for queries.

>>> import numpy as np, tempfile
>>> repo = create_repository(tempfile.mkdtemp() + "/arc")
>>> v1 = repo.commit("mlp", {"fc.weight": np.ones((4, 3), np.float32)}, hyperparameters={"lr": 0.1})
>>> v2 = repo.commit("mlp", {"fc.weight": np.full((4, 3), 2, np.float32)}, parents=[v1.id])
>>> (v2.id, v2.parents, repo.version("mlp").id)
(2, [1], 2)
>>> repo.restore(1)["fc.weight"].sum()
np.float32(12.0)
>>> repo.close()
"""

from __future__ import annotations

import functools
import numbers
import os
import sqlite3
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from gpupas.archive import Archive, create_archive, open_archive
from gpupas.catalog import Catalog, catalog_path, flatten, open_catalog, rebuild_catalog
from gpupas.errors import (
    ArchiveExistsError,
    CatalogError,
    ConflictError,
    GpupasError,
    IntegrityError,
    InvalidInputError,
    SnapshotNotFoundError,
    VersionNotFoundError,
)
from gpupas.format import keys
from gpupas.format.manifest import Manifest
from gpupas.network import Network, extract_network
from gpupas.store.archive import remote_floor
from gpupas.tensors import Loaded, load_checkpoint, tensors_of
from gpupas.versions import export as _export
from gpupas.versions import inspect as _inspect
from gpupas.versions import verify as _verify
from gpupas.versions.metrics import best_rule, merge_metrics, normalize_metrics, pick_best, snapshot_step, upto
from gpupas.versions.model import (
    Record,
    Version,
    check_file_name,
    check_text,
    check_version_name,
    checkpoint_files,
    file_key,
    new_record,
    now,
    snapshot_entry,
    step_of,
    to_json,
)
from gpupas.versions.records import Records

Progress = Callable[[str, int, int], None]
_TAG_TRIES = 8  # a tag deleted between finding it and reading it is created again, this many times at most


def _check_distinct(names: list[str]) -> None:
    """Attached file names a checkout can write side by side on every file system: no name twice, none
    equal to another but for case (macOS and Windows see one file), no file where another's folder is."""
    files: dict[str, str] = {}
    for name in names:
        key = file_key(name)
        other = files.get(key)
        if other is not None:
            raise InvalidInputError(f"attached file {name!r} is given twice; rename one" if other == name else
                                    f"attached files {other!r} and {name!r} would be one file in a checkout on "
                                    "macOS or Windows (their names differ only in case); rename one")
        files[key] = name
    folders = {"/".join(k.split("/")[:d]): name for k, name in files.items() for d in range(1, k.count("/") + 1)}
    for key, name in files.items():
        if key in folders:
            raise InvalidInputError(f"attached file {name!r} is where {folders[key]!r} needs a folder; rename one")


def as_refs(refs: Any, what: str = "parents") -> list[Any]:
    """Version references, read once: one reference (an id, a tag, a name, a Version) may be given alone."""
    if isinstance(refs, (str, int, np.integer, Version)):
        return [refs]
    if not isinstance(refs, Iterable) or isinstance(refs, (bytes, Mapping)):
        raise InvalidInputError(f"{what}: give a version (an id, a tag, a name) or a list of them, not a "
                                f"{type(refs).__name__}")
    return list(refs)


def _check_message(message: Any, author: Any) -> None:
    """A version's message and author (text or None), refused by name otherwise."""
    if message is not None and not isinstance(message, str):
        raise InvalidInputError(f"message={message!r:.60}: give the version's message as text")
    if author is not None and not isinstance(author, str):
        raise InvalidInputError(f"author={author!r:.60}: give the author's name as text (or leave it out)")
    check_text([message, author], "the message or author")


def _flag(best: Any) -> bool:
    """``best`` as a bool: True, False, 1, 0, or one of those as a NumPy or torch scalar (``val < top`` of two
    tensors); anything else (a string, a number of the wrong kind) refused by name."""
    if callable(getattr(best, "item", None)) and getattr(best, "ndim", None) == 0:
        best = best.item()
    if isinstance(best, (bool, np.bool_)) or (isinstance(best, numbers.Integral) and best in (0, 1)):
        return bool(best)
    raise InvalidInputError(f"best={best!r:.60}: True marks this snapshot as the version's best, False not")


def _weights(tensors: Any) -> Any:
    """What a commit archives of an in-memory mapping (a training checkpoint's state_dict, without its optimizer
    state, counters and ``_extra_state``): what a network is read off, not the wrapper around it."""
    return tensors_of(tensors, "input", None) if isinstance(tensors, Mapping) else tensors


def _repick(rec: Record, best_by: str | None) -> None:
    """Mark best the snapshot of record ``rec`` that ``best_by`` picks over its whole series, where it has that
    metric (else the mark stays)."""
    if best_by is None or best_rule(best_by)[0] not in (rec.get("metrics") or {}):
        return
    sid = pick_best(rec["snapshots"], rec["metrics"], None, best_by)
    if sid is not None:
        rec["best"] = sid


def _hyperparameters(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """A version's hyperparameters as JSON, refused where two keys would be one to queries (``"a.b"``
    beside ``"a": {"b"}``)."""
    if given is not None and not isinstance(given, Mapping):
        raise InvalidInputError(f"hyperparameters must be a mapping of names to values (e.g. {{'lr': 0.01}}), "
                                f"not {given!r:.60}")
    hp = to_json(dict(given or {}), "hyperparameters")
    flatten(hp, strict=True)
    return hp


def create_repository(location: str | os.PathLike[str], **kw: Any) -> Repository:
    """Create a new archive with versions at ``location``; ArchiveExistsError if one is there."""
    loc = os.fspath(location)
    try:
        open_archive(loc, **kw).close()
    except (FileNotFoundError, OSError):  # ArchiveNotFoundError is one: nothing there yet
        pass
    else:
        raise ArchiveExistsError(f"{location} is already an archive; nothing changed")
    return Repository(create_archive(loc, **kw))


def open_repository(location: str | os.PathLike[str], **kw: Any) -> Repository:
    """Open the archive at ``location`` for versions (it may hold plain snapshots too)."""
    return Repository(open_archive(location, **kw))


class Repository:
    """Versions, lineage, tags and files of one archive (local or remote), with its SQLite catalog.

    Use :func:`create_repository` / :func:`open_repository`; close it (or use ``with``).
    """

    def __init__(self, archive: Archive, *, own_archive: bool = True):
        if not isinstance(archive, Archive):  # a path: was an AttributeError ('str' object has no attribute 'store')
            raise InvalidInputError(f"Repository({archive!r:.80}): a Repository wraps an opened Archive; open one "
                                    "with gpupas.open_repository(location) (gpupas.create_repository for a new one)")
        self.archive = archive
        self.records = Records(archive.store)
        root = archive.store.local_root
        self.root = Path(root) if root is not None else None
        self._own = own_archive
        self._catalog: Catalog | None = None
        self._catalog_lock = threading.RLock()  # one catalog opened, not one per thread (a hook's own thread)

    @property
    def location(self) -> str:
        """Where the archive is: a local folder's path, as given, or the URL of a remote one."""
        return self.archive.location

    def __repr__(self) -> str:
        return f"<gpupas.Repository {self.location!r}>"

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._catalog_lock:
            if self._catalog is not None:
                self._catalog.close()
                self._catalog = None
        if self._own:
            self.archive.close()

    # -- catalog ---------------------------------------------------------------------------------------------
    def catalog(self) -> Catalog:
        """The SQLite catalog, brought up to date with the records (rebuilt if missing or damaged)."""
        with self._catalog_lock:
            if self._catalog is None:
                self._catalog = open_catalog(catalog_path(self.location, self.archive.store.local_root), self.records)
            else:
                self._catalog.sync()
            return self._catalog

    def reindex(self) -> dict[str, int]:
        """Build the catalog from scratch from the archive alone (the old one is never read: whatever it
        holds, no table, view or trigger of it survives), removing the temporary catalogs of rebuilds killed
        before theirs was in place (never a running one's); returns the row count of each table."""
        with self._catalog_lock:
            if self._catalog is not None:  # in place: another thread may hold it (between catalog() and a query)
                try:
                    return self._catalog.rebuild()
                except BaseException:
                    self._catalog = None  # its connection is closed: the next use opens the catalog again
                    raise
            self._catalog = rebuild_catalog(catalog_path(self.location, self.archive.store.local_root), self.records)
            return self._catalog.counts()

    def _after_publish(self, keys: Iterable[str]) -> None:
        """Bring the catalog up to date with the records this process has just written (catalog keys
        ``v/<id>``, ``m/<snapshot>``, ``t/<tag>``)."""
        try:
            with self._catalog_lock:
                if self._catalog is None:
                    self.catalog()
                else:
                    self._catalog.refresh(keys)
        except (CatalogError, OSError, sqlite3.Error) as exc:  # the record is the truth; the next reader catches up
            warnings.warn(f"version published, but the catalog was not updated ({exc}); it will be on next use",
                          stacklevel=3)

    # -- reading versions ------------------------------------------------------------------------------------
    def _record(self, vid: int) -> Record:
        rec = self.records.version(vid)
        if rec is None:
            raise VersionNotFoundError(f"no version {vid} in archive {self.location}; list them with `gpupas log`")
        return rec

    def resolve(self, ref: str | int | Version) -> int:
        """The id a reference names: a Version, an id, a tag, or a name (its newest version)."""
        if isinstance(ref, Version):
            return ref.id
        if isinstance(ref, (bool, np.bool_)):
            raise InvalidInputError(f"a version reference is an id, a tag or a name, not {ref!r}")
        if isinstance(ref, (int, np.integer)) or (isinstance(ref, str) and ref.isascii() and ref.isdigit()):
            # an id: 0-9 only ("²" is a digit to str.isdigit, not to int); past 20 digits no id, and int() refuses
            vid = int(ref) if not isinstance(ref, str) or len(ref) <= 20 else -1
            if not self.records.has_version(vid):
                raise VersionNotFoundError(f"no version {ref!s:.24} in archive {self.location}; list them with "
                                           "`gpupas log`")
            return vid
        if not isinstance(ref, str):
            raise InvalidInputError(f"a version reference is an id, a tag or a name, not a {type(ref).__name__}")
        keys.check_name(ref, "version reference")
        tag = self.records.tag(ref)
        if tag is not None:
            return tag
        try:
            rows = self.catalog().query("SELECT max(id) AS id FROM versions WHERE name=?", (ref,))
            found = rows[0]["id"] if rows else None
        except (CatalogError, sqlite3.Error):  # no usable catalog: read the records
            found = max((v.id for v in self.versions() if v.name == ref), default=None)
        if found is not None:
            return int(found)
        raise VersionNotFoundError(f"no version, tag or name {ref!r} in archive {self.location}; "
                                   "list them with `gpupas log`")

    def version(self, ref: str | int | Version) -> Version:
        """The version a reference names (see :meth:`resolve`)."""
        return Version(self._record(self.resolve(ref)))

    def versions(self) -> list[Version]:
        """Every version, by id (records that cannot be read are skipped; `verify` reports them)."""
        out = []
        for vid in self.records.version_ids():
            try:
                rec = self.records.version(vid)
            except IntegrityError:
                continue
            if rec is not None:
                out.append(Version(rec))
        return out

    def tags(self) -> dict[str, int]:
        """Tag name -> version id."""
        return {r["tag"]: r["version"] for r in self.catalog().query("SELECT tag, version FROM tags ORDER BY tag")}

    def file_bytes(self, sha256: str) -> bytes:
        """A stored file's bytes, checked against their hash."""
        return self.records.blob(sha256)

    # -- writing versions ------------------------------------------------------------------------------------
    def _sources(self, checkpoints: Any) -> list[tuple[Any, str | None, int | None]]:
        """(tensors or path, source name, step) per snapshot to commit."""
        if checkpoints is None:
            return []
        if isinstance(checkpoints, (str, os.PathLike)):
            skipped: list[str] = []
            found = checkpoint_files(checkpoints, skipped)
            for note in skipped:
                warnings.warn(note, stacklevel=3)
            return [(p, p.name, step_of(p)) for p in found]
        if isinstance(checkpoints, Mapping):
            return [(checkpoints, None, None)]
        if isinstance(checkpoints, (list, tuple)):
            out = []
            for c in checkpoints:
                out.extend(self._sources(c))
            return out
        raise InvalidInputError(f"checkpoints must be a path, a directory, a mapping of tensors or a list of those, "
                                f"not {type(checkpoints).__name__}")

    def _store_files(self, files: Any) -> dict[str, dict[str, Any]]:
        """Check and store files (paths, dirs, or {logical name: path or bytes}); returns the refs."""
        items: list[tuple[str, Any]] = []
        if files is None:
            files = []
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        if isinstance(files, (bytes, bytearray, memoryview)):
            raise InvalidInputError("files: bytes need a name in the version: give {name: bytes}")
        if isinstance(files, Mapping):
            items = [(check_file_name(k), v) for k, v in files.items()]
            for k, v in items:
                if not isinstance(v, (bytes, bytearray, memoryview, str, os.PathLike)):
                    raise InvalidInputError(f"attached file {k!r}: give a path or bytes, not a {type(v).__name__}")
        elif not isinstance(files, Iterable):
            raise InvalidInputError(f"files: give paths, folders or {{name: path or bytes}}, not a "
                                    f"{type(files).__name__}")
        else:
            for f in files:
                if not isinstance(f, (str, os.PathLike)):
                    raise InvalidInputError(f"files: {f!r:.60} is not a path (it is a {type(f).__name__}); give "
                                            "paths, folders or {name: path or bytes}")
                p = Path(f)
                if p.is_dir():
                    items += [(check_file_name(f"{p.name}/{q.relative_to(p).as_posix()}"), q)
                              for q in sorted(p.rglob("*")) if q.is_file()]
                elif p.is_file():
                    items.append((check_file_name(p.name), p))
                else:  # a device (/dev/null), a socket, a broken link, nothing
                    what = "is neither a file nor a folder" if p.exists() else "does not exist"
                    raise InvalidInputError(f"file {p} {what}: attach files or folders")
        _check_distinct([name for name, _ in items])
        blobs = []
        for name, src in items:
            if isinstance(src, (bytes, bytearray, memoryview)):
                data = bytes(src)
            else:
                try:
                    data = Path(src).read_bytes()
                except OSError as exc:
                    raise InvalidInputError(f"file {src} cannot be read: {exc}") from None
            blobs.append((name, data))
        return {name: {"sha256": self.records.put_blob(data), "size": len(data)} for name, data in blobs}

    @staticmethod
    def _load(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A checkpoint file's tensors, and the snapshot metadata it brings: a safetensors file's own
        metadata as ``file_metadata`` (export writes it back)."""
        notes: list[str] = []
        metadata: dict[str, str] = {}
        tensors = Loaded(load_checkpoint(path, notes, metadata))  # the cache's alone once committed
        for note in notes:
            warnings.warn(note, stacklevel=4)
        return tensors, ({"file_metadata": metadata} if metadata else {})

    @contextmanager
    def _publishing(self) -> Iterator[list[str]]:
        """Around writing snapshots for a version and publishing it: gc waits meanwhile (it would take
        them for garbage); on an error, the snapshots listed in the yielded list are removed again."""
        written: list[str] = []
        try:
            with self.archive.store.writing():
                yield written
        except BaseException as exc:
            if not getattr(exc, "maybe_published", False):  # else a published record may name them
                self._discard(written)  # after the lock is released: discard takes it exclusively
            raise

    def _discard(self, sids: Iterable[str]) -> None:
        """Remove snapshots this process wrote for a version that was never published (newest first:
        each is the base of the next)."""
        for sid in reversed(list(sids)):
            try:
                self.archive.discard(sid)
            except SnapshotNotFoundError:  # already gone
                pass
            except GpupasError as exc:  # e.g. a compaction made it another snapshot's base meanwhile
                warnings.warn(f"snapshot {sid}, written for the version that failed, stays ({exc}); `gpupas gc` "
                              "removes it once nothing needs it", stacklevel=4)

    def _commit_snapshots(self, sources: Sequence[tuple[Any, str | None, int | None]], base: str | None,
                          name: str, setting: str, progress: Progress | None,
                          written: list[str], lossy: Any = None) -> tuple[list[dict[str, Any]], Any]:
        entries, first = [], None
        for i, (src, label, step) in enumerate(sources):
            tensors, extra = self._load(src) if isinstance(src, (str, os.PathLike)) else (src, {})
            if first is None:
                first = _weights(tensors)
            m = self.archive.commit(tensors, base=base, setting=setting, lossy=lossy,
                                    meta={"version_name": name, "source": label, "step": step, **extra})
            written.append(m.id)
            entries.append(snapshot_entry(m, step, label))
            base = m.id
            if progress:
                progress(f"{name}: {label or 'tensors'}", i + 1, len(sources))
        return entries, first

    def commit(self, name: str, checkpoints: Any = None, *, parents: Iterable[str | int | Version] = (),
               message: str = "", author: str | None = None, hyperparameters: Mapping[str, Any] | None = None,
               metrics: Any = None, files: Any = None, network: Any = None, setting: str = "default",
               best: str | int | None = None, best_by: str | None = None, step: int | None = None,
               progress: Progress | None = None, lossy: Any = None,
               from_snapshot: str | int | None = None) -> Version:
        """Commit a new version of ``name`` and return it.

        Parameters
        ----------
        checkpoints
            A checkpoint file (safetensors or torch, read without executing code), a directory
            of them (time-ordered snapshots in natural name order; a model folder with a shard index:
            one snapshot), a mapping of tensor names to
            arrays, or a list of those. Each snapshot is delta-encoded against the previous one,
            the first against the first parent's latest snapshot.
        parents
            Versions this one derives from (ids, tags, names); one may be given alone.
        from_snapshot
            The first parent's snapshot this version starts from (1-based index, id, "best"; default its
            latest): its first snapshot is a delta against that one, as `show` then says.
        hyperparameters, metrics, files
            Any JSON object; metric series (see :func:`~gpupas.versions.metrics.normalize_metrics`;
            a path reads a training log); files as paths, directories or ``{name: path or bytes}``.
        network
            A torch module, a network dict, or None: then it is read off the first
            checkpoint's tensor names and shapes.
        best, best_by
            Mark a snapshot best: a 1-based index or snapshot id, or the one with the best value
            of a metric (``"accuracy"``: highest; ``"loss:min"``: lowest).
        step
            The training step of an in-memory checkpoint (files take it from their name).
        lossy
            Store float tensors in a lossy scheme ("bf16", "fp16", "fixed:16", "quant:8",
            "kmeans:4", ...; see :mod:`gpupas.pas.schemes`); the version then says so everywhere.

        Nothing is visible until the version record is published; on any error the snapshots
        written so far are removed again.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> repo = create_repository(tempfile.mkdtemp() + "/a")
        >>> repo.commit("net", {"w": np.zeros(3, np.float32)}, metrics={"loss": [0.9, 0.5]}).metrics["loss"]
        [[0, 0.9], [1, 0.5]]
        """
        self._check_new_name(name)
        _check_message(message, author)
        parent_ids = list(dict.fromkeys(self.resolve(p) for p in as_refs(parents)))
        hp = _hyperparameters(hyperparameters)
        series = normalize_metrics(metrics)
        step = snapshot_step(step)
        sources = self._sources(checkpoints)
        if step is not None:
            sources = [(src, label, step if st is None else st) for src, label, st in sources]
        if from_snapshot is not None and not parent_ids:
            raise InvalidInputError("from_snapshot names a snapshot of the first parent; give parents too")
        base = None
        if parent_ids:  # (a parent without snapshots: the first snapshot is stored whole)
            first = Version(self._record(parent_ids[0]))
            base = first.latest if from_snapshot is None else first.snapshot(from_snapshot)["id"]
        net = extract_network(network) if network is not None else None
        with self._publishing() as written:
            entries, first = self._commit_snapshots(sources, base, name, setting, progress, written, lossy)
            if net is None:
                net = extract_network(first) if first is not None else Network(source="none")
            record = new_record(name, parents=parent_ids, snapshots=entries, network=net.to_dict(),
                                hyperparameters=hp, metrics=series, files=self._store_files(files),
                                message=message, author=author, best=pick_best(entries, series, best, best_by))
            vid = self.records.publish_version(record)
            written.clear()  # published: nothing to take back
        self._after_publish([f"v/{vid}", *(f"m/{e['id']}" for e in entries)])
        self._say_if_tagged(name, [vid])
        return Version(self._record(vid))

    def _update(self, ref: str | int | Version, change: Callable[[Record], bool | None],
                published: Callable[[], None] | None = None, snapshots: Iterable[str] = ()) -> Version:
        """Apply ``change`` to a version's record and publish it atomically (no concurrent update is lost);
        ``published`` runs as soon as the record is replaced, before anything else can fail; ``snapshots``:
        those the change adds."""
        vid = self.resolve(ref)

        def bump(rec: Record) -> bool | None:
            if change(rec) is False:  # nothing to change: the record stays as it is (Records.update_version)
                return False
            rec["rev"] = int(rec.get("rev", 0)) + 1
            rec["updated"] = now()
            return None

        rec = self.records.update_version(vid, bump)
        if published is not None:
            published()
        self._after_publish([f"v/{vid}", *(f"m/{sid}" for sid in snapshots)])
        return Version(rec)

    def add_snapshot(self, ref: str | int | Version, tensors: Any, *, step: int | None = None,
                     metrics: Any = None, best: bool = False, source: str | None = None,
                     setting: str = "default", lossy: Any = None, best_by: str | None = None) -> Version:
        """Append a snapshot to an existing version, delta-encoded against its latest one.

        Records are replaced atomically (no concurrent append is lost), so readers see the version
        before or after, never in between. ``best_by`` (see :meth:`commit`): mark best the snapshot that
        metric picks over the whole version, in the same update (a training loop's every checkpoint).
        """
        best = _flag(best)
        if best_by is not None:
            best_rule(best_by)
        vid = self.resolve(ref)
        series = normalize_metrics(metrics)
        step = snapshot_step(step)
        latest = Version(self._record(vid)).latest
        extra: dict[str, Any] = {}
        if isinstance(tensors, (str, os.PathLike)):
            (path,) = checkpoint_files(tensors)
            source, step = source or path.name, step if step is not None else step_of(path)
            tensors, extra = self._load(path)
        check_text(source, "the source name")

        def change(rec: Record) -> None:
            rec["snapshots"].append(entry)
            rec["latest"] = entry["id"]
            if best:
                rec["best"] = entry["id"]
            merge_metrics(rec.setdefault("metrics", {}), series)
            _repick(rec, best_by)
            if rec.get("network", {}).get("source") in (None, "none"):
                rec["network"] = extract_network(_weights(tensors)).to_dict()

        with self._publishing() as written:
            m = self.archive.commit(tensors, base=latest, setting=setting, lossy=lossy,
                                    meta={"version_id": vid, "source": source, "step": step, **extra})
            written.append(m.id)
            entry = snapshot_entry(m, step, source)
            version = self._update(vid, change, published=written.clear,  # from then on the record names it
                                   snapshots=[m.id])
        return version

    def log_metrics(self, ref: str | int | Version, metrics: Any, *, best_by: str | None = None) -> Version:
        """Append metric points (see :func:`~gpupas.versions.metrics.normalize_metrics`) to a version; ``best_by``
        as :meth:`add_snapshot`'s."""
        series = normalize_metrics(metrics)
        if best_by is not None:
            best_rule(best_by)

        def change(rec: Record) -> None:
            merge_metrics(rec.setdefault("metrics", {}), series)
            _repick(rec, best_by)

        return self._update(ref, change)

    def mark_best(self, ref: str | int | Version, snapshot: str | int) -> Version:
        """Mark one of a version's snapshots (1-based index or id) as its best."""
        v = self.version(ref)  # resolved once: a name may reach a newer version by the time the record is updated
        sid = v.snapshot(snapshot)["id"]
        return self._update(v.id, lambda rec: rec.__setitem__("best", sid))

    def drop_snapshots(self, ref: str | int | Version, snapshots: Iterable[str | int] | str | int = (), *,
                       keep_last: int | None = None, best_by: str | None = None, allow_empty: bool = False,
                       dry_run: bool = False) -> Version:
        """Remove snapshots from a version's record: those ``snapshots`` names (each a 1-based index, an id,
        "latest" or "best", as :meth:`Version.snapshot` reads them) and, with ``keep_last``, all but the last
        ``keep_last`` (the version's best is kept too, unless named; where that keeps them all, nothing changes).
        Returns the version as updated.

        One atomic record update (no concurrent append is lost: what is dropped is what the version held when
        this was called; readers see the version before or after). ``latest`` becomes the last snapshot left;
        a dropped best is unmarked, or, with ``best_by``, the best of those left by that metric is marked.
        Metrics stay. The record lists what was dropped under ``"dropped"`` (verify and gc say so).

        Bytes are freed by ``gc`` once the drop is ``min_age`` old (an hour; ``gpupas gc --min-age 0``: at once),
        except those another version names (a ``copy`` shares its source's latest) or a kept snapshot
        is built on (its base): ``compact`` re-bases those (onto kept snapshots, or whole), then gc frees
        them. A version left without snapshots is refused unless ``allow_empty``. ``dry_run``: the version as it
        would be, nothing written.
        """
        return self.dropping(ref, snapshots, keep_last=keep_last, best_by=best_by, allow_empty=allow_empty,
                             dry_run=dry_run)[0]

    def dropping(self, ref: str | int | Version, snapshots: Iterable[str | int] | str | int = (), *,
                 keep_last: int | None = None, best_by: str | None = None, allow_empty: bool = False,
                 dry_run: bool = False) -> tuple[Version, list[dict[str, Any]]]:
        """:meth:`drop_snapshots`, and the snapshot entries this call dropped (not those another process dropped
        meanwhile). Where none is left to drop, the record is not rewritten."""
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, numbers.Integral)
                                      or keep_last < 0):
            raise InvalidInputError(f"keep_last={keep_last!r:.60}: give how many of the last snapshots to keep "
                                    "(0 or more; the best is kept too)")
        if best_by is not None:
            best_rule(best_by)
        if isinstance(snapshots, (str, int, np.integer)):
            sels: list[Any] = [snapshots]
        elif isinstance(snapshots, Iterable) and not isinstance(snapshots, (bytes, Mapping)):
            sels = list(snapshots)
        else:
            raise InvalidInputError(f"snapshots={snapshots!r:.60}: name them by number (1 is the first), id, "
                                    "'latest' or 'best', one or a list")
        if not sels and keep_last is None:
            raise InvalidInputError("name the snapshots to drop (their numbers or ids, as `gpupas show VERSION` "
                                    "lists them) or how many of the last to keep (keep_last, `--keep-last N`)")
        v = self.version(ref)  # resolved once: a name may reach a newer version by the time the record is updated
        snaps = v.snapshots
        drop: dict[str, None] = {}
        for sel in sels:
            try:
                drop[v.snapshot(sel)["id"]] = None
            except SnapshotNotFoundError as exc:
                raise InvalidInputError(f"{exc}: nothing dropped; name snapshots it has (`gpupas show {v.id}` "
                                        "lists them)") from None
        if keep_last is not None:  # (more to keep than there are: all kept)
            keep = {s["id"] for s in snaps[max(0, len(snaps) - keep_last):]} if keep_last else set()
            drop.update((s["id"], None) for s in snaps if s["id"] not in keep and s["id"] != v.best)
        if not drop:  # keep_last keeps them all: nothing to do (a routine `--keep-last N` is not an error)
            return v, []
        gone: list[dict[str, Any]] = []

        def change(rec: Record) -> bool | None:
            left = [s for s in rec["snapshots"] if s["id"] not in drop]
            gone[:] = [s for s in rec["snapshots"] if s["id"] in drop]
            if not gone:  # dropped meanwhile by another: the record stays as it is
                return False
            if not left and not allow_empty:
                raise InvalidInputError(f"that drops every snapshot of version {rec['id']} ({len(gone)}); a version "
                                        "without snapshots keeps its metadata only: pass allow_empty=True "
                                        "(`gpupas drop --all`) if that is what you want")
            stamp = now()
            rec["snapshots"] = left
            rec["dropped"] = [*(rec.get("dropped") or []), *({**s, "dropped": stamp} for s in gone)]
            rec["latest"] = left[-1]["id"] if left else None
            if rec.get("best") in drop:
                rec["best"] = None
                if left:
                    _repick(rec, best_by)
            return None

        if dry_run:
            rec = v.to_dict()
            change(rec)
            return Version(rec), gone
        return self._update(v.id, change), gone

    def copy(self, ref: str | int | Version, name: str, *, message: str = "", author: str | None = None) -> Version:
        """Scaffold a new version from ``ref``: same network, hyperparameters, files and latest weights.

        The weights are shared (no bytes copied); the new version's parent is ``ref``. Train
        it further with :meth:`add_snapshot` or the training hook.
        """
        self._check_new_name(name)
        _check_message(message, author)
        src = self.version(ref)
        snaps = [src.snapshot()] if src.snapshots else []
        record = new_record(name, parents=[src.id], snapshots=snaps, network=src.record.get("network"),
                            hyperparameters=src.hyperparameters, metrics={}, files=src.files,
                            message=message or f"copy of version {src.id} ({src.name})", author=author)
        vid = self.records.publish_version(record)
        self._after_publish([f"v/{vid}"])
        self._say_if_tagged(name, [vid])
        return Version(self._record(vid))

    def import_folder(self, folder: str | os.PathLike[str], name: str, *, parent: str | int | None = None,
                      hyperparameters: Mapping[str, Any] | None = None, metrics: Any = None, files: Any = None,
                      message: str = "", author: str | None = None, setting: str = "default",
                      progress: Progress | None = None) -> list[Version]:
        """Make a folder of checkpoints a lineage chain: one version per file, each the parent of the next.

        Files are taken in natural name order; the last number in a file name is its step, and
        each version gets the metric points logged up to its step. Each snapshot is a delta
        against the previous one. On an error, no version of the chain is published.
        """
        self._check_new_name(name)
        _check_message(message, author)
        skipped: list[str] = []
        paths = checkpoint_files(folder, skipped)
        for note in skipped:
            warnings.warn(note, stacklevel=2)
        if len(paths) == 1 and Path(folder).is_file():
            raise InvalidInputError(f"{folder} is a file; import takes a directory (commit takes files)")
        parent_ids = [self.resolve(parent)] if parent is not None else []
        hp = _hyperparameters(hyperparameters)
        series = normalize_metrics(metrics)
        base = Version(self._record(parent_ids[0])).latest if parent_ids else None
        records: list[Record] = []
        out: list[int] = []
        with self._publishing() as written:
            for i, p in enumerate(paths):  # 1: every snapshot; nothing is visible yet
                entries, tensors = self._commit_snapshots([(p, p.name, step_of(p))], base, name, setting, None,
                                                          written)
                if progress:
                    progress(f"{name}: {p.name}", i + 1, len(paths))
                base = entries[0]["id"]
                step, prev = step_of(p), (records[-1]["snapshots"][0]["step"] if records else None)
                records.append(new_record(
                    name, parents=[], snapshots=entries, network=extract_network(tensors).to_dict(),
                    hyperparameters=hp, metrics=upto(series, step, prev), files={}, author=author,
                    message=f"{message}: {p.name}" if message else f"imported {p.name}"))
            file_refs = self._store_files(files)
            for rec in records:  # 2: publish the chain, parents first
                rec["parents"], rec["created"], rec["files"] = parent_ids, now(), file_refs
                parent_ids = [self.records.publish_version(rec)]
                out.append(parent_ids[0])
                for s in rec["snapshots"]:  # published: not to be taken back on a later error
                    written.remove(s["id"])
        self._after_publish([*(f"v/{v}" for v in out), *(f"m/{s['id']}" for r in records for s in r["snapshots"])])
        self._say_if_tagged(name, out)
        return [Version(self._record(v)) for v in out]

    # -- tags ------------------------------------------------------------------------------------------------
    def _check_new_name(self, name: str) -> None:
        """A new version's name: valid, and not a tag (tags resolve first: the name would never reach it)."""
        check_version_name(name)
        if self.records.tag(name) is not None:
            raise InvalidInputError(f"{name!r} is a tag here (`gpupas show {name}` shows its version): a version "
                                    "of that name could not be reached by it; pick another name or untag it first")

    def _say_if_tagged(self, name: str, vids: Sequence[int]) -> None:
        """Warn where a tag of ``name`` appeared while versions of that name were committed (their name was
        checked before): the name reaches the tag's version, not theirs."""
        try:
            tagged = self.records.tag(name)
        except GpupasError:
            return
        if tagged is not None:
            warnings.warn(f"tag {name!r} was set (to version {tagged}) while version(s) {', '.join(map(str, vids))} "
                          f"named {name!r} were committed: that name reaches the tag's version; refer to them by "
                          f"id, or untag {name!r}", stacklevel=3)

    def _named_versions(self, name: str) -> list[int]:
        try:
            return [r["id"] for r in self.catalog().query("SELECT id FROM versions WHERE name=? ORDER BY id", (name,))]
        except (CatalogError, sqlite3.Error):  # no usable catalog: read the records
            return [v.id for v in self.versions() if v.name == name]

    def tag(self, tag: str, ref: str | int | Version, *, force: bool = False) -> int:
        """Point ``tag`` at a version; ArchiveExistsError if it points elsewhere (unless ``force``).
        A tag may not take a version name (it would hide those versions from that name), nor another tag's name
        in another case (InvalidInputError: macOS and Windows keep one file for both)."""
        check_version_name(tag, "tag")
        vid = self.resolve(ref)
        named = self._named_versions(tag)
        if named:
            raise InvalidInputError(f"{tag!r} names version(s) {', '.join(map(str, named))}; a tag of that name would "
                                    "hide them from it: pick another tag")
        self._check_case(tag)
        record = {"tag": tag, "version": vid, "created": now()}
        created = False
        for _ in range(_TAG_TRIES):
            created = self.records.create_tag(tag, record)
            old = vid if created else self.records.tag(tag)
            if old is not None:  # None: deleted since create_tag found it; create it again
                break
            self._check_case(tag)  # or made meanwhile under another case, on a case-insensitive file system
            held = self.records.read(f"t/{tag}")
            if held is not None:  # or it holds another tag's record, as an older gpupas on macOS left it
                if not force:
                    raise ArchiveExistsError(f"the file of tag {tag!r} holds tag {held[0].get('tag')!r} (one file "
                                             "on macOS and Windows); use --force to set the tag in its place")
                break
        else:
            raise ConflictError(f"tag {tag!r} was deleted and made again by others {_TAG_TRIES} times while this "
                                "tried to set it; try again")
        if old != vid:
            if not force:
                raise ArchiveExistsError(f"tag {tag!r} already points at version {old}; use --force to move it")
            self.records.replace_tag(tag, record)
        named = self._named_versions(tag) if created else []  # a commit of that name that checked before the tag
        if named:
            if self.records.tag(tag) == vid:
                self.records.delete_tag(tag)
            raise InvalidInputError(f"{tag!r} names version(s) {', '.join(map(str, named))} (committed meanwhile); "
                                    "a tag of that name would hide them from it: pick another tag")
        if created:
            try:
                self._check_case(tag)  # the same name in another case, tagged meanwhile by another process
            except InvalidInputError:
                if self.records.tag(tag) == vid:
                    self.records.delete_tag(tag)
                raise
        self._after_publish([f"t/{tag}"])
        return vid

    def _check_case(self, tag: str) -> None:
        """Refuse a tag that differs from another only in case: macOS and Windows file systems keep one file
        for both, so the archive would read differently there."""
        clash = [t for t in self.records.tag_names() if t != tag and file_key(t) == file_key(tag)]
        if clash:
            raise InvalidInputError(f"tag {tag!r} differs from tag {clash[0]!r} only in case, which macOS and "
                                    f"Windows file systems do not tell apart: pick another name, or move "
                                    f"{clash[0]!r} (`gpupas tag {clash[0]} VERSION --force`)")

    def untag(self, tag: str) -> int:
        """Delete a tag; returns the version it pointed at."""
        check_version_name(tag, "tag")
        vid = self.records.tag(tag)
        if vid is None:
            raise VersionNotFoundError(f"no tag {tag!r} in archive {self.location}")
        self.records.delete_tag(tag)
        self._after_publish([f"t/{tag}"])
        return vid

    # -- weights out -----------------------------------------------------------------------------------------
    def restore(self, ref: str | int | Version, snapshot: str | int | None = None, *,
                names: Iterable[str] | None = None, framework: str = "numpy") -> dict[str, Any]:
        """The tensors of a version's snapshot (latest by default): bit-exact, except tensors committed with a
        lossy scheme (they restore to what the scheme kept; ``show`` and ``log`` say which)."""
        sid = self.version(ref).snapshot(snapshot)["id"]
        return self.archive.restore(sid, names, framework=framework)

    def export(self, ref: str | int | Version, path: str | os.PathLike[str], *, snapshot: str | int | None = None,
               format: str | None = None, force: bool = False) -> Path:
        """Write a version's weights (its latest snapshot, or ``snapshot``) to one safetensors or torch file, the
        ``format`` named or taken from the suffix; ``force`` replaces a file there (see
        :func:`gpupas.versions.export.export`)."""
        return _export.export(self, ref, path, snapshot=snapshot, format=format, force=force)

    def checkout(self, ref: str | int | Version, out_dir: str | os.PathLike[str], *,
                 snapshot: str | int | None = None, format: str | None = None, force: bool = False,
                 weights_name: str | None = None) -> list[Path]:
        """Write a version (its latest snapshot, or ``snapshot``) to a directory: weights, files and
        ``gpupas-version.json``; ``force`` writes over an earlier checkout (see
        :func:`gpupas.versions.export.checkout`)."""
        return _export.checkout(self, ref, out_dir, snapshot=snapshot, format=format, force=force,
                                weights_name=weights_name)

    # -- exploration -----------------------------------------------------------------------------------------
    def show(self, ref: str | int | Version, snapshot: str | int | None = None) -> dict[str, Any]:
        """Metadata, network, sizes and per-layer storage of a version (``gpupas show``)."""
        return _inspect.show(self, ref, snapshot)

    def diff(self, a: str | int | Version, b: str | int | Version, *, snapshot_a: str | int | None = None,
             snapshot_b: str | int | None = None, weights: bool = True) -> dict[str, Any]:
        """Two versions side by side (``gpupas diff``): network, hyperparameters, metrics and, unless not
        ``weights``, per-tensor changes between their latest snapshots or ``snapshot_a``/``snapshot_b`` (see
        :func:`gpupas.versions.inspect.diff`)."""
        return _inspect.diff(self, a, b, snapshot_a=snapshot_a, snapshot_b=snapshot_b, weights=weights)

    def log(self, ref: str | int | Version | None = None) -> list[dict[str, Any]]:
        """Every version's summary, or only those connected to ``ref`` (``gpupas log``)."""
        return _inspect.log(self, ref)

    def lineage(self) -> list[dict[str, Any]]:
        """Every version's summary (id, name, parents, tags, snapshots, sizes), by id."""
        return _inspect.lineage(self)

    def stats(self) -> dict[str, Any]:
        """What the archive stores, how, and what that saves (``gpupas stats``)."""
        return _inspect.stats(self)

    def query(self, dql: str) -> list[dict[str, Any]]:
        """Versions selected by a DQL ``select`` statement (see :mod:`gpupas.query`), from the catalog."""
        from gpupas.query import run_query

        return run_query(self.catalog(), dql)

    def verify(self, refs: Iterable[str | int] | None = None, progress: Progress | None = None,
               scheduler: Any = "sync") -> dict[str, Any]:
        """Check every chunk, tensor, record, tag and file (``gpupas verify``; see :mod:`gpupas.versions.verify`)."""
        return _verify.verify(self, None if refs is None else as_refs(refs, "refs"), progress, scheduler)

    def gc(self, min_age: float = 3600.0, dry_run: bool = False) -> list[dict[str, Any]]:
        """Delete what no published version and no kept snapshot needs (``gpupas gc``), once untouched for
        ``min_age`` seconds (the age of the snapshot's manifest: its commit, or its last revision; for one dropped,
        the time since the drop): snapshots written for versions that never published (a killed commit) or
        dropped from their version (:meth:`drop_snapshots`; those items say ``dropped_from``: the version), chunk
        folders no snapshot names, and temporary files killed writes left. Snapshots committed without a
        version (``Archive.commit``) are kept, with everything they are built on. Returns ``{"kind", "name",
        "bytes"}`` per item removed (or, with ``dry_run``, that would be); ``bytes``: what it took in the
        store (and tiers), every file."""

        dropped: dict[str, int] = {}

        @functools.cache
        def records() -> tuple[set[str], set[int]]:
            """The snapshots the version records name (or dropped less than ``min_age`` ago), and the ids of the
            records there are: read once, on first use, which is under the archive's exclusive lock (no commit is
            between steps)."""
            ids = self.records.version_ids()
            versions = every_version(ids)
            dropped.update(_verify.dropped_from(v.record for v in versions))
            recent = _verify.dropped_within((v.record for v in versions),  # readers may be restoring them, and an
                                            remote_floor(self.archive.store, min_age))  # add on them in flight
            return {s["id"] for v in versions for s in v.snapshots} | recent, set(ids)

        def is_root(m: Manifest) -> bool:
            """Kept, with what it is built on: a snapshot a record names, one committed without a version, one
            whose version's record is lost (:func:`~gpupas.versions.verify.unpublished` says which)."""
            named, published = records()
            return m.id in named or not _verify.unpublished(m.meta, published)

        def every_version(ids: list[int]) -> list[Version]:
            """Every record of ``ids``, or IntegrityError: a record that cannot be read may name snapshots."""
            out = []
            for vid in ids:
                try:
                    rec = self.records.version(vid)
                except IntegrityError as exc:
                    raise IntegrityError(f"{exc}; gc removes nothing while a version record cannot be read (its "
                                         "snapshots would look unused): repair or restore it, then run gc again"
                                         ) from None
                if rec is not None:
                    out.append(Version(rec))
            return out

        found = self.archive.store.collect(is_root, min_age, dry_run,  # named: a lost manifest's folders stay
                                           lambda: records()[0])
        for kind, name, _ in found:
            if kind == "snapshot":
                self.archive.bases.drop(name)
                self.archive._forget(name)
        return [{"kind": k, "name": n, "bytes": b, **({"dropped_from": dropped[n]} if k == "snapshot" and n in dropped
                                                     else {})} for k, n, b in found]
