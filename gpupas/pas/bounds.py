"""Guaranteed bounds on values known only by their highest byte planes: interval math over bit patterns.

With the top ``k`` of ``w`` planes of a coded pattern read, the coded pattern is known to lie in an
aligned block ``[top << m, (top << m) | (2^m - 1)]`` (``m = 8 (w - k)`` unknown low bits). This
module pushes such blocks back through the inverse of each encoding (docs/FORMAT.md 9) in pattern
space, then maps pattern sets to value intervals:

- what is known of one raw pattern is a :class:`Slots`: up to :data:`MAX_SLOTS` pattern intervals
  ``[lo, hi]`` (inclusive, unsigned; the pattern lies in one of them). Rotated floats give two (the
  sign is the bottom coded bit: unknown until the last plane), a SUB delta a few (its zigzag sign is
  the bottom bit too, and sums wrap around), XOR aligned blocks;
- unrotation and XOR work on aligned blocks (a known prefix): XOR of two blocks is a block;
- SUB adds a delta range to each slot, wrapping modulo ``2^bits`` ('pred' does the same against a
  prediction whose range comes from the base's and grand-base's slots);
- :func:`to_values` maps slots to ``[lo, hi]`` per value: IEEE order within each sign half, two's
  complement for signed integers. A NaN pattern inside a slot makes the value unbounded (flagged).

Everything is NumPy integer arithmetic on ``uint64`` arrays (any pattern width up to 64), no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import ml_dtypes
import numpy as np

from gpupas.pas.planes import EXPONENTS, FLOATS, LAYOUTS

MAX_SLOTS = 4  # pattern intervals kept per value; more are merged (their hull: sound, looser)
U64 = np.uint64
FRAC = 13  # 'pred' factors' fixed point (as gpupas.pas.predict)


def _mask(bits: int) -> np.uint64:
    return U64((1 << bits) - 1)


@dataclass(frozen=True)
class Slots:
    """What is known of ``n`` raw patterns of ``bits`` bits: each lies in one of its row's valid intervals.

    ``lo``, ``hi``: (n, s) uint64, ``lo <= hi`` where ``ok``; ``ok``: (n, s) bool (every row has one).
    """

    lo: np.ndarray
    hi: np.ndarray
    ok: np.ndarray
    bits: int

    @property
    def n(self) -> int:
        return int(self.lo.shape[0])

    def is_exact(self) -> bool:
        """Whether every pattern is known (one valid slot of one pattern per row)."""
        one = self.ok.sum(axis=1) == 1
        return bool(np.all(one & np.all(~self.ok | (self.lo == self.hi), axis=1)))

    def take(self, idx: Any) -> Slots:
        """The rows ``idx`` (an index array or a boolean mask)."""
        return Slots(self.lo[idx], self.hi[idx], self.ok[idx], self.bits)

    def hull(self) -> tuple[np.ndarray, np.ndarray]:
        """The smallest single pattern interval holding every slot of each row: (lo, hi)."""
        lo = np.where(self.ok, self.lo, _mask(self.bits)).min(axis=1)
        hi = np.where(self.ok, self.hi, U64(0)).max(axis=1)
        return lo, hi


def exact(u: np.ndarray, bits: int) -> Slots:
    """Slots of fully known patterns ``u`` (flat)."""
    u = np.asarray(u).astype(U64).reshape(-1, 1)
    return Slots(u, u.copy(), np.ones(u.shape, bool), bits)


def unknown(n: int, bits: int) -> Slots:
    """Slots of ``n`` patterns about which nothing is known."""
    return Slots(np.zeros((n, 1), U64), np.full((n, 1), _mask(bits), U64), np.ones((n, 1), bool), bits)


def _pad(x: Slots, s: int) -> Slots:
    extra = s - x.lo.shape[1]
    if extra <= 0:
        return x
    z = np.zeros((x.n, extra), U64)
    return Slots(np.hstack([x.lo, z]), np.hstack([x.hi, z]), np.hstack([x.ok, np.zeros((x.n, extra), bool)]), x.bits)


def scatter(whole: Slots, rows_idx: np.ndarray, part: Slots) -> Slots:
    """``whole`` with rows ``rows_idx`` replaced by ``part``."""
    s = max(whole.lo.shape[1], part.lo.shape[1])
    w, p = _pad(whole, s), _pad(part, s)
    lo, hi, ok = w.lo.copy(), w.hi.copy(), w.ok.copy()
    lo[rows_idx], hi[rows_idx], ok[rows_idx] = p.lo, p.hi, p.ok
    return Slots(lo, hi, ok, whole.bits)


def merge(x: Slots, limit: int = MAX_SLOTS) -> Slots:
    """At most ``limit`` slots per row: sorted by start, the closest neighbours joined (their hull)."""
    used = x.ok.any(axis=0)
    lo, hi, ok = x.lo[:, used], x.hi[:, used], x.ok[:, used]
    if lo.shape[1] == 0:
        return Slots(x.lo[:, :1], x.hi[:, :1], x.ok[:, :1], x.bits)
    order = np.lexsort((lo, ~ok), axis=1)  # valid first (also one starting at 2^64 - 1), by start
    lo, hi, ok = (np.take_along_axis(a, order, axis=1) for a in (lo, hi, ok))
    count = ok.sum(axis=1)
    keep = max(1, int(count.max(initial=1)))
    lo, hi, ok = lo[:, :keep], hi[:, :keep], ok[:, :keep]
    if keep <= limit:
        return Slots(lo, hi, ok, x.bits)
    big = np.flatnonzero(count > limit)
    blo, bhi, bok = lo[big], hi[big], ok[big]
    r = np.arange(big.size)
    while blo.shape[1] > limit:
        s = blo.shape[1]
        both = bok[:, :-1] & bok[:, 1:]
        gap = np.where(both, blo[:, 1:].astype(np.float64) - bhi[:, :-1].astype(np.float64), -np.inf)  # void: free
        j = np.argmin(gap, axis=1)
        bhi[r, j] = np.where(bok[r, j + 1], np.maximum(bhi[r, j], bhi[r, j + 1]), bhi[r, j])
        cols = np.arange(s - 1)[None, :]
        src = np.where(cols <= j[:, None], cols, cols + 1)
        blo, bhi, bok = (np.take_along_axis(a, src, axis=1) for a in (blo, bhi, bok))
    lo, hi, ok = lo[:, :limit].copy(), hi[:, :limit].copy(), ok[:, :limit].copy()  # the other rows fit
    lo[big], hi[big], ok[big] = blo, bhi, bok
    return Slots(lo, hi, ok, x.bits)


# -- coded blocks -----------------------------------------------------------------------------------------------
def block(top: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The coded patterns whose top bits are ``top`` and whose ``m`` low bits are unknown: (lo, hi)."""
    lo = np.asarray(top).astype(U64) << U64(m)
    return lo, lo | U64((1 << m) - 1)


def unrotate_block(lo: np.ndarray, hi: np.ndarray, m: int, bits: int, rotate: bool) -> Slots:
    """Raw patterns of the coded block [lo, hi] (``m`` unknown low bits) under (un)rotation."""
    n = lo.size
    if not rotate:
        return Slots(lo.reshape(-1, 1), hi.reshape(-1, 1), np.ones((n, 1), bool), bits)
    sign = U64(1) << U64(bits - 1)
    if m == 0:
        return exact((lo >> U64(1)) | ((lo & U64(1)) << U64(bits - 1)), bits)
    a, b = lo >> U64(1), hi >> U64(1)  # the sign (bottom coded bit) is unknown: both halves
    return Slots(np.stack([a, a | sign], 1), np.stack([b, b | sign], 1), np.ones((n, 2), bool), bits)


def _span(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The low-bit mask of the smallest aligned block holding [lo, hi] (bits where they differ, and below)."""
    diff = lo ^ hi
    _, e = np.frexp(diff.astype(np.float64))  # bit length (rounding up only ever widens the block)
    e = e.astype(np.int64)
    return np.where(e >= 64, _mask(64), (U64(1) << np.minimum(e, 63).astype(U64)) - U64(1))


def xor(x: Slots, base: Slots) -> Slots:
    """Patterns ``a ^ b`` for ``a`` in ``x`` and ``b`` in ``base`` (each slot taken as its aligned block)."""
    mx, mb = _span(x.lo, x.hi), _span(base.lo, base.hi)
    m = mx[:, :, None] | mb[:, None, :]
    v = (x.lo[:, :, None] ^ base.lo[:, None, :]) & ~m
    ok = x.ok[:, :, None] & base.ok[:, None, :]
    return merge(Slots(_rows(v), _rows(v | m), _rows(ok), x.bits))


# -- SUB and 'pred' --------------------------------------------------------------------------------------------
def zigzag_parts(lo: np.ndarray, hi: np.ndarray, m: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The deltas a zigzag-coded block [lo, hi] can hold, as up to two wrapping ranges
    (start mod 2^bits, length, valid), each (n, 2): the even codes (d >= 0) and the odd ones (d < 0)."""
    mask = _mask(bits)
    n = lo.size
    if m == 0:
        d = ((lo >> U64(1)) ^ ((U64(0) - (lo & U64(1))) & mask)) & mask
        z = np.zeros(n, U64)
        return np.stack([d, z], 1), np.zeros((n, 2), U64), np.stack([np.ones(n, bool), np.zeros(n, bool)], 1)
    a, b = lo >> U64(1), hi >> U64(1)
    length = b - a
    return np.stack([a, mask - b], 1), np.stack([length, length], 1), np.ones((n, 2), bool)


def _rows(a: np.ndarray) -> np.ndarray:
    """(n, ...) as (n, columns), empty tensors included."""
    return a.reshape(a.shape[0], int(np.prod(a.shape[1:])))


def _add(lo: np.ndarray, hi: np.ndarray, ok: np.ndarray, start: np.ndarray, length: np.ndarray, pok: np.ndarray,
         bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patterns ``u + d mod 2^bits`` for ``u`` in [lo, hi] and ``d`` in the wrapping range (start, length);
    broadcast arrays in, (..., 2) arrays out (a wrapped sum splits in two)."""
    mask = _mask(bits)
    width = hi - lo
    if bits < 64:
        total = width + length
        full = total >= mask
        st = (lo + start) & mask
        end_raw = st + total
        wrap = end_raw > mask
        end = end_raw & mask
    else:
        total = width + length
        full = (total < width) | (total == mask)
        st = lo + start
        end = st + total
        wrap = end < st
    valid = ok & pok
    a_lo = np.where(full, U64(0), st)
    a_hi = np.where(full | wrap, mask, end)
    b_ok = valid & wrap & ~full
    out_lo = np.stack(np.broadcast_arrays(a_lo, np.zeros_like(a_lo)), -1)
    out_hi = np.stack(np.broadcast_arrays(a_hi, np.where(b_ok, end, U64(0))), -1)
    out_ok = np.stack(np.broadcast_arrays(valid, b_ok), -1)
    return out_lo, out_hi, out_ok


def add(base: Slots, start: np.ndarray, length: np.ndarray, pok: np.ndarray) -> Slots:
    """``base + d`` (mod 2^bits) for ``d`` in any of the wrapping ranges (start, length, valid): (n, p) each."""
    lo, hi, ok = _add(base.lo[:, :, None], base.hi[:, :, None], base.ok[:, :, None], start[:, None, :],
                      length[:, None, :], pok[:, None, :], base.bits)
    return merge(Slots(_rows(lo), _rows(hi), _rows(ok), base.bits))


def _adjust(alpha: np.ndarray, step: np.ndarray) -> np.ndarray:
    return (alpha * step + (1 << (FRAC - 1))) >> FRAC


def predict_exact(ub: np.ndarray, ub2: np.ndarray, alpha: np.ndarray, bits: int) -> np.ndarray:
    """The 'pred' prediction (docs/FORMAT.md 9.6) of known patterns (uint64), ``alpha`` per value."""
    mask = _mask(bits)
    half = 1 << (bits - 1)
    step = (((ub - ub2) & mask).astype(np.int64) ^ half) - half
    return (ub + (_adjust(alpha.astype(np.int64), step).astype(U64) & mask)) & mask


def predict(ub: Slots, ub2: Slots, alpha: np.ndarray) -> Slots:
    """The patterns the 'pred' prediction can take for ``ub`` in its slots and ``ub2`` in its (bits <= 32;
    ``alpha`` per value). Sound, not tight: the prediction's dependence on ``ub`` is counted twice."""
    bits = ub.bits
    if bits > 32:
        raise ValueError("'pred' is defined for floats of up to 32 bits")
    half, size = 1 << (bits - 1), 1 << bits
    ub, ub2 = merge(ub, 2), merge(ub2, 2)  # fewer pairs to combine (looser where they had more slots)
    lo1, hi1 = ub.lo.astype(np.int64)[:, :, None], ub.hi.astype(np.int64)[:, :, None]
    lo2, hi2 = ub2.lo.astype(np.int64)[:, None, :], ub2.hi.astype(np.int64)[:, None, :]
    low, width = lo1 - hi2, (hi1 - lo2) - (lo1 - hi2)  # the step before wrapping: [low, low + width]
    s_lo = ((low % size) ^ half) - half
    s_hi = s_lo + width
    wide = (width >= size) | (s_hi > half - 1)  # wraps past the signed range: any step
    s_lo, s_hi = np.where(wide, -half, s_lo), np.where(wide, half - 1, s_hi)
    a = alpha.astype(np.int64)[:, None, None]
    e1, e2 = _adjust(a, s_lo), _adjust(a, s_hi)
    amin, amax = np.minimum(e1, e2), np.maximum(e1, e2)
    start = (amin % size).astype(U64)
    length = (amax - amin).astype(U64)
    ok = ub.ok[:, :, None] & ub2.ok[:, None, :]
    lo, hi, okk = _add(ub.lo[:, :, None], ub.hi[:, :, None], ok, start, length, np.ones_like(ok), bits)
    return merge(Slots(_rows(lo), _rows(hi), _rows(okk), bits))


def decode(top: np.ndarray, m: int, enc: str, bits: int, rotate: bool, ub: Slots | None = None,
           ub_approx: np.ndarray | None = None, ub2: Slots | None = None, ub2_approx: np.ndarray | None = None,
           alpha: np.ndarray | None = None) -> tuple[Slots, np.ndarray]:
    """Raw patterns from coded values whose top bits are ``top`` (natural order; ``m`` low bits unknown).

    ``ub``/``ub_approx``: what is known of the base's raw patterns (deltas), ``ub2``/``ub2_approx`` and
    ``alpha`` (per value) of the grand-base ('pred'). Returns the slots and an approximation: the
    pattern with the missing coded bits at their midpoint (``10...0``); for SUB/'pred' the middle of the
    delta's range, i.e. the base (the zigzag sign is the lowest coded bit).
    """
    mask = _mask(bits)
    lo, hi = block(top, m)
    mid = lo | (U64(1 << (m - 1)) if m else U64(0))
    if enc == "mat":
        return unrotate_block(lo, hi, m, bits, rotate), _unrotate(mid, bits, rotate)
    assert ub is not None and ub_approx is not None
    if enc == "xor":
        x = unrotate_block(lo, hi, m, bits, rotate)
        return xor(x, ub), _unrotate(mid, bits, rotate) ^ ub_approx
    if enc == "pred":
        assert ub2 is not None and ub2_approx is not None and alpha is not None
        against, against_approx = predict(ub, ub2, alpha), predict_exact(ub_approx, ub2_approx, alpha, bits)
    else:
        against, against_approx = ub, ub_approx
    start, length, pok = zigzag_parts(lo, hi, m, bits)
    approx = against_approx if m else (against_approx + start[:, 0]) & mask
    return add(against, start, length, pok), approx


def _unrotate(c: np.ndarray, bits: int, rotate: bool) -> np.ndarray:
    if not rotate:
        return c
    return (c >> U64(1)) | ((c & U64(1)) << U64(bits - 1))


def top_byte(x: Slots, rotate: bool) -> tuple[np.ndarray, np.ndarray]:
    """The context byte (docs/FORMAT.md 9.2) of each pattern where every slot pins it: (byte, pinned)."""
    shift = U64(x.bits - 9 if rotate else x.bits - 8)
    tl, th = x.lo >> shift, x.hi >> shift
    byte = (tl & U64(0xFF)).astype(np.uint8)
    first = byte[np.arange(x.n), np.argmax(x.ok, axis=1)] if x.n else np.zeros(0, np.uint8)
    pinned = np.all(~x.ok | ((tl == th) & (byte == first[:, None])), axis=1)
    return first, pinned


# -- patterns <-> values ---------------------------------------------------------------------------------------
def np_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a manifest dtype name (ml_dtypes for bfloat16 and float8)."""
    return LAYOUTS[name].dtype


@cache
def _float_info(name: str) -> tuple[int, int]:
    """(sign bit, largest non-NaN pattern of the positive half) of a float dtype."""
    dt = np_dtype(name)
    bits = 8 * dt.itemsize
    uint = LAYOUTS[name].uint
    top = np.array(np.inf).astype(dt)
    if np.isnan(top.astype(np.float64)):  # float8_e4m3fn: no Inf
        top = np.array(ml_dtypes.finfo(dt).max, dt)
    return 1 << (bits - 1), int(top.view(uint))


def is_float(name: str) -> bool:
    return name in FLOATS


def _as_values(p: np.ndarray, name: str) -> np.ndarray:
    """Patterns (uint64) as float64 values (exact for every float dtype)."""
    with np.errstate(invalid="ignore"):  # NaN patterns of float8 types
        return p.astype(LAYOUTS[name].uint).view(np_dtype(name)).astype(np.float64)


def _extremes(name: str) -> tuple[Any, Any]:
    dt = np_dtype(name)
    if is_float(name):
        top = float(np.array(np.inf).astype(dt).astype(np.float64))
        if np.isnan(top):
            top = float(ml_dtypes.finfo(dt).max)
        return np.array(-top).astype(dt), np.array(top).astype(dt)
    if dt == np.bool_:
        return np.False_, np.True_
    if name in EXPONENTS:  # patterns in value order; the top one is NaN
        return np.uint8(0).view(dt), np.uint8(0xFE).view(dt)
    info = np.iinfo(dt)
    return dt.type(info.min), dt.type(info.max)


def to_values(x: Slots, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pattern, value bounds (lo, hi) of dtype ``name`` and whether it is unbounded (a NaN pattern
    possible: then lo, hi are the dtype's extremes, ±Inf where it has them)."""
    dt = np_dtype(name)
    bits = x.bits
    if is_float(name):
        sign, pos_max = _float_info(name)
        s_, pm = U64(sign), U64(pos_max)
        nan = x.ok & (((x.lo <= s_ - U64(1)) & (x.hi >= pm + U64(1))) | (x.hi >= (s_ | pm) + U64(1)))
        if name.endswith("fnuz"):  # no -0.0: the sign bit alone is their NaN
            nan |= x.ok & (x.lo <= s_) & (x.hi >= s_)
        neg = x.lo >= s_
        a, b = _as_values(x.lo, name), _as_values(x.hi, name)
        vlo, vhi = np.where(neg, b, a), np.where(neg, a, b)
        vlo = np.where(x.ok, vlo, np.inf).min(axis=1)
        vhi = np.where(x.ok, vhi, -np.inf).max(axis=1)
        unb = nan.any(axis=1)
        emin, emax = _extremes(name)
        lo = np.where(unb, float(emin), vlo).astype(dt)
        hi = np.where(unb, float(emax), vhi).astype(dt)
        return lo, hi, unb  # type: ignore[return-value]  # (numpy's stubs: any(axis=) may be a scalar)
    if name in EXPONENTS:  # patterns in value order, the top one NaN (0xFF)
        unb = (x.ok & (x.hi >= U64(0xFF))).any(axis=1)
        lo_p = np.where(x.ok, x.lo, _mask(64)).min(axis=1)
        hi_p = np.where(x.ok, x.hi, U64(0)).max(axis=1)
        return (np.where(unb, 0, lo_p).astype(np.uint8).view(dt), np.where(unb, 0xFE, hi_p).astype(np.uint8).view(dt),
                unb)  # type: ignore[return-value]  # (as above)
    unb = np.zeros(x.n, bool)
    if dt == np.bool_:
        lo = np.where(x.ok, x.lo, _mask(64)).min(axis=1) != 0
        hi = np.where(x.ok, x.hi, U64(0)).max(axis=1) != 0
        return lo, hi, unb
    if dt.kind == "u":
        lo = np.where(x.ok, x.lo, _mask(64)).min(axis=1).astype(dt)
        hi = np.where(x.ok, x.hi, U64(0)).max(axis=1).astype(dt)
        return lo, hi, unb
    top = U64(1) << U64(bits - 1)
    cross = x.ok & (x.lo < top) & (x.hi >= top)  # from the largest positive to the smallest negative
    view = np.dtype(f"i{dt.itemsize}")
    a = x.lo.astype(LAYOUTS[name].uint).view(view).astype(np.int64)
    b = x.hi.astype(LAYOUTS[name].uint).view(view).astype(np.int64)
    info = np.iinfo(dt)
    a, b = np.where(cross, info.min, a), np.where(cross, info.max, b)
    lo = np.where(x.ok, a, np.iinfo(np.int64).max).min(axis=1).astype(dt)
    hi = np.where(x.ok, b, np.iinfo(np.int64).min).max(axis=1).astype(dt)
    return lo, hi, unb


def clip(approx: np.ndarray, lo: np.ndarray, hi: np.ndarray, unbounded: np.ndarray, name: str) -> np.ndarray:
    """Approximations (raw patterns, uint64) as values of dtype ``name``, moved into their bounds where
    bounded (a SUB delta's midpoint, the base, can lie outside when the delta's magnitude is known; a NaN
    there, a base's NaN, becomes the middle of the bounds, or the finite one)."""
    dt = np_dtype(name)
    v = approx.astype(LAYOUTS[name].uint).view(dt)
    if dt == np.bool_:
        return np.where(unbounded, v, np.clip(v, lo, hi))
    if name in EXPONENTS:  # in pattern order, which is value order (NaN, the top pattern, moves to hi)
        p = np.minimum(np.maximum(v.view(np.uint8), lo.view(np.uint8)), hi.view(np.uint8))
        return np.where(unbounded, v, p.view(dt))
    if is_float(name):
        with np.errstate(invalid="ignore", over="ignore"):
            f, a, b = v.astype(np.float64), lo.astype(np.float64), hi.astype(np.float64)
            inside = unbounded | ((f >= a) & (f <= b))
            mid = np.where(np.isfinite(a) & np.isfinite(b), a / 2 + b / 2, np.where(np.isfinite(a), a, b))
            mid = np.minimum(np.maximum(mid, a), b)  # a / 2 of a float64 subnormal rounds
            moved = np.where(np.isnan(f), mid, np.where(f < a, a, b)).astype(dt)  # the dtype's values between
        return np.where(inside, v, moved).astype(dt)
    return np.where(unbounded, v, np.minimum(np.maximum(v, lo), hi)).astype(dt)


def from_values(lo: np.ndarray, hi: np.ndarray, unbounded: np.ndarray, name: str) -> Slots:
    """The float patterns of dtype ``name`` whose values lie in [lo, hi] (both zeros where 0 is inside);
    every pattern where ``unbounded``."""
    dt = np_dtype(name)
    bits = 8 * dt.itemsize
    uint = LAYOUTS[name].uint
    sign = U64(1) << U64(bits - 1)
    lo = np.asarray(lo, np.float64).reshape(-1)
    hi = np.asarray(hi, np.float64).reshape(-1)
    unb = np.asarray(unbounded, bool).reshape(-1) | np.isnan(lo) | np.isnan(hi)

    def pat(v: np.ndarray) -> np.ndarray:
        return np.abs(v).astype(dt).view(uint).astype(U64)  # magnitude pattern (exact: v is of the dtype)

    pos_ok = hi >= 0
    neg_ok = lo <= 0
    p_lo = np.where(lo > 0, pat(np.where(lo > 0, lo, 0.0)), U64(0))
    p_hi = pat(np.where(pos_ok, hi, 0.0))
    n_lo = np.where(hi < 0, pat(np.where(hi < 0, hi, 0.0)), U64(0)) | sign
    n_hi = pat(np.where(neg_ok, lo, 0.0)) | sign
    out = Slots(np.stack([p_lo, n_lo], 1), np.stack([p_hi, n_hi], 1), np.stack([pos_ok, neg_ok], 1), bits)
    if unb.any():
        lo_, hi_, ok_ = out.lo.copy(), out.hi.copy(), out.ok.copy()
        lo_[unb, 0], hi_[unb, 0], ok_[unb, 0], ok_[unb, 1] = 0, _mask(bits), True, False
        out = Slots(lo_, hi_, ok_, bits)
    return out
