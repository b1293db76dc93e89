"""What a commit accepts, normalized to a dict of NumPy arrays (checked, contiguous, native order)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gpupas.errors import InvalidInputError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Tensors of a safetensors or torch checkpoint file, read without executing code."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"checkpoint file {p} does not exist")
    if p.suffix == ".safetensors":
        from gpupas.integrations.safetensors import load_file

        return load_file(p)
    if p.suffix in TORCH_SUFFIXES:
        from gpupas.integrations.torch import _torch

        torch = _torch()
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for damaged or unsafe files
            raise InvalidInputError(f"{p} is not a loadable torch checkpoint (weights only): {exc}") from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise InvalidInputError(f"{p} holds a {type(obj).__name__}, not a state_dict")
        return as_tensor_dict(obj, source=str(p))
    raise InvalidInputError(
        f"{p}: unknown checkpoint type {p.suffix!r}; give a .safetensors file or a torch "
        f"state_dict file ({', '.join(TORCH_SUFFIXES)})"
    )


def as_tensor_dict(tensors: Any, source: str = "input", backend: Any = None) -> dict[str, Any]:
    """Named tensors as arrays of ``backend`` (NumPy by default); accepts a mapping of
    NumPy/CuPy/torch arrays or a checkpoint file path."""
    if backend is None:
        from gpupas.backend import get_backend

        backend = get_backend("numpy")
    if isinstance(tensors, (str, os.PathLike)):
        return {k: backend.as_array(v, k) for k, v in load_checkpoint(tensors).items()}
    if not isinstance(tensors, Mapping):
        raise InvalidInputError(
            f"{source}: expected a mapping of name -> tensor or a checkpoint path, got {type(tensors).__name__}"
        )
    out = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or "\0" in name:
            raise InvalidInputError(f"{source}: tensor name {name!r} must be a non-empty string without NUL")
        try:
            out[name] = backend.as_array(value, name)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{source}: {exc}") from None
    return out
