"""The task functions of the jobs: pure, module-level, over (archive spec, snapshot ids, inputs).

Each opens the archive itself with an inline executor (``workers=1``: the cluster already uses
the cores) and hands the bits its inputs decoded to the archive's base cache, so a snapshot whose
bases came in is decoded alone (each link of a chain once). Bits are checked by CRC-32 before
any use (the cache does it), so an input can never corrupt a result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from gpupas.errors import (
    UNREACHABLE,
    ArchiveNotFoundError,
    ConflictError,
    GpupasError,
    SnapshotNotFoundError,
    Unreachable,
)
from gpupas.format.manifest import FORMAT
from gpupas.xp import aligned

_TRIES = 4  # revisions of one snapshot that others revise meanwhile


@dataclass(frozen=True)
class ArchiveSpec:
    """Where an archive is: a location (directory or fsspec URL), its storage options, and its tiers'
    (credentials given at open time; see :mod:`gpupas.store.tiers`)."""

    location: str
    storage_options: dict[str, Any] | None = None
    tier_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # a directory as an absolute path: a worker of a Dask cluster started elsewhere read a relative one from
        # its own working directory ("no archive at ...", or another archive of that name)
        if "://" not in self.location:
            object.__setattr__(self, "location", os.path.abspath(self.location))

    def open(self, cache_size: int = 8) -> Any:
        from gpupas.archive import open_archive

        return open_archive(self.location, storage_options=self.storage_options, workers=1, cache_size=cache_size,
                            tier_options=self.tier_options)


def _open(spec: ArchiveSpec, cache_size: int = 8) -> Any:
    """``spec.open`` in a task: an archive the job was built on that the task does not find is said as such (a Dask
    worker on another machine, or in a container, that does not see the path), not as one to create there."""
    import socket

    try:
        return spec.open(cache_size)
    except ArchiveNotFoundError:
        raise ArchiveNotFoundError(f"a task of this job, on host {socket.gethostname()}, finds no archive at "
                                   f"{spec.location}, which the job was built on: every Dask worker must see the "
                                   "archive at that path (a shared filesystem) or at a URL; run the job on workers "
                                   "that do, or here (--scheduler local or sync)") from None


@dataclass
class Link:
    """A decoded snapshot (its raw bits by tensor name), or why it could not be decoded."""

    sid: str
    bits: dict[str, Any] | None = None
    error: str | None = None
    tensors: int = 0


@dataclass(frozen=True)
class Reencode:
    """How a compaction re-encodes: a setting name, and optionally the chunk codecs to choose among."""

    setting: str = "default"
    codecs: tuple[str, ...] | None = None
    force: bool = False  # re-encode every snapshot not yet in this form, whatever its base

    def setting_object(self) -> Any:
        from gpupas.pas.settings import get_setting

        cfg = get_setting(self.setting)
        return cfg if self.codecs is None else replace(cfg, codecs=tuple(self.codecs))

    def needed(self, m: Any) -> bool:
        """Whether snapshot manifest ``m`` is not yet in this form (setting, codecs)."""
        if m.setting != self.setting or m.format < FORMAT:  # an older format: re-encoding writes this one
            return True
        allowed = set(self.setting_object().codecs)
        return any(not set(s.codec_ids()) <= allowed for s in m.streams)


def _feed(archive: Any, inputs: tuple[Any, ...]) -> None:
    """Put the bases other tasks decoded into ``archive``'s cache: arrays a worker received from another are
    views into its message and may start anywhere, so a misaligned one is copied (the compiled kernels read
    whole values through typed pointers)."""
    for x in inputs:
        if isinstance(x, Link) and x.bits is not None:
            archive.bases.put(x.sid, {k: aligned(v) for k, v in x.bits.items()})


def decode_link(spec: ArchiveSpec, sid: str, *inputs: Link) -> Link:
    """Decode snapshot ``sid`` given its bases' links (what is missing is decoded here)."""
    from gpupas.backend import get_backend
    from gpupas.engine.chain import read_bits

    try:
        with _open(spec, max(8, len(inputs) + 2)) as a:
            _feed(a, inputs)
            bits, _ = read_bits(a.store, sid, None, manifests=a.manifest, backend=get_backend("numpy"),
                                executor=a.executor, cache=a.bases)
            return Link(sid, dict(bits), None, len(bits))
    except (GpupasError, OSError, KeyError) as exc:
        failed = [x for x in inputs if isinstance(x, Link) and x.error]
        why = f"{exc}" + (f" (its base {failed[0].sid} could not be decoded either)" if failed else "")
        unreachable = isinstance(exc, UNREACHABLE)
        return Link(sid, None, Unreachable.of(exc, why) if unreachable else why, 0)


def check_link(link: Link) -> tuple[str, int | str]:
    """The result of verifying a snapshot: its tensor count, or what is wrong."""
    return link.sid, (link.error if link.error is not None else link.tensors)


@dataclass
class Revised:
    """What a revision task did."""

    snapshot: str
    old_base: str | None
    base: str | None
    why: str
    stored_before: int = 0
    stored_after: int = 0
    done: bool = True
    note: str = ""


def revise_link(spec: ArchiveSpec, sid: str, base: str | None, why: str, how: Reencode,
                planned: tuple[int, int, str | None] | None, *inputs: Any) -> Revised:
    """Revise ``sid`` onto ``base`` (None: whole) in the form ``how``; the inputs carry the bits of
    the snapshot and of its new bases (and earlier revisions it must follow). Skipped where the
    snapshot is already in that form (a rerun after a kill). ``Archive.revise`` decodes the new
    form and compares it bit for bit before it switches, atomically. ``planned``: the snapshot's
    (revision, stored bytes, base) when the job was built: found in that form at a later revision, it was
    revised after the plan, most often by an earlier run of this very task on a worker that died
    (Dask runs it again), and is reported as revised, from the bytes it stored then."""
    with _open(spec, max(8, len(inputs) + 2)) as a:
        _feed(a, inputs)
        for attempt in range(_TRIES):
            try:
                old = a.store.read_manifest(sid)
                grand_ok = old.grand is None or base is None or old.grand == a.store.read_manifest(base).base
                if old.base == base and grand_ok and old.format >= FORMAT and not (how.force and how.needed(old)):
                    if attempt == 0 and planned is not None and old.revision > planned[0]:
                        return Revised(sid, planned[2], base, why, planned[1], old.stored_bytes, True,
                                       "revised since the job was planned (by an earlier run of this task, on "
                                       "a worker that died, or by another job)")
                    return Revised(sid, old.base, base, why, old.stored_bytes, old.stored_bytes, False,
                                   "already in that form")
                new = a.revise(sid, setting=how.setting_object(), base=base, descendants=False)  # (the plan checks)
            except SnapshotNotFoundError as exc:  # it, or its new base, was discarded after the plan (a commit failed)
                return Revised(sid, None, base, why, done=False, note=f"not revised: {exc}")
            except ConflictError:
                # another writer revised it meanwhile (the same job started twice, most often): look again; where
                # it is now in this form, there is nothing left to do, else revise what is there now
                if attempt == _TRIES - 1:
                    raise
                continue
            return Revised(sid, old.base, new.base, why, old.stored_bytes, new.stored_bytes)
    raise AssertionError("unreachable")  # pragma: no cover


def gc_archive(spec: ArchiveSpec, min_age: float, *after: Any) -> list[dict[str, Any]]:
    """Delete what nothing needs (see ``Repository.gc``), after the tasks ``after``."""
    from gpupas.versions.repository import Repository

    with _open(spec) as a:
        return Repository(a, own_archive=False).gc(min_age)

