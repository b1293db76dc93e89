"""Model versions, lineage, tags, files and metadata on top of the PAS archive (the dlv layer).

A **version** is ``(name, id, parents, network, snapshots, metadata, files)``: a running integer
id, any number of parent versions (lineage), a network definition (a DAG of layers), one or
more time-ordered snapshots of its weights (PAS snapshots; one is latest, one may be marked
best), hyperparameters and metric series, and files stored by content hash.

On disk, next to the PAS data of the archive::

    versions/<id>.json          one record per version, published atomically
    refs/tags/<tag>.json        {"version": id}
    files/<sha256>              file contents, deduplicated by hash
    catalog.sqlite              SQLite index of all of it (a cache: `gpupas reindex` rebuilds it)

Publishing is create-if-absent (``os.link`` of a fully written temporary file), so two
processes committing at once get distinct ids without a lock file, and a killed commit leaves
no visible half version (its snapshots, written first, stay unreferenced). Records that change
later (a snapshot appended by a training loop, a best mark) are replaced atomically
(``os.replace``) under a ``flock`` that dies with its process.

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

import csv
import fcntl
import getpass
import hashlib
import io
import json
import math
import os
import re
import sqlite3
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from gpupas.archive import Archive, create_archive, open_archive
from gpupas.catalog import Catalog, flatten, open_catalog
from gpupas.errors import (
    ArchiveExistsError,
    CatalogError,
    GpupasError,
    IntegrityError,
    InvalidInputError,
    SnapshotNotFoundError,
    VersionNotFoundError,
)
from gpupas.format.keys import check_name
from gpupas.network import Network, diff_networks, extract_network
from gpupas.store.local import publish_file
from gpupas.tensors import TORCH_SUFFIXES, load_checkpoint

RECORD_FORMAT = 1
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
_VERSION_FILE = re.compile(r"^([1-9][0-9]{0,17})\.json$")
_STEP_NAMES = ("step", "global_step", "iteration", "iter", "epoch")

Progress = Callable[[str, int, int], None]
Record = dict[str, Any]


# -- small helpers ------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(UTC).isoformat()


def _default_author() -> str:
    try:
        return os.environ.get("GPUPAS_AUTHOR") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) and obj.size <= 1024:
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON")


def _to_json(obj: Any, what: str) -> Any:
    """``obj`` as plain JSON values; InvalidInputError names ``what`` when it is not JSON."""
    try:
        return json.loads(json.dumps(obj, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} must be JSON values (numbers, strings, lists, objects; no NaN): {exc}") \
            from None


def _dumps(record: Record) -> bytes:
    return json.dumps(record, indent=1, allow_nan=False).encode()


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``step-9`` before ``step-10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def step_of(path: str | os.PathLike[str]) -> int | None:
    """The training step in a checkpoint's file name (its last number), if any."""
    nums = re.findall(r"\d+", Path(path).stem)
    return int(nums[-1]) if nums else None


def check_version_name(name: str, what: str = "version name") -> str:
    """``name`` if it can name a version or tag: a safe path component that is not only digits."""
    check_name(name, what)
    if name.isdigit():
        raise InvalidInputError(f"{what} {name!r} is not allowed: names of digits only would read as version ids")
    return name


def check_file_name(name: str) -> str:
    """A file's logical name: relative, '/'-separated, every part a safe name."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        raise InvalidInputError(f"file name {name!r} is not allowed: give a relative path with '/' separators")
    for part in name.split("/"):
        check_name(part, f"file name part of {name!r}:")
    return name


def checkpoint_files(path: str | os.PathLike[str]) -> list[Path]:
    """A checkpoint file, or the checkpoint files of a directory in natural order of their names."""
    p = Path(path)
    if p.is_dir():
        found = sorted((f for f in p.iterdir() if f.is_file() and f.suffix in CHECKPOINT_SUFFIXES),
                       key=lambda f: natural_key(f.name))
        if not found:
            raise InvalidInputError(f"{p} holds no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)})")
        return found
    if not p.is_file():
        raise InvalidInputError(f"checkpoint {p} does not exist")
    if p.suffix not in CHECKPOINT_SUFFIXES:
        raise InvalidInputError(f"{p}: unknown checkpoint type {p.suffix!r}; give a .safetensors file, a torch "
                                f"state_dict file ({', '.join(TORCH_SUFFIXES)}) or a directory of them")
    return [p]


# -- metrics ------------------------------------------------------------------------------------
def _value(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InvalidInputError(f"metric value {v!r} is not a number") from None
    return f if math.isfinite(f) else None


def _step(v: Any) -> int | float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InvalidInputError(f"step {v!r} is not a number") from None
    if not math.isfinite(f):
        raise InvalidInputError(f"step {v!r} is not finite")
    return int(f) if f.is_integer() else f


def _from_rows(rows: Iterable[Mapping[str, Any]], source: str) -> dict[str, list[list[Any]]]:
    """Series from per-step records; columns holding any text (timestamps, phase names) are skipped."""
    rows = [r for r in rows if isinstance(r, Mapping)]
    cols = list(dict.fromkeys(k for r in rows for k in r if k is not None))
    step_key = next((k for k in _STEP_NAMES if k in cols), None)

    def numeric(v: Any) -> bool:
        if v is None or v == "" or isinstance(v, bool):
            return v is not True and v is not False
        try:
            float(v)
        except (TypeError, ValueError):
            return False
        return True

    metrics = [k for k in cols if k != step_key and all(numeric(r.get(k)) for r in rows)]
    out: dict[str, list[list[Any]]] = {}
    for i, row in enumerate(rows):
        raw_step = row.get(step_key) if step_key else None
        step = _step(raw_step) if raw_step not in (None, "") else i
        for k in metrics:
            if row.get(k) not in (None, ""):
                out.setdefault(k, []).append([step, _value(row[k])])
    if not out and rows:
        raise InvalidInputError(f"{source}: no numeric metric columns found")
    return out


def read_training_log(path: str | os.PathLike[str]) -> dict[str, list[list[Any]]]:
    """Metric series from a training log: CSV with a header, JSON or JSON lines.

    A ``step`` (or ``global_step``, ``iteration``, ``iter``, ``epoch``) column gives the step,
    else the row number; every other numeric column is a series. JSON may also be an object of
    series (``{"loss": [0.9, 0.5]}`` or ``{"loss": [[step, value], ...]}``).
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"training log {p} does not exist")
    text = p.read_text(errors="replace")
    try:
        if p.suffix == ".csv":
            return _from_rows(csv.DictReader(io.StringIO(text)), str(p))
        if p.suffix == ".jsonl":
            return _from_rows([json.loads(line) for line in text.splitlines() if line.strip()], str(p))
        if p.suffix == ".json":
            return normalize_metrics(json.loads(text), str(p))
    except (json.JSONDecodeError, csv.Error, AttributeError) as exc:
        raise InvalidInputError(f"training log {p} cannot be read: {exc}") from None
    raise InvalidInputError(f"training log {p}: unknown type {p.suffix!r}; give .csv, .json or .jsonl")


def normalize_metrics(metrics: Any, source: str = "metrics") -> dict[str, list[list[Any]]]:
    """Metric series as ``{name: [[step, value], ...]}`` (values NaN/Inf -> None).

    Accepts a path (see :func:`read_training_log`), a list of per-step records, or a mapping of
    name to a number, a list of numbers, a list of ``[step, value]`` pairs or ``{step: value}``.
    """
    if metrics is None:
        return {}
    if isinstance(metrics, (str, os.PathLike)):
        return read_training_log(metrics)
    if isinstance(metrics, list):
        if not all(isinstance(r, Mapping) for r in metrics):
            raise InvalidInputError(f"{source}: a list of metrics must hold one object per step")
        return _from_rows(metrics, source)
    if not isinstance(metrics, Mapping):
        raise InvalidInputError(f"{source}: metrics must be a mapping of name -> series, a list of records or a path")
    out: dict[str, list[list[Any]]] = {}
    for name, series in metrics.items():
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"{source}: metric name {name!r} must be a non-empty string")
        if isinstance(series, Mapping):
            pts = [[_step(k), _value(v)] for k, v in series.items()]
        elif isinstance(series, (list, tuple)):
            pts = [[_step(x[0]), _value(x[1])] if isinstance(x, (list, tuple)) and len(x) == 2 else [i, _value(x)]
                   for i, x in enumerate(series)]
        else:
            pts = [[0, _value(series)]]
        out[name] = pts
    return out


def _merge_metrics(into: dict[str, list[list[Any]]], more: Mapping[str, list[list[Any]]]) -> None:
    for name, pts in more.items():
        into.setdefault(name, []).extend(pts)


def _upto(metrics: Mapping[str, list[list[Any]]], step: int | None, after: int | None) -> dict[str, Any]:
    """The points of each series in (after, step]; all of them when step is unknown."""
    if step is None:
        return {k: list(v) for k, v in metrics.items()}
    out = {k: [p for p in v if p[0] <= step and (after is None or p[0] > after)] for k, v in metrics.items()}
    return {k: v for k, v in out.items() if v}


def _value_at(series: Sequence[Sequence[Any]], step: int | None) -> float | None:
    pts = [p for p in series if p[1] is not None and (step is None or p[0] <= step)]
    return max(pts, key=lambda p: p[0])[1] if pts else None


# -- the version object ---------------------------------------------------------------------------
class Version:
    """One committed model version (a read-only view of its record)."""

    def __init__(self, record: Record):
        self.record = record

    def __repr__(self) -> str:
        return f"Version(id={self.id}, name={self.name!r}, parents={self.parents}, snapshots={len(self.snapshots)})"

    id = property(lambda self: int(self.record["id"]))
    name = property(lambda self: str(self.record["name"]))
    parents = property(lambda self: [int(p) for p in self.record["parents"]])
    created = property(lambda self: str(self.record["created"]))
    author = property(lambda self: self.record.get("author"))
    message = property(lambda self: self.record.get("message", ""))
    snapshots = property(lambda self: list(self.record["snapshots"]))
    latest = property(lambda self: self.record.get("latest"))
    best = property(lambda self: self.record.get("best"))
    hyperparameters = property(lambda self: dict(self.record.get("hyperparameters") or {}))
    metrics = property(lambda self: dict(self.record.get("metrics") or {}))
    files = property(lambda self: dict(self.record.get("files") or {}))
    rev = property(lambda self: int(self.record.get("rev", 0)))

    @property
    def network(self) -> Network:
        return Network.from_dict(self.record.get("network"))

    def snapshot(self, selector: str | int | None = None) -> dict[str, Any]:
        """A snapshot entry: ``None``/"latest", "best", a 1-based index, or a snapshot id."""
        snaps = self.record["snapshots"]
        if not snaps:
            raise SnapshotNotFoundError(f"version {self.id} has no snapshots")
        sel = "latest" if selector is None else str(selector)
        if sel in ("latest", "best"):
            sid = self.latest if sel == "latest" else self.best
            if sid is None:
                raise SnapshotNotFoundError(f"version {self.id} has no snapshot marked best; pick one with "
                                            f"--snapshot N (1..{len(snaps)}) or mark one with Repository.mark_best")
            sel = sid
        if sel.isdigit() and len(sel) < 6:
            i = int(sel)
            if not 1 <= i <= len(snaps):
                raise SnapshotNotFoundError(f"version {self.id} has snapshots 1..{len(snaps)}, not {i}")
            return snaps[i - 1]
        for s in snaps:
            if s["id"] == sel:
                return s
        raise SnapshotNotFoundError(f"version {self.id} has no snapshot {sel!r}; it has "
                                    f"{', '.join(s['id'] for s in snaps[:5])}{'...' if len(snaps) > 5 else ''}")

    def to_dict(self) -> Record:
        return json.loads(json.dumps(self.record))


# -- the repository -----------------------------------------------------------------------------
def create_repository(location: str | os.PathLike[str]) -> Repository:
    """Create a new archive with versions at ``location``; ArchiveExistsError if one is there."""
    p = Path(os.fspath(location)).expanduser()
    if (p / "zarr.json").exists():
        raise ArchiveExistsError(f"{location} is already an archive; nothing changed")
    repo = Repository(create_archive(location))
    for d in ("versions", "refs/tags", "files"):
        (repo.root / d).mkdir(parents=True, exist_ok=True)
    return repo


def open_repository(location: str | os.PathLike[str]) -> Repository:
    """Open the archive at ``location`` for versions (it may hold plain snapshots too)."""
    return Repository(open_archive(location))


class Repository:
    """Versions, lineage, tags and files of one local archive, with its SQLite catalog.

    Use :func:`create_repository` / :func:`open_repository`; close it (or use ``with``).
    """

    def __init__(self, archive: Archive, *, own_archive: bool = True):
        root = archive.store.local_root
        if root is None:
            raise InvalidInputError(f"{archive.location}: versions need a local archive directory; remote stores "
                                    "hold snapshots only (use Archive directly)")
        self.archive = archive
        self.root = Path(root)
        self._own = own_archive
        self._catalog: Catalog | None = None

    @property
    def location(self) -> str:
        return self.archive.location

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None
        if self._own:
            self.archive.close()

    # -- low-level record I/O (local, atomic) ------------------------------------------------
    def _create(self, rel: str, data: bytes) -> bool:
        """Publish ``data`` at ``rel`` unless something is there already (atomic). True if written."""
        return publish_file(self.root / rel, data)

    def _replace(self, rel: str, data: bytes) -> None:
        publish_file(self.root / rel, data, replace=True)

    @contextmanager
    def _locked(self, vid: int) -> Iterator[None]:
        """Exclusive right to rewrite version ``vid``'s record; the kernel drops it if we die."""
        d = self.root / "versions" / ".locks"
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / f"{vid}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def fingerprints(self) -> dict[str, tuple[int, int, int]]:
        """(inode, mtime_ns, size) of every version and tag record: what the catalog compares."""
        out = {}
        for sub, prefix in (("versions", "v/"), ("refs/tags", "t/")):
            try:
                entries = list(os.scandir(self.root / sub))
            except FileNotFoundError:
                continue
            for e in entries:
                if e.name.startswith("."):
                    continue
                m = _VERSION_FILE.match(e.name) if prefix == "v/" else None
                if prefix == "v/" and not m:
                    continue
                if prefix == "t/" and not e.name.endswith(".json"):
                    continue
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                key = prefix + (m.group(1) if m else e.name[:-5])
                out[key] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return out

    def read_record(self, key: str) -> tuple[Record, tuple[int, int, int]] | None:
        """The record behind a catalog key (``v/<id>``, ``t/<tag>``) and its fingerprint, or None."""
        rel = f"versions/{key[2:]}.json" if key.startswith("v/") else f"refs/tags/{key[2:]}.json"
        try:
            with open(self.root / rel, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(data)
        except json.JSONDecodeError as exc:
            raise IntegrityError(f"{rel} in {self.location} is damaged ({exc}); restore it from a copy") from None
        return rec, (st.st_ino, st.st_mtime_ns, st.st_size)

    def _version_ids(self) -> list[int]:
        return sorted(int(k[2:]) for k in self.fingerprints() if k.startswith("v/"))

    # -- catalog -----------------------------------------------------------------------------
    def catalog(self) -> Catalog:
        """The SQLite catalog, brought up to date with the records (rebuilt if missing or damaged)."""
        if self._catalog is None:
            self._catalog = open_catalog(self.root, self)
        else:
            self._catalog.sync()
        return self._catalog

    def reindex(self) -> dict[str, int]:
        """Rebuild the catalog from the archive alone; returns the row count of each table."""
        return self.catalog().rebuild()

    def _after_publish(self) -> None:
        try:
            self.catalog()
        except (CatalogError, OSError, sqlite3.Error) as exc:  # the record is the truth; the next reader catches up
            warnings.warn(f"version published, but the catalog was not updated ({exc}); it will be on next use",
                          stacklevel=3)

    # -- reading versions --------------------------------------------------------------------
    def _record(self, vid: int) -> Record:
        got = self.read_record(f"v/{vid}")
        if got is None:
            raise VersionNotFoundError(f"no version {vid} in archive {self.location}; list them with `gpupas log`")
        return got[0]

    def resolve(self, ref: str | int | Version) -> int:
        """The id a reference names: a Version, an id, a tag, or a name (its newest version)."""
        if isinstance(ref, Version):
            return ref.id
        if isinstance(ref, (int, np.integer)) or (isinstance(ref, str) and ref.isdigit()):
            vid = int(ref)
            if vid < 1 or not (self.root / "versions" / f"{vid}.json").is_file():
                raise VersionNotFoundError(f"no version {vid} in archive {self.location}; list them with `gpupas log`")
            return vid
        if not isinstance(ref, str):
            raise InvalidInputError(f"a version reference is an id, a tag or a name, not a {type(ref).__name__}")
        check_name(ref, "version reference")
        tag = self.read_record(f"t/{ref}")
        if tag is not None:
            return int(tag[0]["version"])
        try:
            rows = self.catalog().query("SELECT max(id) AS id FROM versions WHERE name=?", (ref,))
            found = rows[0]["id"] if rows else None
        except (CatalogError, sqlite3.Error):  # no usable catalog (read-only place?): read the records
            found = max((v.id for v in self.versions() if v.name == ref), default=None)
        if found is not None:
            return int(found)
        raise VersionNotFoundError(f"no version, tag or name {ref!r} in archive {self.location}; "
                                   "list them with `gpupas log`")

    def version(self, ref: str | int | Version) -> Version:
        """The version a reference names (see :meth:`resolve`)."""
        return Version(self._record(self.resolve(ref)))

    def versions(self) -> list[Version]:
        """Every version, by id."""
        out = []
        for vid in self._version_ids():
            got = self.read_record(f"v/{vid}")
            if got is not None:
                out.append(Version(got[0]))
        return out

    def tags(self) -> dict[str, int]:
        """Tag name -> version id."""
        return {r["tag"]: r["version"] for r in self.catalog().query("SELECT tag, version FROM tags ORDER BY tag")}

    # -- writing versions --------------------------------------------------------------------
    def _sources(self, checkpoints: Any) -> list[tuple[Any, str | None, int | None]]:
        """(tensors or path, source name, step) per snapshot to commit."""
        if checkpoints is None:
            return []
        if isinstance(checkpoints, (str, os.PathLike)):
            return [(p, p.name, step_of(p)) for p in checkpoint_files(checkpoints)]
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
        if isinstance(files, Mapping):
            items = [(check_file_name(k), v) for k, v in files.items()]
        else:
            for f in files:
                p = Path(f)
                if p.is_dir():
                    items += [(check_file_name(f"{p.name}/{q.relative_to(p).as_posix()}"), q)
                              for q in sorted(p.rglob("*")) if q.is_file()]
                elif p.is_file():
                    items.append((check_file_name(p.name), p))
                else:
                    raise InvalidInputError(f"file {p} does not exist")
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
        return {name: {"sha256": h, "size": n} for name, h, n in ((nm, self._put_blob(d), len(d)) for nm, d in blobs)}

    def _put_blob(self, data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        if not (self.root / "files" / h).exists():
            self._create(f"files/{h}", data)  # False: another process stored the same bytes first
        return h

    def file_bytes(self, sha256: str) -> bytes:
        """A stored file's bytes, checked against their hash."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
            raise InvalidInputError(f"{sha256!r} is not a sha256 hex digest")
        try:
            data = (self.root / "files" / sha256).read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"file blob {sha256} is missing from {self.location}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"file blob {sha256} in {self.location} is damaged (hash mismatch)")
        return data

    def _discard(self, sids: Iterable[str]) -> None:
        """Remove snapshots this process wrote for a version that was never published."""
        for sid in sids:
            self.archive.discard(sid)

    def _commit_snapshots(self, sources: Sequence[tuple[Any, str | None, int | None]], base: str | None,
                          name: str, setting: str, progress: Progress | None,
                          written: list[str]) -> tuple[list[dict[str, Any]], Any]:
        entries, first = [], None
        for i, (src, label, step) in enumerate(sources):
            if progress:
                progress(f"{name}: {label or 'tensors'}", i, len(sources))
            tensors = load_checkpoint(src) if isinstance(src, (str, os.PathLike)) else src
            if first is None:
                first = tensors
            m = self.archive.commit(tensors, base=base, setting=setting,
                                    meta={"version_name": name, "source": label, "step": step})
            written.append(m.id)
            entries.append({"id": m.id, "created": m.created, "step": step, "source": label,
                            "base": m.base, "raw_bytes": m.raw_bytes, "stored_bytes": m.stored_bytes,
                            "tensors": len(m.tensors)})
            base = m.id
        if progress:
            progress(f"{name}: done", len(sources), len(sources))
        return entries, first

    def commit(self, name: str, checkpoints: Any = None, *, parents: Iterable[str | int | Version] = (),
               message: str = "", author: str | None = None, hyperparameters: Mapping[str, Any] | None = None,
               metrics: Any = None, files: Any = None, network: Any = None, setting: str = "default",
               best: str | int | None = None, best_by: str | None = None, step: int | None = None,
               progress: Progress | None = None) -> Version:
        """Commit a new version of ``name`` and return it.

        Parameters
        ----------
        checkpoints
            A checkpoint file (safetensors or torch, read without executing code), a directory
            of them (time-ordered snapshots in natural name order), a mapping of tensor names to
            arrays, or a list of those. Each snapshot is delta-encoded against the previous one,
            the first against the first parent's latest snapshot.
        parents
            Versions this one derives from (ids, tags, names).
        hyperparameters, metrics, files
            Any JSON object; metric series (see :func:`normalize_metrics`; a path reads a
            training log); files as paths, directories or ``{name: path or bytes}``.
        network
            A torch module, a network dict, or None: then it is read off the first
            checkpoint's tensor names and shapes.
        best, best_by
            Mark a snapshot best: a 1-based index or snapshot id, or the one with the best value
            of a metric (``"accuracy"``: highest; ``"loss:min"``: lowest).
        step
            The training step of an in-memory checkpoint (files take it from their name).

        Nothing is visible until the version record is published; on any error the snapshots
        written so far are removed again.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> repo = create_repository(tempfile.mkdtemp() + "/a")
        >>> repo.commit("net", {"w": np.zeros(3, np.float32)}, metrics={"loss": [0.9, 0.5]}).metrics["loss"]
        [[0, 0.9], [1, 0.5]]
        """
        check_version_name(name)
        parent_ids = list(dict.fromkeys(self.resolve(p) for p in parents))
        hp = _to_json(dict(hyperparameters or {}), "hyperparameters")
        series = normalize_metrics(metrics)
        sources = self._sources(checkpoints)
        if step is not None:
            sources = [(src, label, step if st is None else st) for src, label, st in sources]
        base = None
        if parent_ids:
            pv = Version(self._record(parent_ids[0]))
            base = pv.latest
        net_given = network is not None
        net = extract_network(network) if net_given else None
        written: list[str] = []
        try:
            entries, first = self._commit_snapshots(sources, base, name, setting, progress, written)
            if net is None:
                net = extract_network(first) if first is not None else Network(source="none")
            file_refs = self._store_files(files)
            record: Record = {
                "format": RECORD_FORMAT, "id": 0, "name": name, "parents": parent_ids, "created": _now(),
                "author": author if author is not None else _default_author(), "message": message, "rev": 0,
                "snapshots": entries, "latest": entries[-1]["id"] if entries else None, "best": None,
                "network": net.to_dict(), "hyperparameters": hp, "metrics": series, "files": file_refs,
            }
            record["best"] = _pick_best(entries, series, best, best_by)
            vid = self._publish_version(record)
        except BaseException:
            self._discard(written)
            raise
        self._after_publish()
        return Version(self._record(vid))

    def _publish_version(self, record: Record) -> int:
        """Give ``record`` the next free id and publish it; distinct ids across processes."""
        while True:
            ids = self._version_ids()
            record["id"] = (ids[-1] if ids else 0) + 1
            if self._create(f"versions/{record['id']}.json", _dumps(record)):
                return int(record["id"])

    def _update(self, ref: str | int | Version, change: Callable[[Record], None],
                on_failure: Callable[[], None] | None = None) -> Version:
        """Apply ``change`` to a version's record and publish it; ``on_failure`` runs only if the
        record was not replaced (after that, the record references what the change added)."""
        vid = self.resolve(ref)
        try:
            with self._locked(vid):
                rec = self._record(vid)
                change(rec)
                rec["rev"] = int(rec.get("rev", 0)) + 1
                rec["updated"] = _now()
                self._replace(f"versions/{vid}.json", _dumps(rec))
        except BaseException:
            if on_failure is not None:
                on_failure()
            raise
        self._after_publish()
        return Version(rec)

    def add_snapshot(self, ref: str | int | Version, tensors: Any, *, step: int | None = None,
                     metrics: Any = None, best: bool = False, source: str | None = None,
                     setting: str = "default") -> Version:
        """Append a snapshot to an existing version, delta-encoded against its latest one.

        One writer per version (the training loop that owns it); records are replaced atomically,
        so readers see the version before or after, never in between.
        """
        vid = self.resolve(ref)
        series = normalize_metrics(metrics)
        latest = Version(self._record(vid)).latest
        if isinstance(tensors, (str, os.PathLike)):
            (path,) = checkpoint_files(tensors)
            source, step = source or path.name, step if step is not None else step_of(path)
            tensors = load_checkpoint(path)
        m = self.archive.commit(tensors, base=latest, setting=setting,
                                meta={"version_id": vid, "source": source, "step": step})
        entry = {"id": m.id, "created": m.created, "step": step, "source": source, "base": m.base,
                 "raw_bytes": m.raw_bytes, "stored_bytes": m.stored_bytes, "tensors": len(m.tensors)}

        def change(rec: Record) -> None:
            rec["snapshots"].append(entry)
            rec["latest"] = entry["id"]
            if best:
                rec["best"] = entry["id"]
            _merge_metrics(rec.setdefault("metrics", {}), series)
            if rec.get("network", {}).get("source") in (None, "none"):
                rec["network"] = extract_network(tensors).to_dict()

        return self._update(vid, change, on_failure=lambda: self._discard([m.id]))

    def log_metrics(self, ref: str | int | Version, metrics: Any) -> Version:
        """Append metric points (see :func:`normalize_metrics`) to a version."""
        series = normalize_metrics(metrics)
        return self._update(ref, lambda rec: _merge_metrics(rec.setdefault("metrics", {}), series))

    def mark_best(self, ref: str | int | Version, snapshot: str | int) -> Version:
        """Mark one of a version's snapshots (1-based index or id) as its best."""
        sid = self.version(ref).snapshot(snapshot)["id"]
        return self._update(ref, lambda rec: rec.__setitem__("best", sid))

    def copy(self, ref: str | int | Version, name: str, *, message: str = "", author: str | None = None) -> Version:
        """Scaffold a new version from ``ref``: same network, hyperparameters, files and latest weights.

        The weights are shared (no bytes copied); the new version's parent is ``ref``. Train
        it further with :meth:`add_snapshot` or the training hook.
        """
        check_version_name(name)
        src = self.version(ref)
        snaps = [src.snapshot()] if src.snapshots else []
        record: Record = {
            "format": RECORD_FORMAT, "id": 0, "name": name, "parents": [src.id], "created": _now(),
            "author": author if author is not None else _default_author(),
            "message": message or f"copy of version {src.id} ({src.name})", "rev": 0,
            "snapshots": snaps, "latest": snaps[-1]["id"] if snaps else None, "best": None,
            "network": src.record.get("network"), "hyperparameters": src.hyperparameters, "metrics": {},
            "files": src.files,
        }
        vid = self._publish_version(record)
        self._after_publish()
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
        check_version_name(name)
        paths = checkpoint_files(folder)
        if len(paths) == 1 and Path(folder).is_file():
            raise InvalidInputError(f"{folder} is a file; import takes a directory (commit takes files)")
        parent_ids = [self.resolve(parent)] if parent is not None else []
        hp = _to_json(dict(hyperparameters or {}), "hyperparameters")
        series = normalize_metrics(metrics)
        base = Version(self._record(parent_ids[0])).latest if parent_ids else None
        written: list[str] = []
        records: list[Record] = []
        try:  # 1: every snapshot; nothing is visible yet
            for i, p in enumerate(paths):
                entries, tensors = self._commit_snapshots([(p, p.name, step_of(p))], base, name, setting, None,
                                                          written)
                if progress:
                    progress(f"{name}: {p.name}", i + 1, len(paths))
                base = entries[0]["id"]
                step, prev = step_of(p), (records[-1]["snapshots"][0]["step"] if records else None)
                records.append({
                    "format": RECORD_FORMAT, "id": 0, "name": name, "parents": [], "created": "",
                    "author": author if author is not None else _default_author(),
                    "message": f"{message}: {p.name}" if message else f"imported {p.name}", "rev": 0,
                    "snapshots": entries,
                    "latest": base, "best": None, "network": extract_network(tensors).to_dict(),
                    "hyperparameters": hp, "metrics": _upto(series, step, prev), "files": {},
                })
            file_refs = self._store_files(files)
        except BaseException:
            self._discard(written)
            raise
        out: list[int] = []
        try:  # 2: publish the chain, parents first
            for rec in records:
                rec["parents"], rec["created"], rec["files"] = parent_ids, _now(), file_refs
                parent_ids = [self._publish_version(rec)]
                out.append(parent_ids[0])
        except BaseException:
            self._discard(s["id"] for rec in records[len(out):] for s in rec["snapshots"])
            raise
        self._after_publish()
        return [Version(self._record(v)) for v in out]

    # -- tags --------------------------------------------------------------------------------
    def tag(self, tag: str, ref: str | int | Version, *, force: bool = False) -> int:
        """Point ``tag`` at a version; ArchiveExistsError if it points elsewhere (unless ``force``)."""
        check_version_name(tag, "tag")
        vid = self.resolve(ref)
        data = _dumps({"tag": tag, "version": vid, "created": _now()})
        if not self._create(f"refs/tags/{tag}.json", data):
            old = self.read_record(f"t/{tag}")
            if old is not None and old[0]["version"] == vid:
                return vid
            if not force:
                raise ArchiveExistsError(f"tag {tag!r} already points at version {old[0]['version'] if old else '?'};"
                                         " use --force to move it")
            self._replace(f"refs/tags/{tag}.json", data)
        self._after_publish()
        return vid

    def untag(self, tag: str) -> int:
        """Delete a tag; returns the version it pointed at."""
        check_version_name(tag, "tag")
        got = self.read_record(f"t/{tag}")
        if got is None:
            raise VersionNotFoundError(f"no tag {tag!r} in archive {self.location}")
        (self.root / "refs" / "tags" / f"{tag}.json").unlink(missing_ok=True)
        self._after_publish()
        return int(got[0]["version"])

    # -- weights out -------------------------------------------------------------------------
    def restore(self, ref: str | int | Version, snapshot: str | int | None = None, *,
                names: Iterable[str] | None = None, framework: str = "numpy") -> dict[str, Any]:
        """The tensors of a version's snapshot (latest by default), bit-exact."""
        sid = self.version(ref).snapshot(snapshot)["id"]
        return self.archive.restore(sid, names, framework=framework)

    def export(self, ref: str | int | Version, path: str | os.PathLike[str], *, snapshot: str | int | None = None,
               format: str | None = None, force: bool = False) -> Path:
        """Write a version's weights to one safetensors or torch file (format from the suffix)."""
        p = Path(path)
        fmt = format or ("torch" if p.suffix in TORCH_SUFFIXES else "safetensors")
        if fmt not in ("safetensors", "torch"):
            raise InvalidInputError(f"format must be 'safetensors' or 'torch', not {fmt!r}")
        if p.exists() and not force:
            raise ArchiveExistsError(f"{p} exists; nothing written (use --force to overwrite)")
        tensors = self.restore(ref, snapshot)
        p.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "safetensors":
            from gpupas.integrations.safetensors import save_file

            save_file(tensors, p, metadata={"gpupas_version": str(self.resolve(ref))})
        else:
            from gpupas.integrations.torch import _torch, numpy_to_state_dict

            torch = _torch()
            tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
            torch.save(numpy_to_state_dict(tensors), tmp)
            os.replace(tmp, p)
        return p

    def checkout(self, ref: str | int | Version, out_dir: str | os.PathLike[str], *,
                 snapshot: str | int | None = None, format: str = "safetensors", force: bool = False) -> list[Path]:
        """Write a version to a directory: weights (``model.safetensors`` or ``model.pt``), its files
        under their names, and ``gpupas-version.json`` (metadata and network). Returns the paths."""
        v = self.version(ref)
        snap = v.snapshot(snapshot)
        out = Path(out_dir)
        if out.exists() and any(out.iterdir()) and not force:
            raise ArchiveExistsError(f"{out} is not empty; nothing written (use --force to write into it)")
        targets = {}
        base = out.resolve()
        for fname, ref_ in v.files.items():
            target = (out / check_file_name(fname)).resolve()
            if base not in target.parents:
                raise InvalidInputError(f"file name {fname!r} would leave {out}")
            targets[target] = ref_
        blobs = {t: self.file_bytes(r["sha256"]) for t, r in targets.items()}  # all checked before writing
        out.mkdir(parents=True, exist_ok=True)
        written = [self.export(v, out / ("model.pt" if format == "torch" else "model.safetensors"),
                               snapshot=snap["id"], format=format, force=True)]
        for t, data in blobs.items():
            t.parent.mkdir(parents=True, exist_ok=True)
            t.write_bytes(data)
            written.append(t)
        meta = v.to_dict() | {"checked_out_snapshot": snap["id"]}
        (out / "gpupas-version.json").write_text(json.dumps(meta, indent=1))
        written.append(out / "gpupas-version.json")
        return written

    # -- exploration -------------------------------------------------------------------------
    def describe(self, ref: str | int | Version, snapshot: str | int | None = None) -> dict[str, Any]:
        """Metadata, network, sizes and per-layer storage of a version (``gpupas show``)."""
        v = self.version(ref)
        d = v.to_dict()
        d["tags"] = [t for t, vid in self.tags().items() if vid == v.id]
        d["children"] = [r["version"] for r in self.catalog().query(
            "SELECT version FROM parents WHERE parent=? ORDER BY version", (v.id,))]
        if not v.snapshots:
            d["layers"], d["snapshot"] = [], None
            return d
        snap = v.snapshot(snapshot)
        m = self.archive.manifest(snap["id"])
        types = {n.name: n.type for n in v.network.nodes}
        layers: dict[str, dict[str, Any]] = {}
        for e in m.tensors:
            prefix = e.name.rpartition(".")[0] or e.name
            row = layers.setdefault(prefix, {"layer": prefix, "type": types.get(prefix, ""), "tensors": 0,
                                             "params": 0, "raw_bytes": 0, "stored_bytes": 0, "enc": {}})
            row["tensors"] += 1
            row["params"] += int(np.prod(e.shape, dtype=np.int64))
            row["raw_bytes"] += e.nbytes
            row["stored_bytes"] += e.stored
            row["enc"][e.enc] = row["enc"].get(e.enc, 0) + 1
        for row in layers.values():
            row["ratio"] = row["stored_bytes"] / row["raw_bytes"] if row["raw_bytes"] else 0.0
        d["snapshot"] = {"index": v.snapshots.index(snap) + 1, **snap, "base": m.base,
                         "setting": m.setting, "commit_seconds": m.commit_seconds}
        d["layers"] = list(layers.values())
        d["tensors"] = self.archive.report(snap["id"])
        return d

    def diff(self, a: str | int | Version, b: str | int | Version, *, snapshot_a: str | int | None = None,
             snapshot_b: str | int | None = None, weights: bool = True) -> dict[str, Any]:
        """Two versions side by side: network, hyperparameter, metric and per-tensor weight changes."""
        va, vb = self.version(a), self.version(b)
        ha, hb = flatten(va.hyperparameters), flatten(vb.hyperparameters)
        hp = {k: [ha.get(k), hb.get(k)] for k in sorted(ha.keys() | hb.keys()) if ha.get(k) != hb.get(k)}
        ma, mb = va.metrics, vb.metrics
        metrics = {k: [_value_at(ma.get(k, []), None), _value_at(mb.get(k, []), None)]
                   for k in sorted(ma.keys() | mb.keys())}
        out: dict[str, Any] = {
            "a": {"id": va.id, "name": va.name}, "b": {"id": vb.id, "name": vb.name},
            "network": diff_networks(va.network, vb.network), "hyperparameters": hp, "metrics": metrics,
            "files": {k: [va.files.get(k, {}).get("sha256"), vb.files.get(k, {}).get("sha256")]
                      for k in sorted(va.files.keys() | vb.files.keys())
                      if va.files.get(k, {}).get("sha256") != vb.files.get(k, {}).get("sha256")},
        }
        if weights and va.snapshots and vb.snapshots:
            sa, sb = va.snapshot(snapshot_a)["id"], vb.snapshot(snapshot_b)["id"]
            out["snapshots"] = [sa, sb]
            out["weights"] = diff_tensors(self.archive.restore(sa), self.archive.restore(sb))
        return out

    def query(self, dql: str) -> list[dict[str, Any]]:
        """Versions selected by a DQL ``select`` statement (see :mod:`gpupas.query`), from the catalog."""
        from gpupas.query import run_query

        return run_query(self.catalog(), dql)

    def lineage(self) -> list[dict[str, Any]]:
        """Every version's summary (id, name, parents, tags, snapshots, sizes), from the catalog, by id."""
        cat = self.catalog()
        parents: dict[int, list[int]] = {}
        for r in cat.query("SELECT version, parent FROM parents ORDER BY version, pos"):
            parents.setdefault(r["version"], []).append(r["parent"])
        tags: dict[int, list[str]] = {}
        for r in cat.query("SELECT tag, version FROM tags ORDER BY tag"):
            tags.setdefault(r["version"], []).append(r["tag"])
        return [dict(r) | {"parents": parents.get(r["id"], []), "tags": tags.get(r["id"], [])}
                for r in cat.query("SELECT id, name, created, author, message, n_snapshots, raw_bytes, stored_bytes,"
                                   " latest, best FROM versions ORDER BY id")]

    def verify(self, refs: Iterable[str | int] | None = None, progress: Progress | None = None) -> dict[str, Any]:
        """Re-read and check every chunk, tensor and file of the versions (all of the archive by default).

        Returns ``{"ok", "checked": {...}, "problems": [...]}``; never raises on damage found.
        """
        problems: list[str] = []
        if refs is None:
            records = []
            for vid in self._version_ids():
                try:
                    records.append(self._record(vid))
                except IntegrityError as exc:
                    problems.append(str(exc))
            try:
                sids = sorted(self.archive.store.list_snapshots())
            except OSError:
                sids = []
            tags = self.fingerprints()
            for key in (k for k in tags if k.startswith("t/")):
                try:
                    got = self.read_record(key)
                    if got is not None and not (self.root / "versions" / f"{int(got[0]['version'])}.json").is_file():
                        problems.append(f"tag {key[2:]!r} points at missing version {got[0]['version']}")
                except (IntegrityError, KeyError, TypeError, ValueError) as exc:
                    problems.append(f"tag {key[2:]!r} is damaged: {exc}")
        else:
            records = [self._record(self.resolve(r)) for r in refs]
            sids = []
        ids = set(self._version_ids())
        blobs: dict[str, str] = {}
        malformed = [r for r in records if not _well_formed(r)]
        problems += [f"version record {r.get('id', '?')} is malformed (missing or bad id, name, parents, created "
                     "or snapshots); restore it from a copy" for r in malformed]
        records = [r for r in records if _well_formed(r)]
        for rec in records:
            for p in rec.get("parents", []):
                if p not in ids:
                    problems.append(f"version {rec['id']}: parent {p} is missing")
            sids += [s["id"] for s in rec.get("snapshots", [])]
            for fname, f in (rec.get("files") or {}).items():
                blobs.setdefault(f["sha256"], f"version {rec['id']} file {fname!r}")
        sids = list(dict.fromkeys(sids))
        tensors = 0
        for i, sid in enumerate(sids):
            if progress:
                progress(f"snapshot {sid}", i, len(sids))
            try:
                tensors += self.archive.verify(sid)
            except SnapshotNotFoundError:
                if refs is not None or self.archive.store.has_manifest(sid):
                    problems.append(f"snapshot {sid} is missing")
            except (IntegrityError, KeyError, ValueError, OSError) as exc:
                problems.append(f"snapshot {sid}: {exc}")
        if progress:
            progress("files", len(sids), len(sids))
        for h, where in blobs.items():
            try:
                self.file_bytes(h)
            except GpupasError as exc:
                problems.append(f"{where}: {exc}")
        return {"ok": not problems, "problems": problems,
                "checked": {"versions": len(records), "snapshots": len(sids), "tensors": tensors,
                            "files": len(blobs)}}

    def stats(self) -> dict[str, Any]:
        """What the archive stores, how (encodings, dtypes), and what that saves (``gpupas stats``)."""
        cat = self.catalog()
        q = cat.query
        referenced = {r["snapshot"] for r in q("SELECT DISTINCT snapshot FROM snapshots")}
        uniq = "(SELECT DISTINCT snapshot FROM snapshots)"
        tot = q(f"SELECT count(*) AS n, coalesce(sum(nbytes),0) AS raw, coalesce(sum(stored),0) AS stored "
                f"FROM tensors WHERE snapshot IN {uniq}")[0]
        by_enc = [dict(r) for r in q(f"SELECT enc, count(*) AS tensors, sum(nbytes) AS raw_bytes, sum(stored) AS "
                                     f"stored_bytes FROM tensors WHERE snapshot IN {uniq} GROUP BY enc ORDER BY enc")]
        by_dtype = [dict(r) for r in q(f"SELECT dtype, count(*) AS tensors, sum(nbytes) AS raw_bytes, sum(stored) AS "
                                       f"stored_bytes FROM tensors WHERE snapshot IN {uniq} GROUP BY dtype "
                                       "ORDER BY dtype")]
        files = q("SELECT count(*) AS refs, coalesce(sum(size),0) AS logical FROM files")[0]
        blob_sizes = {r["sha256"]: r["size"] for r in q("SELECT DISTINCT sha256, size FROM files")}
        all_sids = set(self.archive.store.list_snapshots())
        orphans = sorted(all_sids - referenced)
        disk = sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())
        raw, stored = int(tot["raw"]), int(tot["stored"])
        for row in by_enc + by_dtype:
            row["ratio"] = row["stored_bytes"] / row["raw_bytes"] if row["raw_bytes"] else 0.0
        return {
            "location": self.location,
            "versions": q("SELECT count(*) AS n FROM versions")[0]["n"],
            "names": q("SELECT count(DISTINCT name) AS n FROM versions")[0]["n"],
            "tags": q("SELECT count(*) AS n FROM tags")[0]["n"],
            "snapshots": len(referenced), "tensors": tot["n"], "raw_bytes": raw, "stored_bytes": stored,
            "ratio": stored / raw if raw else 0.0, "saved_bytes": raw - stored,
            "by_encoding": by_enc, "by_dtype": by_dtype,
            "files": {"references": files["refs"], "logical_bytes": files["logical"], "blobs": len(blob_sizes),
                      "stored_bytes": sum(blob_sizes.values()),
                      "saved_bytes": files["logical"] - sum(blob_sizes.values())},
            "unreferenced_snapshots": orphans, "incomplete_snapshots": self.archive.store.orphan_folders(),
            "disk_bytes": disk,
            "per_version": [dict(r) for r in q("SELECT id, name, n_snapshots, raw_bytes, stored_bytes FROM versions "
                                               "ORDER BY id")],
        }


def _well_formed(r: Any) -> bool:
    try:
        return (isinstance(r, dict) and int(r["id"]) > 0 and isinstance(r["name"], str)
                and isinstance(r["created"], str) and all(isinstance(p, int) for p in r["parents"])
                and all(isinstance(s["id"], str) for s in r["snapshots"]))
    except (KeyError, TypeError, ValueError):
        return False


def _pick_best(entries: list[dict[str, Any]], series: Mapping[str, Any], best: str | int | None,
               best_by: str | None) -> str | None:
    if best is not None:
        return Version({"id": 0, "snapshots": entries, "latest": entries[-1]["id"] if entries else None}
                       ).snapshot(best)["id"]
    if not best_by or not entries:
        return None
    metric, _, mode = best_by.partition(":")
    if metric not in series:
        raise InvalidInputError(f"best_by: no metric {metric!r}; the metrics are {', '.join(series) or 'none'}")
    mode = mode or ("min" if re.search(r"loss|err|perplex", metric) else "max")
    if mode not in ("min", "max"):
        raise InvalidInputError(f"best_by mode must be 'min' or 'max', not {mode!r}")
    scored = [(v, i) for i, e in enumerate(entries) if (v := _value_at(series[metric], e.get("step"))) is not None]
    if not scored:
        return None
    sign = 1 if mode == "min" else -1
    return entries[min(scored, key=lambda t: (sign * t[0], t[1]))[1]]["id"]


def diff_tensors(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Per-tensor change statistics from ``a`` to ``b`` (same name and shape), plus totals.

    Rows: ``name, shape, changed`` (fraction of elements whose bits differ), and for float
    tensors ``max_abs``, ``mean_abs`` and ``rel_l2 = ||b - a|| / ||a||``.
    """
    rows, d2, n2 = [], 0.0, 0.0
    for name in [k for k in b if k in a]:
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            rows.append({"name": name, "shape": [list(x.shape), list(y.shape)], "dtype": [str(x.dtype), str(y.dtype)]})
            continue
        row: dict[str, Any] = {"name": name, "shape": list(x.shape), "dtype": str(x.dtype)}
        xb = x.reshape(-1).view(np.uint8).reshape(x.size, -1) if x.size else np.zeros((0, 1), np.uint8)
        yb = y.reshape(-1).view(np.uint8).reshape(y.size, -1) if y.size else np.zeros((0, 1), np.uint8)
        row["changed"] = float(np.any(xb != yb, axis=1).mean()) if x.size else 0.0
        if x.dtype.kind == "f" or x.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            xf, yf = x.astype(np.float64).reshape(-1), y.astype(np.float64).reshape(-1)
            with np.errstate(all="ignore"):
                d = yf - xf
                ok = np.isfinite(d)
                dd, nn = float(np.sum(d[ok] ** 2)), float(np.sum(xf[ok] ** 2))
                row["max_abs"] = float(np.max(np.abs(d[ok]))) if ok.any() else None
                row["mean_abs"] = float(np.mean(np.abs(d[ok]))) if ok.any() else None
                row["rel_l2"] = math.sqrt(dd / nn) if nn else (0.0 if dd == 0 else None)
            d2, n2 = d2 + dd, n2 + nn
        rows.append(row)
    return {
        "tensors": rows,
        "added": [k for k in b if k not in a], "removed": [k for k in a if k not in b],
        "identical": sum(1 for r in rows if r.get("changed") == 0.0),
        "rel_l2": math.sqrt(d2 / n2) if n2 else 0.0,
    }
