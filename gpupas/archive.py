"""The archive API: commit named tensors as snapshots, restore them bit-exactly, revise, report, verify.

A thin facade over :mod:`gpupas.engine` (the pipeline), :mod:`gpupas.store` (bytes) and
:mod:`gpupas.backend` (where the array work runs).

>>> import numpy as np, gpupas, tempfile
>>> a = gpupas.create_archive(tempfile.mkdtemp() + "/arc")
>>> s1 = a.commit({"w": np.arange(6, dtype=np.float32)})
>>> s2 = a.commit({"w": np.arange(6, dtype=np.float32) + 1}, base=s1.id)
>>> a.restore(s2.id)["w"].tolist()
[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
"""

from __future__ import annotations

import functools
import json
import numbers
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from gpupas.backend import get_backend, resolve_device
from gpupas.engine import chain, decode
from gpupas.engine.bases import BaseCache
from gpupas.engine.encode import Layout, layout_of_snapshot, tiered, write_streams
from gpupas.engine.executor import Executor
from gpupas.engine.stage import delta_candidate, stage_all
from gpupas.errors import (
    ArchiveExistsError,
    ConflictError,
    GpupasError,
    IntegrityError,
    InvalidInputError,
    SnapshotNotFoundError,
    TierNotFoundError,
    TierUnavailableError,
)
from gpupas.format.keys import check_name
from gpupas.format.manifest import Manifest, now
from gpupas.pas import schemes
from gpupas.pas.planes import from_bits, layout_of
from gpupas.pas.settings import Setting, get_setting
from gpupas.store.archive import ArchiveStore
from gpupas.tensors import Loaded, as_tensor_dict

if TYPE_CHECKING:
    from gpupas.engine.partial import PlaneRead

SMALL = 1 << 20  # snapshots of up to this many bytes are coded on the calling thread
MANIFEST_CACHE = (1024, 1 << 18)  # parsed manifests a session keeps: at most this many, holding this many tensors
_KEEP = object()


def new_id() -> str:
    """A fresh, unique snapshot id."""
    return uuid.uuid4().hex[:16]


def lossy_schemes(arrays: Mapping[str, Any], lossy: str | Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Schemes by tensor name from a commit's ``lossy`` option: one scheme for every float tensor it makes
    smaller (none may be: a version's snapshots share one option), or a mapping of tensor names to schemes."""
    if lossy is None:
        return {}
    if not isinstance(lossy, str | Mapping):
        raise InvalidInputError(f"lossy={lossy!r}: give one scheme (e.g. 'bf16', 'fixed:16', 'quant:4') or a "
                                "mapping of tensor names to schemes")
    if isinstance(lossy, str) or lossy.get("name") in schemes.NAMES:  # one scheme ("cast" etc. name no tensor's)
        scheme = _given(lossy)
        return {n: scheme for n, a in arrays.items() if schemes.applies(scheme, layout_of(a.dtype).name)}
    out = {}
    for name, spec in lossy.items():
        if name not in arrays:
            raise InvalidInputError(f"lossy: there is no tensor {name!r} in this commit")
        scheme = _given(spec)
        dtype = layout_of(arrays[name].dtype).name
        if dtype not in schemes.FLOATS:
            raise InvalidInputError(f"lossy: tensor {name!r} is {dtype}; lossy schemes apply to "
                                    f"{', '.join(schemes.FLOATS)} tensors only: leave it out of the mapping")
        if not schemes.applies(scheme, dtype):
            raise InvalidInputError(f"lossy: {schemes.describe(scheme)} does not make tensor {name!r} ({dtype}) "
                                    "smaller; leave it out to store it losslessly, or pick a narrower scheme")
        out[name] = scheme
    return out


def _given(spec: Any) -> dict[str, Any]:
    """A scheme the caller gave: what it cost (``error``) is measured here, not taken from the caller."""
    scheme = schemes.parse(spec)
    schemes.check_members(scheme)  # parse() reads manifests too, whose unknown members are ignored (FORMAT.md 9.9)
    scheme.pop("error", None)
    return scheme


def _meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """A commit's ``meta`` as plain JSON (NumPy and torch scalars as numbers), checked before anything is
    coded: the manifest must be able to hold it."""
    if meta is None:
        return {}
    def keys_ok(x: Any) -> bool:  # JSON would turn other keys into strings (1 and "1" would collide)
        if isinstance(x, Mapping):
            return all(isinstance(k, str) and keys_ok(v) for k, v in x.items())
        return all(keys_ok(v) for v in x) if isinstance(x, list | tuple) else True

    if not isinstance(meta, Mapping) or not keys_ok(meta):
        raise InvalidInputError(f"meta must be a mapping with string keys (nested ones too), not {meta!r:.80}")

    def scalar(o: Any) -> Any:
        if callable(getattr(o, "item", None)) and getattr(o, "ndim", None) == 0:
            return o.item()
        raise TypeError(f"{type(o).__name__} {o!r:.40} is not a JSON value")

    try:
        return json.loads(json.dumps(dict(meta), allow_nan=False, default=scalar))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"meta: {exc}; give strings, numbers (finite), booleans, None, lists and "
                                "mappings with string keys") from None


def _names(names: Iterable[str] | str | None) -> list[str] | None:
    """A restore's tensor names, read once (an iterator would be spent by the first look); one name alone
    may be given as a string."""
    if names is None:
        return None
    if isinstance(names, str):
        return [names]
    out = list(names)
    odd = [n for n in out if not isinstance(n, str)]
    if odd:
        raise InvalidInputError(f"names must be tensor names (strings), not {odd[:3]!r}")
    return out


def _sid(snapshot: Any) -> str:
    """``snapshot`` if it is a snapshot id, else InvalidInputError (a Manifest in its place: its ``.id`` named)."""
    if isinstance(snapshot, Manifest):
        raise InvalidInputError(f"give a snapshot id, not a Manifest: its id is {snapshot.id!r} (manifest.id)")
    if not isinstance(snapshot, str) and hasattr(snapshot, "latest") and hasattr(snapshot, "snapshots"):
        # a model version (gpupas.versions, a layer up: not imported), told apart by what it has
        raise InvalidInputError(f"give a snapshot id, not a version ({snapshot!r:.80}): its latest snapshot's id is "
                                f"{snapshot.latest!r} (version.latest; the others: [s['id'] for s in "
                                "version.snapshots]); Repository.restore(version) takes the version itself")
    return check_name(snapshot)


def _base_discarded(sid: str) -> SnapshotNotFoundError:
    return SnapshotNotFoundError(f"snapshot {sid}, the base of this commit, was discarded while it was being "
                                 "committed; nothing was stored")


def _address(x: Any) -> int | None:
    """Where the data of array ``x`` (torch, NumPy, CuPy) starts, if it says."""
    try:
        ptr = getattr(x, "data_ptr", None)  # torch (its CUDA array interface refuses a tensor that requires grad)
        if callable(ptr):
            return int(ptr())
        for iface in ("__array_interface__", "__cuda_array_interface__"):
            if hasattr(x, iface):
                return int(getattr(x, iface)["data"][0])
    except Exception:  # a tensor without storage (sparse) beside a checkpoint's weights: none (asked once published)
        return None
    return None


def _addresses(tensors: Any) -> set[int]:
    """Where the arrays of a mapping of tensors (nested mappings too) start; none for tensors loaded for this
    commit (:class:`~gpupas.tensors.Loaded`: no caller holds them)."""
    out: set[int] = set()
    if isinstance(tensors, Loaded):
        return out
    for v in tensors.values() if isinstance(tensors, Mapping) else ():
        if isinstance(v, Mapping):
            out |= _addresses(v)
        elif a := _address(v):
            out.add(a)
    return out


def _layout(layout: Any) -> Layout | None:
    """``layout`` if it is None or a Layout, else InvalidInputError (a dict or a name is not one)."""
    if layout is not None and not isinstance(layout, Layout):
        raise InvalidInputError(f"layout={layout!r:.60}: give a gpupas.Layout(...), e.g. Layout(rotate=False)"
                                + (" or Layout(**options)" if isinstance(layout, Mapping) else ""))
    return layout


def _unchanged(staged: Any, backend: Any, executor: Any) -> None:
    """Every tensor still has the bits it was staged with: a tensor that another thread changed while
    it was being coded (a training step) would publish planes that restore to no state it ever had."""
    now = backend.crc32_many([st.unchanged[0] for st in staged], executor)
    for st, crc in zip(staged, now):
        if crc != st.unchanged[1]:
            raise InvalidInputError(
                f"tensor {st.name!r} changed while it was being committed (another thread updated it in place); "
                "nothing was stored: commit between optimizer steps, or commit a copy (e.g. "
                "{k: v.clone() for k, v in model.state_dict().items()})")


_STORE_KW = ("storage_options", "durable", "tier_options")


def check_options(**options: Any) -> None:
    """InvalidInputError for an Archive option out of range (``workers`` 0: one per core; ``cache_bytes``
    may be a float), before anything is opened or created."""
    known = ("workers", "cache_size", "max_chain", "cache_bytes", *_STORE_KW)
    for what in options:
        if what not in known:
            hint = "; a layout is chosen per commit: commit(..., layout=Layout(...))" if what == "layout" else ""
            raise InvalidInputError(f"{what}=: not an archive option (those are {', '.join(known)}){hint}")
    so, to = options.get("storage_options"), options.get("tier_options")  # (were an AttributeError or TypeError
    if so is not None and not isinstance(so, Mapping):                    # deep in the store, or ignored)
        raise InvalidInputError(f"storage_options={so!r:.60}: give a mapping of fsspec options, e.g. "
                                "{'anon': True}")
    if to is not None and not (isinstance(to, Mapping) and all(isinstance(v, Mapping) for v in to.values())):
        raise InvalidInputError(f"tier_options={to!r:.60}: give a mapping of tier names to their storage options, "
                                "e.g. {'cold': {'key': ..., 'secret': ...}}")
    for what, least in (("workers", 0), ("cache_size", 0), ("max_chain", 0), ("cache_bytes", 0)):
        v = options.get(what)
        whole = isinstance(v, numbers.Integral) or (what == "cache_bytes" and isinstance(v, numbers.Real))
        if v is not None and (isinstance(v, bool) or not whole or not v >= least):
            raise InvalidInputError(f"{what}={v!r}: give a whole number of at least {least}")


def _location(location: Any) -> None:
    """InvalidInputError for a location that is neither a path nor a URL."""
    if not isinstance(location, str | os.PathLike) or not os.fspath(location):
        raise InvalidInputError(f"archive location {location!r:.60}: give a folder's path or an fsspec URL "
                                "(s3://bucket/prefix)")


def create_archive(location: str | os.PathLike[str], **kw: Any) -> Archive:
    """Create an archive at ``location`` (an empty or missing directory, or an fsspec URL); an archive
    already there is opened as it is (a folder holding anything else is refused)."""
    _location(location)
    check_options(**kw)
    store_kw = {k: kw.pop(k) for k in _STORE_KW if k in kw}
    return Archive(ArchiveStore.open(location, create=True, **store_kw), **kw)


def open_archive(location: str | os.PathLike[str], **kw: Any) -> Archive:
    """Open the existing archive at ``location``; ArchiveNotFoundError says how to create one.
    ``tier_options``: storage options (credentials) of its tiers by name, for this session."""
    _location(location)
    check_options(**kw)
    store_kw = {k: kw.pop(k) for k in _STORE_KW if k in kw}
    return Archive(ArchiveStore.open(location, **store_kw), **kw)


class Archive:
    """Snapshots of named tensors in one store.

    ``workers``: threads for coding (default: one per core); ``cache_size``: snapshots kept in
    memory as delta bases (``cache_bytes``: at most that many bytes the cache owns, the newest snapshot kept
    whatever its size: a commit's copies of torch tensors, lossy or file input, and restored snapshots count,
    the caller's own NumPy arrays not, but for memory-mapped ones, read into copies);
    ``max_chain``: a commit whose delta chain would grow longer is stored whole.

    Use :func:`create_archive` / :func:`open_archive` (they take these options too); close it (or use ``with``).
    """

    def __init__(self, store: ArchiveStore, workers: int | None = None, cache_size: int = 2, max_chain: int = 16,
                 cache_bytes: int | None = None):
        if not isinstance(store, ArchiveStore):  # a path: was taken, and every use failed with an AttributeError
            raise InvalidInputError(f"Archive({store!r:.80}): an Archive wraps an opened store; open one with "
                                    "gpupas.open_archive(location) (gpupas.create_archive for a new one)")
        check_options(workers=workers, cache_size=cache_size, max_chain=max_chain, cache_bytes=cache_bytes)
        self.store = store
        self.max_chain = max_chain
        self.executor = Executor(workers)
        self.bases = BaseCache(cache_size, cache_bytes)
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()  # least recently used first
        self._entries = 0  # tensors in the cached manifests
        self._lock = threading.Lock()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker threads and drop cached snapshots."""
        self.executor.close()
        self.bases.clear()

    @property
    def location(self) -> str:
        """Where the archive is: a local folder's path, as given, or the URL of a remote one."""
        return self.store.location

    def __repr__(self) -> str:
        return f"<gpupas.Archive {self.location!r}>"

    # -- listing ---------------------------------------------------------------------------------------------
    def manifest(self, snapshot: str) -> Manifest:
        """The manifest of ``snapshot`` (tensors, encodings, streams, sizes)."""
        _sid(snapshot)
        with self._lock:
            m = self._manifests.get(snapshot)
            if m is not None:
                self._manifests.move_to_end(snapshot)
        if m is None:
            m = self.store.read_manifest(snapshot)
            with self._lock:
                self._drop(snapshot)
                self._manifests[snapshot] = m
                self._entries += len(m.tensors)
                most, tensors = MANIFEST_CACHE
                while len(self._manifests) > 1 and (len(self._manifests) > most or self._entries > tensors):
                    self._drop(next(iter(self._manifests)))  # (a snapshot of many tensors: the newest is kept)
        return m

    def _drop(self, snapshot: str) -> None:
        gone = self._manifests.pop(snapshot, None)
        if gone is not None:
            self._entries -= len(gone.tensors)

    def _forget(self, snapshot: str) -> None:
        _sid(snapshot)
        with self._lock:
            self._drop(snapshot)

    def refresh(self) -> None:
        """Forget the manifests read so far: the next reads see what other processes published, revised or
        discarded since."""
        with self._lock:
            self._manifests.clear()
            self._entries = 0

    def snapshots(self) -> list[str]:
        """Committed snapshot ids, oldest first (those whose manifest cannot be read, first)."""
        def created(sid: str) -> tuple[str, str]:
            try:
                return self.manifest(sid).created, sid
            except GpupasError:  # a damaged manifest is still listed (first): verify says what is wrong
                return "", sid

        return sorted(self.store.list_snapshots(), key=created)

    def depth(self, snapshot: str) -> int:
        """Links below ``snapshot`` in its delta chain (0: stored whole), derived from the manifests."""
        m = self.manifest(snapshot)
        depth, seen = 0, {snapshot}
        while m.base is not None:
            if m.base in seen:
                raise IntegrityError(f"snapshot {snapshot}: its delta chain loops back to {m.base}")
            seen.add(m.base)
            depth += 1
            m = self.manifest(m.base)
        return depth

    def discard(self, snapshot: str, *, force: bool = False) -> None:
        """Delete ``snapshot`` for good (a snapshot nothing references, e.g. of a failed version).

        Refused while other snapshots are deltas on it or extrapolate from it; ``force`` deletes it
        anyway, and those can then no longer be restored. SnapshotNotFoundError if there is no such snapshot.
        """
        self.store.discard(_sid(snapshot), force=force)
        self.bases.drop(snapshot)
        self._forget(snapshot)

    def gc(self, min_age: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Delete the chunk folders no manifest names (interrupted commits, revised snapshots) once
        untouched for ``min_age`` seconds, in the archive and in its tiers (``tier:folder``); returns their
        names; a local archive's temporary files of killed writes go too, unlisted. (Every published snapshot is kept:
        :meth:`gpupas.versions.repository.Repository.gc` also removes snapshots no version needs.)"""
        return self.store.remove_orphans(min_age, dry_run)

    # -- commit ------------------------------------------------------------------------------------------------
    def commit(self, tensors: Any, *, base: str | None = None, snapshot: str | None = None,
               setting: str | Setting = "default", meta: Mapping[str, Any] | None = None,
               device: str | None = None, layout: Layout | None = None,
               lossy: str | Mapping[str, Any] | None = None) -> Manifest:
        """Store ``tensors`` as a new snapshot, as deltas against snapshot ``base`` where that pays.

        ``tensors`` is a mapping of names to NumPy/CuPy arrays or torch tensors, or the path of a
        safetensors/torch checkpoint. Tensors missing from ``base`` or of another shape or dtype
        are stored whole. The snapshot becomes visible only once all of it is written.
        ``device``: where to encode ("cpu", "cuda"; default: where the tensors are).
        ``lossy``: store float tensors in a smaller representation (see :mod:`gpupas.pas.schemes`:
        "bf16", "fp16", "fixed:16", "quant:8", "kmeans:4", ...; a dict of tensor names to schemes
        for some tensors only); such tensors are stored whole and restore to what the scheme kept,
        not bit-exactly. Returns the manifest.
        """
        t0 = time.perf_counter()
        base = None if base is None else _sid(base)
        meta, layout = _meta(meta), _layout(layout)
        backend = get_backend(resolve_device(device, tensors))
        file_meta: dict[str, str] = {}
        arrays = as_tensor_dict(tensors, backend=backend, metadata=file_meta)
        if file_meta and "file_metadata" not in meta:  # a safetensors file's own metadata, as Repository keeps it
            meta["file_metadata"] = file_meta
        cfg = get_setting(setting)
        layout = layout or Layout(**getattr(backend, "layout", {}))  # the device's chunk size (GPU: 64 KiB)
        sid = check_name(snapshot) if snapshot is not None else new_id()
        plan_lossy = lossy_schemes(arrays, lossy)
        if self.store.has_manifest(sid):
            raise ArchiveExistsError(f"snapshot {sid!r} already exists in {self.location}; choose another id")
        with self.store.writing():  # a discard or gc of the base waits until this is published
            self.store.check_tiers(layout.tiers)
            for attempt in range(2):  # a second time with the base read from the store, where a cached one changed
                base_m, base_bits, grand_bits = None, {}, {}
                if base is not None:
                    self._forget(base)
                    base_m = self.manifest(base)  # read again under the lock: still there
                    if self.depth(base) + 1 > self.max_chain:  # keep restores bounded: start a new chain
                        base, base_m = None, None
                    else:
                        base_bits = self._read(base, None, backend, cache=attempt == 0)[0]
                        grand_bits = self._grand_bits(base_m, arrays, cfg, backend, cache=attempt == 0)
                small = sum(int(a.nbytes) for a in arrays.values()) <= SMALL
                staged = stage_all(arrays, cfg, backend.crc32, self.executor, small,
                                   None if base_m is None else base_m.by_name, base_bits, grand_bits, layout.rotate,
                                   plan_lossy)
                check = functools.partial(_unchanged, staged, backend, self.executor)  # while the shards close
                streams, entries = write_streams(self.store, sid, staged, cfg, backend, self.executor, layout, small,
                                                 meanwhile=check)
                grand = base_m.base if base_m is not None and any(st.plan.enc == "pred" for st in staged) else None
                m = Manifest(id=sid, created=now(), base=base, grand=grand, streams=streams, tensors=entries,
                             setting=cfg.name, segment=layout.segment, raw_bytes=sum(st.nbytes for st in staged),
                             stored_bytes=sum(s.stored for s in streams), meta=meta,
                             commit_seconds=round(time.perf_counter() - t0, 6))
                try:
                    if not self._bases_unchanged(m, base_bits, grand_bits, backend):
                        if attempt:
                            raise IntegrityError(f"the base {base} of this commit changed while it was read from "
                                                 "the store; nothing was stored")
                        for s in streams:
                            self.store.delete_folder(s.folder, s.tier)
                        self.bases.drop(base)  # type: ignore[arg-type]
                        continue
                    if (gone := self._gone_base(m)) is not None:
                        raise _base_discarded(gone)
                    self.store.publish_manifest(m)
                    self._bases_still_there(m)
                except BaseException as exc:
                    if not getattr(exc, "maybe_published", False):  # else the manifest may name them
                        for s in streams:
                            self.store.delete_folder(s.folder, s.tier)
                    raise
                break
            self.store.keep_tiers(m)  # published: what this raises (a warning made an error) removes nothing
        given = _addresses(tensors)  # the caller's arrays are borrowed; copies (of torch tensors, lossy) are owned
        self.bases.put(sid, {st.name: st.bits for st in staged},  # checked by CRC before use
                       borrowed=[st.name for st in staged if _address(st.bits) in given])
        return m

    def _bases_still_there(self, m: Manifest) -> None:
        """On an object store (no lock keeps a discard from crossing a commit), after ``m`` is published: where
        its base or grand-base was discarded meanwhile, take ``m`` back and raise. A discard looks for children
        after deleting the manifest and puts it back where it finds one, so one of the two looks sees the other."""
        if self.store.local_root is None and (gone := self._gone_base(m)) is not None:
            self.store.unpublish(m.id)
            raise _base_discarded(gone)

    def _new_base_still_there(self, new: Manifest, was: bytes) -> None:
        """:meth:`_bases_still_there` for a revision that re-based a snapshot (a compaction): where the new base (or
        grand-base) was discarded meanwhile, put back the manifest ``new`` replaced (``was``) and raise."""
        if self.store.local_root is not None or (gone := self._gone_base(new)) is None:
            return
        try:
            self.store.unreplace(new, was)
        except BaseException as exc:  # it may have switched back, or not: the new form's folders stay
            exc.maybe_published = True  # type: ignore[attr-defined]
            raise
        raise SnapshotNotFoundError(f"snapshot {gone}, the new base of {new.id}, was discarded while {new.id} was "
                                    f"being revised; {new.id} is kept as it was")

    def _gone_base(self, m: Manifest) -> str | None:
        """The first of ``m``'s base and grand-base that the archive no longer has (discarded), if any."""
        return next((s for s in (m.base, m.grand) if s is not None and not self.store.has_manifest(s)), None)

    def _bases_unchanged(self, m: Manifest, base_bits: Mapping[str, Any], grand_bits: Mapping[str, Any],
                         backend: Any) -> bool:
        """Whether the base (and grand-base) bits the tensors of ``m`` were coded against still match their
        checksums: a cached base can be the caller's live arrays, which a training step may have changed."""
        for sid, bits, used in ((m.base, base_bits, [e.name for e in m.tensors if e.reads_base]),
                                (m.grand, grand_bits, [e.name for e in m.tensors if e.enc == "pred"])):
            if sid is None or not used:
                continue
            by_name = self.manifest(sid).by_name
            if backend.crc32_many([bits[n] for n in used], self.executor) != [by_name[n].crc32 for n in used]:
                return False
        return True

    def _grand_bits(self, base_m: Manifest, arrays: Mapping[str, Any], cfg: Setting, backend: Any,
                    cache: bool = True) -> dict[str, Any]:
        """Bits of the base's own base for the tensors the base stores as deltas (what a 'pred'
        encoding extrapolates from); empty where there is none or the setting does not predict."""
        names = [e.name for e in base_m.tensors if e.reads_base and e.name in arrays]
        if not (cfg.predict and names and base_m.base is not None):
            return {}
        try:
            return self._read(base_m.base, names, backend, cache)[0]
        except (SnapshotNotFoundError, IntegrityError, KeyError):
            return {}  # the base cannot be restored either; store plain deltas, which need only it

    # -- revise ------------------------------------------------------------------------------------------------
    def revise(self, snapshot: str, *, setting: str | Setting = "default", layout: Layout | None = None,
               base: Any = _KEEP, descendants: bool = True) -> Manifest:
        """Re-encode ``snapshot`` under the same id (another setting, codec, plane grouping, or
        ``base``: another delta base, None to store it whole) and switch to it atomically.

        The new form is decoded and compared bit for bit before it replaces the old one; readers
        see the old form or the new one, never a mix; the old folders become garbage for
        :meth:`gc`. Its bits do not change, so snapshots that use it as a base are unaffected,
        except in how deep their chains go: a new base that would put one of them more than
        ``max_chain`` links deep (and deeper than it was) is refused (``descendants=False``: not
        checked, for a compaction, which checks its whole plan and moves some of them next).
        Without ``layout``, planes that live in a tier stay there (see :meth:`tier`).
        """
        _sid(snapshot), _layout(layout)
        if base is not _KEEP and base is not None:
            _sid(base)
        with self.store.writing():
            return self._revise(snapshot, get_setting(setting), layout, base, descendants)

    def _revise(self, snapshot: str, cfg: Setting, layout: Layout | None, base: Any, descendants: bool) -> Manifest:
        backend = get_backend("numpy")
        self._forget(snapshot)
        old = self.manifest(snapshot)
        if layout is None:  # planes in tiers stay where they are (a compaction must not bring them back)
            layout = layout_of_snapshot(old) if tiered(old) else Layout()
        self.store.check_tiers(layout.tiers)  # under the lock: a tier removed since this session opened it
        new_base = old.base if base is _KEEP else base
        if new_base is not None:
            self._check_base(snapshot, new_base)
        if new_base != old.base:
            self._check_children(snapshot, new_base if descendants else None)
        bits = self._read(snapshot, None, backend)[0]
        arrays = {e.name: from_bits(bits[e.name], e.layout, e.shape) for e in old.tensors}
        base_m = None if new_base is None else self.manifest(new_base)
        # only the base tensors the new form can read (of the same dtype and shape): damage in the base's others
        # is the base's alone
        shared = [] if base_m is None else [e.name for e in old.tensors
                                            if delta_candidate(base_m.by_name.get(e.name), e.dtype, e.shape)]
        base_bits = self._read(new_base, shared, backend)[0] if shared and new_base is not None else {}
        grand_bits = {} if base_m is None else self._grand_bits(base_m, arrays, cfg, backend)
        small = old.raw_bytes <= SMALL
        keep = {e.name: e.scheme for e in old.tensors if e.scheme is not None}  # the same representation again
        staged = stage_all(arrays, cfg, backend.crc32, self.executor, small,
                           None if base_m is None else base_m.by_name, base_bits, grand_bits, layout.rotate, keep)
        streams, entries = write_streams(self.store, snapshot, staged, cfg, backend, self.executor, layout, small)
        try:
            grand = base_m.base if base_m is not None and any(st.plan.enc == "pred" for st in staged) else None
            new = old.revise(streams, entries, now(), setting=cfg.name, segment=layout.segment, base=new_base,
                             grand=grand)
            for e, e_old in zip(new.tensors, old.tensors):
                if e.crc32 != e_old.crc32:
                    raise IntegrityError(f"snapshot {snapshot}: tensor {e.name!r} changed while being revised")
            check = decode.decode_snapshot(self.store, new, new.tensors,
                                           {e.name: base_bits[e.name] for e in new.tensors if e.reads_base},
                                           self._pred_bits(new, backend), backend, self.executor)
            for name, b in bits.items():
                if check[name].tobytes() != b.tobytes():
                    raise IntegrityError(f"snapshot {snapshot}: the revised form of {name!r} does not decode to "
                                         "the same bits; nothing was changed")
            rebased = new_base is not None and new_base != old.base
            # checked again as the manifest is switched (other re-bases publish under the same lock): two
            # revisions that each passed the check above could together make a loop or too long a chain
            was = self.store.replace_manifest(new, old.revision, check=functools.partial(
                self._check_base, snapshot, new_base, self.store.read_manifest) if new_base is not None and rebased
                else None)
            if rebased and was is not None:
                self._new_base_still_there(new, was)
        except BaseException as exc:
            if not getattr(exc, "maybe_published", False):  # else the manifest may name them
                for s in streams:
                    self.store.delete_folder(s.folder, s.tier)
            raise
        finally:
            self._forget(snapshot)
        self.store.keep_tiers(new)  # published: what this raises (a warning made an error) removes nothing
        return new

    # -- tiers -------------------------------------------------------------------------------------------------
    def add_tier(self, name: str, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *,
                 force: bool = False) -> dict[str, Any]:
        """Define storage tier ``name`` at ``url`` (a directory, or an fsspec URL such as s3://bucket/cold).

        Storage options that are not secrets are written into the archive; keys, secrets and tokens are
        used for this session only (later: ``$GPUPAS_TIER_OPTIONS_<NAME>``, the filesystem's own variables,
        or ``open_archive(..., tier_options=...)``). ``force``: point the tier at a copy of its data, or
        add a removed tier back at the location that still holds it. A location inside the archive is refused.
        """
        return self.store.add_tier(name, os.fspath(url), storage_options, force=force)

    def tiers(self) -> dict[str, dict[str, Any]]:
        """The archive's tiers: name -> {"url", "options" (written non-secret storage options), "id"}."""
        return self.store.tier_table()

    def remove_tier(self, name: str) -> None:
        """Forget tier ``name`` (its data is left where it is); refused while a snapshot has planes there."""
        self.store.remove_tier(name)

    def tier(self, snapshot: str, *, planes_from: int | None = 2, to: str | None = "cold") -> Manifest:
        """Move planes ``planes_from..`` of ``snapshot`` into tier ``to`` (None or "local": back into the
        archive); planes ``0..planes_from-1`` stay local, in a stream of their own, so a read of only
        those never opens the tier. A revision: checked bit for bit, then switched atomically; nothing
        is done where the snapshot is already in that form. Returns the manifest.

        >>> archive.tier(sid, planes_from=2, to="cold")  # doctest: +SKIP
        """
        from gpupas.tiers import move  # the one call up the layers (docs/architecture.md)

        return move(self, snapshot, planes_from=planes_from, to=to)

    def _check_base(self, snapshot: str, base: str, read: Callable[[str], Manifest] | None = None) -> None:
        """InvalidInputError where ``base`` is ``snapshot`` or a delta on it, or a delta on it would make a
        chain longer than ``max_chain``; ``read``: how manifests are read (default: this session's cache)."""
        read = read or self.manifest
        m, seen, depth = read(base), {base}, 0
        while True:
            if m.id == snapshot:
                raise InvalidInputError(f"snapshot {base} is {snapshot} or a delta on it: it cannot be its base")
            if m.base is None:
                break
            if m.base in seen:
                raise IntegrityError(f"snapshot {base}: its delta chain loops back to {m.base}")
            seen.add(m.base)
            depth += 1
            m = read(m.base)
        if depth + 1 > self.max_chain:
            raise InvalidInputError(f"a delta on {base} would make a chain of {depth + 1} links; at most "
                                    f"{self.max_chain} are allowed")

    def _check_children(self, snapshot: str, new_base: str | None) -> None:
        """Before ``snapshot`` is re-based: snapshots of formats 1 and 2 that extrapolate ('pred') along its
        current base name it only implicitly (re-basing it would cut them off); and, with ``new_base``, the
        snapshots built on it must stay within ``max_chain`` links (or no deeper than they are)."""
        children: dict[str, list[str]] = {}
        for sid in self.store.list_snapshots():
            m = self.manifest(sid)
            if m.implicit_grand and m.base == snapshot and m.has_pred:
                raise InvalidInputError(f"snapshot {sid} (format {m.format}) extrapolates along {snapshot}'s delta "
                                        f"base; re-encode it first (Archive.revise({sid!r}): it becomes format 3), "
                                        f"then change the base of {snapshot} (gpupas compact does both, in order)")
            if m.base is not None:
                children.setdefault(m.base, []).append(sid)
        if new_base is None:
            return
        deepest, height, level, seen = snapshot, 0, [snapshot], {snapshot}
        while nxt := [c for s in level for c in children.get(s, ()) if c not in seen]:  # a level at a time
            seen.update(nxt)
            deepest, height, level = nxt[0], height + 1, nxt
        depth = self.depth(new_base) + 1 + height
        if height and depth > self.max_chain and depth > self.depth(snapshot) + height:
            raise InvalidInputError(f"a delta of {snapshot} on {new_base} would put snapshot {deepest}, built on it, "
                                    f"{depth} links deep; at most {self.max_chain} are allowed: give {snapshot} a "
                                    "base nearer a whole snapshot, or store it whole (base=None)")

    def _pred_bits(self, m: Manifest, backend: Any) -> dict[str, Any]:
        names = [e.name for e in m.tensors if e.enc == "pred"]
        if not names or m.grand is None:
            return {}
        return self._read(m.grand, names, backend)[0]

    # -- restore -----------------------------------------------------------------------------------------------
    def _read(self, snapshot: str, names: Iterable[str] | None, backend: Any,
              cache: bool = True) -> tuple[dict[str, Any], bool]:
        """Raw bits of ``names`` of ``snapshot`` along its chain (see :meth:`fresh`)."""
        return self.fresh(lambda: chain.read_bits(self.store, snapshot, names, manifests=self.manifest,
                                                   backend=backend, executor=self.executor,
                                                   cache=self.bases if cache else None))

    def fresh(self, read: Callable[[], Any]) -> Any:
        """``read()`` (a read of this archive through its manifests), retried once on fresh manifests where it
        failed as a read of out-of-date ones does (chunks missing, a tier gone) and another process's revision
        (a compaction or tier move, then gc or a tier's removal) replaced a manifest this session holds."""
        try:
            return read()
        except (IntegrityError, ConflictError, TierNotFoundError, TierUnavailableError):
            stale = [s for s in list(self._manifests) if self._revised(s)]
            if not stale:
                raise
            for s in stale:
                self._forget(s)
            return read()

    def _revised(self, snapshot: str) -> bool:
        try:
            return self.store.read_manifest(snapshot).revision != self._manifests[snapshot].revision
        except (KeyError, SnapshotNotFoundError, IntegrityError):
            return True

    def restore(self, snapshot: str, names: Iterable[str] | None = None, *, framework: str = "numpy",
                device: str | None = None) -> dict[str, Any]:
        """The tensors of ``snapshot`` (all, or ``names``), bit-exact: NumPy arrays (or ``framework="torch"``
        tensors); with ``device="cuda"``, decoded on the GPU into CuPy arrays or torch CUDA tensors.

        The arrays of one restore are views of one allocation (huge pages, so fewer page faults);
        copy a tensor that should outlive the others without keeping them in memory.
        """
        if framework not in ("numpy", "torch"):
            raise InvalidInputError(f"framework must be 'numpy' or 'torch', not {framework!r}")
        backend = get_backend(resolve_device(device))
        bits, cached = self._read(snapshot, _names(names), backend)
        m = self.manifest(snapshot)
        if cached:  # arrays the cache holds, which whoever else holds them may change at any moment: the copy checked
            bits = {n: b.copy() for n, b in bits.items()}
            if backend.crc32_many(list(bits.values()), self.executor) != [m.tensor(n).crc32 for n in bits]:
                self.bases.drop(snapshot)
                bits = self._read(snapshot, _names(names), backend, cache=False)[0]
        return backend.outputs(m, bits, framework)

    def read_planes(self, snapshot: str, planes: int = 1, names: Iterable[str] | None = None, *,
                    base_planes: int | None = None) -> PlaneRead:
        """The tensors of ``snapshot`` (all, or ``names``) from their highest ``planes`` byte planes only:
        a :class:`gpupas.engine.partial.PlaneRead` with ``approx`` (missing bits at their midpoint),
        guaranteed bounds ``lo``/``hi`` (and ``unbounded`` where a NaN was possible), ``bytes_read`` and
        ``bytes_total`` (bases included). Only the chunks holding those planes are fetched; a delta's
        bases are read with as many planes (at least ``base_planes``, if given). Floats
        committed with ``layout=Layout(rotate=False)`` bound tightly (their sign is in the top plane);
        see docs/partial-reads.md.

        >>> import numpy as np, gpupas, tempfile
        >>> a = gpupas.create_archive(tempfile.mkdtemp() + "/arc")
        >>> m = a.commit({"w": np.linspace(-1, 1, 5, dtype=np.float32)}, layout=gpupas.Layout(rotate=False))
        >>> r = a.read_planes(m.id, planes=2)
        >>> bool(np.all((r.lo["w"] <= a.restore(m.id)["w"]) & (a.restore(m.id)["w"] <= r.hi["w"])))
        True
        """
        from gpupas.engine.partial import PartialReader

        names = _names(names)

        def read() -> PlaneRead:
            with PartialReader(self.store, self.manifest, get_backend("numpy"), self.executor, base_planes) as r:
                return r.read(snapshot, planes, names)

        return self.fresh(read)

    def verify(self, snapshot: str) -> int:
        """Re-read every chunk and tensor of ``snapshot`` (and what it needs of its chain); raises
        IntegrityError. Returns the tensor count."""
        self.bases.drop(_sid(snapshot))
        self.refresh()  # manifests are read again: one damaged since it was first read is found
        return len(self._read(snapshot, None, get_backend("numpy"), cache=False)[0])

    def verify_all(self, snapshots: Iterable[str] | str | None = None) -> Iterator[tuple[str, int | Exception]]:
        """Check every snapshot (default: all; one id may be given alone), decoding each once, parents before
        children (a base not asked for only as far as its dependents read it); yields (snapshot, tensor count or
        the error found). A delta whose base failed is decoded again along its own chain and judged by the base
        tensors it reads: damage in the base's others is the base's alone."""
        if isinstance(snapshots, str):  # one id (was read as a list of one-letter ids, each "not found")
            snapshots = [snapshots]
        sids = self.store.list_snapshots() if snapshots is None else [_sid(s) for s in snapshots]
        self.refresh()
        return chain.read_all(self.store, sids, manifests=self.manifest, backend=get_backend("numpy"),
                              executor=self.executor)

    # -- reporting ---------------------------------------------------------------------------------------------
    def report(self, snapshot: str) -> list[dict[str, Any]]:
        """Per-tensor rows: name, dtype, shape, encoding, raw and stored bytes, stored per plane."""
        return [{"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "enc": e.enc, "ctx": e.ctx,
                 "nbytes": e.nbytes, "stored": e.stored, "planes": list(e.plane_bytes),
                 "ratio": e.stored / e.nbytes if e.nbytes else 0.0,
                 "lossy": None if e.scheme is None else schemes.describe(e.scheme),
                 "error": None if e.scheme is None else e.scheme.get("error")}
                for e in self.manifest(snapshot).tensors]
