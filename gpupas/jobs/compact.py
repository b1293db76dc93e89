"""Compaction end to end: plan an archive (or take a plan), build the job, run it where asked."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpupas.errors import FormatError, IntegrityError, InvalidInputError, SnapshotNotFoundError
from gpupas.jobs.graph import Job, compact_graph
from gpupas.jobs.run import check, run
from gpupas.jobs.tasks import ArchiveSpec, Reencode


@dataclass
class Compaction:
    """What a compaction changes (or would, in a dry run), and the stored bytes before and after (``unkept``:
    the snapshots of those after that no version keeps and none kept is built on, which gc frees, and
    ``stored_unkept`` their bytes; in a dry run, as they are now)."""

    job: Job
    target: dict[str, str | None]
    results: list[Any] = field(default_factory=list)
    dry_run: bool = False
    stored_before: int = 0
    stored_after: int = 0
    notes: list[str] = field(default_factory=list)
    unkept: list[str] = field(default_factory=list)
    stored_unkept: int = 0

    def to_dict(self) -> dict[str, Any]:
        revised = [r for r in self.results if hasattr(r, "snapshot")]
        removed = [x for r in self.results if isinstance(r, list) for x in r]
        return {"dry_run": self.dry_run, "stored_before": self.stored_before, "stored_after": self.stored_after,
                "unkept": self.unkept, "stored_unkept": self.stored_unkept, "decodes": self.job.decodes,
                "notes": self.notes,
                "changes": [{"snapshot": c.snapshot, "old_base": c.old_base, "base": c.base, "why": c.why}
                            for c in self.job.changes],
                "revised": [{"snapshot": r.snapshot, "base": r.base, "stored_before": r.stored_before,
                             "stored_after": r.stored_after, "done": r.done, "note": r.note} for r in revised],
                "removed": removed}


def load_target(path: str | os.PathLike[str]) -> dict[str, str | None]:
    """A plan saved by ``gpupas plan --json`` (its ``target``), or a bare {snapshot: base or null}."""
    try:
        with open(path) as f:
            doc = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read the plan {path}: {exc}") from None
    target = doc.get("target", doc) if isinstance(doc, dict) else None
    if not isinstance(target, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, str))
                                               for k, v in target.items()):
        raise InvalidInputError(f"{path} holds no plan: expected {{snapshot: base or null}} or gpupas plan --json")
    return target


def compact_archive(location: str, *, target: Mapping[str, str | None] | None = None, alpha: float | None = 2.0,
                    scheme: str = "independent", budgets: Mapping[str, float] | None = None,
                    pairs: Iterable[tuple[str, str]] = (), fraction: float = 1 / 16, setting: str | None = None,
                    codecs: Iterable[str] | None = None, dry_run: bool = False, scheduler: Any = None,
                    workers: int = 2, gc_min_age: float | None = None,
                    storage_options: dict[str, Any] | None = None, no_slower: bool = False) -> Compaction:
    """Carry a storage plan out: ``target`` (snapshot -> base) or the PAS plan at ``alpha`` (``no_slower``:
    restoring no snapshot slower than now, see :func:`~gpupas.plan.archive.plan_archive`); with
    ``setting``/``codecs``, every snapshot is also re-encoded in that form. ``dry_run``: build the
    job and say what would change, change nothing. ``scheduler``: see :func:`gpupas.jobs.run.run`."""
    check(scheduler, workers)
    how = Reencode(setting or "default", None if codecs is None else tuple(codecs),
                   force=setting is not None or codecs is not None)
    how.setting_object()  # an unknown setting or codec list fails before any work (planning reads every snapshot)
    spec = ArchiveSpec(location, storage_options)
    notes: list[str] = []
    with spec.open() as a:
        from gpupas.plan.archive import plan_archive, unkept

        if target is None:
            planned = plan_archive(a, alpha, scheme=scheme, budgets=budgets, pairs=pairs, fraction=fraction,
                                   setting=setting or "default", no_slower=no_slower)
            garbage, dead = planned.unkept  # dropped snapshots (a killed commit's): gc's, never re-encoded
            target = planned.target
            notes += [f"budget not met: {v}" for v in planned.plan.violations] + planned.notes[-1:] * (
                planned.chosen == "current")
            if planned.plan.storage > planned.current.storage:
                notes.append(f"the plan stores more than the archive does now ({planned.plan.storage:,.0f} against "
                             f"{planned.current.storage:,.0f} bytes): its budgets need faster restores than deltas "
                             "give; a larger alpha stores less")
            listed = set(a.store.list_snapshots())  # less any a commit that failed discarded while this planned
            target = {s: b for s, b in target.items() if s in listed and (b is None or b in listed)}
        else:  # a plan made before a drop (`compact --plan FILE`): no dropped snapshot re-encoded, none a new base
            garbage, dead = unkept(a)
            onto = sorted(f"{s} on {b}" for s, b in target.items() if b is not None and b in garbage | dead
                          and s not in garbage | dead and a.store.base_of(s) != b)
            if onto:
                raise InvalidInputError(f"the plan builds on snapshots dropped from their version since it was made "
                                        f"({', '.join(onto[:3])}): nothing changed; plan again (`gpupas plan`)")
            target = {s: b for s, b in target.items() if s not in garbage | dead or s in target.values()}
        unknown = sorted((set(target) | {b for b in target.values() if b is not None}) - set(a.store.list_snapshots()))
        if unknown:
            raise InvalidInputError(f"the plan names snapshots not in {location}: {', '.join(unknown[:5])}")
        counted = list(a.store.list_snapshots())  # after the job, the same snapshots (not others' new commits)
        before = _stored(a, counted)
        if how.force:  # every snapshot in the new form: also those a plan made before their commits leaves out
            target = {**_unlike(a, [s for s in counted if s not in target and s not in garbage], how), **target}
    job = compact_graph(spec, dict(target), how=how, gc_min_age=None if dry_run else gc_min_age)
    out = Compaction(job, dict(target), dry_run=dry_run, stored_before=before, stored_after=before, notes=notes)
    if dry_run:
        out.unkept = sorted(s for s in counted if s in garbage)
        with spec.open() as a:
            out.stored_unkept = _stored(a, out.unkept)
        return out
    out.results = run(job, scheduler, workers=workers)
    with spec.open() as a:
        out.stored_after = _stored(a, counted)
        out.unkept = sorted(s for s in counted if s in unkept(a)[0])  # now that kept ones are re-based off them
        out.stored_unkept = _stored(a, out.unkept)
    return out


def _unlike(a: Any, sids: Iterable[str], how: Reencode) -> dict[str, str | None]:
    """Those of snapshots ``sids`` of archive ``a`` not yet in the form ``how``, on their bases (snapshots whose
    manifests do not read stay out: the job reports them)."""
    out = {}
    for sid in sids:
        try:
            m = a.manifest(sid)
        except (SnapshotNotFoundError, IntegrityError, FormatError):
            continue
        if how.needed(m):
            out[sid] = m.base
    return out


def _stored(a: Any, sids: Iterable[str]) -> int:
    """Bytes snapshots ``sids`` of archive ``a`` store (one discarded after the listing, by a commit that failed,
    counts nothing)."""
    total = 0
    for sid in sids:
        try:
            total += a.manifest(sid).stored_bytes
        except SnapshotNotFoundError:
            pass
    return total
