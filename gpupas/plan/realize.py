"""A snapshot-level plan as revisions: which snapshots to re-base or re-encode, parents first.

gpupas stores a snapshot's tensors under one manifest with one ``base`` (each tensor a delta on
the base's tensor of the same name, or whole; the encoder picks per tensor), so a plan is carried
out at snapshot granularity: ``Archive.revise(sid, base=plan[sid])``. A tensor-level plan is an
analysis (what per-tensor bases would save); :func:`project` turns one into a snapshot plan.

A snapshot's 'pred' tensors also read its ``grand`` (the base's base when it was encoded). Where a
plan changes a snapshot's base's base, a ``grand`` off the new chain would make its restores
decode another chain: such snapshots are revised too (same base), after their new parents, so
their new ``grand`` lies on the planned chain. Format 1/2 children that extrapolate along a
snapshot being re-based are revised first (as format 3), as ``Archive.revise`` requires.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gpupas.errors import InvalidInputError, SnapshotNotFoundError
from gpupas.plan.graph import ROOT


@dataclass(frozen=True)
class Change:
    """Revise ``snapshot`` onto ``base`` (None: whole); ``after``: the keys of the changes that must
    finish first. ``key``: unique in a plan: the snapshot's id, or :func:`first_key` of it for the
    step that makes a format 1/2 snapshot format 3 before a later change of it."""

    snapshot: str
    old_base: str | None
    base: str | None
    why: str
    after: tuple[str, ...] = ()
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.snapshot)


def first_key(sid: str) -> str:
    """The key of the step that makes snapshot ``sid`` format 3 before its base is re-based."""
    return f"{sid}:format3"


def project(parent: Mapping[Any, Any]) -> dict[str, str | None]:
    """A snapshot plan from a tensor plan (vertices ``(sid, name)``): each snapshot's base is the
    snapshot most of its tensors are deltas on, or None if most are stored whole. An analysis aid:
    budgets must be checked again on the snapshot graph."""
    votes: dict[str, dict[str | None, int]] = {}
    for v, p in parent.items():
        sid = v[0]
        b = None if p == ROOT else p[0]
        votes.setdefault(sid, {}).setdefault(b, 0)
        votes[sid][b] += 1
    return {sid: max(c.items(), key=lambda kv: kv[1])[0] for sid, c in votes.items()}


def changes(target: Mapping[str, str | None], manifest: Callable[[str], Any], *, reencode: Callable[[Any], bool]
            | None = None, snapshots: Iterable[str] = ()) -> list[Change]:
    """The revisions that take the archive to ``target`` (snapshot -> base or None), parents first.

    ``reencode(m)``: whether a snapshot whose base stays must be re-encoded anyway (another setting
    or codec). Snapshots not in ``target`` keep their base; ``snapshots``: the archive's others, so
    that format 1/2 'pred' children of a re-based snapshot are made format 3 also where the target
    leaves them out.
    """
    ms = {sid: manifest(sid) for sid in target}
    new_base = {sid: target[sid] for sid in target}

    def base_of(s: str) -> str | None:
        return new_base[s] if s in new_base else manifest(s).base

    todo: dict[str, str] = {}
    for sid, m in ms.items():
        b = new_base[sid]
        if b != m.base:
            todo[sid] = "re-base" if b is not None else "store whole"
        elif m.grand is not None and b is not None and m.grand != base_of(b):
            todo[sid] = "its 'pred' base is off the new chain"
        elif reencode is not None and reencode(m):
            todo[sid] = "re-encode"
    # format 1/2 'pred' children of re-based snapshots: made format 3 on their old base first, also where
    # they change later themselves (that change may have to follow their base's: a step of its own)
    first: dict[str, str] = {}
    rebased = [sid for sid, why in todo.items() if why in ("re-base", "store whole")]
    pool = dict(ms)
    for other in snapshots if rebased else ():
        if other not in pool:
            try:
                pool[other] = manifest(other)
            except SnapshotNotFoundError:  # discarded since it was listed (a commit that failed)
                pass
    for sid in rebased:
        for other, m in pool.items():
            if m.implicit_grand and m.base == sid and m.has_pred:
                ms.setdefault(other, m)  # a child the target leaves out keeps its base
                new_base.setdefault(other, m.base)
                first[other] = "format 3 before its base is re-based"
                todo.setdefault(other, "its 'pred' base is off the new chain")  # then its grand goes on it
    order = _parents_first(list(todo), base_of)
    out = [Change(s, ms[s].base, ms[s].base, why, key=first_key(s)) for s, why in first.items()]
    for sid in order:
        deps = [first_key(sid)] if sid in first else []
        x = base_of(sid)
        while x is not None:  # the nearest changed ancestor in the new tree
            if x in todo:
                deps.append(x)
                break
            x = base_of(x)
        deps += [c.key for c in out[:len(first)] if ms[c.snapshot].base == sid]  # its format 1/2 children's steps
        out.append(Change(sid, ms[sid].base, new_base[sid], todo[sid], tuple(deps)))
    return out


def _parents_first(sids: list[str], base_of: Callable[[str], str | None]) -> list[str]:
    depth: dict[str, int] = {}
    for s in sids:
        d, x, seen = 0, base_of(s), {s}
        while x is not None:
            if x in seen:
                raise InvalidInputError(f"the plan makes a loop through {x}: no snapshot can be a delta on "
                                        "itself or on a delta on it")
            seen.add(x)
            d += 1
            x = base_of(x)
        depth[s] = d
    return sorted(sids, key=lambda s: (depth[s], s))
