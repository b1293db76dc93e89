"""The CPU fast path: compiled, fused transforms for the NumPy backend and the planning of a commit.

The NumPy functions of :mod:`gpupas.pas` are the reference; everything here computes exactly what they
compute (the same plane bytes, the same coder group bounds, the same plan and factors), in a small C
extension (``gpupas/_fastc.c``, built by ``pip install``) whose kernels fuse the reference's
passes and release the GIL, so the executor's threads run them in parallel. A tensor whose unchanged
rows are masked is read through a row map instead of gathered copies.

Why C: it costs nothing at run time beyond the call (numba, tried first, had to import and initialise LLVM
in every new process even with its on-disk cache: a tax on every CLI call, BENCHMARKS.md), it needs no NumPy
headers and pins no NumPy version, and it builds with the compiler every Linux and macOS development
machine has. Where it was not built (no compiler at install time), the NumPy reference runs and a log
line says so once.

Switch: ``GPUPAS_FAST=0`` (or :func:`use`) runs the NumPy reference (the same bytes).

Memory: a restore holds at most :data:`WINDOW` bytes of decoded planes at a time (``GPUPAS_WINDOW``) besides
its output; each executor thread keeps scratch for its next call: three buffers of a segment's values and
one of its bytes (13 MiB for 4-byte values, 25 MiB for 8-byte ones), and the sampled counts (2-4 MiB); the
process keeps the sample positions of the last 16 tensor sizes planned (2 MiB at most, :func:`sample_positions`).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from gpupas.backend.base import bases_of
from gpupas.format.checksum import crc32, crc32_combine
from gpupas.pas.context import SAMPLE, bounds_from_counts, plan_samples, sample_index
from gpupas.pas.planes import Layout
from gpupas.pas.predict import FRAC, ROW_COST_BITS, SAMPLE_COLS, _adjust, _steps
from gpupas.pas.rows import MIN_ROWS, MIN_UNCHANGED, rows_of
from gpupas.pas.settings import Setting
from gpupas.pas.transform import (
    MIN_ESTIMATE_VALUES,
    Plan,
    candidates,
    may_split_whole,
    min_gain,
    plan_of,
    splits,
)

log = logging.getLogger("gpupas")

KINDS = {"mat": 0, "sub": 1, "xor": 2, "pred": 3}
_state: dict[str, Any] = {"on": os.environ.get("GPUPAS_FAST", "1") != "0", "kernels": None}
_lock = threading.Lock()
_EMPTY64 = np.zeros(0, np.int64)
_EMPTY16 = np.zeros(0, np.int16)
_NONE = np.zeros(0, np.uint8)


def kernels() -> Any:
    """The compiled kernels module, or None where it was not built (said once)."""
    k = _state["kernels"]
    if k is not None:
        return k or None
    with _lock:
        if _state["kernels"] is None:
            try:
                _state["kernels"] = importlib.import_module("gpupas._fastc")
            except ImportError as exc:
                _state["kernels"] = False
                log.warning("gpupas: the compiled CPU kernels are unavailable (%s); using the NumPy reference "
                            "transforms (slower). Reinstall gpupas with a C compiler present to build them.", exc)
    return _state["kernels"] or None


def enabled() -> bool:
    """Whether the fast path runs (it is on and the compiled kernels were built)."""
    return bool(_state["on"]) and kernels() is not None


@contextmanager
def use(on: bool) -> Iterator[None]:
    """Run the fast path (``on``) or the NumPy reference inside a ``with`` block (tests, comparisons)."""
    was = _state["on"]
    _state["on"] = on
    try:
        yield
    finally:
        _state["on"] = was


def applies(*arrays: Any) -> bool:
    """Whether the fast path runs for these arrays (NumPy ones, each aligned for its dtype: the kernels read
    whole values through typed pointers, where it is enabled)."""
    return enabled() and all(a is None or (isinstance(a, np.ndarray) and a.flags.aligned) for a in arrays)


def _rowmap(rows: np.ndarray | None) -> np.ndarray:
    return _EMPTY64 if rows is None else rows


_local = threading.local()


def _scratch(k: int, nbytes: int) -> np.ndarray:
    """Thread-local scratch buffer ``k`` of ``nbytes``, kept for the thread's next call (see the module's
    docstring for how much)."""
    cache: dict[Any, Any] = _local.__dict__
    have = cache.get(k)
    if have is None or have.size < nbytes:
        have = np.empty(-(-nbytes // 65536) * 65536, np.uint8)
        cache[k] = have
    return have[:nbytes]


def encode_segment(u: np.ndarray, ub: np.ndarray | None, ub2: np.ndarray | None, alpha: np.ndarray | None,
                   rows: np.ndarray | None, per: int, a: int, b: int, layout: Layout, plan: Plan, flat: np.ndarray,
                   offs: np.ndarray, min_group: int) -> list[list[int]]:
    """The reference's :func:`gpupas.pas.transform.encode_segment` for coded values ``a .. b-1`` of one
    tensor (``u``, ``ub``, ``ub2``: every row where ``rows`` lists the coded ones), planes into ``flat``
    at ``offs``; returns the same per-plane group bounds."""
    n = b - a
    w = layout.width
    if n == 0:
        return [[] for _ in range(w)]
    step = max(1, n // SAMPLE)
    sample = np.zeros(256, np.int64)
    cs, ks, srt = (_scratch(0, n * w), _scratch(1, n), _scratch(2, n * w)) if plan.ctx else (_NONE,) * 3
    _kernels_mod().encode(w, KINDS[plan.enc], layout.rotate, plan.ctx, u, u if ub is None else ub,
                          u if ub2 is None else ub2, _EMPTY16 if alpha is None else alpha, _rowmap(rows), per, a, n,
                          flat, offs, step, sample, cs, ks, srt)
    if not plan.ctx:
        return [[] for _ in range(w)]
    groups = bounds_of_sample(sample, -(-n // step), n, min_group)
    return [groups if p or plan.enc != "mat" else [] for p in range(w)]


def decode_segment(flat: np.ndarray, offs: np.ndarray, ub: np.ndarray | None, ub2: np.ndarray | None,
                   alpha: np.ndarray | None, rows: np.ndarray | None, per: int, a: int, b: int, layout: Layout,
                   plan: Plan, out: np.ndarray) -> None:
    """Inverse of :func:`encode_segment`: the raw patterns of coded values ``a .. b-1`` into ``out`` (the
    whole tensor's patterns; through ``rows`` where only the changed rows are coded)."""
    n, w = b - a, layout.width
    if n == 0:
        return
    bs, ks, joined = (_scratch(0, n * w), _scratch(1, n), _scratch(2, n * w)) if plan.ctx else (_NONE,) * 3
    _kernels_mod().decode(w, KINDS[plan.enc], layout.rotate, plan.ctx, flat, offs, out if ub is None else ub,
                          out if ub2 is None else ub2, _EMPTY16 if alpha is None else alpha, _rowmap(rows), per, a, n,
                          out, bs, ks, joined)


def copy_unchanged(out: np.ndarray, base: np.ndarray, rows: np.ndarray, nrows: int, per: int) -> None:
    """The rows of ``base`` not listed in ``rows`` into ``out`` (a masked tensor's unchanged rows)."""
    _kernels_mod().copy_rows(out.itemsize, out, base, rows, nrows, per)


def bounds_of_sample(counts: np.ndarray, nsample: int, n: int, min_group: int) -> list[int]:
    """:func:`gpupas.pas.context.group_bounds` from the histogram of its sample (every ``n // SAMPLE``-th
    context byte): the same float arithmetic, so the same bounds."""
    top = int(np.flatnonzero(counts)[-1]) + 1 if counts.any() else 0
    return bounds_from_counts(counts[:top] * (n / max(1, nsample)), n, min_group)


def _kernels_mod() -> Any:
    k = kernels()
    if k is None:  # pragma: no cover - callers check enabled() first
        raise RuntimeError("the compiled kernels are unavailable")
    return k


# -- planning a commit -------------------------------------------------------------------------------------
_LN2X2 = float(2 * np.log(2))  # the reference's Miller-Madow divisor, computed as it computes it
_NLOGN: list[np.ndarray] = []


def _nlogn(m: int) -> np.ndarray:
    """``c * log2(c)`` for every count ``c`` up to ``m`` (the reference's terms, computed by NumPy as it does)."""
    table = _NLOGN[0] if _NLOGN else None
    if table is None or table.size <= m:
        c = np.arange(max(m, SAMPLE) + 1, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            table = c * np.log2(c)
        table[0] = 0.0
        _NLOGN[:] = [table]  # another thread may put a shorter one meanwhile: this call returns its own
    return table


@functools.lru_cache(maxsize=16)  # at most 16 * SAMPLE positions (2 MiB) kept: tensors of a model share sizes
def sample_positions(n: int, sampled: bool = False) -> np.ndarray:
    """The positions (read-only) a plan samples of ``n`` coded values; every one where ``sampled`` (the
    values are a sample already)."""
    idx = slice(None) if sampled else sample_index(n, plan_samples(n))
    out = np.arange(n, dtype=np.int64) if isinstance(idx, slice) else idx
    out.flags.writeable = False
    return out


def choose_plan(u: np.ndarray, ub: np.ndarray | None, layout: Layout, setting: Setting,
                encs: tuple[str, ...] | None = None, rows: np.ndarray | None = None, per: int = 1,
                of: int | None = None) -> Plan:
    """:func:`gpupas.pas.transform.choose_plan` (the same plan and estimate) with the sampled byte counts
    taken by a kernel; ``rows``: the coded rows of ``u`` and ``ub`` (every row where None); ``of``: ``u`` and
    ``ub`` are a sample of a tensor of ``of`` values."""
    n = u.size if rows is None else rows.size * per
    if ub is None and not may_split_whole(u if rows is None else u.reshape(-1, per)[rows].reshape(-1), setting,
                                          layout):  # the coded rows' values, as the reference sees them
        return Plan("mat", False)
    if ub is not None and n < MIN_ESTIMATE_VALUES:
        return Plan("sub", False)
    k = _kernels_mod()
    idx = sample_positions(n, of is not None)
    w = layout.width
    cnt = _scratch(3, 8 * w * 256 * 256)
    coded, keys = _scratch(4, 8 * idx.size), _scratch(5, idx.size)
    best: Plan | None = None
    for enc in encs if encs is not None else candidates(ub is not None, setting, layout):
        want = splits(enc, setting, n if of is None else of, layout)
        h, hc = np.empty(w), np.empty(w if want else 0)
        k.sample_entropies(w, KINDS[enc], layout.rotate, u, u if ub is None else ub, idx, _rowmap(rows), per,
                           _nlogn(idx.size), _LN2X2, h, hc, cnt, coded, keys)
        plan = plan_of(enc, h, hc if want else None, min_gain(enc, setting, layout))
        if best is None or plan.estimate < best.estimate:
            best = plan
    assert best is not None
    return best


def range_entropies(buf: Any, ranges: np.ndarray) -> np.ndarray | None:
    """:func:`gpupas.pas.context.count_entropies` of the byte counts of ``buf[a:b:step]`` for each row ``(a, b,
    step)`` of ``ranges`` (the same doubles), without the counts; None where the fast path does not run for
    ``buf`` (the caller counts with NumPy)."""
    if not (applies(buf) and buf.dtype == np.uint8 and buf.ndim == 1 and buf.flags.c_contiguous):
        return None
    rg = np.ascontiguousarray(ranges, np.int64).reshape(-1, 3)
    longest = int((-(-(rg[:, 1] - rg[:, 0]) // rg[:, 2])).max(initial=0))
    h = np.empty(len(rg))
    _kernels_mod().range_entropies(buf, rg, _nlogn(longest), _LN2X2, h)
    return h


def gather(x: np.ndarray, idx: np.ndarray, rows: np.ndarray | None, per: int) -> np.ndarray:
    """Values of ``x`` at (sorted) coded positions ``idx`` (through ``rows``)."""
    out = np.empty(idx.size, x.dtype)
    _kernels_mod().gather(x.itemsize, x, idx, _rowmap(rows), per, out)
    return out


def changed_rows(u: np.ndarray, ub: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """:func:`gpupas.pas.rows.changed_rows`, comparing each row only up to its first difference."""
    rows, per = rows_of(shape)
    if rows < MIN_ROWS or per == 0:
        return None
    if int((u[::per] == ub[::per]).sum()) < rows * MIN_UNCHANGED:  # column 0: a cheap look first
        return None
    changed = np.zeros(rows, np.bool_)
    _kernels_mod().row_changes(u.itemsize, u, ub, rows, per, changed.view(np.uint8))
    return changed if rows - int(changed.sum()) >= rows * MIN_UNCHANGED else None


def fit(u: np.ndarray, ub: np.ndarray, ub2: np.ndarray, layout: Layout, coded_shape: tuple[int, ...],
        rows: np.ndarray | None = None) -> np.ndarray | None:
    """:func:`gpupas.pas.predict.fit` (the same factors): the sample, the median ratio and the factor in
    one kernel pass per row; the cost test's gain is re-checked with NumPy's log2 for the rows where the
    kernel's lies within rounding of the threshold."""
    nrows, per = rows_of(coded_shape)
    if nrows * per == 0:
        return None
    if layout.width > 4:  # never staged ('pred' is for floats up to 32 bits): the reference, on gathered rows
        from gpupas.pas.predict import fit as reference

        take = (lambda x: x) if rows is None else (lambda x: x.reshape(-1, per)[rows].reshape(-1))
        return reference(take(u), take(ub), take(ub2), layout, coded_shape)
    cols = np.unique(np.linspace(0, per - 1, min(per, SAMPLE_COLS)).astype(np.int64))
    q, gain, scale = np.zeros(nrows, np.int16), np.zeros(nrows), np.zeros(nrows)
    _kernels_mod().fit_rows(u.itemsize, u, ub, ub2, _rowmap(rows), nrows, per, cols, q, gain, scale)
    near = np.flatnonzero(np.abs(gain - ROW_COST_BITS) <= 1e-9 * (scale + 1.0))
    if near.size:  # exactly as the reference computes it
        full = near if rows is None else rows[near]
        idx = (full[:, None] * per + cols[None, :]).ravel()
        new = _steps(u[idx], ub[idx], layout).reshape(near.size, -1)
        last = _steps(ub[idx], ub2[idx], layout).reshape(near.size, -1)
        residual = new - _adjust(q[near][:, None].astype(np.int64), last.copy())
        gain[near] = (np.log2(np.abs(new) + 1.0) - np.log2(np.abs(residual) + 1.0)).sum(axis=1) * (per / cols.size)
    q[gain <= ROW_COST_BITS] = 0
    return q if q.any() else None


assert FRAC == 13  # the kernels' fixed point


def flat_of(views: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]] | None:
    """One uint8 buffer that holds every view in ``views`` and each view's offset in it (the views of a
    workspace), or None."""
    if not views:
        return None
    root = views[0]
    while isinstance(root.base, np.ndarray):
        root = root.base
    if root.dtype != np.uint8 or root.ndim != 1 or not root.flags.c_contiguous:
        return None
    lo = root.ctypes.data
    offs = []
    for v in views:
        off = v.ctypes.data - lo if v.size else 0
        if v.dtype != np.uint8 or v.ndim != 1 or not v.flags.c_contiguous or off < 0 or off + v.size > root.size:
            return None
        offs.append(off)
    return root, offs


# -- the backend's two plane methods -----------------------------------------------------------------------
def _offsets(starts: dict[int, int], parts: Sequence[Any], a: int, n: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Where each plane of segment ``[a, a+n)`` lies: in the flat buffer, and as (stream, offset)."""
    offs, where = [], []
    for p in parts:
        start = p.offset + a * p.count
        for k in range(p.count):
            offs.append(starts[p.stream] + start + k * n)
            where.append((p.stream, start + k * n))
    return np.array(offs, np.int64), where


def encode_planes(staged: Sequence[Any], extras: Sequence[np.ndarray], placements: Sequence[Any],
                  bufs: Sequence[np.ndarray], segment: int, min_group: int, executor: Any,
                  small: bool) -> list[list[int]] | None:
    """:meth:`gpupas.backend.numpy.NumpyBackend.encode_planes` with the fused kernel (one task per
    segment); None where the buffers are not views of one workspace (the caller runs the reference)."""
    from gpupas.format.layout import segments, write_extras

    got = flat_of(list(bufs))
    if got is None:
        return None
    root, at = got
    starts = dict(enumerate(at))
    cuts = write_extras(extras, placements, bufs)
    units = [(i, a, b) for i, st in enumerate(staged) for a, b in segments(st.values, segment)]

    def encode(unit: tuple[int, int, int]) -> list[tuple[int, int]]:
        i, a, b = unit
        st, pl = staged[i], placements[i]
        offs, where = _offsets(starts, pl.parts, a, b - a)
        enc = st.plan.enc
        groups = encode_segment(st.full("u"), None if enc == "mat" else st.full("ub"),
                                st.full("ub2") if enc == "pred" else None,
                                st.alpha if enc == "pred" else None, st.rows, rows_of(st.coded_shape)[1], a, b,
                                st.layout, st.plan, root, offs, min_group)
        return [(s, lo + g) for (s, lo), gs in zip(where, groups) for g in (0, *gs)]

    for found in executor.map(encode, units, inline=small):
        for s, off in found:
            cuts[s].add(off)
    return [sorted(c) for c in cuts]


WINDOW = int(os.environ.get("GPUPAS_WINDOW", 32 << 20))  # bytes of decoded planes a restore holds at a time


def _restore_jobs(backend: Any, m: Any, entries: Sequence[Any], base_bits: Any, grand_bits: Any
                  ) -> tuple[dict[str, np.ndarray], dict[str, list[Any]]] | None:
    """The outputs of a restore (one allocation) and, per entry, [base, base's base, factors, rows,
    rows of the tensor, values a row], checked as the reference checks them; None where a base is not
    what the kernels read (the caller runs the reference)."""
    nbytes = [e.nbytes for e in entries]
    edges = np.cumsum([0] + [-(-n // 64) * 64 for n in nbytes]).tolist()  # 64-byte aligned tensors
    jobs: dict[str, list[Any]] = {}
    for e in entries:
        nrows, per = rows_of(e.shape)
        ub, ub2 = bases_of(m, e, base_bits, grand_bits)
        for arr in (ub, ub2):  # the kernels read them as raw patterns
            if arr is not None and (not isinstance(arr, np.ndarray) or arr.dtype != e.coding.uint
                                    or not arr.flags.c_contiguous or not arr.flags.aligned):
                return None
        jobs[e.name] = [ub, ub2, None, None, nrows, per]
    block = backend.empty(edges[-1])  # one allocation: huge pages
    out = {e.name: block[lo : lo + n].view(e.layout.uint) for e, lo, n in zip(entries, edges, nbytes)}
    return out, jobs


def _read_extras(m: Any, e: Any, job: list[Any], extra: np.ndarray) -> bool:
    """Set the row map and factors of ``e`` from its extras bytes; whether it has a row mask."""
    from gpupas.errors import IntegrityError
    from gpupas.pas.predict import alpha_from_planes
    from gpupas.pas.rows import mask_from_bytes

    nrows = job[4]
    if e.masked:
        changed = mask_from_bytes(extra[: e.mask_nbytes], nrows)
        if int(changed.sum()) != e.rows:
            raise IntegrityError(f"snapshot {m.id}: the row mask of tensor {e.name!r} is damaged")
        job[3] = np.flatnonzero(changed)
    if e.enc == "pred":
        job[2] = np.ascontiguousarray(alpha_from_planes(extra[e.mask_nbytes :]))
        if job[2].size != (nrows if job[3] is None else job[3].size):
            raise IntegrityError(f"snapshot {m.id}: the factors of tensor {e.name!r} are damaged")
    return bool(e.masked)


def _rebuild(out: dict[str, np.ndarray], jobs: dict[str, list[Any]], root: np.ndarray, shift: dict[int, int],
             unit: tuple[Any, int, int], crcs: dict[tuple[str, int], int] | None = None) -> None:
    """One unit of a restore: a segment's values (``a >= 0``), or a masked tensor's unchanged rows; the
    CRC-32 of an unmasked tensor's segment into ``crcs`` (while its bytes are in cache)."""
    e, a, b = unit
    ub, ub2, alpha, rowsel, nrows, per = jobs[e.name]
    if a < 0:
        copy_unchanged(out[e.name], ub, rowsel, nrows, per)
        return
    offs, _ = _offsets(shift, e.parts, a, b - a)
    decode_segment(root, offs, ub, ub2, alpha, rowsel, per, a, b, e.coding, Plan(e.enc, e.ctx), out[e.name])
    if crcs is not None and rowsel is None:
        crcs[e.name, a] = crc32(memoryview(out[e.name][a:b]).cast("B"))


def _combine(entries: Sequence[Any], out: dict[str, np.ndarray], jobs: dict[str, list[Any]],
             parts: dict[tuple[str, int], int], segment: int, crcs: dict[str, int]) -> None:
    """Each unmasked tensor's CRC-32 from its segments' (``parts``) into ``crcs``."""
    from gpupas.format.layout import segments

    for e in entries:
        if jobs[e.name][3] is not None:
            continue
        crc = 0
        for a, b in segments(e.values, segment):
            crc = crc32_combine(crc, parts[e.name, a], (b - a) * out[e.name].itemsize)
        crcs[e.name] = crc


def _check_parts(m: Any, e: Any) -> None:
    from gpupas.errors import IntegrityError

    for p in e.parts:  # the manifest's checks, again: a kernel must not be pointed outside the planes
        if p.offset < 0 or p.offset + p.count * e.values > m.streams[p.stream].length:
            raise IntegrityError(f"snapshot {m.id}: tensor {e.name!r} lies outside its stream")


def decode_windows(backend: Any, m: Any, entries: Sequence[Any], read: Any, base_bits: Any, grand_bits: Any,
                   executor: Any, small: bool, window: int | None = None,
                   crcs: dict[str, int] | None = None) -> dict[str, np.ndarray] | None:
    """A restore through a bounded buffer: the segments of ``entries`` in stream order, a window of at
    most ``window`` bytes of decoded chunks at a time (one segment's chunks at least; every segment of
    its chunks: a chunk larger than the window is decoded once), each window's chunks decoded
    (``read(stream, chunks, buf, first chunk)``) and then its segments rebuilt, one task each.
    A tensor's row mask and factors are read with its first segment (from chunks of their own where
    they lie outside that window). Where ``crcs`` is given, the CRC-32 of each tensor whose rows are not
    masked goes into it, computed segment by segment by the same tasks. None where the reference must run."""
    from gpupas.format.layout import segments

    window = WINDOW if window is None else window
    got = _restore_jobs(backend, m, entries, base_bits, grand_bits)
    if got is None:
        return None
    out, jobs = got
    order = sorted(entries, key=lambda e: (e.parts[0].stream, e.parts[0].offset) if e.parts else (0, 0))
    units: list[tuple[Any, int, int, dict[int, tuple[int, int]]]] = []
    for e in order:
        _check_parts(m, e)
        for a, b in segments(e.values, m.segment):
            spans: dict[int, tuple[int, int]] = {}
            for p in e.parts:
                lo = p.offset + a * p.count
                hi = lo + p.count * (b - a)
                x = spans.get(p.stream)
                spans[p.stream] = (lo, hi) if x is None else (min(x[0], lo), max(x[1], hi))
            units.append((e, a, b, spans))
        if not e.values:
            units.append((e, 0, 0, {}))  # nothing coded: its extras (a mask of no changed row) still count

    def chunk_range(s: int, lo: int, hi: int) -> tuple[int, int]:
        size = m.streams[s].chunk_size
        return lo // size, -(-hi // size)

    windows: list[tuple[list[Any], dict[int, tuple[int, int]]]] = []
    cur: list[Any] = []
    span: dict[int, tuple[int, int]] = {}
    for u in units:
        ranges = {s: chunk_range(s, lo, hi) for s, (lo, hi) in u[3].items()}
        # chunks between two wanted tensors (a restore of some names) are never read: not their time, and
        # not their damage either
        gap = any(s in span and (c0 > span[s][1] or c1 < span[s][0]) for s, (c0, c1) in ranges.items())
        merged = dict(span)
        for s, (c0, c1) in ranges.items():
            x = merged.get(s)
            merged[s] = (c0, c1) if x is None else (min(x[0], c0), max(x[1], c1))
        total = sum((c1 - c0) * m.streams[s].chunk_size for s, (c0, c1) in merged.items())
        if cur and (gap or total > window) and merged != span:  # within the window's chunks it costs nothing
            # (a chunk larger than the window holds several segments: one window each would decode it again)
            windows.append((cur, span))
            cur, merged = [], ranges
        cur.append(u)
        span = merged
    if cur:
        windows.append((cur, span))
    biggest = max((sum((c1 - c0) * m.streams[s].chunk_size for s, (c0, c1) in sp.items()) for _, sp in windows),
                  default=0)
    seen: set[str] = set()
    parts: dict[tuple[str, int], int] | None = None if crcs is None else {}
    with backend.workspace(biggest) as ws:
        root, _ = flat_of([ws]) or (None, None)
        if root is None:
            return None
        base = ws.ctypes.data - root.ctypes.data if ws.size else 0
        for units_w, span_w in windows:
            shift, bufs, at = {}, {}, 0
            for s in sorted(span_w):
                c0, c1 = span_w[s]
                size = m.streams[s].chunk_size
                bufs[s] = ws[at : at + (c1 - c0) * size]
                read(s, list(range(c0, c1)), bufs[s], c0)
                shift[s] = base + at - c0 * size
                at += (c1 - c0) * size
            tasks: list[tuple[Any, int, int]] = []
            for e, a, b, _ in units_w:
                if e.name not in seen:  # its first segment: its mask and factors first
                    seen.add(e.name)
                    if e.extras is not None and _read_extras(m, e, jobs[e.name],
                                                            _extras_of(m, e, span_w, bufs, read)):
                        tasks.append((e, -1, -1))
                if b > a:
                    tasks.append((e, a, b))
            executor.map(lambda t, sh=shift: _rebuild(out, jobs, root, sh, t, parts), tasks, inline=small)
    if crcs is not None and parts is not None:
        _combine(entries, out, jobs, parts, m.segment, crcs)
    return out


def _extras_of(m: Any, e: Any, span: dict[int, tuple[int, int]], bufs: dict[int, np.ndarray], read: Any) -> np.ndarray:
    """The bytes of ``e``'s row mask and factors: from the window where they lie in it, else decoded apart."""
    s, off = e.extras
    n = e.extras_nbytes
    size = m.streams[s].chunk_size
    c0, c1 = off // size, -(-(off + n) // size)
    if s in span and span[s][0] <= c0 and c1 <= span[s][1]:
        lo = off - span[s][0] * size
        return bufs[s][lo : lo + n]
    tmp = np.empty((c1 - c0) * size, np.uint8)
    read(s, list(range(c0, c1)), tmp, c0)
    return tmp[off - c0 * size : off - c0 * size + n]


def decode_planes(backend: Any, m: Any, entries: Sequence[Any], bufs: Any, base_bits: Any, grand_bits: Any,
                  executor: Any, small: bool) -> dict[str, np.ndarray] | None:
    """:meth:`gpupas.backend.numpy.NumpyBackend.decode_planes` with the fused kernel (the planes of every
    entry already decoded in ``bufs``): one task per segment, masked tensors decoded into their rows in
    place (the base's unchanged rows copied in by tasks of their own). None where the reference must run."""
    from gpupas.format.layout import segments

    keys = sorted(bufs)
    got = flat_of([bufs[s] for s in keys])
    if got is None:
        return None
    root, at = got
    shift = dict(zip(keys, at))
    jobs_got = _restore_jobs(backend, m, entries, base_bits, grand_bits)
    if jobs_got is None:
        return None
    out, jobs = jobs_got
    units: list[tuple[Any, int, int]] = []
    for e in entries:
        _check_parts(m, e)
        if e.extras is not None:
            s, off = e.extras
            if _read_extras(m, e, jobs[e.name], bufs[s][off : off + e.extras_nbytes]):
                units.append((e, -1, -1))
        units.extend((e, a, b) for a, b in segments(e.values, m.segment))
    executor.map(lambda t: _rebuild(out, jobs, root, shift, t), units, inline=small)
    return out
