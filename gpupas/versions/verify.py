"""Checking a repository: every record, tag, file blob and snapshot, each snapshot decoded once."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gpupas.errors import (
    UNREACHABLE,
    FormatError,
    GpupasError,
    IntegrityError,
    NotFoundError,
    SnapshotNotFoundError,
    Unreachable,
)
from gpupas.format import keys
from gpupas.store.archive import built_on
from gpupas.versions.model import well_formed

if TYPE_CHECKING:
    from gpupas.versions.repository import Repository

Progress = Callable[[str, int, int], None]


def verify(repo: Repository, refs: Iterable[str | int] | None = None, progress: Progress | None = None,
           scheduler: Any = "sync") -> dict[str, Any]:
    """Re-read and check every chunk, tensor, record, tag and file of the versions (all of the archive
    by default, plain snapshots included). Returns ``{"ok", "checked": {...}, "problems": [...],
    "unreachable": [...], "notes": [...]}`` (problems: damage found; unreachable: snapshots that could not be
    read because a store or tier cannot be reached; notes: what is not damage but may need a look, such as
    snapshots no version names); never raises on damage found.

    The snapshots are checked by :func:`gpupas.jobs.graph.verify_graph` (each decoded once, its bases
    first), run by ``scheduler``: "sync" (default) in this process, None or "local" a local Dask cluster, or a
    scheduler's address / a ``distributed.Client``.
    """
    problems: list[str] = []
    records: list[dict[str, Any]] = []
    sids: list[str] = []
    if refs is None:
        for vid in repo.records.version_ids():
            try:
                rec = repo.records.version(vid)
            except (IntegrityError, FormatError) as exc:
                problems.append(str(exc))
                continue
            if rec is not None:
                records.append(rec)
        for key in (k for k in repo.records.fingerprints() if k.startswith("t/")):
            try:
                target = repo.records.tag(key[2:])
                if target is not None and not repo.records.has_version(target):
                    problems.append(f"tag {key[2:]!r} points at missing version {target}")
            except (IntegrityError, FormatError) as exc:
                problems.append(f"tag {key[2:]!r}: {exc}")
        try:
            sids = sorted(repo.archive.store.list_snapshots())
        except OSError as exc:
            problems.append(f"cannot list the snapshots: {exc}")
    else:
        records = [repo.version(r).record for r in refs]
    ids = set(repo.records.version_ids())
    notes: list[str] = []
    if refs is None:
        problems += [f"version record {keys.version(v)} is missing (ids are given 1, 2, ... in order: a copy lost it?)"
                     ": restore it from a copy; until then gc keeps every snapshot no version names"
                     for v in missing_ids(ids)]
        _unnamed(repo, records, ids, problems, notes)
    problems += [f"version record {r.get('id', '?') if isinstance(r, dict) else '?'} is malformed (missing or bad "
                 "id, name, parents, created or snapshots); restore it from a copy"
                 for r in records if not well_formed(r)]
    records = [r for r in records if well_formed(r)]
    listed = set(repo.archive.store.list_snapshots())
    blobs: dict[str, str] = {}
    for rec in records:
        for p in rec.get("parents", []):
            if p not in ids:
                problems.append(f"version {rec['id']}: parent {p} is missing")
        for s in rec.get("snapshots", []):
            if s["id"] in listed:
                sids.append(s["id"])
            else:
                problems.append(f"version {rec['id']}: snapshot {s['id']} is missing")
        for fname, f in (rec.get("files") or {}).items():
            blobs.setdefault(f.get("sha256", ""), f"version {rec['id']} file {fname!r}")
    problems += [f"version {v}: its parents form a cycle ({path}); restore the records from "
                 "a copy" for v, path in _parent_loops(records)]
    sids = list(dict.fromkeys(sids))
    tensors = 0
    if progress:
        progress("snapshots", 0, len(sids))
    unreachable: list[str] = []
    versioned, gone = {s["id"] for r in records for s in r.get("snapshots", [])}, 0
    passed: list[str] = []
    for sid, first in _check_snapshots(repo, sids, scheduler):
        result = _again(repo, sid, first, sid in versioned) if isinstance(first, str) else first
        if result is None:
            gone += 1
            continue
        if isinstance(result, str):
            line = f"snapshot {sid}: {result}" if sid not in result else result
            (unreachable if isinstance(result, Unreachable) else problems).append(line)
        else:
            tensors += result
            passed.append(sid)
    said: set[str] = set()  # snapshots/zarr.json: once
    for sid in passed:  # what stock Zarr, which FORMAT.md promises reads an archive, would trip on
        try:
            missing = repo.archive.store.missing_documents(repo.archive.store.read_manifest(sid))
        except (SnapshotNotFoundError, IntegrityError, FormatError):
            continue  # gone meanwhile, or reported by its check
        missing = [k for k in missing if k not in said]
        said.update(missing)
        if missing:
            more = "..." if len(missing) > 4 else ""
            problems.append(f"snapshot {sid}: Zarr document(s) {', '.join(missing[:4])}{more} missing (a copy that "
                            "skipped them?): gpupas reads it without them, stock Zarr cannot; copy them over from the "
                            "original archive (its data is intact)")
    if progress:
        progress("files", len(sids), len(sids))
    for h, where in blobs.items():
        try:
            repo.records.blob(h)
        except (IntegrityError, NotFoundError, ValueError) as exc:
            problems.append(f"{where}: {exc}")
    return {"ok": not problems and not unreachable, "problems": problems, "unreachable": unreachable, "notes": notes,
            "checked": {"versions": len(records), "snapshots": len(sids) - gone, "tensors": tensors,
                        "files": len(blobs)}}


def missing_ids(ids: Collection[int], limit: int = 5) -> list[int]:
    """Version ids below the highest of ``ids`` that have no record (the first ``limit``): ids are given 1, 2, ...
    in order and no record is ever deleted, so each is a lost record."""
    out: list[int] = []
    prev = 0
    for vid in sorted(ids):
        out += range(prev + 1, min(vid, prev + 1 + limit - len(out)))
        if len(out) >= limit:
            break
        prev = vid
    return out


def unpublished(meta: Mapping[str, Any], ids: Collection[int]) -> bool:
    """Whether a snapshot no version record names, with manifest ``meta``, is what a commit killed before
    publishing left (gc's), given the ids of the records there are. A new version's commit (and an import)
    writes ``version_name`` alone (the id is given as it publishes); ``add_snapshot`` the ``version_id`` of a
    version whose record is there; no record is ever deleted. So a ``version_id`` without a record (whatever
    the id: the lost record may be the newest) means a lost record, and so does a missing id below the highest,
    which any ``version_name`` snapshot may belong to: both are kept. Committed without a version: kept."""
    if "version_id" in meta:
        vid = meta["version_id"]
        return isinstance(vid, int) and vid in ids
    return "version_name" in meta and not missing_ids(ids, 1)


def dropped_from(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Snapshot -> the version whose record lists it as dropped (``Repository.drop_snapshots``) and no longer
    names it (the first such version, by id, where several did)."""
    out: dict[str, int] = {}
    for r in sorted(records, key=lambda r: int(r["id"])):
        named = {s["id"] for s in r.get("snapshots", [])}
        for d in r.get("dropped") or []:
            if isinstance(d, Mapping) and isinstance(d.get("id"), str) and d["id"] not in named:
                out.setdefault(d["id"], int(r["id"]))
    return out


def dropped_within(records: Iterable[Mapping[str, Any]], seconds: float) -> set[str]:
    """Snapshots a record lists as dropped less than ``seconds`` ago (by the ``dropped`` time it wrote): a reader
    that read the version before may still be restoring them."""
    now = datetime.now(UTC)
    out = set()
    for r in records:
        for d in r.get("dropped") or []:
            try:
                if (now - datetime.fromisoformat(d["dropped"])).total_seconds() < seconds:
                    out.add(d["id"])
            except (KeyError, TypeError, ValueError):  # not a time this code wrote: counts as long ago
                continue
    return out


def kept(store: Any, records: Iterable[Mapping[str, Any]], ids: Collection[int]) -> dict[str, tuple[str, Any]]:
    """Why gc keeps each snapshot it keeps (whatever their age): ``("named", version)`` for a snapshot a record
    names, ``("plain", None)`` for one committed without a version or whose version's record is lost (see
    :func:`unpublished`), ``("base", snapshot)`` for one that a kept snapshot is built on (its base, or the
    base's base a 'pred' tensor reads). Snapshots whose manifest cannot be read are left out (gc keeps them)."""
    named: dict[str, int] = {}
    for r in sorted(records, key=lambda r: int(r["id"])):
        for s in r.get("snapshots", []):
            named.setdefault(s["id"], int(r["id"]))
    manifests = {}
    for sid in store.list_snapshots():  # (an ArchiveStore)
        try:
            manifests[sid] = store.read_manifest(sid)
        except (SnapshotNotFoundError, IntegrityError, FormatError):
            continue
    why: dict[str, tuple[str, Any]] = {}
    for sid, m in manifests.items():
        if sid in named:
            why[sid] = ("named", named[sid])
        elif not unpublished(m.meta, ids):
            why[sid] = ("plain", None)
    todo = list(why)
    while todo:
        sid = todo.pop()
        for d in built_on(manifests[sid], manifests):
            if d in manifests and d not in why:
                why[d] = ("base", sid)
                todo.append(d)
    return why


def kept_on(why: Mapping[str, tuple[str, Any]], sid: str) -> str:
    """The kept snapshot that keeps ``sid`` (a ``("base", ...)`` entry of :func:`kept`): through the dropped bases
    between them to the one a version names (or gc keeps for itself)."""
    by = why[sid][1]
    while why[by][0] == "base":
        by = why[by][1]
    return str(by)


def fate(repo: Repository, sids: Iterable[str], record: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """What ``gc`` does with snapshots ``sids`` once their drop is older than its ``min_age`` (just dropped;
    ``record``: a version's record as it is, or would be, in place of the stored one): per snapshot ``{"gc":
    "frees" or "keeps", "why": ...}``; why: "named by version N", "the base of kept snapshot X" (or of a dropped
    one in its chain of bases), "kept by gc"
    (committed without a version, or its version's record is lost), None where gc frees it."""
    records, ids = repo.records.every_version()
    if record is not None:
        records = [dict(record) if r["id"] == record["id"] else r for r in records]
    why = kept(repo.archive.store, records, set(ids))
    out = {}
    for sid in sids:
        kind, by = why.get(sid, ("", None))
        on = by
        if kind == "base":
            by = kept_on(why, sid)
        out[sid] = {"gc": "keeps" if kind else "frees",
                    "why": {"named": f"named by version {by}", "base": f"the base of kept snapshot {by}" if on == by
                            else f"the base of {on} (dropped too), in the chain kept snapshot {by} is built on",
                            "plain": "kept by gc", "": None}[kind]}
    return out


def _unnamed(repo: Repository, records: list[dict[str, Any]], ids: set[int], problems: list[str],
             notes: list[str]) -> None:
    """Report the snapshots written for a version that no record names: a problem where the version's record
    is lost (gc keeps them), a note where a killed commit or add may have left them, or where they were dropped
    from their version (gc removes them, unless a kept snapshot is built on them)."""
    named = {s["id"] for r in records for s in r.get("snapshots", [])}
    dropped = dropped_from(records)
    killed: dict[str, list[str]] = {}
    added: dict[int, list[str]] = {}
    gone: dict[int, list[str]] = {}
    for sid in sorted(set(repo.archive.store.list_snapshots()) - named):
        try:
            meta = repo.archive.store.read_manifest(sid).meta
        except (SnapshotNotFoundError, IntegrityError, FormatError):
            continue  # gone meanwhile, or reported as damaged by its check
        if "version_id" in meta and not unpublished(meta, ids):
            problems.append(f"snapshot {sid} was added to version {meta['version_id']!r}, whose record is missing "
                            f"({keys.version(meta['version_id']) if isinstance(meta['version_id'], int) else '?'}"
                            "): restore it from a copy; gc keeps the snapshot, and what it is built on, meanwhile")
        elif sid in dropped:
            gone.setdefault(dropped[sid], []).append(sid)
        elif "version_name" in meta and "version_id" not in meta:
            killed.setdefault(str(meta["version_name"]), []).append(sid)
        elif "version_id" in meta:
            added.setdefault(meta["version_id"], []).append(sid)
    why = kept(repo.archive.store, records, ids) if gone else {}
    for vid, sids in gone.items():
        bases = [s for s in sids if s in why]
        free = [s for s in sids if s not in why]
        if free:
            notes.append(f"snapshot(s) {_few(free)} were dropped from version {vid} (`gpupas drop`): `gpupas gc` "
                         "removes them")
        if bases:
            notes.append(f"snapshot(s) {_few(bases)} were dropped from version {vid} (`gpupas drop`) but kept "
                         f"snapshots are built on them ({', '.join(sorted({kept_on(why, s) for s in bases})[:3])}): "
                         "gc keeps them until `gpupas compact` re-bases those")
    for vid, sids in added.items():
        notes.append(f"snapshot(s) {_few(sids)} written for version {vid} are not named by its record and "
                     "were never dropped from it: an add_snapshot killed before its record named them left them "
                     "(`gpupas gc` removes them)")
    for name, sids in killed.items():
        notes.append(f"snapshot(s) {_few(sids)} written for a version "
                     f"{name!r} are named by no version record: a commit killed before publishing left them "
                     "(`gpupas gc` removes them), unless a version's record was lost (the newest, "
                     f"{keys.version(max(ids, default=0) + 1)}?): then restore it from a copy before running gc")


def _few(sids: list[str]) -> str:
    """The first five of ``sids``, and '...' where there are more."""
    return f"{', '.join(sids[:5])}{'...' if len(sids) > 5 else ''}"


def _again(repo: Repository, sid: str, first: str, versioned: bool) -> int | str | None:
    """A snapshot found wrong, checked once more on fresh manifests: its tensor count where that passes (it
    was revised while it was read), None where it is a plain snapshot discarded meanwhile (by a commit that
    failed), else what was found first. An unreachable store is not tried again; a tier the archive did not
    name is (the snapshot may have been moved out of it since), and what that look finds is the answer."""
    if isinstance(first, Unreachable) and not first.recheck:
        return first
    try:
        return repo.archive.verify(sid)
    except SnapshotNotFoundError:
        return first if versioned else None
    except (GpupasError, OSError, KeyError, ValueError) as exc:
        if not isinstance(first, Unreachable):
            return first
        return Unreachable.of(exc) if isinstance(exc, UNREACHABLE) else str(exc)  # damage in the new form is damage


def _check_snapshots(repo: Repository, sids: list[str], scheduler: Any) -> list[tuple[str, int | str]]:
    """(snapshot, tensor count or what is wrong) for each of ``sids``, by the verify job's graph."""
    if not sids:
        return []
    if scheduler == "sync" and repo.archive.store.local_root is not None and len(sids) <= 2:
        # a couple of snapshots: no graph needed (the same decodes, each once)
        return [(s, r if isinstance(r, int) else Unreachable.of(r) if isinstance(r, UNREACHABLE) else str(r))
                for s, r in repo.archive.verify_all(sids)]
    from gpupas.jobs.graph import verify_graph
    from gpupas.jobs.run import run
    from gpupas.jobs.tasks import ArchiveSpec

    spec = ArchiveSpec(repo.location, dict(repo.archive.store.store.storage_options or {}),
                       dict(repo.archive.store.tier_options) or None)
    return list(run(verify_graph(spec, sids), scheduler))


def _parent_loops(records: list[Any]) -> list[tuple[int, str]]:
    """(version, its loop) for each version that is its own ancestor (a damaged or hostile record)."""
    parents = {r["id"]: [p for p in r.get("parents", []) if isinstance(p, int)] for r in records}
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    loops: list[tuple[int, str]] = []
    for root in sorted(parents):
        if root in state:
            continue
        path, stack = [root], [iter(parents[root])]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                cycle = path[path.index(nxt):]
                loops.append((nxt, " -> ".join(map(str, [*cycle, nxt]))))
            elif nxt not in state and nxt in parents:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(parents[nxt]))
    return loops

