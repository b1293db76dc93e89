"""Rows of a tensor (its first axis): what prediction factors and the unchanged-row mask work on.

A fine-tune step leaves most rows of an embedding untouched (tokens not in its batches). A delta
whose tensor has enough such rows stores a bit per row saying whether it changed, and planes for the
changed rows only; the others are the base's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gpupas.xp import namespace, to_numpy

MIN_UNCHANGED = 0.125  # mask rows only where at least this share of them is unchanged
MIN_ROWS = 8


def rows_of(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """(rows, values per row): rows are the first axis (a token's embedding, a neuron's weights)."""
    n = math.prod(int(d) for d in shape)
    if len(shape) >= 2 and shape[0] > 0:
        return int(shape[0]), n // int(shape[0])
    return 1, n


def changed_rows(u: Any, ub: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """Which rows of ``u`` differ from base ``ub`` (bool per row), or None where masking does not pay."""
    rows, per = rows_of(shape)
    if rows < MIN_ROWS or per == 0:
        return None
    a, b = u.reshape(rows, per), ub.reshape(rows, per)
    if int((a[:, 0] == b[:, 0]).sum()) < rows * MIN_UNCHANGED:  # cheap look at one column first
        return None
    changed = to_numpy(namespace(u).any(a != b, axis=1))
    return changed if rows - int(changed.sum()) >= rows * MIN_UNCHANGED else None


def gather(x: Any, changed: np.ndarray, per: int) -> Any:
    """The values of the changed rows of flat ``x``, in order (a copy)."""
    return x.reshape(-1, per)[namespace(x).asarray(changed)].reshape(-1)


def mask_bytes(changed: np.ndarray) -> np.ndarray:
    """The stored form of the mask: one bit per row."""
    return np.packbits(changed)


def mask_from_bytes(stored: Any, rows: int) -> np.ndarray:
    """Inverse of :func:`mask_bytes`."""
    return np.unpackbits(to_numpy(stored), count=rows).astype(bool)
