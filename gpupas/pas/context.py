"""Context split: group a plane's bytes by a context byte the decoder already knows.

The context is the value's own top (exponent) byte for its lower planes, or the base's top byte
for every plane of a delta. Grouping is a stable sort by context; each group is then coded with
statistics of its own (the coder restarts its tables at each group boundary).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpupas.xp import namespace

SAMPLE = 16384
PLAN_SAMPLE_MIN = 4096  # values a plan samples at least (all of a smaller tensor)


def order_by(ctx: Any) -> Any:
    """Stable permutation that groups equal context bytes together."""
    return namespace(ctx).argsort(ctx, kind="stable")


def group_bounds(ctx: Any, min_group: int) -> list[int]:
    """Offsets (inside one plane sorted by ``ctx``) where a group of at least ``min_group`` bytes ends.

    Small neighbouring groups are merged; the last boundary (the plane's end) is left out.
    """
    n = ctx.size
    step = max(1, n // SAMPLE)  # bounds are hints for the coder: a sample places them well enough
    return bounds_from_counts(np.bincount(np.asarray(ctx[::step])) * (n / max(1, ctx[::step].size)), n, min_group)


def bounds_from_counts(counts: np.ndarray, n: int, min_group: int) -> list[int]:
    """:func:`group_bounds` from the estimated size of each context group (in context order)."""
    bounds, start, pos = [], 0, 0
    for c in counts[counts > 0].tolist():  # Python floats: round() as on NumPy's (half to even), faster
        pos = min(n, pos + round(c))
        if pos - start >= min_group:
            bounds.append(pos)
            start = pos
    if bounds and (bounds[-1] == n or n - bounds[-1] < min_group):
        bounds.pop()
    return bounds


def sample_index(n: int, size: int = SAMPLE) -> np.ndarray | slice:
    """Evenly spaced positions for estimating statistics of ``n`` values."""
    return slice(None) if n <= size else np.linspace(0, n - 1, size).astype(np.int64)


def plan_samples(n: int) -> int:
    """How many of a tensor's ``n`` values a plan samples: a quarter of them, at least
    :data:`PLAN_SAMPLE_MIN` and at most :data:`SAMPLE`, so planning a small tensor costs a fraction of
    coding it (a checkpoint of thousands of small tensors was planned value by value)."""
    return min(n, max(PLAN_SAMPLE_MIN, min(SAMPLE, n // 4)))


def entropy(symbols: np.ndarray, ctx: np.ndarray | None = None) -> float:
    """Order-0 entropy of a byte sample in bits per byte, conditioned on ``ctx`` (ints) if given.

    Miller-Madow corrected: a small sample split over many contexts would otherwise look
    more predictable than it is.
    """
    n = symbols.size
    if n == 0:
        return 0.0
    if ctx is None:
        hist = np.bincount(symbols, minlength=256)
        return (_h(hist) + (np.count_nonzero(hist) - 1) / (2 * np.log(2))) / n
    joint = np.bincount(ctx.astype(np.int64) * 256 + symbols, minlength=(int(ctx.max()) + 1) * 256).reshape(-1, 256)
    used = np.count_nonzero(joint.sum(axis=1))
    bias = (np.count_nonzero(joint) - used) / (2 * np.log(2))
    return (_h(joint.ravel()) - _h(joint.sum(axis=1)) + bias) / n


def entropies(samples: list[np.ndarray]) -> np.ndarray:
    """:func:`entropy` (no context) of each byte sample in ``samples``, with one histogram pass."""
    return count_entropies(sample_counts(samples))


def sample_counts(samples: list[np.ndarray]) -> np.ndarray:
    """The byte counts of each sample in ``samples`` (``k * 256``, sample after sample), in one pass."""
    k = len(samples)
    if not k:
        return np.zeros(0, np.int64)
    n = np.array([x.size for x in samples], np.int64)
    return np.bincount(np.repeat(np.arange(k), n) * 256 + np.concatenate(samples), minlength=k * 256)


def count_entropies(cnt: np.ndarray) -> np.ndarray:
    """:func:`entropies` from the samples' byte counts (``k * 256``, sample after sample)."""
    k = cnt.size // 256
    n = cnt.reshape(k, 256).sum(axis=1)
    if not n.any():
        return np.zeros(k)
    nf = np.maximum(n, 1).astype(np.float64)
    h = (nf * np.log2(nf) - _nlogn_by(cnt, k) + (_count_by(cnt, k) - 1) / (2 * np.log(2))) / nf
    return np.where(n > 0, h, 0.0)


def plane_entropies(planes: np.ndarray, ctx: np.ndarray | None = None) -> np.ndarray:
    """:func:`entropy` of each row of ``planes`` (w, n) at once, conditioned on ``ctx`` if given."""
    w, n = planes.shape
    if n == 0:
        return np.zeros(w)
    if ctx is not None:  # number the context values that occur: keeps the histograms small
        present = np.bincount(ctx, minlength=256) > 0
        ctx = (np.cumsum(present) - 1)[ctx]
    k = 1 if ctx is None else int(present.sum())
    key = planes.astype(np.int32)
    key += (np.arange(w, dtype=np.int32)[:, None] * k + (0 if ctx is None else ctx.astype(np.int32))) * 256
    cnt = np.bincount(key.ravel(), minlength=w * k * 256)
    rows = cnt.reshape(w * k, 256).sum(axis=1)
    bias = (_count_by(cnt, w) - _count_by(rows, w)) / (2 * np.log(2))  # Miller-Madow
    return (_nlogn_by(rows, w) - _nlogn_by(cnt, w) + bias) / n


def _nlogn_by(counts: np.ndarray, w: int) -> np.ndarray:
    """Sum of c*log2(c) over the nonzero counts of each of ``w`` equal slices."""
    idx = np.flatnonzero(counts)
    c = counts[idx].astype(np.float64)
    return np.bincount(idx // (counts.size // w), weights=c * np.log2(c), minlength=w)


def _count_by(counts: np.ndarray, w: int) -> np.ndarray:
    """Number of nonzero counts in each of ``w`` equal slices."""
    return np.bincount(np.flatnonzero(counts) // (counts.size // w), minlength=w)


def _h(counts: np.ndarray) -> float:
    """``n * H`` in bits for a histogram with total ``n``."""
    c = counts[counts > 0].astype(np.float64)
    n = c.sum()
    return float(n * np.log2(n) - (c * np.log2(c)).sum())
