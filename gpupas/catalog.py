"""The catalog: a SQLite index of versions, lineage, hyperparameters, metrics, layers and tensors.

The archive's records and manifests are the truth; the catalog (``catalog.sqlite`` at the root of
a local archive, or in the user's cache folder for a remote or read-only one) is a cache that any
reader brings up to date. Every version record, tag and manifest has a fingerprint in the
``records`` table: :meth:`Catalog.sync` re-indexes exactly those whose fingerprint changed (a
revised manifest included), :meth:`Catalog.rebuild` (``gpupas reindex``) builds a fresh database
from scratch. A missing, damaged or outdated (schema) catalog is rebuilt on open; the catalog is
never opened through a symbolic link.

Several processes share it safely: WAL journal (readers never block and never see a partial
transaction), a busy timeout for writers, every change in one ``BEGIN IMMEDIATE`` transaction. The
threads of one process share a :class:`Catalog` (an asynchronous checkpoint hook appends from a thread
of its own while the loop queries): its one connection serves one of them at a time.
A writer killed mid-transaction leaves nothing: SQLite rolls the transaction back. A rebuild killed before
its new database is in place leaves that (``.catalog.sqlite.<pid>.<hex>.tmp``, with a ``.lock`` file) beside
the catalog; the next rebuild removes it, never one that a running rebuild still holds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from gpupas.errors import CatalogError, FormatError, GpupasError, IntegrityError, InvalidInputError
from gpupas.network import Network
from gpupas.pas.schemes import describe

SCHEMA_VERSION = 5  # 4: hyperparameters typed; a metric's last value at its highest step (NaN too), count all;
#  5: no table of every metric point (no query read it; re-indexing it made a long run's appends slow)
FILENAME = "catalog.sqlite"
STORED_NOW = ("coalesce((SELECT sum(t.stored) FROM tensors t WHERE t.snapshot IN (SELECT snapshot FROM snapshots "
              "WHERE version={v}.id)), {v}.stored_bytes)")  # a version's stored bytes as its manifests say now (a
#  revision, compaction or tier move changes them; the version record keeps those of the commit)
BUSY_TIMEOUT_S = 60.0

SCHEMA = """
CREATE TABLE records(key TEXT PRIMARY KEY, ino INTEGER, mtime_ns INTEGER, size INTEGER);
CREATE TABLE versions(id INTEGER PRIMARY KEY, name TEXT NOT NULL, created TEXT NOT NULL, author TEXT,
    message TEXT, latest TEXT, best TEXT, n_snapshots INTEGER, raw_bytes INTEGER, stored_bytes INTEGER,
    network_source TEXT, n_layers INTEGER, rev INTEGER);
CREATE TABLE parents(version INTEGER, pos INTEGER, parent INTEGER, PRIMARY KEY(version, pos));
CREATE TABLE snapshots(version INTEGER, pos INTEGER, snapshot TEXT, created TEXT, step INTEGER, base TEXT,
    raw_bytes INTEGER, stored_bytes INTEGER, source TEXT, PRIMARY KEY(version, pos));
CREATE TABLE tensors(snapshot TEXT, name TEXT, dtype TEXT, shape TEXT, enc TEXT, nbytes INTEGER,
    stored INTEGER, lossy TEXT, PRIMARY KEY(snapshot, name));
CREATE TABLE hparams(version INTEGER, key TEXT, num REAL, text TEXT, type TEXT, PRIMARY KEY(version, key));
CREATE TABLE metric_summary(version INTEGER, name TEXT, last REAL, min REAL, max REAL, n INTEGER,
    PRIMARY KEY(version, name));
CREATE TABLE layers(version INTEGER, node INTEGER, name TEXT, type TEXT, kind TEXT, variant TEXT, attrs TEXT,
    PRIMARY KEY(version, node));
CREATE TABLE edges(version INTEGER, src INTEGER, dst INTEGER);
CREATE TABLE flow(version INTEGER, src INTEGER, dst INTEGER);
CREATE TABLE files(version INTEGER, path TEXT, sha256 TEXT, size INTEGER, PRIMARY KEY(version, path));
CREATE TABLE tags(tag TEXT PRIMARY KEY, version INTEGER, created TEXT);
CREATE INDEX hparams_key ON hparams(key, num);
CREATE INDEX metric_name ON metric_summary(name, last);
CREATE INDEX layers_version ON layers(version, name);
CREATE INDEX edges_version ON edges(version, src);
CREATE INDEX flow_version ON flow(version, src);
CREATE INDEX snapshots_id ON snapshots(snapshot);
CREATE INDEX versions_name ON versions(name);
"""
TABLES = [m.group(1) for m in re.finditer(r"CREATE TABLE (\w+)", SCHEMA)]
_PER_VERSION = ["versions", "parents", "snapshots", "hparams", "metric_summary", "layers", "edges",
                "flow", "files"]

Fingerprint = tuple[int, int, int]


class RecordSource(Protocol):
    """What the catalog indexes: keys ``v/<id>``, ``t/<tag>``, ``m/<snapshot>`` with fingerprints."""

    def fingerprints(self) -> dict[str, Fingerprint]: ...

    def read(self, key: str) -> tuple[dict[str, Any], Fingerprint] | None: ...

    def read_manifest(self, sid: str) -> tuple[Any, Fingerprint] | None: ...


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@lru_cache(maxsize=1024)
def _like_part(part: tuple[tuple[str, bool], ...]) -> re.Pattern[str]:
    """A run of a LIKE pattern between two ``%``, as (character, escaped) pairs: its characters, ``_`` (not
    escaped) any one."""
    return re.compile("".join("." if c == "_" and not esc else re.escape(c) for c, esc in part), re.DOTALL)


def _like_runs(pattern: str, escape: str | None) -> list[tuple[tuple[str, bool], ...]] | None:
    """``pattern`` cut at its ``%`` wildcards (an escaped one is a character); None where it ends in a lone
    escape character (it matches nothing, as in SQLite)."""
    runs: list[tuple[tuple[str, bool], ...]] = []
    run: list[tuple[str, bool]] = []
    chars = iter(pattern)
    for c in chars:
        if c == escape:
            nxt = next(chars, None)
            if nxt is None:
                return None
            run.append((nxt, True))
        elif c == "%":
            runs.append(tuple(run))
            run = []
        else:
            run.append((c, False))
    return [*runs, tuple(run)]


def _like(pattern: Any, value: Any, escape: Any = None) -> bool | None:
    """SQL's LIKE as the standard has it (SQLite's own ignores ASCII case): ``%`` any run, ``_`` one
    character, case-sensitive, the whole value; ``ESCAPE`` (one character) makes the next ``%``, ``_`` or
    itself a character. In linear passes, not one regular expression: ``.*a.*a...`` backtracks
    exponentially (``%a%a%a%a%a%a%a%a%b`` over a run of a's: BENCHMARKS.md)."""
    if pattern is None or value is None:
        return None
    if escape is not None and len(str(escape)) != 1:
        raise ValueError("ESCAPE takes one character")
    runs = _like_runs(str(pattern), None if escape is None else str(escape))
    if runs is None:
        return False
    first, *rest = runs
    text = str(value)
    if not rest:
        return _like_part(first).fullmatch(text) is not None
    *middle, last = rest
    end = len(text) - len(last)  # each part matches as many characters as it has
    if end < len(first) or not _like_part(first).match(text) or not _like_part(last).fullmatch(text, end):
        return False
    pos = len(first)
    for part in middle:  # the leftmost place of each part leaves the most room to the rest
        found = _like_part(part).search(text, pos, end) if part else None
        if part and found is None:
            return False
        pos = found.end() if found else pos
    return True


def _numcmp(text: Any, number: Any) -> int | None:
    """-1, 0 or 1 as the number written as JSON ``text`` compares with ``number``, exactly (an int past 2**53 is
    not the double nearest it, as SQLite's REAL would have it); None where ``text`` is not a number."""
    try:
        x, y = Decimal(json.loads(text)), Decimal(number)
    except (TypeError, ValueError, ArithmeticError):
        return None
    return (x > y) - (x < y)


def _regexp(pattern: str, value: Any) -> bool:
    """SQLite REGEXP: the whole value must match (``conv[1-3]`` matches conv1, not conv10)."""
    try:
        return value is not None and _compiled(pattern).fullmatch(str(value)) is not None
    except re.error:
        return False


def flatten(d: Mapping[str, Any], prefix: str = "", strict: bool = False) -> dict[str, Any]:
    """Nested dicts as dotted keys: ``{"opt": {"lr": 1}}`` -> ``{"opt.lr": 1}``. ``strict``: InvalidInputError
    where two keys become one (``"opt.lr"`` beside ``"opt": {"lr"}``): queries could reach only one."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        inner = flatten(v, key + ".", strict) if isinstance(v, Mapping) and v else {key: v}
        if strict and (same := inner.keys() & out.keys()):
            raise InvalidInputError(f"hyperparameters {sorted(same)[0]!r} is given twice (a dotted key beside a "
                                    "nested one): queries and diffs would see only one; rename one of them")
        out |= inner
    return out


def _num_text(v: Any) -> tuple[float | None, str, str]:
    """A hyperparameter's row: its number, its text and its type ("bool", "num", "str", "null", "json"),
    so that a query's literal matches values of its own type only (true is not 1, "1" is not 1)."""
    if isinstance(v, bool):
        return float(v), json.dumps(v), "bool"
    if isinstance(v, (int, float)):
        return _finite(v), json.dumps(v), "num"
    if isinstance(v, str):
        return None, v, "str"
    return None, json.dumps(v, sort_keys=True), "null" if v is None else "json"


def _finite(v: Any) -> float | None:
    """``v`` as a finite float, else None (an int past a double's range, 10**400, too)."""
    try:
        f = float(v) if isinstance(v, (int, float)) else math.nan
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


class Catalog:
    """SQLite index over an archive's records (a :class:`RecordSource`); opened by ``Repository.catalog()``."""

    def __init__(self, path: str | os.PathLike[str], source: RecordSource):
        self.path = Path(path)
        self.source = source
        self.lock = threading.RLock()  # one connection (its transaction is the connection's): one thread at a time
        if self.path.is_symlink():
            raise CatalogError(f"the catalog {self.path} is a symbolic link; gpupas never opens its catalog through "
                               "one: remove it (`gpupas reindex` builds a new one)")
        self.conn = self._connect()

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        for attempt in (0, 1):
            try:
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                       check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.create_function("regexp", 2, _regexp, deterministic=True)
                conn.create_function("like", 2, _like, deterministic=True)  # SQL's LIKE, case and all
                conn.create_function("like", 3, _like, deterministic=True)  # ... with ESCAPE
                conn.create_function("numcmp", 2, _numcmp, deterministic=True)  # numbers compared exactly
                if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    self._create_schema(conn)
                return conn
            except sqlite3.DatabaseError as exc:
                if attempt or not _damaged(exc):
                    raise CatalogError(f"cannot open the catalog {self.path}: {exc}; remove it and run "
                                       "`gpupas reindex` (the archive holds everything it indexes)") from None
                # not a database (damaged): it is only a cache, start a new one
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        raise AssertionError("unreachable")

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
                    conn.execute(f'DROP TABLE IF EXISTS "{name}"')
                for stmt in SCHEMA.split(";"):  # not executescript: it would commit the transaction
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): all of it or nothing (the other threads wait)."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                if self.conn.in_transaction:  # SQLite may have rolled it back itself (an I/O error, a damaged page)
                    self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """Rows of a read-only SQL statement (rows behave like dicts); a catalog found damaged is rebuilt."""
        for attempt in (0, 1):
            with self.lock:  # (not in another thread's transaction: it would see that half done)
                cur = self.conn.cursor()
                cur.row_factory = sqlite3.Row
                try:
                    return cur.execute(sql, tuple(params)).fetchall()
                except sqlite3.DatabaseError as exc:
                    if attempt or not _damaged(exc):
                        raise
            self.rebuild()
        raise AssertionError("unreachable")

    # -- keeping it up to date -------------------------------------------------------------
    def _known(self) -> dict[str, Fingerprint]:
        with self.lock:
            return {k: (i, m, s) for k, i, m, s in self.conn.execute("SELECT key, ino, mtime_ns, size FROM records")}

    def is_fresh(self) -> bool:
        """True when every record file is indexed with its current fingerprint."""
        return self._known() == self.source.fingerprints()

    @contextmanager
    def _updating(self) -> Iterator[None]:
        """Around an update of the index: SQLite's errors as CatalogError, with the remedy."""
        try:
            yield
        except sqlite3.Error as exc:
            raise CatalogError(f"the catalog {self.path} cannot be updated ({exc}); if this persists, remove it "
                               "and run `gpupas reindex`") from None

    def sync(self) -> int:
        """Index the records that changed since the last sync; returns how many were (re)indexed."""
        with self.lock, self._updating():
            try:
                if self.is_fresh():
                    return 0
                with self.transaction():
                    return self._apply(self.source.fingerprints(), self._known())
            except sqlite3.DatabaseError as exc:
                if not _damaged(exc):
                    raise
            return sum(self.rebuild().values())  # damaged (a malformed page): it is only a cache

    def refresh(self, keys: Iterable[str]) -> int:
        """Index just ``keys`` (records this process has written) as they now are, without listing the
        archive: a commit costs the same at its thousandth version as at its first. Any other change
        is found by the next :meth:`sync`."""
        todo = sorted(set(keys), key=_key_order)
        with self.lock, self._updating(), self.transaction():
            for key in todo:
                self._reindex(key)
        return len(todo)

    def rebuild(self) -> dict[str, int]:
        """Build a fresh database from the archive alone and put it in place of this one (see
        :func:`rebuild_catalog`); returns row counts per table."""
        with self.lock:
            self.conn.close()
            fresh = rebuild_catalog(self.path, self.source)
            self.conn = fresh.conn
            return self.counts()

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {t: self.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES if t != "records"}

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table, sorted: two catalogs of one archive dump equal."""
        out = {}
        for t in TABLES:
            with self.lock:
                rows = self.conn.execute(f"SELECT * FROM {t}").fetchall()
            out[t] = sorted(rows, key=lambda r: tuple((x is None, "" if x is None else str(x)) for x in r))
        return out

    def _apply(self, disk: dict[str, Fingerprint], known: dict[str, Fingerprint]) -> int:
        gone = [k for k in known if k not in disk]
        todo = sorted((k for k, fp in disk.items() if known.get(k) != fp), key=_key_order)
        for key in gone:
            self._forget(key)
            self.conn.execute("DELETE FROM records WHERE key=?", (key,))
        for key in todo:
            self._reindex(key)
        return len(todo) + len(gone)

    def _reindex(self, key: str) -> None:
        """Index record ``key`` as it is in the archive now (nothing where it is gone or damaged)."""
        conn = self.conn
        self._forget(key)
        conn.execute("DELETE FROM records WHERE key=?", (key,))
        try:
            got = (self.source.read_manifest(key[2:]) if key.startswith("m/") else self.source.read(key))
        except (IntegrityError, FormatError):  # damaged: stays out of the catalog, retried next time; verify
            return  # reports it
        if got is None:  # vanished between listing and reading
            return
        record: Any = got[0]  # a Manifest (m/) or a record (v/, t/)
        fp = got[1]
        if key.startswith("v/") and (not isinstance(record, dict) or record.get("id") != int(key[2:])):
            return  # a record moved or copied under another id: damaged (as Records.version says), and indexed
            # under its own id no later change of this key would ever remove it
        if key.startswith("t/") and isinstance(record, dict) and record.get("tag", key[2:]) != key[2:]:
            return  # another tag's record (a case-insensitive file system's one file): no tag, as Records.tag says
        conn.execute("SAVEPOINT one")
        try:
            if key.startswith("v/"):
                self._index_version(record)
            elif key.startswith("m/"):
                conn.executemany("INSERT OR REPLACE INTO tensors VALUES (?,?,?,?,?,?,?,?)", [
                    (record.id, e.name, e.dtype, json.dumps(list(e.shape)), e.enc, e.nbytes, e.stored,
                     None if e.scheme is None else describe(e.scheme)) for e in record.tensors])
            else:
                conn.execute("INSERT INTO tags VALUES (?, ?, ?)",
                             (key[2:], int(record["version"]), record.get("created")))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, GpupasError, sqlite3.Error):
            conn.execute("ROLLBACK TO one")  # malformed record (a step past SQLite's integers): as above
            conn.execute("RELEASE one")
            return
        conn.execute("RELEASE one")
        conn.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)", (key, *fp))

    def _forget(self, key: str) -> None:
        if key.startswith("v/"):
            vid = int(key[2:])
            for t in _PER_VERSION:
                self.conn.execute(f"DELETE FROM {t} WHERE {'id' if t == 'versions' else 'version'}=?", (vid,))
        elif key.startswith("m/"):
            self.conn.execute("DELETE FROM tensors WHERE snapshot=?", (key[2:],))
        else:
            self.conn.execute("DELETE FROM tags WHERE tag=?", (key[2:],))

    def _index_version(self, r: Mapping[str, Any]) -> None:
        conn, vid = self.conn, int(r["id"])
        snaps = r.get("snapshots", [])
        net = Network.from_dict(r.get("network"))
        conn.execute(
            "INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (vid, r["name"], r["created"], r.get("author"), r.get("message"), r.get("latest"), r.get("best"),
             len(snaps), sum(s.get("raw_bytes", 0) for s in snaps), sum(s.get("stored_bytes", 0) for s in snaps),
             net.source, len(net.nodes), r.get("rev", 0)))
        conn.executemany("INSERT INTO parents VALUES (?,?,?)", [(vid, i, int(p)) for i, p in enumerate(r["parents"])])
        conn.executemany("INSERT INTO snapshots VALUES (?,?,?,?,?,?,?,?,?)", [
            (vid, i, s["id"], s.get("created"), s.get("step"), s.get("base"), s.get("raw_bytes"),
             s.get("stored_bytes"), s.get("source")) for i, s in enumerate(snaps)])
        conn.executemany("INSERT INTO hparams VALUES (?,?,?,?,?)", [
            (vid, k, *_num_text(v)) for k, v in flatten(r.get("hyperparameters") or {}).items()])
        for name, series in (r.get("metrics") or {}).items():
            vals = [f for _, v in series if (f := _finite(v)) is not None]
            if series:  # last: at the highest step (NULL where not finite); count: every point logged
                conn.execute("INSERT INTO metric_summary VALUES (?,?,?,?,?,?)",
                             (vid, name, last_value(series), min(vals, default=None), max(vals, default=None),
                              len(series)))
        conn.executemany("INSERT INTO layers VALUES (?,?,?,?,?,?,?)", [
            (vid, n.id, n.name, n.type, n.kind, n.variant, json.dumps(n.attrs, sort_keys=True)) for n in net.nodes])
        conn.executemany("INSERT INTO edges VALUES (?,?,?)", [(vid, a, b) for a, b in net.edges])
        conn.executemany("INSERT INTO flow VALUES (?,?,?)", [(vid, a, b) for a, b in net.flow_edges()])
        conn.executemany("INSERT INTO files VALUES (?,?,?,?)", [
            (vid, path, f["sha256"], f["size"]) for path, f in (r.get("files") or {}).items()])


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    """Whether ``exc`` says the database file is damaged ("malformed", "not a database"): only plain
    DatabaseError does; locks, I/O errors, bad SQL raise its subclasses."""
    return type(exc) is sqlite3.DatabaseError


def last_value(series: Sequence[Sequence[Any]]) -> float | None:
    """A series' last value: the one logged at its highest step (the later of points at one step), None
    where that is not a finite number (a run that diverged has no last loss to compare)."""
    return _finite(max(enumerate(series), key=lambda ip: (ip[1][0], ip[0]))[1][1]) if series else None


def _key_order(key: str) -> tuple[int, int, str]:
    return (0, int(key[2:]), "") if key.startswith("v/") else (1, 0, key)


def catalog_path(location: str, local_root: str | None) -> Path:
    """Where the catalog of an archive lives: at its root where that can be written, else in the
    user's cache folder (remote archives, read-only mounts, another user's archive or catalog)."""
    if local_root is not None and os.access(local_root, os.W_OK):
        path = Path(local_root) / FILENAME  # its files too: another user's (umask 022) in a shared folder are not
        if all(os.path.islink(f) or os.access(f, os.W_OK) or not os.path.exists(f)  # (a link: refused, as ever)
               for f in (f"{path}{s}" for s in ("", "-wal", "-shm"))):
            return path
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpupas" / "catalogs"
    cache.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(os.fsencode(os.path.realpath(location) if local_root else location)).hexdigest()[:24]
    return cache / f"{name}.sqlite"


def rebuild_catalog(path: Path, source: RecordSource) -> Catalog:
    """A fresh catalog at ``path`` built from ``source`` alone, moved into place atomically: nothing of
    an old file there (tables, views or triggers it did not create) survives, and it is never read."""
    if path.is_symlink():
        path.unlink()  # never write through a link; the new catalog takes its place
    _sweep_temp(path)
    tmp, held = _locked_temp(path)
    try:
        fresh = Catalog(tmp, source)
    except BaseException:
        for suffix in ("-wal", "-shm", "-journal", ""):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        _release_temp(tmp, held)
        raise
    try:
        with fresh.transaction():
            fresh._apply(source.fingerprints(), {})
        fresh.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        fresh.conn.execute("PRAGMA journal_mode=DELETE")  # one self-contained file to move into place
        fresh.close()
        for suffix in ("-journal", "-wal", "-shm"):  # a stale journal would be rolled back into the new file
            Path(f"{path}{suffix}").unlink(missing_ok=True)  # a link is removed, never followed
        os.replace(tmp, path)
        for suffix in ("-journal", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    except BaseException:
        fresh.close()
        for suffix in ("-wal", "-shm", "-journal", ""):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        raise
    finally:
        _release_temp(tmp, held)
    return Catalog(path, source)


def _locked_temp(path: Path) -> tuple[Path, int]:
    """A fresh name for the database :func:`rebuild_catalog` builds, and a descriptor holding an exclusive
    ``flock`` on its lock file (the name plus ``.lock``) until the database is in place: the kernel drops it
    when the process dies, and :func:`_sweep_temp` removes only temporary catalogs whose lock no one holds.
    The lock is a file of its own: on macOS and on NFS a ``flock`` can meet SQLite's POSIX locks."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        lock = Path(f"{tmp}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except FileNotFoundError:
            pass  # a sweep found it before it was locked and removed it: take another name
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _release_temp(tmp: Path, held: int) -> None:
    """Remove the lock file of ``tmp`` (the database is in place, or removed) and drop its lock."""
    try:
        Path(f"{tmp}.lock").unlink(missing_ok=True)
    finally:
        os.close(held)


def _sweep_temp(path: Path) -> None:
    """Remove the temporary catalogs (with their journals and lock files) that rebuilds killed before they
    finished left beside ``path``; one whose lock a running rebuild holds (see :func:`_locked_temp`) stays."""
    prefix = f".{path.name}."
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(prefix) and n.endswith(".tmp.lock")]
    except OSError:
        return
    for name in names:
        lock = path.parent / name
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)  # NFS: an exclusive flock needs write
        except OSError:
            continue  # gone, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            tmp = str(lock)[: -len(".lock")]
            for suffix in ("-wal", "-shm", "-journal", "", ".lock"):  # the lock last: it marks the rest
                Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        except OSError:
            pass  # held: a rebuild is running (or it cannot be removed: left as it was)
        finally:
            os.close(fd)


def open_catalog(path: Path, source: RecordSource) -> Catalog:
    """The catalog at ``path``, brought up to date; rebuilt where it holds what gpupas did not put there
    (triggers, views or tables of a catalog handed over with an archive)."""
    cat = Catalog(path, source)
    try:
        if _foreign(cat.conn):
            cat.close()
            return rebuild_catalog(path, source)
        cat.sync()
    except BaseException:
        cat.close()
        raise
    return cat


def _foreign(conn: sqlite3.Connection) -> bool:
    """Whether the database holds schema objects other than the catalog's own tables and indexes."""
    own = set(TABLES) | {m.group(1) for m in re.finditer(r"CREATE INDEX (\w+)", SCHEMA)}
    rows = conn.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall()
    return any(kind not in ("table", "index") or name not in own for kind, name in rows)
