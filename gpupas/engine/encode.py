"""Writing a snapshot's streams: planes of every segment into the workspace, chunks coded and sharded.

:func:`write_streams` is a function of (store, staged tensors, setting, backend, executor): a commit
and a revision (re-encoding an existing snapshot with another setting, codec or plane grouping)
both call it, and so can a Dask task. It writes folders that nothing references yet; the caller
publishes the manifest that names them.
"""

from __future__ import annotations

import bisect
import itertools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from gpupas.backend import fast
from gpupas.codecs import registry
from gpupas.codecs.policy import ChunkPolicy
from gpupas.engine.stage import Staged
from gpupas.format.layout import group_bounds, place, plane_ranges
from gpupas.format.manifest import Stream, TensorEntry
from gpupas.pas.context import count_entropies, sample_counts
from gpupas.pas.planes import LAYOUTS
from gpupas.pas.settings import Setting
from gpupas.pas.transform import MIN_SEGMENT, SEGMENT
from gpupas.store.archive import ArchiveStore
from gpupas.xp import to_numpy

CHUNK_SIZE = 1 << 18  # bytes per chunk (CPU): the coders' block size and the unit of parallel work
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

        if not MIN_SEGMENT <= self.segment <= 1 << 31:
            raise InvalidInputError(f"Layout(segment={self.segment}): a segment holds {MIN_SEGMENT} to 2^31 values "
                                    f"(default {SEGMENT})")

    def tier_of(self, first_plane: int) -> str | None:
        """The tier of the stream whose planes start at ``first_plane`` (None: the archive's own store)."""
        for g, (lo, hi) in enumerate(group_bounds(self.groups)):
            if lo <= first_plane < hi:
                return self.tiers[g] if g < len(self.tiers) else None
        return None


def new_folder(sid: str) -> str:
    """A fresh folder name for a stream of ``sid``: concurrent writers never share one."""
    return f"{sid}.{uuid.uuid4().hex[:8]}"


def write_streams(store: ArchiveStore, sid: str, staged: Sequence[Staged], setting: Setting, backend: Any,
                  executor: Any, layout: Layout = Layout(), small: bool = False,
                  meanwhile: Callable[[], None] | None = None) -> tuple[tuple[Stream, ...], tuple[TensorEntry, ...]]:
    """Write the streams of a snapshot of ``staged`` tensors; returns them and the tensor entries.
    ``meanwhile``: a check run once every chunk is coded, while the shards close (its error fails the write)."""
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
                closing.append((executor.background(sink.close), sink, made))  # indexes and fsyncs, meanwhile
                streams.append(replace(stream, chunks="".join(letter for letter, _ in coded),
                                       stored=sum(n for _, n in coded)))
                chunk_sizes.append([n for _, n in coded])
            entries = [TensorEntry(name=st.name, dtype=st.dtype or st.layout.name, shape=st.shape, nbytes=st.nbytes,
                                   crc32=st.crc, enc=st.plan.enc, ctx=st.plan.ctx, parts=pl.parts,
                                   rows=None if st.changed is None else st.coded_shape[0], extras=pl.extras,
                                   rot=st.layout.rotate or not LAYOUTS[st.layout.name].rotate,
                                   scheme=st.scheme)
                       for st, pl in zip(staged, placements)]
            entries = attribute(entries, streams, bufs, chunk_sizes, layout.segment)  # while the shards close
            if meanwhile is not None:
                meanwhile()
            _closed(closing)
            for stream in streams:
                store.sync_stream(stream)
        except BaseException:
            _closed(closing, failed=True)  # nothing still writes into a folder removed below
            for stream in written:  # never published: remove now rather than leave it to gc
                try:
                    store.delete_folder(stream.folder, stream.tier)
                except OSError:
                    pass
            raise
    return tuple(streams), tuple(entries)


def _closed(closing: Sequence[tuple[Any, Any, Any]], failed: bool = False) -> None:
    """Wait until every stream's shards are closed and its documents written; a sink whose closing failed is
    aborted (its files closed). Raises the first error unless ``failed`` (the caller is unwinding already)."""
    first: BaseException | None = None
    for fut, sink, made in closing:
        closed, documents = fut.exception(), made.exception()  # each waits
        if closed is not None:
            sink.abort()
        first = first or closed or documents
    if first is not None and not failed:
        raise first


def attribute(entries: list[TensorEntry], streams: Sequence[Stream], bufs: Sequence[Any],
              chunk_sizes: Sequence[Sequence[int]], segment: int) -> list[TensorEntry]:
    """Share each chunk's stored bytes among the tensor planes in it, weighted by sampled entropy.

    Exact for planes that fill their chunks; an estimate where small planes share one. Row masks
    and 'pred' factors count in a tensor's ``stored`` bytes, not in its ``plane_bytes``.
    """
    shares = [[0.0] * (e.width + 1) for e in entries]
    shared: list[tuple[int, list[tuple[int, int, int, int]]]] = []  # (stored, parts) of chunks several planes share
    ranges: list[tuple[int, int, int]] = []
    counts: list[np.ndarray] = []
    for s, stream in enumerate(streams):
        segs = []  # (start, end, entry index, plane) in this stream, in stream order
        for i, e in enumerate(entries):
            segs.extend((lo, lo + b - a, i, p) for st, lo, p, a, b in plane_ranges(e, segment) if st == s)
            if e.extras is not None and e.extras[0] == s:
                segs.append((e.extras[1], e.extras[1] + e.extras_nbytes, i, e.width))
        segs.sort()
        starts = [x[0] for x in segs]
        buf, size = bufs[s], stream.chunk_size
        for c, stored in enumerate(chunk_sizes[s]):
            lo, hi = c * size, min(len(buf), (c + 1) * size)
            parts = []
            for x in segs[max(0, bisect.bisect_right(starts, lo) - 1) :]:
                if x[0] >= hi:
                    break
                a, b = max(lo, x[0]), min(hi, x[1])
                if b > a:
                    parts.append((x[2], x[3], a, b))
            if len(parts) == 1:  # the common case: one plane fills the chunk
                shares[parts[0][0]][parts[0][1]] += stored
            elif parts:
                shared.append((stored, parts))
                ranges.extend((a, b, max(1, (b - a) // SHARE_SAMPLES)) for *_, a, b in parts)
        if ranges:  # the sampled byte counts of every part of every shared chunk of this stream, in one pass
            cnt = fast.range_counts(buf, np.array(ranges, np.int64))
            counts.append(cnt if cnt is not None else sample_counts([to_numpy(buf[a:b:st]) for a, b, st in ranges]))
            ranges = []
    h = iter(count_entropies(np.concatenate(counts)).tolist()) if counts else iter(())
    for stored, parts in shared:
        weights = [(b - a) * max(0.05, x) for (*_, a, b), x in zip(parts, h)]
        total = sum(weights) or 1.0
        for (i, p, _, _), w in zip(parts, weights):
            shares[i][p] += stored * w / total
    return [replace(e, plane_bytes=tuple(round(x) for x in sh[:-1]), stored=round(sum(sh)))
            for e, sh in zip(entries, shares)]
