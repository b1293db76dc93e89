"""Bit layouts per dtype and the split of bit patterns into byte planes (high-order first).

Floats are stored with their sign bit rotated to the bottom, so the exponent fills the top
byte (float32, bfloat16) or its high bits (float16, float64): the top plane then holds the
low-entropy exponent alone. Integers and bool keep their bits as they are.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from gpupas.errors import UnsupportedDtypeError
from gpupas.xp import ML_DTYPES, aligned, namespace

if sys.byteorder != "little":  # pragma: no cover - every platform we ship on is little-endian
    raise ImportError("gpupas needs a little-endian machine")


@dataclass(frozen=True)
class Layout:
    """How one dtype's values become unsigned bit patterns."""

    name: str
    dtype: np.dtype
    uint: np.dtype
    rotate: bool

    @property
    def width(self) -> int:
        """Bytes per value: the number of planes."""
        return self.dtype.itemsize

    @property
    def bits(self) -> int:
        return 8 * self.dtype.itemsize


EXPONENTS = ("float8_e8m0fnu",)  # 1 byte, an exponent alone (no sign, no mantissa): block scales (MX formats)
SMALL_FLOATS = tuple(n for n in ML_DTYPES if n.startswith("float8") and n not in EXPONENTS)  # 1 byte, sign on top
FLOATS = ("float64", "float32", "float16", "bfloat16", *SMALL_FLOATS)  # sign, exponent, mantissa: value bounds


def _layouts() -> dict[str, Layout]:
    uints: dict[int, np.dtype[Any]] = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32),
                                       8: np.dtype(np.uint64)}
    rotated = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16]
    ints = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]
    out = {}
    for t in rotated + [getattr(ml_dtypes, n) for n in SMALL_FLOATS + EXPONENTS] + ints:
        dt = np.dtype(t)
        out[dt.name] = Layout(dt.name, dt, uints[dt.itemsize], rotate=t in rotated)
    return out


LAYOUTS: dict[str, Layout] = _layouts()


def layout_of(dtype: Any) -> Layout:
    """The layout of ``dtype`` (NumPy dtype or its name); raises for dtypes we cannot archive."""
    if isinstance(dtype, str) and dtype in LAYOUTS:  # manifest names: the common case, kept cheap
        return LAYOUTS[dtype]
    if isinstance(dtype, np.dtype) and dtype in _BY_DTYPE:  # an array's: a dtype's name is built each time
        return _BY_DTYPE[dtype]
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in LAYOUTS:
        raise UnsupportedDtypeError(
            f"dtype {name!r} cannot be archived; supported: {', '.join(sorted(LAYOUTS))}. "
            "Convert it first (complex: store .real and .imag; object/str: not tensor data)."
        )
    if isinstance(dtype, np.dtype):
        _BY_DTYPE[dtype] = LAYOUTS[name]
    return LAYOUTS[name]


_BY_DTYPE: dict[np.dtype, Layout] = {}  # dtypes seen, one entry each (a dozen or so)
_RAW: dict[str, Layout] = {}


def coding_layout(name: str, rotate: bool = True) -> Layout:
    """The layout values of dtype ``name`` are coded with: as :data:`LAYOUTS`, or with ``rotate=False``
    a float's patterns as they are (the sign stays in the top plane: partial reads can bound values)."""
    layout = LAYOUTS[name]
    if rotate or not layout.rotate:
        return layout
    if name not in _RAW:
        _RAW[name] = Layout(layout.name, layout.dtype, layout.uint, rotate=False)
    return _RAW[name]


def to_bits(values: Any, layout: Layout) -> Any:
    """Flat, native-order unsigned bit patterns of ``values``: a view where it can be."""
    xp = namespace(values)
    if not values.flags.c_contiguous:
        values = xp.ascontiguousarray(values)
    if not values.dtype.isnative:
        values = values.astype(values.dtype.newbyteorder("="))
    return aligned(values).reshape(-1).view(layout.uint)


def from_bits(bits: Any, layout: Layout, shape: tuple[int, ...]) -> Any:
    """Inverse of :func:`to_bits`: values of ``layout.dtype`` with ``shape`` (a view)."""
    return bits.view(layout.dtype).reshape(shape)


def rotate(u: Any, layout: Layout, out: Any = None, tmp: Any = None) -> Any:
    """Patterns with the sign bit moved to the bottom (floats; others copied as they are).

    Written into ``out`` (a new array if None), with ``tmp`` as scratch of the same shape.
    """
    xp = namespace(u)
    r = xp.empty_like(u) if out is None else out
    if not layout.rotate:
        r[...] = u
        return r
    xp.left_shift(u, 1, out=r)
    r |= xp.right_shift(u, layout.bits - 1, out=tmp)
    return r


def unrotate(r: Any, layout: Layout, tmp: Any = None) -> Any:
    """Inverse of :func:`rotate`, in place (``tmp``: optional scratch): returns ``r``."""
    if layout.rotate:
        low = namespace(r).right_shift(r, 1, out=tmp)
        r <<= layout.bits - 1
        r |= low
    return r


def top_byte(u: Any, layout: Layout) -> Any:
    """The top byte of the rotated patterns of raw ``u`` (the exponent byte of floats), uint8."""
    shift = layout.bits - 9 if layout.rotate else layout.bits - 8
    return (u >> shift).astype(np.uint8)


def split_planes(bits: Any, out: Any, tmp: Any = None) -> None:
    """Write the byte planes of ``bits`` (width w) into ``out`` ((w, n), or w views of n), high byte first.

    Shifts and truncating copies (``tmp``: optional scratch like ``bits``): about twice as fast
    as strided byte copies.
    """
    xp = namespace(bits)
    w = bits.dtype.itemsize
    for p in range(w):
        shift = 8 * (w - 1 - p)
        src = xp.right_shift(bits, shift, out=tmp) if shift else bits
        xp.copyto(out[p], src, casting="unsafe")  # keeps the low byte


def join_planes(planes: Any, out: Any) -> Any:
    """Inverse of :func:`split_planes`: write the bit patterns into ``out`` (uint, flat); return it."""
    out[...] = planes[0]
    for p in range(1, len(planes)):
        out <<= 8
        out |= planes[p]
    return out
