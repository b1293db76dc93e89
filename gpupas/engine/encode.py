"""Writing a snapshot's streams: planes of every segment into the workspace, chunks coded and sharded.

:func:`write_streams` is a function of (store, staged tensors, setting, backend, executor): a commit
and a revision (re-encoding an existing snapshot with another setting, codec or plane grouping)
both call it, and so can a Dask task. It writes folders that nothing references yet; the caller
publishes the manifest that names them.
"""

from __future__ import annotations

import itertools
import math
import numbers
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from gpupas.backend import fast
from gpupas.codecs import registry
from gpupas.codecs.policy import ChunkPolicy
from gpupas.engine.stage import Staged, twins
from gpupas.format.layout import group_bounds, place, segments
from gpupas.format.manifest import Manifest, Stream, TensorEntry
from gpupas.pas.context import count_entropies, sample_counts
from gpupas.pas.planes import LAYOUTS
from gpupas.pas.settings import Setting
from gpupas.pas.transform import MIN_SEGMENT, SEGMENT
from gpupas.store.archive import ArchiveStore
from gpupas.xp import to_numpy

CHUNK_SIZE = 1 << 18  # bytes per chunk (CPU): the coders' block size and the unit of parallel work
MAX_CHUNK = 1 << 30  # the largest chunk a reader accepts (FORMAT.md 5)
SHARD_CHUNKS = 4096  # chunks per shard file at most: 1 GiB of planes
SHARE_SAMPLES = 512  # bytes sampled (evenly spaced) per part of a chunk that several planes share


@dataclass(frozen=True)
class Layout:
    """How a snapshot's bytes are laid out: plane groups (one stream each) and chunk size."""

    groups: tuple[int, ...] = ()  # first plane of each stream after the first, e.g. (1,): exponents alone
    chunk_size: int = CHUNK_SIZE
    segment: int = SEGMENT
    rotate: bool = True  # floats' sign bit rotated to the bottom plane (False: kept on top, for bounded reads)
    tiers: tuple[str | None, ...] = ()  # the tier of each plane group's stream, first group first (None: local)

    def __post_init__(self) -> None:
        from gpupas.errors import InvalidInputError

        def whole(x: Any) -> bool:
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        for field in ("groups", "tiers"):  # an iterator (a generator) read once, here, not used up by the checks
            x = getattr(self, field)
            if isinstance(x, Iterator):
                object.__setattr__(self, field, tuple(x))
        if not whole(self.segment) or not MIN_SEGMENT <= self.segment <= 1 << 31:
            raise InvalidInputError(f"Layout(segment={self.segment!r}): a segment holds {MIN_SEGMENT} to 2^31 values "
                                    f"(default {SEGMENT})")
        if not whole(self.chunk_size) or not 1 <= self.chunk_size <= MAX_CHUNK:
            raise InvalidInputError(f"Layout(chunk_size={self.chunk_size!r}): a chunk holds 1 to 2^30 bytes "
                                    f"(default {CHUNK_SIZE})")
        try:
            groups_ok = all(whole(g) and g >= 0 for g in self.groups)
        except TypeError:  # not iterable
            groups_ok = False
        if not groups_ok:
            raise InvalidInputError(f"Layout(groups={self.groups!r}): the first plane of each further plane group, "
                                    "as integers (e.g. (1,): the top plane alone)")
        try:
            tiers_ok = not isinstance(self.tiers, str | bytes) and all(t is None or isinstance(t, str)
                                                                        for t in self.tiers)
        except TypeError:  # not iterable
            tiers_ok = False
        if not tiers_ok:
            raise InvalidInputError(f"Layout(tiers={self.tiers!r}): the tier of each plane group's stream, first "
                                    "group first, as tier names or None (local), e.g. (None, 'cold')")
        if not isinstance(self.rotate, bool | np.bool_) and self.rotate not in (0, 1):
            raise InvalidInputError(f"Layout(rotate={self.rotate!r}): True or False")
        object.__setattr__(self, "rotate", bool(self.rotate))

    def tier_of(self, first_plane: int) -> str | None:
        """The tier of the stream whose planes start at ``first_plane`` (None: the archive's own store)."""
        for g, (lo, hi) in enumerate(group_bounds(self.groups)):
            if lo <= first_plane < hi:
                return self.tiers[g] if g < len(self.tiers) else None
        return None


def placement(m: Manifest) -> tuple[tuple[int, ...], tuple[str | None, ...]]:
    """The plane groups of ``m`` (first plane of each stream after the first) and each group's tier."""
    firsts: dict[int, int] = {}
    for e in m.tensors:
        for p in e.parts:
            firsts[p.stream] = min(p.first, firsts.get(p.stream, p.first))
    order = sorted(range(len(m.streams)), key=lambda s: firsts.get(s, 0))
    groups = tuple(firsts[s] for s in order if firsts.get(s, 0) > 0)
    return groups, tuple(m.streams[s].tier for s in order)


def layout_of_snapshot(m: Manifest, groups: tuple[int, ...] | None = None, tiers: tuple[str | None, ...] | None = None
                       ) -> Layout:
    """A layout that writes ``m`` again as it is (its chunk size, segment, sign rotation, plane groups and
    tiers), with ``groups`` and ``tiers`` replaced where given."""
    have_groups, have_tiers = placement(m)
    rotate = all(e.rot for e in m.tensors)  # False only where floats kept their sign bit on top
    chunk = m.streams[0].chunk_size if m.streams else Layout().chunk_size
    return Layout(groups=have_groups if groups is None else groups, chunk_size=chunk, segment=m.segment,
                  rotate=rotate, tiers=have_tiers if tiers is None else tiers)


def tiered(m: Manifest) -> bool:
    """Whether any stream of ``m`` lives in a tier."""
    return any(s.tier is not None for s in m.streams)


def new_folder(sid: str) -> str:
    """A fresh folder name for a stream of ``sid``: concurrent writers never share one."""
    return f"{sid}.{uuid.uuid4().hex[:8]}"


def write_streams(store: ArchiveStore, sid: str, staged: Sequence[Staged], setting: Setting, backend: Any,
                  executor: Any, layout: Layout = Layout(), small: bool = False,
                  meanwhile: Callable[[], None] | None = None) -> tuple[tuple[Stream, ...], tuple[TensorEntry, ...]]:
    """Write the streams of a snapshot of ``staged`` tensors; returns them and the tensor entries.
    ``meanwhile``: a check run once every chunk is coded, while the shards close (its error fails the write).
    A tensor coded exactly as an earlier one (:func:`~gpupas.engine.stage.twins`) is coded once: its entry
    names the earlier one's parts, with no stored bytes of its own."""
    alike = twins(staged)
    every, staged = staged, [st for i, st in enumerate(staged) if i not in alike]
    extras = [st.extra() for st in staged]
    placements, lengths = place([(st.layout.width, st.values, x.size) for st, x in zip(staged, extras)],
                                layout.groups)
    policy = ChunkPolicy(setting.codecs, setting.try_all, setting.zstd_level)
    table = policy.table()
    inner = {cid: list(registry.info(cid).zarr_codecs) for cid in table.values()}
    firsts: dict[int, int] = {}  # the first plane of each stream: which plane group, so which tier
    for pl in placements:
        for p in pl.parts:
            firsts[p.stream] = min(p.first, firsts.get(p.stream, p.first))
    streams: list[Stream] = []
    chunk_sizes: list[list[int]] = []
    with backend.workspace(sum(lengths)) as ws:
        starts = np.cumsum([0, *lengths]).tolist()
        bufs = [ws[a:b] for a, b in itertools.pairwise(starts)]
        bounds = backend.encode_planes(staged, extras, placements, bufs, layout.segment, setting.min_group, executor,
                                       small)
        written: list[Stream] = []
        closing: list[tuple[Any, Any, Any]] = []  # per stream: its shards' closing, its sink, its documents
        try:
            for s, length in enumerate(lengths):
                nchunks = -(-length // layout.chunk_size)
                stream = Stream(new_folder(sid), length, layout.chunk_size, max(1, min(SHARD_CHUNKS, nchunks)),
                                table, "", tier=layout.tier_of(firsts.get(s, 0)))
                made = executor.background(store.create_stream, stream, inner)  # its Zarr documents, meanwhile
                written.append(stream)
                sink = store.sink(stream, executor.background)
                try:
                    coded = backend.encode_chunks(policy, bufs[s], bounds[s], layout.chunk_size, sink.add, executor,
                                                  small)
                except BaseException:
                    sink.abort()
                    made.exception()  # written (or failed) before the folder is removed below
                    raise
                closing.append((executor.background(sink.close, False), sink, made))  # indexes, meanwhile
                streams.append(replace(stream, chunks="".join(letter for letter, _ in coded),
                                       stored=sum(n for _, n in coded)))
                chunk_sizes.append([n for _, n in coded])
            entries = [TensorEntry(name=st.name, dtype=st.dtype or st.layout.name, shape=st.shape, nbytes=st.nbytes,
                                   crc32=st.crc, enc=st.plan.enc, ctx=st.plan.ctx, parts=pl.parts,
                                   rows=None if st.changed is None else st.coded_shape[0], extras=pl.extras,
                                   rot=st.layout.rotate or not LAYOUTS[st.layout.name].rotate,
                                   scheme=st.scheme)
                       for st, pl in zip(staged, placements)]
            entries = _with_twins(every, attribute(entries, streams, bufs, chunk_sizes, layout.segment), alike)
            if meanwhile is not None:
                meanwhile()
            for stream, files in zip(streams, _closed(closing)):
                store.sync_stream(stream, files)
        except BaseException:
            _closed(closing, failed=True)  # nothing still writes into a folder removed below
            for stream in written:  # never published: remove now rather than leave it to gc
                try:
                    store.delete_folder(stream.folder, stream.tier)
                except OSError:
                    pass
            raise
    return tuple(streams), tuple(entries)


def _with_twins(staged: Sequence[Staged], entries: Sequence[TensorEntry], alike: dict[int, int]) -> list[TensorEntry]:
    """The entries of every one of ``staged`` from those of the tensors coded (all but the keys of ``alike``,
    in order): a twin's entry is its earlier tensor's, under its own name, with no stored bytes."""
    coded = iter(entries)
    out: list[TensorEntry] = []
    at: dict[int, TensorEntry] = {}
    for i, st in enumerate(staged):
        if i in alike:
            e = at[alike[i]]
            out.append(replace(e, name=st.name, stored=0, plane_bytes=(0,) * len(e.plane_bytes)))
        else:
            at[i] = next(coded)
            out.append(at[i])
    return out


def _closed(closing: Sequence[tuple[Any, Any, Any]], failed: bool = False) -> list[list[str]]:
    """Wait until every stream's shards are closed and its documents written; a sink whose closing failed is
    aborted (its files closed). Raises the first error unless ``failed`` (the caller is unwinding already).
    Returns each stream's files (documents and shards), to be made durable."""
    first: BaseException | None = None
    for fut, sink, made in closing:
        closed, documents = fut.exception(), made.exception()  # each waits
        if closed is not None:
            sink.abort()
        first = first or closed or documents
    if first is not None and not failed:
        raise first
    return [] if first is not None else [made.result() + fut.result() for fut, _, made in closing]


def attribute(entries: list[TensorEntry], streams: Sequence[Stream], bufs: Sequence[Any],
              chunk_sizes: Sequence[Sequence[int]], segment: int) -> list[TensorEntry]:
    """Share each chunk's stored bytes among the tensor planes in it, weighted by sampled entropy.

    Exact for planes that fill their chunks; an estimate where small planes share one. Row masks
    and 'pred' factors count in a tensor's ``stored`` bytes, not in its ``plane_bytes``. Vectorized over
    the pieces (a plane's bytes inside one chunk): a snapshot of thousands of small tensors shares
    thousands of chunks.
    """
    widths = [e.width for e in entries]
    slots = np.cumsum([0] + [w + 1 for w in widths])  # entry i, plane p -> slots[i] + p (p == width: extras)
    # (stream, start, length, planes, first slot): ``planes`` pieces of ``length`` bytes, back to back
    runs: list[tuple[int, int, int, int, int]] = []
    for i, e in enumerate(entries):
        for p in e.parts:
            runs.extend((p.stream, p.offset + a * p.count, b - a, p.count, slots[i] + p.first)
                        for a, b in segments(e.values, segment))
        if e.extras is not None:
            runs.append((e.extras[0], e.extras[1], e.extras_nbytes, 1, slots[i] + widths[i]))
    r = np.array(runs, np.int64).reshape(-1, 5)
    r = r[(r[:, 2] > 0) & (r[:, 3] > 0)]
    k = np.arange(int(r[:, 3].sum())) - np.repeat(np.cumsum(r[:, 3]) - r[:, 3], r[:, 3])  # plane within its run
    seg_stream, seg_len = np.repeat(r[:, 0], r[:, 3]), np.repeat(r[:, 2], r[:, 3])
    seg_start, seg_slot = np.repeat(r[:, 1], r[:, 3]) + k * seg_len, np.repeat(r[:, 4], r[:, 3]) + k
    alone: list[tuple[np.ndarray, np.ndarray]] = []  # (slot, stored) of chunks one plane fills
    shared: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # (slot, length, chunk, h) of pieces
    first_chunk = 0  # a number for each chunk of the snapshot, stream after stream
    for s, stream in enumerate(streams):
        sel = np.flatnonzero(seg_stream == s)
        sel = sel[np.argsort(seg_start[sel], kind="stable")]  # stream order (planes never overlap)
        lo, hi, slot = seg_start[sel], seg_start[sel] + seg_len[sel], seg_slot[sel]
        size, end, stored = stream.chunk_size, len(bufs[s]), np.asarray(chunk_sizes[s], np.int64)
        j, c, a, b = _pieces(lo, hi, size, end, len(stored))
        one = np.bincount(c, minlength=len(stored))[c] == 1
        alone.append((slot[j[one]], stored[c[one]]))
        a, b = a[~one], b[~one]
        ranges = np.stack([a, b, np.maximum(1, (b - a) // SHARE_SAMPLES)], axis=1)
        h = fast.range_entropies(bufs[s], ranges)
        if h is None:
            h = count_entropies(sample_counts([to_numpy(bufs[s][x:y:z]) for x, y, z in ranges.tolist()]))
        shared.append((slot[j[~one]], b - a, c[~one] + first_chunk, h))
        first_chunk += len(stored)
    none = np.zeros(0, np.int64)
    stored_of = np.concatenate([none, *(np.asarray(cs, np.int64) for cs in chunk_sizes)])
    slot_sh, length, chunk = (np.concatenate([none, *(x[q] for x in shared)]) for q in range(3))
    weight = length * np.maximum(0.05, np.concatenate([np.zeros(0), *(x[3] for x in shared)]))
    # A shared chunk's bytes in proportion to the weights of its pieces, none above its own length. bincount adds in
    # index order, so each sum is the one a loop over the chunks would make: chunks one plane fills first, then
    # the shared ones.
    got = _share(chunk, weight, length.astype(np.float64), stored_of.astype(np.float64), first_chunk)
    share = np.bincount(np.concatenate([none, *(x[0] for x in alone), slot_sh]),
                        weights=np.concatenate([np.zeros(0), *(x[1].astype(np.float64) for x in alone), got]),
                        minlength=int(slots[-1])).tolist()
    spans = list(zip(slots[:-1].tolist(), slots[1:].tolist()))
    totals = apportion([sum(share[u:v]) for u, v in spans], int(stored_of.sum()))  # adds up to the snapshot's
    return [replace(e, plane_bytes=tuple(apportion(share[u:v - 1], min(n, round(sum(share[u:v - 1]))))), stored=n)
            for e, (u, v), n in zip(entries, spans, totals)]  # planes add up to at most the tensor's bytes


def _share(chunk: np.ndarray, weight: np.ndarray, length: np.ndarray, stored: np.ndarray, nchunks: int) -> np.ndarray:
    """Each piece's part of its chunk's ``stored`` bytes: in proportion to ``weight``, but no piece more than its
    ``length`` (a sampled entropy biased low elsewhere in the chunk must not make a plane cost more than its raw
    bytes): a piece over it gets its length and the rest is shared again among the others; what is left where
    every piece got its length (a raw chunk's framing) goes by length."""
    got = np.zeros(len(chunk))
    active = np.ones(len(chunk), bool)
    left = stored.copy()
    while True:
        w = np.where(active, weight, 0.0)
        total = np.bincount(chunk, weights=w, minlength=nchunks)
        part = np.where(active, left[chunk] * w / np.where(total > 0, total, 1.0)[chunk], 0.0)
        over = active & (part > length)
        if not over.any():
            got[active] = part[active]
            break
        got[over] = length[over]
        active &= ~over
        left -= np.bincount(chunk[over], weights=length[over], minlength=nchunks)
    full = np.bincount(chunk, weights=active, minlength=nchunks) == 0  # chunks whose pieces all got their length
    rest = np.where(full & (left > 0), left, 0.0)
    if rest.any():
        got += rest[chunk] * length / np.bincount(chunk, weights=length, minlength=nchunks)[chunk]
    return got


def apportion(shares: Sequence[float], total: int) -> list[int]:
    """Whole numbers near ``shares`` that add up to ``total`` (their sum, up to float error): each share
    rounded down, then one more to the largest remainders (the earlier of equal ones first; remainders
    equal to 9 decimals are equal, so a sum's last bit, which NumPy versions order differently, decides
    nothing)."""
    out = [math.floor(x) for x in shares]
    left = total - sum(out)
    order = sorted(range(len(out)), key=lambda i: (round(out[i] - shares[i], 9), i))  # largest remainder first
    for i in order[:max(0, left)]:
        out[i] += 1
    for i in reversed(order):  # float error past the total (never seen): take it back from the smallest remainders
        if left >= 0:
            break
        if out[i] > 0:
            out[i] -= 1
            left += 1
    return out


def _pieces(lo: np.ndarray, hi: np.ndarray, size: int, end: int, nchunks: int) -> tuple[np.ndarray, ...]:
    """The pieces of byte ranges [lo, hi) (sorted, not overlapping) cut at chunk boundaries: for each, its range's
    index, its chunk and its [a, b), in chunk order; bytes past ``end`` or the last chunk dropped."""
    c0, c1 = lo // size, np.minimum((hi - 1) // size, nchunks - 1)
    many = np.maximum(c1 - c0 + 1, 0)
    j = np.repeat(np.arange(len(lo)), many)
    c = np.repeat(c0, many) + np.arange(int(many.sum())) - np.repeat(np.cumsum(many) - many, many)
    a, b = np.maximum(lo[j], c * size), np.minimum(np.minimum(hi[j], (c + 1) * size), end)
    keep = b > a
    return j[keep], c[keep], a[keep], b[keep]
