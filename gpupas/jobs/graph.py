"""Task graphs of the archive-wide jobs, built from the manifests and not run (:mod:`gpupas.jobs.run` runs them).

Graphs follow the delta chains: a decode task per snapshot takes the decoded links of the
snapshots it reads (base, and grand for 'pred' tensors), so each link is decoded once, parents
before children, and Dask frees a snapshot's bits once its last dependent has run. A revision
task takes the links it needs (the snapshot's own bits, its new base's and new grand-base's) and
runs after the revision of its nearest changed ancestor in the new tree, so the new ``grand`` a
revision records lies on the planned chain. Every revision is verified bit-exact before its
atomic switch (``Archive.revise``); a killed job leaves the old or the new form of each snapshot,
and the same graph built again does what is left.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dask

from gpupas.errors import FormatError, IntegrityError, InvalidInputError, SnapshotNotFoundError
from gpupas.jobs import tasks
from gpupas.jobs.tasks import ArchiveSpec, Reencode
from gpupas.plan.measure import parents_first
from gpupas.plan.realize import Change, changes, first_key


@dataclass
class Job:
    """A built job: the delayed results to compute, and what it will change."""

    name: str
    spec: ArchiveSpec
    targets: list[Any] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    decodes: int = 0

    def __len__(self) -> int:
        return len(self.targets)

    def describe(self) -> str:
        return f"{self.name}: {len(self.changes)} revision(s), {self.decodes} snapshot decode(s)"


def _spec(spec: ArchiveSpec | str) -> ArchiveSpec:
    return spec if isinstance(spec, ArchiveSpec) else ArchiveSpec(str(spec))


def _decodes(archive: Any, spec: ArchiveSpec, sids: Iterable[str]) -> dict[str, Any]:
    """A decode task for each of ``sids`` and every snapshot they read, each taking its bases' tasks."""
    from gpupas.engine.chain import dependencies

    out: dict[str, Any] = {}
    for sid in parents_first(archive, sids):
        m = archive.manifest(sid)
        deps = [out[d] for d, _ in dependencies(m, None, archive.manifest) if d in out]
        out[sid] = dask.delayed(tasks.decode_link, pure=False)(spec, sid, *deps, dask_key_name=f"decode-{sid}")
    return out


def verify_graph(spec: ArchiveSpec | str, snapshots: Iterable[str] | None = None) -> Job:
    """Decode every snapshot (default: all) once, dependencies first; each target yields
    ``(snapshot, tensor count or what is wrong)``."""
    spec = _spec(spec)
    with spec.open() as a:
        sids = sorted(a.store.list_snapshots()) if snapshots is None else list(snapshots)
        readable = []
        good: set[str] = set()  # snapshots whose chains were read whole: a chain is walked once, not per snapshot
        job = Job("verify", spec)
        for sid in sids:
            try:
                a.manifest(sid)
                good.update(parents_first(a, [sid], good))
                readable.append(sid)
            except Exception as exc:  # a damaged manifest or chain: reported as the result
                job.targets.append(dask.delayed((sid, str(exc)), name=f"broken-{sid}"))
        links = _decodes(a, spec, readable)
    job.decodes = len(links)
    job.targets += [dask.delayed(tasks.check_link)(links[s], dask_key_name=f"check-{s}") for s in readable]
    return job


def compact_graph(spec: ArchiveSpec | str, target: Mapping[str, str | None], *, how: Reencode | None = None,
                  gc_min_age: float | None = None) -> Job:
    """Revise snapshots to the bases of ``target`` (snapshot -> base, None: whole) in the form
    ``how``; with ``gc_min_age``, a gc after the last revision. Snapshots already there are left
    alone (unless ``how.force`` and they are in another form)."""
    spec = _spec(spec)
    how = how or Reencode()
    with spec.open() as a:
        listed = a.store.list_snapshots()  # once (remotely, a listing request)
        chs = changes(target, a.manifest, reencode=how.needed if how.force else None, snapshots=listed)

        def base_of(s: str) -> str | None:
            return target[s] if s in target else a.manifest(s).base

        def depth_of(s: str, base: Callable[[str], str | None]) -> int:
            """Links below ``s`` as far as they can be read (a chain that loops or a manifest that is missing or
            damaged: the revisions and the reads name that damage)."""
            depth, x, seen = 0, s, {s}
            while True:
                try:
                    below = base(x)
                except (SnapshotNotFoundError, IntegrityError, FormatError):
                    return depth
                if below is None or below in seen:
                    return depth
                x = below
                seen.add(x)
                depth += 1

        # each revision checks its own chain as it runs: a plan too deep would fail half done; and the snapshots
        # left on a re-based one go as deep as it goes, which no revision checks
        revised = list(dict.fromkeys(c.snapshot for c in chs))
        rebased = any(c.base != c.old_base for c in chs)
        kept = sorted(s for s in listed if s not in target and s not in revised) if rebased else []
        for sid in revised + kept:
            depth = depth_of(sid, base_of)
            if depth > a.max_chain and (sid in revised or depth > depth_of(sid, lambda x: a.manifest(x).base)):
                raise InvalidInputError(f"the plan puts snapshot {sid} {depth} delta links deep"
                                        f"{'' if sid in revised else ' (kept on a base the plan moves)'}; at most "
                                        f"{a.max_chain} are allowed: give it a base nearer a whole snapshot, or "
                                        "plan again (gpupas plan keeps chains within the limit)")
        need: set[str] = set()
        for c in chs:
            need.add(c.snapshot)
            if c.base is not None:
                need.add(c.base)
                g = base_of(c.base)
                if g is not None:
                    need.add(g)
        links = _decodes(a, spec, sorted(need))
        # what each revision finds if no one revised its snapshot since (a format 1/2 snapshot's second one: the
        # revision after its first): a task run again after its worker died finds its own revision done
        planned: dict[str, tuple[int, int, str | None]] = {}
        for c in chs:
            m = a.manifest(c.snapshot)
            planned[c.key] = (m.revision + (c.key != c.snapshot and first_key(c.snapshot) in planned),
                              m.stored_bytes, m.base)
    job = Job("compact", spec, changes=chs, decodes=len(links))
    tasks_of: dict[str, Any] = {}  # revision key: its task
    for c in chs:
        ins = [links[c.snapshot]]
        if c.base is not None:
            ins.append(links[c.base])
            g = base_of(c.base)
            if g is not None:
                ins.append(links[g])
        ins += [tasks_of[d] for d in c.after if d in tasks_of]
        tasks_of[c.key] = dask.delayed(tasks.revise_link, pure=False)(
            spec, c.snapshot, c.base, c.why, how, planned[c.key], *ins, dask_key_name=f"revise-{c.key}")
    job.targets = list(tasks_of.values())
    if gc_min_age is not None:
        job.targets.append(gc_graph(spec, gc_min_age, after=job.targets).targets[0])
    return job


def reencode_graph(spec: ArchiveSpec | str, setting: str = "strong", codecs: Iterable[str] | None = None,
                   snapshots: Iterable[str] | None = None, gc_min_age: float | None = None) -> Job:
    """Re-encode snapshots (default: all) in another setting and/or chunk codecs, keeping their bases."""
    spec = _spec(spec)
    with spec.open() as a:
        sids = sorted(a.store.list_snapshots()) if snapshots is None else list(snapshots)
        target = {s: a.manifest(s).base for s in sids}
    how = Reencode(setting, None if codecs is None else tuple(codecs), force=True)
    job = compact_graph(spec, target, how=how, gc_min_age=gc_min_age)
    job.name = "re-encode"
    return job


def gc_graph(spec: ArchiveSpec | str, min_age: float = 3600.0, after: Iterable[Any] = ()) -> Job:
    """One task: delete what nothing needs once untouched for ``min_age`` s (after the tasks ``after``)."""
    spec = _spec(spec)
    return Job("gc", spec, [dask.delayed(tasks.gc_archive, pure=False)(spec, min_age, *after, dask_key_name="gc")])
