"""Array backend: NumPy or CuPy, picked from the array itself; CuPy is never imported up front."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def namespace(array: Any) -> ModuleType:
    """Return ``numpy`` or ``cupy``: the module that owns ``array``."""
    if type(array).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def to_numpy(array: Any) -> np.ndarray:
    """Host copy of a NumPy or CuPy array (no copy for NumPy)."""
    if namespace(array) is np:
        return np.asarray(array)
    return array.get()
