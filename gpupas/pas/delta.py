"""Deltas on bit patterns: exactly invertible integer arithmetic, never float arithmetic.

SUB works on the unrotated patterns (wrap-around subtraction, then zigzag so small changes of
either sign become small numbers); XOR works on the rotated patterns (rotation commutes with it).
Both take and give the *rotated* patterns the rest of the pipeline uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpupas.pas.planes import Layout, rotate, unrotate

ENCODINGS = ("mat", "sub", "xor")


def encode_sub(r: Any, rb: Any, layout: Layout) -> Any:
    """Zigzag of ``value - base`` on raw bit patterns, from rotated ``r`` and base ``rb``."""
    d = unrotate(r, layout) if layout.rotate else r.copy()
    d -= unrotate(rb, layout)
    sign = d.view(f"i{layout.width}") >> (layout.bits - 1)
    d <<= 1
    d ^= sign.view(layout.uint)
    return d


def decode_sub(z: Any, rb: Any, layout: Layout) -> Any:
    """Inverse of :func:`encode_sub`: rotated patterns of the value."""
    sign = z & 1
    np.negative(sign, out=sign)
    d = z >> 1
    d ^= sign
    d += unrotate(rb, layout)
    return rotate(d, layout)


def encode_xor(r: Any, rb: Any) -> Any:
    """Bitwise XOR of rotated patterns."""
    return r ^ rb


def decode_xor(x: Any, rb: Any) -> Any:
    """Inverse of :func:`encode_xor`."""
    return x ^ rb


def encode_delta(enc: str, r: Any, rb: Any, layout: Layout) -> Any:
    """Delta ``enc`` ('sub' or 'xor') of rotated patterns ``r`` against base ``rb``."""
    return encode_sub(r, rb, layout) if enc == "sub" else encode_xor(r, rb)


def decode_delta(enc: str, d: Any, rb: Any, layout: Layout) -> Any:
    """Inverse of :func:`encode_delta`."""
    return decode_sub(d, rb, layout) if enc == "sub" else decode_xor(d, rb)
