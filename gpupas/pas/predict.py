"""Row-wise extrapolation along a delta chain: predict a snapshot from its base and the base's own change.

Adam keeps moving a row it no longer gets gradients for (the embedding row of a token that has left
the batches) along the direction it last moved it, by a factor its betas set; many other rows keep
part of their last change too. Where the base is itself a delta on a grand-base, a float tensor can
be stored as a SUB delta against ``base + alpha[row] * (base - grandbase)`` instead of against the
base ('pred'). ``alpha`` is one fixed-point factor per row (0 where extrapolating does not pay),
stored with the tensor's planes as two byte planes (high bytes, then low bytes).

Everything is integer arithmetic on the raw patterns (a float's magnitude bits move like an integer
while its sign stays), so NumPy and CuPy predict the same bits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpupas.pas.planes import Layout
from gpupas.pas.rows import rows_of
from gpupas.xp import namespace, to_numpy

FRAC = 13  # alpha_q = round(alpha * 2**FRAC), int16: factors in [-4, 4)
SAMPLE_COLS = 64  # values per row the fit looks at
ROW_COST_BITS = 16  # what one row's factor costs to store, about


def supports(layout: Layout) -> bool:
    """Floats of up to 32 bits (their steps times a factor fit int64)."""
    return layout.rotate and layout.width <= 4


def _steps(u: Any, ub: Any, layout: Layout) -> Any:
    """Signed change of the patterns from ``ub`` to ``u``, wrapped to their width (int64)."""
    return namespace(u).subtract(u, ub).view(f"i{layout.width}").astype(np.int64)


def _adjust(alpha: Any, step: Any) -> Any:
    """``alpha * step``, rounded (int64)."""
    step *= alpha
    step += 1 << (FRAC - 1)
    step >>= FRAC
    return step


def fit(u: Any, ub: Any, ub2: Any, layout: Layout, shape: tuple[int, ...]) -> np.ndarray | None:
    """Per-row factors (int16) for predicting ``u`` from base ``ub`` and grand-base ``ub2``, or None.

    The factor is the median ratio of the new change to the base's change over a sample of each
    row; a row keeps it only where the sample says it saves more than storing it costs.
    """
    rows, per = rows_of(shape)
    if rows * per == 0:
        return None
    cols = np.unique(np.linspace(0, per - 1, min(per, SAMPLE_COLS)).astype(np.int64))
    idx = (np.arange(rows, dtype=np.int64)[:, None] * per + cols[None, :]).ravel()
    us, ubs, ub2s = (to_numpy(a[idx]) for a in (u, ub, ub2))
    new = _steps(us, ubs, layout).reshape(rows, -1)
    last = _steps(ubs, ub2s, layout).reshape(rows, -1)
    moved = last != 0
    ratio = np.sort(np.where(moved, new / np.where(moved, last, 1), np.inf), axis=1)  # unmoved last
    k = moved.sum(axis=1)
    lo = np.take_along_axis(ratio, np.maximum(k - 1, 0)[:, None] // 2, axis=1)[:, 0]
    hi = np.take_along_axis(ratio, k[:, None] // 2, axis=1)[:, 0]
    alpha = np.where(k > 0, (lo + hi) / 2, 0.0)  # the median ratio
    q = np.clip(np.rint(alpha * (1 << FRAC)), -32768, 32767).astype(np.int16)
    residual = new - _adjust(q[:, None].astype(np.int64), last.copy())
    gain = (np.log2(np.abs(new) + 1.0) - np.log2(np.abs(residual) + 1.0)).sum(axis=1) * (per / cols.size)
    q[gain <= ROW_COST_BITS] = 0
    return q if q.any() else None


def predict(ub: Any, ub2: Any, alpha: Any, layout: Layout, per: int, start: int = 0) -> Any:
    """Raw patterns of the prediction for values ``start:start+len(ub)`` (rows of ``per`` values)."""
    xp = namespace(ub)
    alpha = xp.asarray(alpha)
    if start % per == 0 and ub.size % per == 0:  # whole rows: extrapolate only the rows that have a factor
        r0 = start // per
        a = alpha[r0 : r0 + ub.size // per]
        moving = xp.flatnonzero(a)
        out = ub.copy()
        rows_b, rows_b2, rows_out = (x.reshape(-1, per) for x in (ub, ub2, out))
        step = _adjust(a[moving][:, None], _steps(rows_b[moving], rows_b2[moving], layout))
        rows_out[moving] += step.astype(layout.uint)
        return out
    step = _adjust(_per_value(alpha, per, start, ub.size), _steps(ub, ub2, layout))
    return xp.add(ub, step.astype(layout.uint))  # wraps around, as SUB does


def _per_value(alpha: Any, per: int, start: int, n: int) -> Any:
    """``alpha`` of the row of each value ``start:start+n``."""
    xp = namespace(alpha)
    if xp is not np:  # CuPy repeats by a scalar only; a division is cheap there
        return alpha[xp.arange(start, start + n, dtype=xp.int64) // per]
    r0, r1 = start // per, -(-(start + n) // per)
    counts = np.full(r1 - r0, per, np.int64)
    counts[0] -= start - r0 * per
    counts[-1] -= r1 * per - (start + n)
    return np.repeat(alpha[r0:r1], counts)


def alpha_planes(alpha: np.ndarray) -> np.ndarray:
    """The stored form of the factors: high bytes, then low bytes (mostly zeros: both compress)."""
    b = alpha.astype("<i2").view(np.uint8).reshape(-1, 2)
    return np.concatenate([b[:, 1], b[:, 0]])


def alpha_from_planes(planes: Any) -> Any:
    """Inverse of :func:`alpha_planes`."""
    xp = namespace(planes)
    n = planes.size // 2
    return (planes[:n].astype(xp.uint16) << 8 | planes[n:].astype(xp.uint16)).view(xp.int16)
