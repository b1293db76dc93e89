"""Array namespaces: NumPy or CuPy, picked from the array itself; CuPy is never imported up front."""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
"""The dtypes gpupas stores that NumPy knows only through ml_dtypes (laid out in :mod:`gpupas.pas.planes`)."""


def namespace(array: Any) -> ModuleType:
    """Return ``numpy`` or ``cupy``: the module that owns ``array``."""
    if type(array).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def to_numpy(array: Any) -> np.ndarray:
    """Host copy of a NumPy or CuPy array, or of another device array that has ``get()`` (the CuPy backend's
    bfloat16 and float8 tensors); no copy for NumPy."""
    if isinstance(array, np.ndarray):
        return np.asarray(array)
    if namespace(array) is not np or (is_device_array(array) and callable(getattr(array, "get", None))):
        return array.get()
    return np.asarray(array)


def aligned(array: Any) -> Any:
    """``array``, or an aligned copy (the same bits) where its data starts where its values may not (a view at an
    odd offset, ``np.frombuffer``, a worker's received message): the compiled kernels read whole values through
    typed pointers."""
    return array if getattr(getattr(array, "flags", None), "aligned", True) else array.copy()


def is_device_array(value: Any) -> bool:
    """A CuPy array, a CUDA torch tensor, or anything else that says it lives on a CUDA device."""
    module = type(value).__module__.split(".")[0]
    if module == "cupy":
        return True
    if module == "torch":
        return getattr(getattr(value, "device", None), "type", "cpu") == "cuda"
    return hasattr(value, "__cuda_array_interface__")


def any_device_array(tensors: Any) -> bool:
    """Whether a mapping of tensors holds any device array (a path or other input: no)."""
    return isinstance(tensors, Mapping) and any(is_device_array(v) for v in tensors.values())
