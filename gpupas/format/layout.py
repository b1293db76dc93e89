"""Where each byte of a snapshot lies in its streams: placement on write, byte ranges and chunks on read.

A tensor's coded values are cut into segments (``segment`` values each). A part holds planes
``first .. first+count-1``: for each segment in order, those planes of the segment one after
another (``count * (b - a)`` bytes for segment ``[a, b)``). The row mask and 'pred' factors, where a
tensor has them, lie at ``extras``. Plane groups put planes of different significance in different
streams (e.g. the exponent plane in one, the low mantissa planes in another).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from gpupas.format.manifest import Manifest, Part, TensorEntry


def segments(n: int, segment: int) -> list[tuple[int, int]]:
    """(start, stop) value ranges of the segments of ``n`` values."""
    return [(s, min(n, s + segment)) for s in range(0, n, segment)]


def group_bounds(groups: Sequence[int]) -> list[tuple[int, int]]:
    """Plane ranges of the plane groups that start at the planes ``groups`` (the first always at 0)."""
    starts = sorted({0, *(int(g) for g in groups if g > 0)})
    return [(lo, hi) for lo, hi in zip(starts, [*starts[1:], 1 << 30])]


@dataclass(frozen=True)
class Placement:
    parts: tuple[Part, ...]
    extras: tuple[int, int] | None


def place(items: Sequence[tuple[int, int, int]], groups: Sequence[int] = ()) -> tuple[list[Placement], list[int]]:
    """Place tensors given as (planes, coded values, extras bytes) into streams, one per plane group.

    Tensors follow one another in each stream; a tensor's extras come right after its part in the
    first stream. Plane groups that no tensor reaches get no stream. Returns the placements and
    the stream lengths.
    """
    bounds = group_bounds(groups)
    used = [any(w > lo for w, _, _ in items) for lo, _ in bounds]
    index = {g: i for i, g in enumerate(g for g in range(len(bounds)) if used[g])} or {0: 0}
    lengths = [0] * len(index)
    out = []
    for width, values, extra in items:
        parts: list[Part] = []
        extras = None
        for g, (lo, hi) in enumerate(bounds):
            if lo >= width:
                break
            count = min(hi, width) - lo
            s = index[g]
            parts.append(Part(s, lengths[s], lo, count))
            lengths[s] += count * values
            if g == 0 and extra:
                extras = (s, lengths[s])
                lengths[s] += extra
        out.append(Placement(tuple(parts), extras))
    return out, lengths


def write_extras(extras: Sequence[Any], placements: Sequence[Placement], bufs: Sequence[Any]) -> list[set[int]]:
    """Copy each tensor's extras (row mask, factors) into its stream buffer where it was placed; returns,
    per stream, the offsets where they start (a coder ends a block there)."""
    cuts: list[set[int]] = [set() for _ in bufs]
    for x, pl in zip(extras, placements):
        if x.size:
            assert pl.extras is not None  # (placed wherever there are extras)
            s, off = pl.extras
            bufs[s][off : off + x.size] = x
            cuts[s].add(off)
    return cuts


def plane_ranges(e: TensorEntry, segment: int, planes: int | None = None) -> Iterator[tuple[int, int, int, int, int]]:
    """(stream, start, plane, a, b) for each stored plane of each segment [a, b) of ``e``: the plane's
    ``b - a`` bytes start at ``start`` of stream ``stream``. ``planes``: only the highest that many."""
    n = e.values
    for p in e.parts:
        for a, b in segments(n, segment):
            base = p.offset + a * p.count
            for k in range(p.count):
                if planes is None or p.first + k < planes:
                    yield p.stream, base + k * (b - a), p.first + k, a, b


def spans(e: TensorEntry, segment: int, planes: int | None = None) -> list[tuple[int, int, int]]:
    """(stream, lo, hi) byte ranges that hold tensor ``e`` (its planes, or the highest ``planes``, and
    its extras)."""
    n = e.values
    out = []
    for p in e.parts:
        k = p.count if planes is None else min(p.count, planes - p.first)
        if k == p.count:
            out.append((p.stream, p.offset, p.offset + p.count * n))
        elif k > 0:  # the highest k planes of the part: the start of each segment's block
            out.extend((p.stream, p.offset + a * p.count, p.offset + a * p.count + k * (b - a))
                       for a, b in segments(n, segment))
    if e.extras is not None:
        s, off = e.extras
        out.append((s, off, off + e.extras_nbytes))
    return [x for x in out if x[2] > x[1]]


def needed_chunks(m: Manifest, entries: Sequence[TensorEntry], planes: int | None = None) -> dict[int, list[int]]:
    """Per stream, the chunks that hold ``entries`` (their highest ``planes`` planes, if given)."""
    need: dict[int, set[int]] = {}
    for e in entries:
        for s, lo, hi in spans(e, m.segment, planes):
            size = m.streams[s].chunk_size
            need.setdefault(s, set()).update(range(lo // size, -(-hi // size)))
    return {s: sorted(cs) for s, cs in need.items()}


def holders(m: Manifest, stream: int, c: int, limit: int = 5) -> list[str]:
    """Names of (up to ``limit``) tensors with bytes in chunk ``c`` of ``stream``: for error messages."""
    size = m.streams[stream].chunk_size
    lo, hi = c * size, (c + 1) * size
    out = []
    for e in m.tensors:
        if any(s == stream and a < hi and b > lo for s, a, b in spans(e, m.segment)):
            out.append(e.name)
            if len(out) > limit:
                break
    return out
