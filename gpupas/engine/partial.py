"""Reading a snapshot's highest byte planes only: an approximation and guaranteed bounds per value.

:class:`PartialReader` fetches and decodes only the chunks that hold the top ``k`` planes of the
tensors asked for (and their extras: row masks, 'pred' factors), remembers every chunk it has
decoded (asking for ``k + 1`` planes later fetches only what is new) and counts the stored bytes it
fetched (chunk payloads and the shard indexes it had to read), bases included.

Per tensor it rebuilds what the planes say (:mod:`gpupas.pas.bounds`): the coded values' known top
bytes, put back in natural order (a context split sorted them by a byte the decoder must know exactly,
see below), then pushed through the inverse of the encoding against what is known of the base.

Delta tensors: the base is read with the same number of planes (capped at its own width; all of them
when the child's planes are all read), recursively along the chain, and the child's bounds are the
child's coded range applied to the base's bounds. A context split of a delta was sorted by the
base's (or the prediction's) context byte: where the base's bounds do not pin that byte for every
value, the base is read one plane deeper, until they do (at its full width they always do). A row
mask's unchanged rows are the base's rows, bounds included. See docs/partial-reads.md.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpupas.engine import decode
from gpupas.engine.chain import dependencies, grand_of
from gpupas.engine.decode import damaged_chunk
from gpupas.errors import IntegrityError, InvalidInputError
from gpupas.format.checksum import crc32
from gpupas.format.layout import needed_chunks, segments
from gpupas.format.manifest import Manifest, TensorEntry
from gpupas.format.sharding import index_nbytes
from gpupas.pas import bounds as B
from gpupas.pas import schemes
from gpupas.pas.planes import LAYOUTS
from gpupas.pas.predict import alpha_from_planes
from gpupas.pas.rows import mask_from_bytes, rows_of
from gpupas.store.archive import ArchiveStore

Manifests = Callable[[str], Manifest]


@dataclass(frozen=True)
class Knowledge:
    """What the planes read say about one tensor's raw patterns (those it restores to)."""

    slots: B.Slots
    approx: np.ndarray  # uint64: the approximation's raw patterns
    exact: bool


@dataclass
class PlaneRead:
    """The tensors of a snapshot from their highest ``planes`` planes.

    ``approx``: values with the missing bits at their midpoint; ``lo``, ``hi``: guaranteed bounds
    (every restored value ``v`` satisfies ``lo <= v <= hi``, or is flagged in ``unbounded``: a NaN
    pattern was possible there, and ``lo``, ``hi`` are the dtype's extremes); all in the tensors'
    dtypes and shapes. ``exact``: per tensor, whether every value is known (then ``approx`` is
    the restored tensor, checked by its CRC-32). ``bytes_read``: stored bytes fetched so far by the
    reader (this snapshot's and its bases' chunks and shard indexes); ``bytes_total``: what a full
    restore of the same tensors fetches. ``planes_read``: snapshot -> tensor -> planes read.
    """

    snapshot: str
    planes: int
    approx: dict[str, np.ndarray]
    lo: dict[str, np.ndarray]
    hi: dict[str, np.ndarray]
    unbounded: dict[str, np.ndarray]
    exact: dict[str, bool]
    bytes_read: int
    bytes_total: int
    planes_read: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def fraction_read(self) -> float:
        """``bytes_read / bytes_total``."""
        return self.bytes_read / self.bytes_total if self.bytes_total else 1.0

    @property
    def all_exact(self) -> bool:
        return all(self.exact.values())


BLOCK = 1 << 14  # values decoded at a time: the interval arithmetic's temporaries are ~1 KB a value
SLOT_BYTES = 17  # one pattern interval of a value: lo, hi (uint64) and whether it is valid
LEAST_BYTES = 16 + SLOT_BYTES  # what a read holds a value at the least: its top bytes, its approximation (uint64)
# and one interval (a rotated float not read whole two: its sign is unknown); measured peaks are higher (35 bytes a
# value for 1-byte tensors, 118 for float32; docs/partial-reads.md)


def _fits(m: Manifest, entries: Sequence[TensorEntry], planes: int) -> None:
    """Refuse a read of ``entries`` that holds more than this machine's memory, before any chunk is read (it
    would fail in an allocation only after reading them, or be killed for memory)."""
    need = {e.name: math.prod(e.shape) * (LEAST_BYTES + SLOT_BYTES * (e.coding.rotate and planes < e.width))
            for e in entries}
    limit = decode.memory_bytes()
    if sum(need.values()) <= limit:
        return
    names = sorted(need, key=lambda n: -need[n])[:5]
    raise InvalidInputError(
        f"snapshot {m.id}: reading the highest {planes} plane(s) of {len(need)} tensor(s) ("
        + ", ".join(map(repr, names)) + (", ..." if len(need) > 5 else "")
        + f") needs at least {sum(need.values()):,} bytes of memory (a partial read holds tens of bytes a value), "
        f"more than this machine's {limit:,} bytes; read fewer tensors at a time (names=[...]), or restore a tensor "
        "too large for that (Archive.restore holds about its size)")


def _decode(top: np.ndarray, m: int, enc: str, bits: int, rotate: bool, ub: B.Slots | None,
            ub_approx: np.ndarray | None, ub2: B.Slots | None, ub2_approx: np.ndarray | None,
            alpha: np.ndarray | None) -> tuple[B.Slots, np.ndarray]:
    """:func:`gpupas.pas.bounds.decode`, :data:`BLOCK` values at a time (each value's bounds are its own)."""
    if top.size <= BLOCK:
        return B.decode(top, m, enc, bits, rotate, ub, ub_approx, ub2, ub2_approx, alpha)
    n = top.size
    approx = np.empty(n, np.uint64)
    cols: list[np.ndarray] = []  # lo, hi, ok: as wide as the widest block's (a wider block widens them)
    for a in range(0, n, BLOCK):
        cut = slice(a, a + BLOCK)
        got, approx[cut] = B.decode(top[cut], m, enc, bits, rotate, _rows(ub, cut), _rows(ub_approx, cut),
                                    _rows(ub2, cut), _rows(ub2_approx, cut), _rows(alpha, cut))
        w = got.lo.shape[1]
        if not cols or w > cols[0].shape[1]:
            wider = [np.zeros((n, w), np.uint64), np.zeros((n, w), np.uint64), np.zeros((n, w), bool)]
            for new, old in zip(wider, cols):
                new[:a, : old.shape[1]] = old[:a]
            cols = wider
        for col, part in zip(cols, (got.lo, got.hi, got.ok)):
            col[cut, :w] = part
    return B.Slots(cols[0], cols[1], cols[2], bits), approx


def _rows(x: Any, cut: slice) -> Any:
    """Rows ``cut`` of Slots or an array (None stays None)."""
    return None if x is None else x.take(cut) if isinstance(x, B.Slots) else x[cut]


class _Unpinned(Exception):
    """A context split's sort byte is not known for every value: read more of the base."""


class PartialReader:
    """Reads the highest planes of snapshots of one archive store, chunk by chunk, each chunk once.

    ``manifests``: snapshot id -> manifest (``Archive.manifest``); ``backend``, ``executor``: where
    chunks are decoded (the NumPy backend and the archive's executor); ``base_planes``: read at least
    that many planes of every base (default: as many as of the delta itself; a large number reads
    the bases whole, which bounds a delta as tightly as its own planes allow).
    """

    def __init__(self, store: ArchiveStore, manifests: Manifests, backend: Any, executor: Any,
                 base_planes: int | None = None):
        if base_planes is not None and (not isinstance(base_planes, numbers.Integral) or isinstance(base_planes, bool)
                                        or base_planes < 0):
            raise InvalidInputError(f"base_planes must be a whole number of planes (0 or more), not {base_planes!r}")
        self.store, self.manifests, self.backend, self.executor = store, manifests, backend, executor
        self.base_planes = base_planes
        self.bytes_read = 0
        self._bufs: dict[tuple[str, int], np.ndarray] = {}
        self._have: dict[tuple[str, int], set[int]] = {}
        self._readers: dict[tuple[str, int], Any] = {}
        self._indexes: set[tuple[str, int, str, int]] = set()
        self._known: dict[tuple[str, str, int], Knowledge] = {}
        self.planes_read: dict[str, dict[str, int]] = {}

    def __enter__(self) -> PartialReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the shard files and drop the decoded chunks."""
        for r in self._readers.values():
            r.close()
        self._readers.clear()
        self._bufs.clear()
        self._have.clear()
        self._known.clear()

    # -- the public read -----------------------------------------------------------------------------------------
    def read(self, snapshot: str, planes: int, names: Iterable[str] | None = None) -> PlaneRead:
        """Approximations and bounds of tensors ``names`` (all when None) of ``snapshot`` from their highest
        ``planes`` planes (a tensor of fewer planes is read whole)."""
        if not isinstance(planes, numbers.Integral) or isinstance(planes, bool) or planes < 1:
            raise InvalidInputError(f"planes must be a positive integer, not {planes!r}")
        planes = int(planes)
        m = self.manifests(snapshot)
        entries = m.select(None if names is None else list(names))
        _fits(m, entries, planes)
        out = PlaneRead(snapshot, planes, {}, {}, {}, {}, {}, 0, 0)
        for e in entries:
            k = self.knowledge(snapshot, e.name, planes)
            for key in [key for key in self._known if key[1] == e.name and key[0] != snapshot]:
                del self._known[key]  # the bases' (their chunks stay: a deeper read decodes only what is new)
            got = [B.to_values(k.slots.take(slice(a, a + BLOCK)), e.dtype) for a in range(0, max(1, k.slots.n), BLOCK)]
            lo, hi, unb = (np.concatenate([g[i] for g in got]) for i in range(3))
            out.approx[e.name] = B.clip(k.approx, lo, hi, unb, e.dtype).reshape(e.shape)
            out.lo[e.name], out.hi[e.name] = lo.reshape(e.shape), hi.reshape(e.shape)
            out.unbounded[e.name] = unb.reshape(e.shape)
            out.exact[e.name] = k.exact
        out.bytes_read = self.bytes_read
        out.bytes_total = self.full_bytes(snapshot, [e.name for e in entries])
        out.planes_read = {s: dict(t) for s, t in self.planes_read.items()}
        return out

    def full_bytes(self, snapshot: str, names: Iterable[str] | None = None) -> int:
        """Stored bytes a full restore of ``names`` of ``snapshot`` fetches: every chunk payload and shard
        index it needs along the delta chain (read from the shard indexes, which this does not count; for a
        stream in a tier this read did not touch, estimated from the manifest's stored bytes, so that a
        read of the local planes makes no request to the tier)."""
        need: dict[str, set[str] | None] = {snapshot: None if names is None else set(names)}
        work = [snapshot]
        while work:
            sid = work.pop()
            for dep, want in dependencies(self.manifests(sid), need[sid], self.manifests):
                have = need.get(dep, set())
                if dep not in need or (have is not None and not want <= have):
                    need[dep] = None if have is None else have | want
                    work.append(dep)
        total = 0
        for sid, names in need.items():
            m = self.manifests(sid)
            entries = m.select(None if names is None else sorted(names))
            for s, chunks in needed_chunks(m, entries).items():
                stream = m.streams[s]
                if stream.tier is not None and (m.id, s) not in self._readers:  # never opened: no request for it
                    total += round(stream.stored * len(chunks) / max(1, stream.nchunks))
                    total += -(-len(chunks) // stream.shard_chunks) * index_nbytes(stream.shard_chunks)
                    continue
                reader = self._reader(m, s)
                shards = set()
                for c in chunks:
                    where = reader.locate(c)
                    if where is None:
                        raise self.store.changed(m) or IntegrityError(
                            f"snapshot {sid}: chunk {c} of stream {s} is missing")
                    total += where[2]
                    shards.add((m.streams[s].codec_of(c), c // m.streams[s].shard_chunks))
                total += len(shards) * index_nbytes(m.streams[s].shard_chunks)
        return total

    # -- what a tensor's planes say ------------------------------------------------------------------------------
    def knowledge(self, sid: str, name: str, planes: int) -> Knowledge:
        """What the highest ``planes`` planes of tensor ``name`` of snapshot ``sid`` (and what that needs of its
        bases) say about its raw patterns."""
        m = self.manifests(sid)
        e = m.tensor(name)
        k = min(planes, e.width)
        key = (sid, name, k)
        if key in self._known:
            return self._known[key]
        self._fetch(m, e, k)
        got = None
        if not e.reads_base:
            got = self._tensor(m, e, k, None, None)
        else:
            if m.base is None:
                raise IntegrityError(f"snapshot {sid}: tensor {name!r} is a delta but the snapshot has no base")
            base_e = self._entry(m.base, name, sid)
            gid = grand_of(m, self.manifests) if e.enc == "pred" else None
            grand_e = self._entry(gid, name, sid) if gid is not None else None
            if e.enc == "pred" and grand_e is None:
                raise IntegrityError(f"snapshot {sid}: 'pred' tensor {name!r} names no grand-base")
            least = self.base_planes or 1
            kb = base_e.width if k >= e.width else min(max(k, least), base_e.width)
            kg = 0 if grand_e is None else (grand_e.width if k >= e.width else min(max(k, least), grand_e.width))
            while got is None:
                base = self.knowledge(m.base, name, kb)
                grand = None if grand_e is None else self.knowledge(gid, name, kg)  # type: ignore[arg-type]
                try:
                    got = self._tensor(m, e, k, base, grand)
                except _Unpinned:
                    done = kb >= base_e.width and (grand_e is None or kg >= grand_e.width)
                    if done:  # cannot happen: fully known bases pin every byte
                        raise IntegrityError(f"snapshot {sid}: tensor {name!r} cannot be bounded") from None
                    kb = min(kb + 1, base_e.width)
                    kg = kg if grand_e is None else min(kg + 1, grand_e.width)
        if got.exact and crc32(got.approx.astype(LAYOUTS[e.dtype].uint)) != e.crc32:
            raise IntegrityError(f"snapshot {sid}: tensor {name!r} does not match its checksum after decoding"
                                 + (f" (is its base {m.base} intact? run verify on it)" if e.reads_base else ""))
        self._known[key] = got
        seen = self.planes_read.setdefault(sid, {})
        seen[name] = max(seen.get(name, 0), k)
        return got

    def _entry(self, sid: str, name: str, user: str) -> TensorEntry:
        try:
            return self.manifests(sid).tensor(name)
        except KeyError:
            raise IntegrityError(f"snapshot {sid} lacks tensor {name!r}, which snapshot {user} is a delta on") from None

    def _tensor(self, m: Manifest, e: TensorEntry, k: int, base: Knowledge | None,
                grand: Knowledge | None) -> Knowledge:
        """The knowledge of ``e`` from its top ``k`` planes (in the buffers) and its bases' knowledge."""
        coding = e.coding
        bits, w = coding.bits, e.width
        m_bits = 8 * (w - k)
        rows, per = rows_of(e.shape)
        n = e.values
        changed = alpha = None
        ub = ub2 = ub_approx = ub2_approx = None
        if base is not None:
            if base.approx.size != rows * per:
                raise IntegrityError(f"snapshot {m.id}: tensor {e.name!r} has {rows * per} values, its base "
                                     f"{base.approx.size}")
            ub, ub_approx = base.slots, base.approx
        if grand is not None:
            if grand.approx.size != rows * per:
                raise IntegrityError(f"snapshot {m.id}: tensor {e.name!r} and its grand-base differ in size")
            ub2, ub2_approx = grand.slots, grand.approx
        if e.extras is not None:
            s, off = e.extras
            extra = self._bufs[(m.id, s)][off : off + e.extras_nbytes]
            if e.masked:
                changed = mask_from_bytes(extra[: e.mask_nbytes], rows)
                if int(changed.sum()) != e.rows:
                    raise IntegrityError(f"snapshot {m.id}: the row mask of tensor {e.name!r} is damaged")
                idx = (np.flatnonzero(changed)[:, None] * per + np.arange(per)[None, :]).reshape(-1)
                if ub is not None:
                    ub, ub_approx = ub.take(idx), ub_approx[idx]  # type: ignore[index]
                if ub2 is not None:
                    ub2, ub2_approx = ub2.take(idx), ub2_approx[idx]  # type: ignore[index]
            if e.enc == "pred":
                alpha = alpha_from_planes(extra[e.mask_nbytes :]).astype(np.int64)
        key = None
        if e.ctx and e.enc != "mat" and n:
            against = ub if e.enc != "pred" else B.predict(ub, ub2, np.repeat(alpha, per))  # type: ignore[arg-type]
            key, pinned = B.top_byte(against, coding.rotate)  # type: ignore[arg-type]
            if not pinned.all():
                raise _Unpinned
        top = self._top(m, e, k, key)
        slots, approx = _decode(top, m_bits, e.enc, bits, coding.rotate, ub, ub_approx, ub2, ub2_approx,
                                None if alpha is None else np.repeat(alpha, per))
        if changed is not None:  # unchanged rows are the base's
            assert base is not None
            slots = B.scatter(base.slots, idx, slots)
            whole = base.approx.copy()
            whole[idx] = approx
            approx = whole
        if e.scheme is not None:
            return _restore(e, slots, approx)
        known = m_bits == 0 and (base is None or base.exact) and (grand is None or grand.exact)
        return Knowledge(slots, approx, known or rows * per == 0)

    def _top(self, m: Manifest, e: TensorEntry, k: int, key: np.ndarray | None) -> np.ndarray:
        """The known top ``k`` bytes of ``e``'s coded values (uint64), in natural order."""
        n = e.values
        out = np.zeros(n, np.uint64)
        where: dict[tuple[int, int], np.ndarray] = {}
        for p in e.parts:
            buf = self._bufs.get((m.id, p.stream))
            for a, b in segments(n, m.segment):
                start = p.offset + a * p.count
                for j in range(p.count):
                    if p.first + j < k:
                        assert buf is not None
                        where[(a, p.first + j)] = buf[start + j * (b - a) : start + (j + 1) * (b - a)]
        for a, b in segments(n, m.segment):
            planes = [where[(a, j)] for j in range(k)]
            if e.ctx and e.enc == "mat" and k > 1:  # planes 1.. sorted by plane 0, which stays natural
                order = np.argsort(planes[0], kind="stable")
                for j in range(1, k):
                    natural = np.empty_like(planes[j])
                    natural[order] = planes[j]
                    planes[j] = natural
            top = np.zeros(b - a, np.uint64)
            for plane in planes:
                top <<= np.uint64(8)
                top |= plane
            if key is not None:  # a delta's planes sorted by the base's context byte
                order = np.argsort(key[a:b], kind="stable")
                natural_top = np.empty_like(top)
                natural_top[order] = top
                top = natural_top
            out[a:b] = top
        return out

    # -- chunks --------------------------------------------------------------------------------------------------
    def _reader(self, m: Manifest, s: int) -> Any:
        key = (m.id, s)
        if key not in self._readers:
            self._readers[key] = self.store.reader(m.streams[s])
        return self._readers[key]

    def _fetch(self, m: Manifest, e: TensorEntry, k: int) -> None:
        """Fetch and decode the chunks holding the top ``k`` planes and the extras of ``e`` not yet held."""
        for s, chunks in needed_chunks(m, [e], planes=k).items():
            have = self._have.setdefault((m.id, s), set())
            new = [c for c in chunks if c not in have]
            if not new:
                continue
            stream = m.streams[s]
            buf = self._bufs.get((m.id, s))
            if buf is None:
                buf = self._bufs[(m.id, s)] = np.zeros(stream.nchunks * stream.chunk_size, np.uint8)
            reader = self._reader(m, s)
            try:
                missing = reader.prepare(new)
            except IntegrityError as exc:
                raise IntegrityError(f"snapshot {m.id}, stream {s}: {exc}; restore the archive from a copy") from None
            if missing:
                raise self.store.changed(m) or IntegrityError(
                    f"snapshot {m.id}: chunk {missing[0]} of stream {s} is missing; restore the archive from a copy")
            for c in new:
                self.bytes_read += reader.locate(c)[2]
                shard = (m.id, s, stream.codec_of(c), c // stream.shard_chunks)
                if shard not in self._indexes:
                    self._indexes.add(shard)
                    self.bytes_read += index_nbytes(stream.shard_chunks)

            def damaged(c: int, exc: Exception, m: Manifest = m, s: int = s, reader: Any = reader) -> IntegrityError:
                return damaged_chunk(self.store, m, s, reader, c, exc)

            self.backend.decode_chunks(stream, new, reader.fetch, buf, self.executor, True, damaged)
            have.update(new)


def _restore(e: TensorEntry, slots: B.Slots, approx: np.ndarray) -> Knowledge:
    """A lossy tensor's knowledge of its restored patterns from that of its representation's (the
    schemes restore monotonically)."""
    assert e.scheme is not None
    rep = schemes.repr_dtype(e.scheme)
    rep_uint, out_uint = LAYOUTS[rep].uint, LAYOUTS[e.dtype].uint
    rep_dt = B.np_dtype(rep)

    def restore(r: np.ndarray) -> np.ndarray:
        if e.scheme["name"] == "quant":  # type: ignore[index]
            r = np.minimum(r, len(e.scheme["levels"]) - 1).astype(r.dtype)  # type: ignore[index]
        return schemes.restore(r, e.scheme, e.dtype)  # type: ignore[arg-type]

    approx_v = restore(approx.astype(rep_uint).view(rep_dt))
    approx_bits = approx_v.view(out_uint).astype(np.uint64)
    if slots.is_exact():
        return Knowledge(B.exact(approx_bits, LAYOUTS[e.dtype].bits), approx_bits, True)
    lo, hi, unb = B.to_values(slots, rep)
    return Knowledge(B.from_values(restore(lo), restore(hi), unb, e.dtype), approx_bits, False)
