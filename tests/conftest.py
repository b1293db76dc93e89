"""Shared fixtures: adversarial tensors for every supported dtype; damage to one tensor's chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gpupas
from gpupas.format.layout import holders
from gpupas.format.manifest import Manifest
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


def flip_chunks_of(arc: Path, m: Manifest, name: str) -> int:
    """Flip a byte in every chunk of snapshot ``m`` that holds tensor ``name`` and nothing else; their count."""
    store, flipped = gpupas.open_archive(arc).store, 0
    for s, stream in enumerate(m.streams):
        reader = store.reader(stream)
        for c in range(stream.nchunks):
            if holders(m, s, c) == [name]:
                key, off, n = reader.locate(c)
                data = bytearray((arc / key).read_bytes())
                data[off + n // 2] ^= 0x10
                (arc / key).write_bytes(bytes(data))
                flipped += 1
        reader.close()
    return flipped
