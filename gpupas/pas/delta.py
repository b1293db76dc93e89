"""Deltas on bit patterns: exactly invertible integer arithmetic, never float arithmetic.

Both take raw (unrotated) patterns. SUB is wrap-around subtraction followed by zigzag, so small
changes of either sign become small numbers; XOR is taken and then rotated like a stored value
(rotation commutes with XOR), so its top plane holds the exponent bits that changed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpupas.pas.planes import Layout, rotate, unrotate

ENCODINGS = ("mat", "sub", "xor")


def encode_delta(enc: str, u: Any, ub: Any, layout: Layout) -> Any:
    """Coded patterns of ``u`` against base ``ub`` for ``enc`` ('sub' or 'xor'): a new array."""
    if enc == "xor":
        return rotate(u ^ ub, layout)
    d = u - ub
    sign = d.view(f"i{layout.width}") >> (layout.bits - 1)
    d <<= 1
    d ^= sign.view(layout.uint)
    return d


def decode_delta(enc: str, coded: Any, ub: Any, layout: Layout, out: Any) -> None:
    """Inverse of :func:`encode_delta`, written into ``out`` (raw patterns); ``coded`` is consumed."""
    if enc == "xor":
        np.bitwise_xor(unrotate(coded, layout), ub, out=out)
        return
    sign = coded & 1
    np.negative(sign, out=sign)
    coded >>= 1
    coded ^= sign
    np.add(coded, ub, out=out)
