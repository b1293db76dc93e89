"""Shared fixtures: adversarial tensors for every supported dtype."""

from __future__ import annotations

import numpy as np
import pytest

from gpupas.pas.planes import LAYOUTS


def adversarial(dtype: np.dtype, n: int = 257, seed: int = 0) -> np.ndarray:
    """Random bit patterns of ``dtype`` (NaN payloads, subnormals, -0.0, Inf included)."""
    rng = np.random.default_rng(seed)
    layout = LAYOUTS[np.dtype(dtype).name]
    bits = rng.integers(0, 256, n * layout.width, dtype=np.uint8).view(layout.uint)
    if layout.rotate:
        special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-40, 3.0], dtype=np.float64)
        vals = special.astype(dtype) if layout.width >= 2 else special
        k = min(n, vals.size)
        bits[:k] = vals[:k].astype(dtype).view(layout.uint)
    return bits.view(dtype)


@pytest.fixture(params=sorted(LAYOUTS))
def dtype_name(request: pytest.FixtureRequest) -> str:
    return request.param
