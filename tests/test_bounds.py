"""Bounds from the highest planes are sound: every true pattern lies in its slots, every true value in
[lo, hi] (or is flagged unbounded), for every dtype, encoding, rotation and plane count, with bases that
are themselves only partly known (gpupas/pas/bounds.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpupas.pas import bounds as B
from gpupas.pas.delta import encode_delta
from gpupas.pas.planes import EXPONENTS, LAYOUTS, coding_layout, rotate

NAMES = sorted(LAYOUTS)
FLOATS = [n for n in NAMES if B.is_float(n)]


def _specials(name: str) -> list[int]:
    """Patterns worth hitting: zeros, extremes, the edges of the sign halves, Inf and NaN, subnormals."""
    bits = LAYOUTS[name].bits
    s = 1 << (bits - 1)
    out = {0, 1, s - 1, s, s + 1, (1 << bits) - 1, 2, s - 2}
    if B.is_float(name):
        _, pos_max = B._float_info(name)
        out |= {pos_max, pos_max - 1, pos_max + 1, s | pos_max, (s | pos_max) + 1, s | 1}
    return sorted(x for x in out if 0 <= x < (1 << bits))


@st.composite
def patterns(draw: st.DrawFn, name: str, n: int) -> np.ndarray:
    bits = LAYOUTS[name].bits
    one = st.one_of(st.integers(0, (1 << bits) - 1), st.sampled_from(_specials(name)))
    return np.array(draw(st.lists(one, min_size=n, max_size=n)), dtype=np.uint64)


def _near(name: str, ub: np.ndarray, steps: list[int]) -> np.ndarray:
    mask = np.uint64((1 << LAYOUTS[name].bits) - 1)
    return (ub + np.array(steps, np.int64).astype(np.uint64)) & mask


def _coded(enc: str, u: np.ndarray, against: np.ndarray | None, name: str, rot: bool) -> np.ndarray:
    layout = coding_layout(name, rot)
    uu = u.astype(layout.uint)
    if enc == "mat":
        return rotate(uu, layout).astype(np.uint64)
    return encode_delta("sub" if enc == "pred" else enc, uu, against.astype(layout.uint), layout).astype(np.uint64)


def _known(u: np.ndarray, name: str, rot: bool, k: int) -> tuple[B.Slots, np.ndarray]:
    """What the top k planes of ``u`` stored whole ('mat') say about it."""
    layout = coding_layout(name, rot)
    m = 8 * (layout.width - k)
    return B.decode(_coded("mat", u, None, name, rot) >> np.uint64(m), m, "mat", layout.bits, layout.rotate)


def _inside(x: B.Slots, u: np.ndarray) -> np.ndarray:
    return np.any(x.ok & (x.lo <= u[:, None]) & (u[:, None] <= x.hi), axis=1)


def _check_values(x: B.Slots, u: np.ndarray, approx: np.ndarray, name: str) -> None:
    lo, hi, unb = B.to_values(x, name)
    dt = B.np_dtype(name)
    v = u.astype(LAYOUTS[name].uint).view(dt)
    a = B.clip(approx, lo, hi, unb, name)
    if B.is_float(name):
        with np.errstate(invalid="ignore"):
            vf, af, lf, hf = (t.astype(np.float64) for t in (v, a, lo, hi))
        assert np.all(unb | ((lf <= vf) & (vf <= hf))), (name, u[~(unb | ((lf <= vf) & (vf <= hf)))])
        assert not np.any(np.isnan(vf) & ~unb)  # a NaN is never claimed bounded
        assert np.all(unb | np.isnan(af) | ((lf <= af) & (af <= hf)))
    else:  # integers are never unbounded; float8_e8m0fnu only where its NaN pattern may be the value
        assert np.all(unb | ((lo <= v) & (v <= hi))) and np.all(unb | ((lo <= a) & (a <= hi))), name
        assert not np.any(np.isnan(v.astype(np.float64)) & ~unb) and (name in EXPONENTS or not unb.any())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_encoding_bounds_its_true_patterns(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(NAMES), label="dtype")
    rot = data.draw(st.booleans(), label="rot")
    layout = coding_layout(name, rot)
    bits, w = layout.bits, layout.width
    encs = ["mat", "sub", "xor"] + (["pred"] if bits <= 32 else [])
    enc = data.draw(st.sampled_from(encs), label="enc")
    k = data.draw(st.integers(1, w), label="planes")
    n = 12
    ub = data.draw(patterns(name, n), label="ub")
    near = data.draw(st.lists(st.integers(-300, 300), min_size=n, max_size=n))
    u = np.where(np.arange(n) % 2 == 0, _near(name, ub, near), data.draw(patterns(name, n), label="u"))
    kb = data.draw(st.integers(1, w), label="base planes")
    base, base_approx = _known(ub, name, rot, kb)  # the base itself only partly known
    assert _inside(base, ub).all()
    ub2 = alpha = grand = grand_approx = None
    against = ub
    if enc == "pred":
        ub2 = data.draw(patterns(name, n), label="ub2")
        grand, grand_approx = _known(ub2, name, rot, data.draw(st.integers(1, w), label="grand planes"))
        alpha = np.array(data.draw(st.lists(st.integers(-32768, 32767), min_size=n, max_size=n)), np.int64)
        against = B.predict_exact(ub, ub2, alpha, bits)
    m = 8 * (w - k)
    top = _coded(enc, u, against, name, rot) >> np.uint64(m)
    slots, approx = B.decode(top, m, enc, bits, layout.rotate, base, base_approx, grand, grand_approx, alpha)
    assert _inside(slots, u).all(), (name, rot, enc, k, kb)
    assert slots.lo.shape[1] <= B.MAX_SLOTS
    _check_values(slots, u, approx, name)
    if k == w and kb == w and (enc != "pred" or grand.is_exact()):
        assert slots.is_exact() and np.array_equal(approx, u)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_merge_and_xor_keep_every_pattern(data: st.DataObject) -> None:
    bits = data.draw(st.sampled_from([8, 16, 32, 64]))
    mask = (1 << bits) - 1
    n, s = 6, data.draw(st.integers(1, 12))
    a = np.array(data.draw(st.lists(st.integers(0, mask), min_size=2 * n * s, max_size=2 * n * s)), np.uint64)
    lo, hi = np.minimum(a[: n * s], a[n * s :]).reshape(n, s), np.maximum(a[: n * s], a[n * s :]).reshape(n, s)
    ok = np.array(data.draw(st.lists(st.booleans(), min_size=n * s, max_size=n * s))).reshape(n, s)
    ok[:, 0] = True
    x = B.Slots(lo, hi, ok, bits)
    pick = np.array([data.draw(st.sampled_from(np.flatnonzero(ok[r]).tolist())) for r in range(n)])
    frac = data.draw(st.floats(0, 1))
    # a point inside each row's picked slot, in Python integers: a float64 width near 2^64 rounds up past it
    pts = np.array([int(lo[r, p]) + min(int(hi[r, p]) - int(lo[r, p]), int((int(hi[r, p]) - int(lo[r, p])) * frac))
                    for r, p in enumerate(pick)], np.uint64)
    limit = data.draw(st.integers(1, 4))
    merged = B.merge(x, limit)
    assert merged.lo.shape[1] <= max(limit, 1) and _inside(merged, pts).all()
    other = np.array(data.draw(st.lists(st.integers(0, mask), min_size=n, max_size=n)), np.uint64)
    assert _inside(B.xor(x, B.exact(other, bits)), pts ^ other).all()


def test_merge_keeps_a_slot_that_starts_at_the_last_pattern() -> None:
    """A valid slot [2^64 - 1, 2^64 - 1] after an unused one: once sorted with the unused ones last by
    that same key, and cut off (found by hypothesis: a SUB delta from -0.0 to the all-ones NaN)."""
    top = np.uint64(2**64 - 1)
    x = B.Slots(np.array([[5, 0, top], [1, 2, 3]], np.uint64), np.array([[9, 0, top], [1, 2, 3]], np.uint64),
                np.array([[True, False, True], [True, True, True]]), 64)
    for limit in (1, 2, 4):
        assert _inside(B.merge(x, limit), np.array([top, 2], np.uint64)).all()
        assert _inside(B.merge(x, limit), np.array([7, 3], np.uint64)).all()


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_value_intervals_back_to_patterns(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(["float64", "float32", "float16", "bfloat16"]))
    dt = B.np_dtype(name)
    vals = st.floats(-1e4, 1e4, allow_nan=False, width=16 if name == "float16" else 32)
    lo, hi = sorted(data.draw(st.lists(vals, min_size=2, max_size=2)))
    lo_t, hi_t = np.array([lo]).astype(dt), np.array([hi]).astype(dt)
    x = B.from_values(lo_t, hi_t, np.zeros(1, bool), name)
    a, b = float(lo_t.astype(np.float64)[0]), float(hi_t.astype(np.float64)[0])
    v = np.array([a + data.draw(st.floats(0, 1)) * (b - a)]).astype(dt)
    v = np.clip(v.astype(np.float64), lo_t.astype(np.float64), hi_t.astype(np.float64)).astype(dt)
    assert _inside(x, v.view(LAYOUTS[name].uint).astype(np.uint64)).all()
    back_lo, back_hi, unb = B.to_values(x, name)
    assert not unb.any() and back_lo[0] <= lo_t[0] and back_hi[0] >= hi_t[0]


def test_context_byte_is_pinned_only_when_every_slot_agrees() -> None:
    x = B.Slots(np.array([[0x3F800000, 0], [0x3F800000, 0x3F7FFFFF]], np.uint64),
                np.array([[0x3F80FFFF, 0], [0x3F80FFFF, 0x3F800000]], np.uint64),
                np.array([[True, False], [True, True]]), 32)
    byte, pinned = B.top_byte(x, rotate=False)
    assert byte[0] == 0x3F and pinned.tolist() == [True, True]
    byte, pinned = B.top_byte(x, rotate=True)  # exponent byte 0x7F vs 0x7E: the second is not pinned
    assert pinned.tolist() == [True, False]


def test_nan_and_inf_patterns() -> None:
    for name in FLOATS:
        bits = LAYOUTS[name].bits
        sign, pos_max = B._float_info(name)
        x = B.Slots(np.array([[pos_max - 1], [pos_max], [pos_max + 1], [sign], [0], [sign + 1]], np.uint64),
                    np.array([[pos_max], [pos_max], [pos_max + 1], [sign | pos_max], [(1 << bits) - 1],
                              [sign | pos_max]], np.uint64),
                    np.ones((6, 1), bool), bits)
        lo, hi, unb = B.to_values(x, name)
        fnuz = name.endswith("fnuz")  # no -0.0: the sign bit alone is their NaN
        assert unb.tolist() == [False, False, True, fnuz, True, False], name
        assert hi[0] == hi[1] and lo[5] == -hi[1], name  # Inf (or the largest finite, float8_e4m3fn) is a bound
