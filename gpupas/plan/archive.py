"""Planning a whole archive: its storage graph, every planner's plan, and the one to carry out.

Plans are made at snapshot granularity: a snapshot is one vertex (its storage: the sum over its
tensors, each whole or a delta on the base as the encoder chooses; its recreation: decoding it
whole once its base is decoded), because gpupas gives each snapshot one base (``Manifest.base``)
and decodes along it. The model counts the whole base chain even where some tensors are stored
whole, so it errs on the slow side: a budget met in the model is met by the archive.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from gpupas.errors import ConflictError, InvalidInputError, SnapshotNotFoundError
from gpupas.plan.costs import DEFAULT, CostModel
from gpupas.plan.graph import ROOT, Plan, StorageGraph, evaluate
from gpupas.plan.measure import Estimates, measure_edges, storage_graph
from gpupas.plan.planners import PLANNERS, plan_all

_TRIES = 4  # plans of an archive whose snapshots others discard or revise meanwhile

COMPARE = ("materialized", "mst", "spt", "last", "pas-mt", "pas-pt")


@dataclass
class ArchivePlan:
    """Every planner's plan of an archive, the current layout, and the chosen plan (``"pas"``)."""

    graph: StorageGraph
    plans: dict[str, Plan]
    current: Plan
    estimates: Estimates
    model: CostModel
    alpha: float | None
    scheme: str
    chosen: str = "pas"
    notes: list[str] = field(default_factory=list)
    reencoded: dict[str, float] = field(default_factory=dict)  # the chosen plan's snapshots re-encoded on their base
    dropped_bases: dict[str, str] = field(default_factory=dict)  # snapshot -> its base now, dropped: left out
    unkept: tuple[set[str], set[str]] = field(default_factory=lambda: (set(), set()))  # :func:`unkept`'s, left out

    @property
    def plan(self) -> Plan:
        return self.plans[self.chosen]

    @property
    def target(self) -> dict[str, str | None]:
        """Snapshot -> the base the chosen plan gives it (None: stored whole)."""
        return {v: _base(p) for v, p in _parents(self.plan).items()}

    def measured(self, plan: Plan) -> bool:
        """Whether ``plan``'s storage is measured (every form it keeps encoded in full), not a sampled estimate."""
        return all(self.graph.edge(u, v).measured for v, u in _parents(plan).items() if v != ROOT)

    def rows(self) -> list[dict[str, Any]]:
        """Per snapshot: base, depth and recreation now and in the plan, and its budget (a base now that was dropped
        from its version is named, ``base_now_dropped``; the graph counts the snapshot whole now)."""
        p, now = self.plan, self.current
        out = []
        for sid in cast("list[str]", self.graph.vertices):  # (snapshot ids)
            out.append({"snapshot": sid, "base_now": self.dropped_bases.get(sid) or _base(now.parent[sid]),
                        "base_now_dropped": sid in self.dropped_bases, "depth_now": now.depth[sid],
                        "recreation_now": now.recreation[sid], "base": _base(p.parent[sid]), "depth": p.depth[sid],
                        "recreation": p.recreation[sid],
                        "budget": None if p.budgets is None else p.budgets.get(sid),
                        "stored": self.reencoded.get(sid, self.graph.edges[sid][p.parent[sid]].storage),
                        "measured": sid in self.reencoded or self.graph.edges[sid][p.parent[sid]].measured})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "scheme": self.scheme, "model": self.model.describe(),
                "estimate": self.estimates.describe(), "chosen": self.chosen, "notes": self.notes,
                "current": self.current.summary() | {"measured": self.measured(self.current)},
                "plans": {k: v.summary() | {"measured": self.measured(v)} for k, v in self.plans.items()},
                "snapshots": self.rows(), "target": self.target}


def _measure(archive: Any, g: StorageGraph, plan: Plan, setting: str) -> bool:
    """Replace the estimated sizes of the edges ``plan`` takes by exact ones (those forms encoded in full),
    in ``g``; whether any changed. A plan meant to store less must not store more when carried out."""
    guessed = [(u, v) for v, u in _parents(plan).items() if v != ROOT and not g.edge(u, v).measured]
    if not guessed:
        return False
    exact, _ = measure_edges(archive, {(u, v) for u, v in guessed if u != ROOT}, sorted({v for _, v in guessed}),
                             fraction=1.0, setting=setting)
    for u, v in guessed:
        e = g.edge(u, v)
        e.storage, e.measured = float(sum(x for x, _ in exact[(u, v)].values())), True
    return True


def _regrand(archive: Any, g: StorageGraph, plan: Plan, setting: str,
             sizes: dict[tuple[str, str], float]) -> dict[str, float]:
    """The sizes of the snapshots ``plan`` keeps on their base while it moves that base's own base: their 'pred'
    tensors extrapolate from it, so ``gpupas compact`` re-encodes them, and the size the graph holds (their
    'pred' form now) no longer holds. Measured as a plain delta (no grand-base), what the encoder falls back
    to: an upper bound. ``sizes``: (base, snapshot) -> those measured before (each edge is measured once)."""
    moved = []
    for v, u in _parents(plan).items():
        if u != ROOT and u == g.current.get(v):
            grand = archive.manifest(v).grand
            if grand is not None and grand != _base(plan.parent[u]):
                moved.append((u, v))
    new = {e for e in moved if e not in sizes}
    if new:
        exact, _ = measure_edges(archive, new, sorted({v for _, v in new}), fraction=1.0, setting=setting)
        sizes.update({e: float(sum(x for x, _ in exact[e].values())) for e in new})
    return {v: sizes[(u, v)] for u, v in moved}


def _base(p: Any) -> str | None:
    return None if p == ROOT else p


def _parents(plan: Plan) -> dict[str, str]:
    """Each snapshot's parent in ``plan`` (``ROOT``: stored whole): an archive's vertices are snapshot ids."""
    return cast("dict[str, str]", plan.parent)


def plan_archive(archive: Any, alpha: float | None = 2.0, *, scheme: str = "independent",
                 budgets: Mapping[str, float] | None = None, pairs: Iterable[tuple[str, str]] = (),
                 fraction: float = 1 / 16, model: CostModel = DEFAULT, setting: str = "default",
                 planner: str = "pas", no_slower: bool = False) -> ArchivePlan:
    """Plan ``archive`` (an open :class:`~gpupas.archive.Archive`): budgets of ``alpha`` x each
    snapshot's recreation under the shortest-path tree and/or ``budgets`` (snapshot -> seconds);
    ``pairs`` (base, snapshot) are extra candidate edges; sizes sampled at ``fraction`` (1: exact).
    Chains stay within the archive's ``max_chain``. ``no_slower``: also budget every snapshot its
    recreation under the current layout, and keep the current layout where the plan would store more
    (``gpupas compact`` without ``--alpha``: store less, restore nothing slower).

    >>> import numpy as np, gpupas, tempfile
    >>> a = gpupas.create_archive(tempfile.mkdtemp() + "/arc")
    >>> w = np.random.default_rng(0).standard_normal(20000).astype(np.float32)
    >>> s = [a.commit({"w": w}).id]
    >>> s += [a.commit({"w": w + 1e-3 * k}, base=s[-1]).id for k in (1, 2, 3)]
    >>> p = plan_archive(a, alpha=1.0)
    >>> [p.target[x] for x in s] == [None] * 4  # alpha 1: every snapshot as fast as can be: whole
    True
    """
    if planner not in (*PLANNERS, "pas"):
        raise InvalidInputError(f"planner must be one of {', '.join((*PLANNERS, 'pas'))}, not {planner!r}")
    pairs = list(pairs)
    for sid in {x for pair in pairs for x in pair} | set(budgets or {}):
        archive.manifest(sid)  # SnapshotNotFoundError names one that does not exist
    args = (archive, alpha, scheme, budgets, pairs, fraction, model, setting, planner, no_slower)
    for _ in range(_TRIES - 1):
        try:
            return _plan(*args)
        except (SnapshotNotFoundError, ConflictError):  # a snapshot listed was discarded or revised meanwhile
            archive.refresh()  # plan again on the snapshots there now
    try:
        return _plan(*args)
    except (SnapshotNotFoundError, ConflictError) as exc:
        raise ConflictError(f"{archive.location}: snapshots kept changing while they were planned ({_TRIES} tries; "
                            f"last: {exc}); commits that fail discard what they wrote: plan again when they are "
                            "done") from exc


def unkept(archive: Any) -> tuple[set[str], set[str]]:
    """Snapshots of ``archive`` that no version keeps (dropped from their version, or left by a killed commit):
    (those no kept snapshot is built on, which gc removes; those kept snapshots are built on, which gc keeps
    while they are). No plan keeps either: a kept snapshot on one is re-based, or stored whole. Both empty in an
    archive without versions, or where a version record cannot be read (gc removes nothing then)."""
    from gpupas.errors import GpupasError
    from gpupas.versions import verify
    from gpupas.versions.records import Records

    try:
        recs, ids = Records(archive.store).every_version()
    except GpupasError:
        return set(), set()
    if not ids:
        return set(), set()
    why = verify.kept(archive.store, recs, set(ids))
    listed = set(archive.store.list_snapshots())
    return listed - set(why), {s for s, (kind, _) in why.items() if kind == "base"}


def _plan(archive: Any, alpha: float | None, scheme: str, budgets: Mapping[str, float] | None,
          pairs: list[tuple[str, str]], fraction: float, model: CostModel, setting: str, planner: str,
          no_slower: bool) -> ArchivePlan:
    left_out = unkept(archive)
    gone = set().union(*left_out)  # dropped (or a killed commit's): no plan keeps one or builds on one
    g, est = storage_graph(archive, model=model, fraction=fraction, pairs=pairs, setting=setting,
                           snapshots=[s for s in archive.snapshots() if s not in gone] if gone else None)
    on_dropped = {s: b for s in cast("list[str]", g.vertices) if (b := archive.manifest(s).base) in gone}
    absolute = dict(budgets or {})
    if no_slower:
        now = evaluate(g, g.current, "current", scheme)
        for group, seconds in now.recreation.items():
            if group != ROOT:  # a hair of slack: the same tree summed in another order must still fit
                absolute[group] = min(absolute.get(group, float("inf")), seconds * (1 + 1e-9))
    plans = plan_all(g, alpha, scheme=scheme, absolute=absolute, max_depth=archive.max_chain)
    current = evaluate(g, g.current, "current", scheme, plans["pas-mt"].budgets)
    notes = list(g.notes)
    if no_slower and not plans[planner].violations and _measure(archive, g, plans[planner], setting):
        again = {id(p): evaluate(g, p.parent, p.name, scheme, p.budgets) for p in plans.values()}
        plans = {k: again[id(p)] for k, p in plans.items()}  # every plan on the exact sizes (one object per plan)
        current = evaluate(g, g.current, "current", scheme, plans["pas-mt"].budgets)
    # Every plan's storage is what compact would store carrying it out, the current layout's too (which stores
    # whole the snapshots on dropped ones): one layout, one size, whichever plan is chosen.
    sizes: dict[tuple[str, str], float] = {}
    regrand: dict[int, dict[str, float]] = {}
    for p in {id(p): p for p in [*plans.values(), current]}.values():
        regrand[id(p)] = r = _regrand(archive, g, p, setting, sizes)
        p.storage += sum(x - g.edge(p.parent[v], v).storage for v, x in r.items())
    reencoded = regrand[id(plans[planner])]
    best = plans[planner]
    if no_slower and (best.violations or (best.storage, best.total_recreation) >= (current.storage,
                                                                                   current.total_recreation)):
        plans["current"] = current
        planner = "current"
        reencoded = regrand[id(current)]
        notes.append(f"no plan stores less without restoring some snapshot slower (the best, its new forms "
                     f"measured exactly, stores {best.storage:,.0f} bytes; now {current.storage:,.0f}): the layout "
                     "stays as it is" + (f", but for {len(on_dropped)} snapshot(s) on dropped ones, stored whole so gc "
                                         "can free those" if on_dropped else ""))
    return ArchivePlan(g, plans, current, est, model, alpha, scheme, planner, notes, reencoded, on_dropped, left_out)
