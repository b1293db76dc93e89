"""The storage graph of an archive: candidate delta edges, their sizes measured or sampled.

Candidates: each snapshot's current base (and whole), lineage neighbours (consecutive snapshots
of a version both ways, the snapshot two back, a version's first snapshot and its parent
version's latest, both ways), or, in an archive without versions, the same along current bases
and creation order; plus pairs the caller names. Storage cost: where the archive stores the
edge now, its measured size; elsewhere the real encoder's size on a sample of every tensor (whole
rows spread evenly over the tensor, ``fraction`` of it; small tensors whole) scaled back up
(``fraction=1``: the exact size). Each current edge is also estimated, so the estimate's error is
measured on the archive itself (:class:`Estimates`). 'pred' is not sampled (it needs a grand-base):
an estimate errs on the large side there.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpupas.outputs import remove_if_stale
from gpupas.plan.costs import DEFAULT, CostModel
from gpupas.plan.graph import ROOT, StorageGraph

SCRATCH_PREFIX = "gpupas-plan-"  # the temporary archive a plan codes its sampled deltas in
WHOLE_BELOW = 1 << 16  # tensors of fewer bytes are sampled whole
WINDOW = 4096  # values per window where a tensor is sampled by windows (fewer than two axes)
Coded = tuple[int, bool]  # a tensor's stored bytes, and whether it is coded as a delta (reads its base)


@dataclass
class Estimates:
    """Sampled sizes next to measured ones (the archive's current edges): the estimate's error."""

    fraction: float
    pairs: list[tuple[str, str | None, float, int]] = field(default_factory=list)  # (snapshot, base, est, measured)
    seconds: float = 0.0

    def errors(self) -> list[float]:
        return [(est - got) / got for _, _, est, got in self.pairs if got > 0]

    def describe(self) -> str:
        errs = self.errors()
        if not errs:
            return f"sampled {100 * self.fraction:.3g}% of every tensor ({self.seconds:.1f} s); nothing to compare"
        total = sum(est for *_, est, _ in self.pairs) / max(1, sum(got for *_, got in self.pairs)) - 1
        mags = sorted(abs(e) for e in errs)
        return (f"sampled {100 * self.fraction:.3g}% of every tensor ({self.seconds:.1f} s): on the {len(errs)} "
                f"edges the archive stores, estimate vs measured: median |error| {100 * mags[len(mags) // 2]:.1f}%, "
                f"max {100 * mags[-1]:.1f}%, total {100 * total:+.1f}%")


def lineage_runs(archive: Any) -> list[list[str]]:
    """Sequences of snapshots along which deltas are natural: each version's snapshots in order,
    preceded by its first parent's latest snapshot; in an archive without versions, chains of
    current bases and then creation order."""
    from gpupas.versions.records import Records

    have = set(archive.store.list_snapshots())
    records = Records(archive.store)
    runs: list[list[str]] = []
    seen: set[str] = set()
    by_id: dict[int, Any] = {}
    for vid in records.version_ids():
        try:
            rec = records.version(vid)
        except Exception:  # a damaged record: verify reports it; plan without it
            continue
        if rec is not None:
            by_id[vid] = rec
    for vid in sorted(by_id):
        rec = by_id[vid]
        run = [s["id"] for s in rec.get("snapshots", []) if s.get("id") in have]
        parents = [p for p in rec.get("parents", []) if p in by_id and by_id[p].get("latest") in have]
        if parents:
            run = [by_id[parents[0]]["latest"], *run]
        if len(run) > 1:
            runs.append(run)
        seen.update(run)
    rest = [s for s in archive.snapshots() if s not in seen]
    if rest:
        runs.append(rest)  # creation order
        for s in rest:
            b = archive.manifest(s).base
            if b is not None and b in have:  # a base that is missing is damage, found as the snapshot is read
                runs.append([b, s])
    return runs


def candidate_pairs(archive: Any, pairs: Iterable[tuple[str, str]] = (), window: int = 2) -> set[tuple[str, str]]:
    """(base, snapshot) candidates: current bases, lineage neighbours within ``window``, twins of other runs
    (:func:`twins`), and ``pairs``."""
    have = set(archive.store.list_snapshots())
    out: set[tuple[str, str]] = set()
    for s in have:
        b = archive.manifest(s).base
        if b is not None and b in have:
            out.add((b, s))
    runs = lineage_runs(archive)
    for run in runs:
        for i, v in enumerate(run):
            for k in range(1, window + 1):
                if i - k >= 0:
                    out.add((run[i - k], v))
                    if k == 1:
                        out.add((v, run[i - k]))
    out |= twins(archive, runs)
    for u, v in pairs:
        if u not in have or v not in have:
            missing = u if u not in have else v
            raise KeyError(f"no snapshot {missing!r} in {archive.location}")
        out.add((u, v))
    return {(u, v) for u, v in out if u != v}


def twins(archive: Any, runs: list[list[str]]) -> set[tuple[str, str]]:
    """Snapshots at the same place of different runs whose tensors have the same names, dtypes and shapes (the
    n-th checkpoint of two runs of a sweep, a rerun, a copy trained on): each to the last such one before it,
    both ways. Lineage alone never pairs them, and two runs can be near or even bit-identical."""
    last: dict[tuple[int, tuple[Any, ...]], str] = {}
    out: set[tuple[str, str]] = set()
    for run in runs:
        for i, s in enumerate(run):
            key = (i, tuple((e.name, e.dtype, tuple(e.shape)) for e in archive.manifest(s).tensors))
            prev = last.get(key)
            if prev is not None and prev != s:
                out |= {(prev, s), (s, prev)}
            last[key] = s
    return out


def parents_first(archive: Any, sids: Iterable[str], done: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``sids`` and the snapshots they read, each after every snapshot it reads (base, grand). ``done``:
    snapshots whose whole chains an earlier call placed (they are not read again, nor what they read)."""
    from gpupas.engine.chain import dependencies, dependencies_first
    from gpupas.errors import IntegrityError, SnapshotNotFoundError

    sids = list(sids)
    starts, user = set(sids), dict[str, str]()  # user: a snapshot that reads each dependency

    def loop(s: str, x: str) -> None:
        raise IntegrityError(f"snapshot {s}: its delta chain loops back to {x}; restore the archive from a copy")

    def deps_of(x: str) -> list[str]:
        if x in done:
            return []
        try:  # one asked for that is not there is not found; a base that is not there is damage to its chain
            m = archive.manifest(x)
        except SnapshotNotFoundError:
            if x in starts and x not in user:
                raise
            raise IntegrityError(f"snapshot {user.get(x, x)}: a snapshot its delta chain reads ({x} or its base) is "
                                 "missing; restore the archive from a copy") from None
        try:  # formats 1 and 2: 'pred' tensors name their grand through the base's manifest
            ds = [d for d, _ in dependencies(m, None, archive.manifest)]
        except SnapshotNotFoundError:
            raise IntegrityError(f"snapshot {x}: a snapshot its delta chain reads ({m.base} or its base) is "
                                 "missing; restore the archive from a copy") from None
        for d in ds:
            user.setdefault(d, x)
        return ds

    return dependencies_first(sids, deps_of, loop)


def iter_bits(archive: Any, sids: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(snapshot, its raw bits) for every snapshot of ``sids``, parents first, each decoded once
    while its children still come (a small cache of decoded bases)."""
    from gpupas.backend import get_backend
    from gpupas.engine.bases import BaseCache
    from gpupas.engine.chain import read_bits

    backend = get_backend("numpy")
    cache = BaseCache(8)
    want = set(sids)
    for sid in parents_first(archive, want):
        bits, _ = read_bits(archive.store, sid, None, manifests=archive.manifest, backend=backend,
                            executor=archive.executor, cache=cache)
        cache.put(sid, bits)
        if sid in want:
            yield sid, bits


def sample(bits: Any, entry: Any, fraction: float) -> Any:
    """A sample of one tensor (values, as the tensor's dtype): whole rows spread evenly over its
    first axis, or evenly spread windows of a flat tensor; small tensors whole."""
    import numpy as np

    from gpupas.pas.planes import from_bits

    values = from_bits(bits, entry.layout, entry.shape)
    if fraction >= 1 or entry.nbytes <= WHOLE_BELOW or values.size == 0:
        return values
    if values.ndim >= 2 and values.shape[0] >= 8:
        k = max(1, round(values.shape[0] * fraction))
        rows = np.unique(np.linspace(0, values.shape[0] - 1, k).round().astype(np.int64))
        return np.ascontiguousarray(values[rows])
    flat = values.reshape(-1)
    m = max(1, round(flat.size * fraction / WINDOW))
    if m * WINDOW >= flat.size:
        return values
    starts = np.linspace(0, flat.size - WINDOW, m).round().astype(np.int64)
    return np.concatenate([flat[a:a + WINDOW] for a in starts])


def _scratch(p: Path) -> bool:
    """Whether ``p`` is what a plan's scratch folder is: a folder (not a link) holding its archive ``a`` alone (or
    nothing yet), not a file or folder of the user's that happens to share its prefix."""
    try:
        return p.is_dir() and not p.is_symlink() and set(os.listdir(p)) <= {"a"}
    except OSError:
        return False


def _schemes(archive: Any, sid: str) -> dict[str, dict[str, Any]]:
    """The lossy schemes of snapshot ``sid``'s tensors, with their parameters: a revision codes such a tensor in
    its representation again, whole, whatever its base (a lossless sample of its values sized another form)."""
    from gpupas.pas.schemes import MEMBERS

    return {e.name: {k: v for k, v in e.scheme.items() if k in MEMBERS[e.scheme["name"]]}
            for e in archive.manifest(sid).tensors if e.scheme is not None}


def measure_edges(archive: Any, pairs: set[tuple[str, str]], sids: Sequence[str], *, fraction: float = 1 / 16,
                  setting: str = "default") -> tuple[dict[tuple[str, str], dict[str, Coded]], Estimates]:
    """Sampled per-tensor sizes (and whether each is coded as a delta) of every snapshot whole (key
    ``(ROOT, sid)``) and of every pair ``(base, sid)``, scaled to the whole tensors; and the
    estimate's error on the current edges."""
    from gpupas.archive import create_archive

    t0 = time.perf_counter()
    samples: dict[str, dict[str, Any]] = {}
    scale: dict[str, dict[str, float]] = {}
    need = set(sids) | {u for u, _ in pairs}
    for sid, bits in iter_bits(archive, need):
        m = archive.manifest(sid)
        samples[sid] = {e.name: sample(bits[e.name], e, fraction) for e in m.tensors}
        scale[sid] = {e.name: (e.nbytes / samples[sid][e.name].nbytes if samples[sid][e.name].nbytes else 1.0)
                      for e in m.tensors}
    out: dict[tuple[str, str], dict[str, Coded]] = {}
    for old in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):  # what killed plans left
        if _scratch(old):
            remove_if_stale(old)
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX) as tmp, \
            create_archive(f"{tmp}/a", durable=False, workers=archive.executor.workers) as scratch:
        ids = {sid: f"w{i}" for i, sid in enumerate(sorted(need))}
        for sid in sorted(need):
            m = scratch.commit(samples[sid], snapshot=ids[sid], setting=setting, lossy=_schemes(archive, sid))
            out[(ROOT, sid)] = {e.name: (round(e.stored * scale[sid][e.name]), False) for e in m.tensors}
        for k, (u, v) in enumerate(sorted(pairs)):
            m = scratch.commit(samples[v], base=ids[u], snapshot=f"d{k}", setting=setting, lossy=_schemes(archive, v))
            out[(u, v)] = {e.name: (round(e.stored * scale[v][e.name]), e.reads_base) for e in m.tensors}
            scratch.discard(m.id, force=True)  # nothing is built on it: no scan of every manifest for its
            # children (each a read of the whole scratch archive, which made planning quadratic in snapshots)
    est = Estimates(fraction, seconds=time.perf_counter() - t0)
    for sid in sids:
        m = archive.manifest(sid)
        key = (m.base or ROOT, sid)
        if key in out:
            est.pairs.append((sid, m.base, float(sum(x for x, _ in out[key].values())), m.stored_bytes))
    return out, est


def storage_graph(archive: Any, *, granularity: str = "snapshot", model: CostModel = DEFAULT,
                  fraction: float = 1 / 16, pairs: Iterable[tuple[str, str]] = (), setting: str = "default",
                  snapshots: Iterable[str] | None = None) -> tuple[StorageGraph, Estimates]:
    """The storage graph of ``archive`` (all snapshots, or ``snapshots``): a vertex per snapshot
    (``granularity="snapshot"``) or per tensor of each snapshot (``"tensor"``, a co-usage group
    per snapshot); edges among the candidates of :func:`candidate_pairs`. Recreation costs follow
    ``model``. Returns the graph and the sampled estimate's measured error. A snapshot whose base is left out
    counts as stored whole now (a plan re-bases it, or stores it whole)."""
    from gpupas.engine.stage import delta_candidate

    if granularity not in ("snapshot", "tensor"):
        raise ValueError(f"granularity must be 'snapshot' or 'tensor', not {granularity!r}")
    sids = sorted(snapshots) if snapshots is not None else archive.snapshots()
    keep = set(sids)
    cands = {(u, v) for u, v in candidate_pairs(archive, pairs) if u in keep and v in keep}
    sizes, est = measure_edges(archive, cands, sids, fraction=fraction, setting=setting)
    measured: dict[tuple[str, str], dict[str, Coded]] = {}
    for sid in sids:  # what the archive stores now is measured, not estimated
        m = archive.manifest(sid)
        measured[(m.base or ROOT, sid)] = {e.name: (e.stored, e.reads_base) for e in m.tensors}
    g = StorageGraph()
    g.notes.append(est.describe())
    manifests = {sid: archive.manifest(sid) for sid in sids}

    def cost(key: tuple[str, str]) -> tuple[dict[str, Coded], bool]:
        return (measured[key], True) if key in measured else (sizes[key], fraction >= 1)

    def snapshot_cost(m: Any, per: dict[str, Coded]) -> tuple[int, float]:
        stored = sum(x for x, _ in per.values()) if per is not measured.get((m.base or ROOT, m.id)) else m.stored_bytes
        delta = sum(e.nbytes for e in m.tensors if per[e.name][1])
        return stored, model.seconds(stored, m.raw_bytes, delta)

    def tensor_cost(e: Any, c: Coded, share: float) -> tuple[int, float]:
        return c[0], model.seconds(c[0], e.nbytes, e.nbytes if c[1] else 0, share)

    for sid in sids:
        m = manifests[sid]
        per, ok = cost((ROOT, sid))
        if granularity == "snapshot":
            g.add_vertex(sid, *snapshot_cost(m, per), m.raw_bytes, ok)
            g.current[sid] = m.base if m.base in keep else ROOT
        else:
            share = 1.0 / max(1, len(m.tensors))
            g.groups[sid] = []
            for e in m.tensors:
                g.add_vertex((sid, e.name), *tensor_cost(e, per[e.name], share), e.nbytes, ok)
                g.groups[sid].append((sid, e.name))
                g.current[(sid, e.name)] = (m.base, e.name) if m.base in keep and e.reads_base else ROOT
    for u, v in sorted(cands):
        per, ok = cost((u, v))
        mv = manifests[v]
        if granularity == "snapshot":
            g.add_edge(u, v, *snapshot_cost(mv, per), ok)
        else:
            share = 1.0 / max(1, len(mv.tensors))
            base = manifests[u].by_name
            for e in mv.tensors:
                if delta_candidate(base.get(e.name), e.dtype, e.shape):
                    g.add_edge((u, e.name), (v, e.name), *tensor_cost(e, per[e.name], share), ok)
    return g, est
