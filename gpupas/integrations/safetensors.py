"""Read and write safetensors files as NumPy dicts (bfloat16 and float8 included), no torch needed.

The format is an 8-byte little-endian header length, a JSON header, then raw little-endian data.
Reading never executes code and checks every offset against the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from gpupas.errors import InvalidInputError, UnsupportedDtypeError

_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
    "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_CODES = {np.dtype(t).name: code for code, t in _DTYPES.items()}


def load_file(path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file; InvalidInputError names the file if it is damaged. ``metadata``: filled
    with the header's ``__metadata__`` (string to string; other entries are left out). The arrays are views
    of one buffer holding the file (copied only where a tensor's offset is not aligned for its dtype), so
    the file is in memory once, for as long as one of them is."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        got = f.readinto(data)
    del data[got:]  # a file that shrank meanwhile: what was read
    bad = f"{path} is not a valid safetensors file"
    if len(data) < 8:
        raise InvalidInputError(f"{bad}: it is shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise InvalidInputError(f"{bad}: header length {n} runs past the end of the file")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{bad}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidInputError(f"{bad}: header is not a JSON object")
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            if metadata is not None and isinstance(info, dict):
                metadata.update({k: v for k, v in info.items() if isinstance(k, str) and isinstance(v, str)})
            continue
        code = info.get("dtype") if isinstance(info, dict) else None
        if isinstance(code, str) and code not in _DTYPES:
            raise UnsupportedDtypeError(f"{path}: tensor {name!r} is {code}, which gpupas does not store (it stores "
                                        f"{', '.join(sorted(_DTYPES))}); convert it first")
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(_whole(s) for s in info["shape"])
            start, end = (_whole(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InvalidInputError(f"{bad}: entry {name!r} has a bad dtype, shape or offsets") from None
        count = math.prod(shape)  # a Python int: a product past 2^63 cannot wrap into a small one
        if min(shape, default=0) < 0 or not 0 <= start <= end <= len(body) or end - start != count * dtype.itemsize:
            raise InvalidInputError(f"{bad}: tensor {name!r} does not fit its offsets (truncated file?)")
        a = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
        out[name] = a if a.flags.aligned else a.copy()
    return out


def _whole(x: Any) -> int:
    """A JSON integer of the header (not a float, bool or string that int() would take)."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{x!r} is not an integer")
    return x


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike[str],
              metadata: Mapping[str, str] | None = None, *, replace: bool = True) -> None:
    """Write NumPy tensors to a safetensors file (readable by the safetensors library), whole or not at all."""
    from gpupas.outputs import write_file

    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    arrays, offset = [], 0
    for name, arr in tensors.items():
        if name == "__metadata__":  # the header's own key: the file would not load
            raise InvalidInputError(f"a tensor named {name!r} cannot be written to a safetensors file (the name is "
                                    "its header's metadata key); write a torch file instead (--format torch)")
        arr = np.asarray(arr)
        arr = arr if arr.flags.c_contiguous else arr.copy()  # (ascontiguousarray would make 0-d 1-d)
        if arr.dtype.name not in _CODES:
            raise UnsupportedDtypeError(f"tensor {name!r}: safetensors has no dtype {arr.dtype.name}")
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _CODES[arr.dtype.name], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        arrays.append(arr)
        offset += arr.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def fill(f: Any) -> None:
        f.write(struct.pack("<Q", len(head)) + head)
        for a in arrays:
            f.write(memoryview(a.reshape(-1).view(np.uint8)) if a.size else b"")

    write_file(path, fill, replace=replace)
