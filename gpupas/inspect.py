"""What an archive stores, as records: one plain dict per snapshot, tensor, layer or plane.

Every function returns a list of flat dicts (numbers, strings, None), ready for
``pandas.DataFrame(rows)`` or a plot; the notebooks and ``gpupas inspect`` share them. Most read only
manifests; :func:`planes` (with ``entropy``) reads the chunks of the planes asked for, and only
those (a read of the high planes never opens a tier that holds only low ones); :func:`changes` and
:func:`savings` decode tensors.

>>> import numpy as np, gpupas, tempfile
>>> from gpupas import inspect
>>> a = gpupas.create_archive(tempfile.mkdtemp() + "/arc")
>>> w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
>>> s0 = a.commit({"fc.weight": w}).id
>>> s1 = a.commit({"fc.weight": w + 1e-3}, base=s0).id
>>> [r["delta_tensors"] for r in inspect.snapshots(a)]
[0, 1]
>>> [(r["plane"], r["tier"]) for r in inspect.plane_summary(a, s1)]
[(0, 'local'), (1, 'local'), (2, 'local'), (3, 'local')]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from gpupas.format.layout import needed_chunks, plane_ranges
from gpupas.format.manifest import Manifest, TensorEntry
from gpupas.pas.context import entropy as _entropy
from gpupas.pas.rows import rows_of
from gpupas.pas.schemes import describe
from gpupas.store.tiers import LOCAL

SAMPLE = 1 << 16  # bytes of each plane whose order-0 entropy is measured (evenly spread)


def _archive(source: Any) -> Any:
    """The archive of ``source`` (an Archive, or a Repository)."""
    return getattr(source, "archive", source)


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: its name without the last dotted part (``encoder.0.weight`` ->
    ``encoder.0``)."""
    return name.rpartition(".")[0] or name


def _tier_of(m: Manifest, stream: int) -> str:
    return m.streams[stream].tier or LOCAL


# -- snapshots ---------------------------------------------------------------------------------------------------
def snapshots(source: Any, which: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """One row per snapshot (all, oldest first, or ``which``): version (where ``source`` is a Repository),
    base, depth, sizes, delta tensors, bytes local and in tiers. Reads manifests only. A snapshot whose
    manifest (or a base's) cannot be read still has its row: what is wrong in ``damaged`` (else None), its
    version and index, the rest None; a snapshot that is not there raises SnapshotNotFoundError."""
    from gpupas.errors import IntegrityError, SnapshotNotFoundError

    archive = _archive(source)
    owners: dict[str, dict[str, Any]] = {}
    if archive is not source and hasattr(source, "versions"):
        for v in source.versions():
            for i, s in enumerate(v.snapshots):
                owners.setdefault(s["id"], {"version": v.id, "version_name": v.name, "index": i + 1,
                                            "step": s.get("step")})
    sids = list(which) if which is not None else archive.snapshots()
    out = []
    for sid in sids:
        owner = owners.get(sid, {})
        m = None
        try:
            m = archive.manifest(sid)
            depth = archive.depth(sid)
        except (IntegrityError, SnapshotNotFoundError) as exc:  # listed, as Archive.snapshots lists it: `gpupas
            # verify` says more. Not a snapshot that is not there (a mistyped id, one discarded meanwhile), nor
            # a store out of reach or a manifest of a newer format: those are no damage
            if m is None and isinstance(exc, SnapshotNotFoundError):
                raise
            out.append(dict.fromkeys(_SNAPSHOT_ROW) | {"snapshot": sid, "version": owner.get("version"),
                                                         "version_name": owner.get("version_name"),
                                                         "index": owner.get("index"), "damaged": str(exc)})
            continue
        tiers: dict[str, int] = {}
        for st in m.streams:
            if st.tier is not None:
                tiers[st.tier] = tiers.get(st.tier, 0) + st.stored
        out.append({
            "snapshot": sid, "version": owner.get("version"), "version_name": owner.get("version_name"),
            "index": owner.get("index"), "step": owner.get("step"), "created": m.created, "base": m.base,
            "depth": depth, "setting": m.setting, "tensors": len(m.tensors),
            "delta_tensors": sum(1 for e in m.tensors if e.reads_base), "raw_bytes": m.raw_bytes,
            "stored_bytes": m.stored_bytes, "ratio": m.stored_bytes / m.raw_bytes if m.raw_bytes else 0.0,
            "streams": len(m.streams), "local_bytes": sum(st.stored for st in m.streams if st.tier is None),
            "tier_bytes": sum(tiers.values()), "tiers": ",".join(sorted(tiers)), "revision": m.revision,
            "damaged": None,
        })
    return out


_SNAPSHOT_ROW = ("snapshot", "version", "version_name", "index", "step", "created", "base", "depth", "setting",
                 "tensors", "delta_tensors", "raw_bytes", "stored_bytes", "ratio", "streams", "local_bytes",
                 "tier_bytes", "tiers", "revision", "damaged")


# -- tensors and layers ------------------------------------------------------------------------------------------
def tensors(source: Any, snapshot: str) -> list[dict[str, Any]]:
    """One row per tensor of ``snapshot``: layer, dtype, shape, parameters, raw and stored bytes,
    encoding, context split, the fraction of rows coded (below 1 where unchanged rows were left out)."""
    m = _archive(source).manifest(snapshot)
    out = []
    for i, e in enumerate(m.tensors):
        rows, _ = rows_of(e.shape)
        out.append({
            "snapshot": snapshot, "position": i, "name": e.name, "layer": layer_of(e.name), "dtype": e.dtype,
            "shape": "x".join(map(str, e.shape)) or "scalar", "params": int(np.prod(e.shape, dtype=np.int64)),
            "nbytes": e.nbytes, "stored": e.stored, "ratio": e.stored / e.nbytes if e.nbytes else 0.0,
            "enc": e.enc, "ctx": e.ctx, "rows_coded": 1.0 if e.rows is None else e.rows / max(rows, 1),
            "planes": e.width, "lossy": None if e.scheme is None else describe(e.scheme),
            "tiers": ",".join(sorted({_tier_of(m, p.stream) for p in e.parts})),
        })
    return out


def layers(source: Any, snapshot: str) -> list[dict[str, Any]]:
    """One row per layer of ``snapshot`` (tensors grouped by :func:`layer_of`), in the order the layers
    first appear: tensors, parameters, raw and stored bytes, ratio, the encodings used."""
    rows: dict[str, dict[str, Any]] = {}
    for t in tensors(source, snapshot):
        r = rows.setdefault(t["layer"], {"snapshot": snapshot, "position": len(rows), "layer": t["layer"],
                                         "tensors": 0, "params": 0, "nbytes": 0, "stored": 0, "encodings": set()})
        r["tensors"] += 1
        r["params"] += t["params"]
        r["nbytes"] += t["nbytes"]
        r["stored"] += t["stored"]
        r["encodings"].add(t["enc"])
    for r in rows.values():
        r["ratio"] = r["stored"] / r["nbytes"] if r["nbytes"] else 0.0
        r["encodings"] = ",".join(sorted(r["encodings"]))
    return list(rows.values())


# -- planes ------------------------------------------------------------------------------------------------------
def read_plane_bytes(archive: Any, snapshot: str, entries: Sequence[TensorEntry] | None = None,
                     planes: int | None = None) -> dict[tuple[str, int], np.ndarray]:
    """The coded bytes of each plane of ``entries`` (all tensors by default) as stored: (tensor, plane)
    -> uint8 array, its segments joined (for a delta, the delta's planes; context-split planes in their
    sorted order). ``planes``: only the highest that many, reading only the streams (and chunks) that
    hold them, so a tier holding only lower planes is never opened."""
    pieces = _plane_pieces(archive, snapshot, entries, planes)
    return {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in pieces.items()}


def _plane_pieces(archive: Any, snapshot: str, entries: Sequence[TensorEntry] | None,
                  planes: int | None) -> dict[tuple[str, int], list[np.ndarray]]:
    """:func:`read_plane_bytes` before its segments are joined: views of the decoded streams."""
    from gpupas.backend import get_backend
    from gpupas.engine import decode

    m = archive.manifest(snapshot)
    entries = list(m.tensors if entries is None else entries)
    need = needed_chunks(m, entries, planes)
    bufs = {}
    backend = get_backend("numpy")
    for s, chunks in need.items():
        st = m.streams[s]
        bufs[s] = np.zeros(st.nchunks * st.chunk_size, np.uint8)
        decode._read_stream(archive.store, m, s, chunks, bufs[s], backend, archive.executor, True)
    out: dict[tuple[str, int], list[np.ndarray]] = {}
    for e in entries:
        for s, start, plane, a, b in plane_ranges(e, m.segment, planes):
            out.setdefault((e.name, plane), []).append(bufs[s][start : start + b - a])
    return out


def _sampled_entropy(pieces: Sequence[np.ndarray], sample: int) -> float:
    """The entropy of every ``size // sample``-th byte of the pieces joined (not joined: a plane's sample,
    not a copy of the plane), at most 8 bits per byte (the small-sample correction can carry an evenly
    spread sample past what a byte holds)."""
    starts = np.cumsum([0] + [p.size for p in pieces])  # of each piece in the joined bytes, then the end
    step = max(1, int(starts[-1]) // sample)
    take = np.arange(0, min(int(starts[-1]), step * sample), step)
    cut = np.searchsorted(take, starts)  # the samples in piece k: take[cut[k]:cut[k + 1]]
    data = np.empty(take.size, np.uint8)
    for k, p in enumerate(pieces):
        data[cut[k]:cut[k + 1]] = p[take[cut[k]:cut[k + 1]] - starts[k]]
    return min(8.0, float(_entropy(data)))


def planes(source: Any, snapshot: str, *, planes: int | None = None, entropy: bool = True,
           sample: int = SAMPLE) -> list[dict[str, Any]]:
    """One row per tensor and plane of ``snapshot`` (plane 0: the most significant byte): coded values,
    stored bytes, stored bits per value, the store that holds it (``local`` or a tier) and, with
    ``entropy``, the order-0 entropy (bits per byte) of ``sample`` bytes of the plane as coded.

    ``planes``: only the highest that many planes; only their chunks are read."""
    return _plane_rows(source, snapshot, planes, entropy, sample)


def _plane_rows(source: Any, snapshot: str, planes: int | None, entropy: bool, sample: int) -> list[dict[str, Any]]:
    archive = _archive(source)
    m = archive.manifest(snapshot)
    data = _plane_pieces(archive, snapshot, None, planes) if entropy else {}
    out = []
    for e in m.tensors:
        tier = {}
        for p in e.parts:
            for k in range(p.count):
                tier[p.first + k] = _tier_of(m, p.stream)
        for p in range(e.width if planes is None else min(planes, e.width)):
            stored = e.plane_bytes[p] if p < len(e.plane_bytes) else None
            row = {"snapshot": snapshot, "tensor": e.name, "layer": layer_of(e.name), "plane": p, "dtype": e.dtype,
                   "enc": e.enc, "values": e.values, "stored": stored,
                   "bits_per_value": None if stored is None or not e.values else 8 * stored / e.values,
                   "tier": tier.get(p, LOCAL)}
            if entropy:
                got = data.get((e.name, p))
                row["entropy"] = None if not got or not sum(x.size for x in got) else _sampled_entropy(got, sample)
            out.append(row)
    return out


def plane_summary(source: Any, snapshot: str, *, planes: int | None = None, entropy: bool = False,
                  sample: int = SAMPLE) -> list[dict[str, Any]]:
    """One row per plane index of ``snapshot``, over all its tensors: coded bytes, stored bytes, stored
    bits per byte, the stores that hold it, and (``entropy``) the value-weighted mean entropy. Row masks and
    'pred' factors are in no plane: the rows add up to the snapshot's stored bytes less theirs."""
    rows: dict[int, dict[str, Any]] = {}
    for r in _plane_rows(source, snapshot, planes, entropy, sample):
        t = rows.setdefault(r["plane"], {"snapshot": snapshot, "plane": r["plane"], "bytes": 0, "stored": 0,
                                         "tier": set(), "_h": 0.0, "_n": 0})
        t["bytes"] += r["values"]
        t["stored"] += r["stored"] or 0
        t["tier"].add(r["tier"])
        if r.get("entropy") is not None:
            t["_h"] += r["entropy"] * r["values"]
            t["_n"] += r["values"]
    out = []
    for p in sorted(rows):
        t = rows[p]
        h, n = t.pop("_h"), t.pop("_n")
        t["tier"] = ",".join(sorted(t["tier"]))
        t["bits_per_byte"] = 8 * t["stored"] / t["bytes"] if t["bytes"] else 0.0
        if entropy:
            t["entropy"] = h / n if n else None
        out.append(t)
    return out


# -- change against a base ---------------------------------------------------------------------------------------
def changes(source: Any, snapshot: str, base: str | None = None) -> list[dict[str, Any]]:
    """One row per tensor of ``snapshot`` present in ``base`` (default: its delta base) with the same
    shape and dtype (only tensors both have are decoded): how it is stored (encoding, stored bytes), the
    fraction of values and of rows whose bits changed, and for floats the largest and mean absolute change
    and the relative L2 change."""
    from gpupas.versions.inspect import diff_tensors

    archive = _archive(source)
    m = archive.manifest(snapshot)
    base = m.base if base is None else base
    if base is None:
        return []
    have = archive.manifest(base).by_name
    both = [e.name for e in m.tensors if e.name in have]  # a tensor only one side has is never read
    a, b = archive.restore(base, both), archive.restore(snapshot, both)
    d = {r["name"]: r for r in diff_tensors(a, b)["tensors"]}
    out = []
    for e in m.tensors:
        r = d.get(e.name)
        if r is None or "changed" not in r:
            continue
        x, y = a[e.name], b[e.name]
        rows, _ = rows_of(e.shape)
        if x.size:
            diff = x.reshape(-1).view(np.uint8).reshape(rows, -1) != y.reshape(-1).view(np.uint8).reshape(rows, -1)
            rows_changed = float(diff.any(axis=1).mean())
        else:
            rows_changed = 0.0
        out.append({"snapshot": snapshot, "base": base, "tensor": e.name, "layer": layer_of(e.name),
                    "enc": e.enc if base == m.base else None, "nbytes": e.nbytes, "stored": e.stored,
                    "changed": r["changed"], "rows_changed": rows_changed, "max_abs": r.get("max_abs"),
                    "mean_abs": r.get("mean_abs"), "rel_l2": r.get("rel_l2"), "not_finite": r.get("not_finite")})
    return out


def savings(source: Any, which: Iterable[str] | None = None, *, fraction: float = 1 / 16) -> list[dict[str, Any]]:
    """What deltas save, per snapshot: stored bytes next to the bytes it would take stored whole
    (measured where it is stored whole, else the encoder run on ``fraction`` of every tensor and scaled
    up, as the planner estimates)."""
    from gpupas.plan.graph import ROOT
    from gpupas.plan.measure import measure_edges

    archive = _archive(source)
    sids = list(which) if which is not None else archive.snapshots()
    ms = {sid: archive.manifest(sid) for sid in sids}
    todo = [sid for sid in sids if any(e.reads_base for e in ms[sid].tensors)]
    est, _ = measure_edges(archive, set(), todo, fraction=fraction) if todo else ({}, None)
    out = []
    for sid in sids:
        m = ms[sid]
        measured = sid not in todo
        whole = m.stored_bytes if measured else sum(x for x, _ in est[(ROOT, sid)].values())
        out.append({"snapshot": sid, "base": m.base, "raw_bytes": m.raw_bytes, "stored_bytes": m.stored_bytes,
                    "whole_bytes": whole, "saved_bytes": whole - m.stored_bytes, "whole_measured": measured})
    return out


# -- the storage plan ------------------------------------------------------------------------------------------
def tradeoff(source: Any, alphas: Sequence[float] = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0), *,
             scheme: str = "independent", fraction: float = 1 / 16) -> list[dict[str, Any]]:
    """The storage-plan trade-off: for each budget factor ``alpha`` and planner (and the archive as it
    is), total stored bytes, total and slowest modelled recreation seconds, deepest chain, snapshots over
    budget. The storage graph is measured once (sizes sampled at ``fraction``)."""
    from gpupas.plan.graph import evaluate
    from gpupas.plan.measure import storage_graph
    from gpupas.plan.planners import plan_all

    archive = _archive(source)
    g, _ = storage_graph(archive, fraction=fraction)
    out = []
    for alpha in alphas:
        plans = plan_all(g, alpha, scheme=scheme, max_depth=archive.max_chain)
        plans["current"] = evaluate(g, g.current, "current", scheme, plans["pas-mt"].budgets)
        for name, p in plans.items():
            out.append({"alpha": alpha, "planner": name, "storage": p.storage, "recreation": p.total_recreation,
                        "max_recreation": max(p.recreation.values(), default=0.0), "max_depth": p.max_depth,
                        "over_budget": len(p.violations)})
    return out
