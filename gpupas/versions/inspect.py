"""Looking at versions: show one, diff two, the lineage (log), what the archive stores (stats).

Functions of a :class:`~gpupas.versions.repository.Repository`; the command line and notebooks
call these (through the repository's methods of the same names).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from gpupas.catalog import STORED_NOW, flatten, last_value
from gpupas.errors import FormatError, GpupasError, IntegrityError
from gpupas.network import diff_networks
from gpupas.pas.planes import FLOATS
from gpupas.pas.schemes import describe
from gpupas.versions.model import Version

if TYPE_CHECKING:
    from gpupas.versions.repository import Repository


def show(repo: Repository, ref: str | int | Version, snapshot: str | int | None = None) -> dict[str, Any]:
    """Metadata, network, sizes and per-layer storage of a version (``gpupas show``)."""
    v = repo.version(ref)
    d = v.to_dict()
    d["tags"] = [t for t, vid in repo.tags().items() if vid == v.id]
    d["children"] = [r["version"] for r in repo.catalog().query(
        "SELECT version FROM parents WHERE parent=? ORDER BY version", (v.id,))]
    if not v.snapshots:
        d["layers"], d["snapshot"] = [], None
        return d
    snap = v.snapshot(snapshot)
    m = repo.archive.manifest(snap["id"])
    for s in d["snapshots"]:  # what the manifests say now (a compaction may have re-encoded or re-based one)
        try:
            cur = repo.archive.manifest(s["id"])
            s["stored_bytes"], s["base"] = cur.stored_bytes, cur.base
            if cur.lossy:
                s["lossy"] = ",".join(sorted({describe(e.scheme) for e in cur.tensors if e.scheme is not None}))
        except GpupasError:
            pass
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
    d["tensors"] = repo.archive.report(snap["id"])
    return d


def _same_json(x: Any, y: Any) -> bool:
    """Whether two JSON values are equal and of one type all the way down (True is not 1, 1 is not 1.0, in a
    list or an object too: Python's ``[True] == [1]``)."""
    if type(x) is not type(y):
        return False
    if isinstance(x, list):
        return len(x) == len(y) and all(map(_same_json, x, y))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same_json(v, y[k]) for k, v in x.items())
    return bool(x == y)


def _same_value(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> bool:
    """Whether hyperparameter ``key`` is the same in both: present in both (a missing key is not None),
    of one type (True is not 1, 0 is not False; inside lists too) and equal."""
    if (key in a) != (key in b):
        return False
    return _same_json(a.get(key), b.get(key))


def diff(repo: Repository, a: str | int | Version, b: str | int | Version, *, snapshot_a: str | int | None = None,
         snapshot_b: str | int | None = None, weights: bool = True) -> dict[str, Any]:
    """Two versions side by side: network, hyperparameter, metric and per-tensor weight changes (where one has no
    snapshots, ``weights_not_compared`` lists which instead)."""
    va, vb = repo.version(a), repo.version(b)
    ha, hb = flatten(va.hyperparameters), flatten(vb.hyperparameters)
    hp = {k: [ha.get(k), hb.get(k)] for k in sorted(ha.keys() | hb.keys()) if not _same_value(ha, hb, k)}
    ma, mb = va.metrics, vb.metrics
    metrics = {k: [last_value(ma.get(k, [])), last_value(mb.get(k, []))] for k in sorted(ma.keys() | mb.keys())}
    out: dict[str, Any] = {
        "a": {"id": va.id, "name": va.name}, "b": {"id": vb.id, "name": vb.name},
        "network": diff_networks(va.network, vb.network), "hyperparameters": hp,
        "hyperparameters_absent": {k: [k not in ha, k not in hb] for k in hp if k not in ha or k not in hb},
        "metrics": metrics,
        "files": {k: [va.files.get(k, {}).get("sha256"), vb.files.get(k, {}).get("sha256")]
                  for k in sorted(va.files.keys() | vb.files.keys())
                  if va.files.get(k, {}).get("sha256") != vb.files.get(k, {}).get("sha256")},
    }
    if weights and not (va.snapshots and vb.snapshots):  # no weights to compare: said, not left out unsaid
        for v, sel in ((va, snapshot_a), (vb, snapshot_b)):
            if sel is not None:
                v.snapshot(sel)  # SnapshotNotFoundError where a snapshot is asked of a version without any
        out["weights_not_compared"] = [v.id for v in (va, vb) if not v.snapshots]
    elif weights:
        sa, sb = va.snapshot(snapshot_a)["id"], vb.snapshot(snapshot_b)["id"]
        out["snapshots"] = [sa, sb]
        ea, eb = repo.archive.manifest(sa).by_name, repo.archive.manifest(sb).by_name
        both = [n for n in eb if n in ea]  # a tensor only one side has is named, never read
        out["weights"] = diff_tensors(repo.archive.restore(sa, both), repo.archive.restore(sb, both)) | {
            "added": [n for n in eb if n not in ea], "removed": [n for n in ea if n not in eb]}
    return out


SHARED = ("(SELECT coalesce(sum(t.stored), 0) FROM tensors t WHERE t.snapshot IN (SELECT s.snapshot FROM snapshots s "
          "WHERE s.version=versions.id AND EXISTS (SELECT 1 FROM snapshots o WHERE o.snapshot=s.snapshot AND "
          "o.version<versions.id)))")  # a version's stored bytes in snapshots an earlier version names (a copy's)


def lineage(repo: Repository) -> list[dict[str, Any]]:
    """Every version's summary (id, name, parents, tags, snapshots, sizes), from the catalog, by id.
    ``shared_bytes``: the part of its ``stored_bytes`` in snapshots an earlier version names too (a copy shares
    its source's latest snapshot), so the rows less those add up to what the archive stores."""
    cat = repo.catalog()
    parents: dict[int, list[int]] = {}
    for r in cat.query("SELECT version, parent FROM parents ORDER BY version, pos"):
        parents.setdefault(r["version"], []).append(r["parent"])
    tags: dict[int, list[str]] = {}
    for r in cat.query("SELECT tag, version FROM tags ORDER BY tag"):
        tags.setdefault(r["version"], []).append(r["tag"])
    return [dict(r) | {"parents": parents.get(r["id"], []), "tags": tags.get(r["id"], [])}
            for r in cat.query(
                "SELECT id, name, created, author, message, n_snapshots, raw_bytes, "
                f"{STORED_NOW.format(v='versions')} AS stored_bytes, {SHARED} AS shared_bytes, latest, best, "
                "(SELECT group_concat(DISTINCT t.lossy) FROM tensors t "
                "WHERE t.lossy IS NOT NULL AND t.snapshot IN (SELECT snapshot FROM snapshots WHERE "
                "version=versions.id)) AS lossy FROM versions ORDER BY id")]


def log(repo: Repository, ref: str | int | Version | None = None) -> list[dict[str, Any]]:
    """:func:`lineage`, or only the versions connected to ``ref`` (its ancestors and descendants)."""
    rows = lineage(repo)
    if ref is None:
        return rows
    vid = repo.resolve(ref)
    by_id = {r["id"]: r for r in rows}
    children: dict[int, list[int]] = {}
    for r in rows:
        for p in r["parents"]:
            children.setdefault(p, []).append(r["id"])
    keep: set[int] = set()
    for start, step in ((vid, lambda x: by_id[x]["parents"] if x in by_id else []),
                        (vid, lambda x: children.get(x, []))):
        stack, seen = [start], set()
        while stack:  # a loop, not recursion: chains can be long (and parents may form a cycle)
            x = stack.pop()
            if x not in seen:
                seen.add(x)
                stack += step(x)
        keep |= seen
    return [r for r in rows if r["id"] in keep]


def _unreadable(repo: Repository, sid: str) -> bool:
    """Whether the manifest of ``sid``, which the catalog lacks, cannot be read (rather than being
    committed, or discarded, since the catalog was brought up to date)."""
    try:
        repo.archive.store.read_manifest(sid)
    except (IntegrityError, FormatError):
        return True
    except GpupasError:
        return False
    return False


def _snapshots_usage(repo: Repository, sids: list[str]) -> int:
    """Bytes the files of snapshots ``sids`` take (manifest, folders, in tiers too), as gc counts those it frees;
    one whose manifest cannot be read (or that was discarded meanwhile) counts nothing."""
    total = 0
    for sid in sids:
        try:
            total += repo.archive.store.snapshot_usage(sid, repo.archive.manifest(sid))
        except GpupasError:
            pass
    return total


def stats(repo: Repository) -> dict[str, Any]:
    """What the archive stores, how (encodings, dtypes), and what that saves (``gpupas stats``)."""
    cat = repo.catalog()
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
    all_sids = set(repo.archive.store.list_snapshots())
    orphans = sorted(all_sids - referenced)
    indexed = {r["key"][2:] for r in q("SELECT key FROM records WHERE key LIKE 'm/%'")}  # readable manifests
    incomplete = repo.archive.store.orphan_folders(referenced)
    disk = repo.archive.store.store.usage("")
    raw, stored = int(tot["raw"]), int(tot["stored"])
    for row in by_enc + by_dtype:
        row["ratio"] = row["stored_bytes"] / row["raw_bytes"] if row["raw_bytes"] else 0.0
    return {
        "location": repo.location,
        "versions": q("SELECT count(*) AS n FROM versions")[0]["n"],
        "names": q("SELECT count(DISTINCT name) AS n FROM versions")[0]["n"],
        "tags": q("SELECT count(*) AS n FROM tags")[0]["n"],
        "snapshots": len(referenced), "tensors": tot["n"], "raw_bytes": raw, "stored_bytes": stored,
        "ratio": stored / raw if raw else 0.0, "saved_bytes": raw - stored,
        "by_encoding": by_enc, "by_dtype": by_dtype,
        "files": {"references": files["refs"], "logical_bytes": files["logical"], "blobs": len(blob_sizes),
                  "stored_bytes": sum(blob_sizes.values()),
                  "saved_bytes": files["logical"] - sum(blob_sizes.values())},
        "unreferenced_snapshots": orphans, "unreferenced_bytes": _snapshots_usage(repo, orphans),
        "incomplete_snapshots": incomplete,
        "incomplete_bytes": sum(repo.archive.store.folder_usage(f) for f in incomplete),
        "unreadable_snapshots": [s for s in sorted(all_sids - indexed) if _unreadable(repo, s)],  # not in totals
        "disk_bytes": disk,
        "per_version": [dict(r) for r in q("SELECT id, name, n_snapshots, raw_bytes, "
                                           f"{STORED_NOW.format(v='versions')} AS stored_bytes "
                                           "FROM versions ORDER BY id")],
    }


DIFF_BLOCK = 1 << 18  # values compared at a time (some 40 bytes of temporaries each)


class _Norm:
    """A running L2 norm kept as ``scale * sqrt(ssq)`` (as LAPACK's dnrm2 does): values near the largest
    doubles square past their range."""

    def __init__(self) -> None:
        self.scale, self.ssq = 0.0, 0.0

    def add(self, v: np.ndarray) -> None:
        m = float(np.abs(v).max()) if v.size else 0.0
        if m:
            w = v / m
            self.join(m, float(np.dot(w, w)))

    def join(self, scale: float, ssq: float) -> None:
        """Add another norm's ``scale * sqrt(ssq)``."""
        if scale > self.scale:
            self.ssq, self.scale = self.ssq * (self.scale / scale) ** 2 + ssq, scale
        elif scale:
            self.ssq += ssq * (scale / self.scale) ** 2

    def ratio(self, other: _Norm) -> float | None:
        """``||self|| / ||other||``: 0.0 where both are 0, None where only ``other`` is."""
        if not other.scale:
            return 0.0 if not self.scale else None
        return self.scale / other.scale * math.sqrt(self.ssq / other.ssq)


def diff_tensors(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Per-tensor change statistics from ``a`` to ``b`` (same name and shape), plus totals.

    Rows: ``name, shape, changed`` (fraction of elements whose bits differ), and for float
    tensors ``max_abs``, ``mean_abs`` and ``rel_l2 = ||b - a|| / ||a||`` (None where ``a`` is all zero and
    ``b`` is not: no relative change, not none) over the elements whose difference is a finite number, and
    ``not_finite``: how many changed elements are left out of those (Inf or NaN before or after); the totals'
    ``rel_l2`` likewise.
    """
    rows, d2, n2 = [], _Norm(), _Norm()
    for name in [k for k in b if k in a]:
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            rows.append({"name": name, "shape": [list(x.shape), list(y.shape)], "dtype": [str(x.dtype), str(y.dtype)]})
            continue
        row: dict[str, Any] = {"name": name, "shape": list(x.shape), "dtype": str(x.dtype)}
        floats = x.dtype.name in FLOATS
        xs, ys = x.reshape(-1), y.reshape(-1)
        changed = ok_n = not_finite = 0
        dd, nn, sum_abs = _Norm(), _Norm(), 0.0
        max_abs: float | None = None
        for lo in range(0, xs.size, DIFF_BLOCK):  # a block at a time: whole-tensor temporaries took ~23x a bf16 one
            xb, yb = xs[lo:lo + DIFF_BLOCK], ys[lo:lo + DIFF_BLOCK]
            bits = np.any(xb.view(np.uint8).reshape(xb.size, -1) != yb.view(np.uint8).reshape(yb.size, -1), axis=1)
            changed += int(np.count_nonzero(bits))
            if floats:
                xf = xb.astype(np.float64)
                with np.errstate(all="ignore"):
                    d = yb.astype(np.float64) - xf
                    ok = np.isfinite(d)
                    not_finite += int(np.count_nonzero(bits & ~ok))
                    d, xf = d[ok], xf[ok]
                    dd.add(d)
                    nn.add(xf)
                    if d.size:
                        ad = np.abs(d)
                        max_abs = max(max_abs or 0.0, float(ad.max()))
                        sum_abs, ok_n = sum_abs + float(ad.sum()), ok_n + d.size
        row["changed"] = changed / xs.size if xs.size else 0.0
        if floats:
            row["max_abs"] = max_abs
            row["mean_abs"] = sum_abs / ok_n if ok_n else None
            row["rel_l2"] = dd.ratio(nn)
            row["not_finite"] = not_finite
            d2.join(dd.scale, dd.ssq)
            n2.join(nn.scale, nn.ssq)
        rows.append(row)
    return {
        "tensors": rows,
        "added": [k for k in b if k not in a], "removed": [k for k in a if k not in b],
        "identical": sum(1 for r in rows if r.get("changed") == 0.0),
        "rel_l2": d2.ratio(n2),
    }
