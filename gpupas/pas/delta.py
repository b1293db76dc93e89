"""Deltas on bit patterns: exactly invertible integer arithmetic, never float arithmetic.

Both take raw (unrotated) patterns. SUB is wrap-around subtraction followed by zigzag, so small
changes of either sign become small numbers; XOR is taken and then rotated like a stored value
(rotation commutes with XOR), so its top plane holds the exponent bits that changed.
"""

from __future__ import annotations

from typing import Any

from gpupas.pas.planes import Layout, rotate, unrotate
from gpupas.xp import namespace


def encode_delta(enc: str, u: Any, ub: Any, layout: Layout, out: Any = None, tmp: Any = None) -> Any:
    """Coded patterns of ``u`` against base ``ub`` for ``enc`` ('xor', else SUB).

    Written into ``out`` (a new array if None); ``tmp`` is optional scratch of the same shape.
    """
    xp = namespace(u)
    if enc == "xor":
        x = xp.bitwise_xor(u, ub, out=tmp)
        return rotate(x, layout, out=out, tmp=x)  # x is ours: rotate may clobber it
    d = xp.subtract(u, ub, out=out)
    signed = f"i{layout.width}"
    sign = xp.right_shift(d.view(signed), layout.bits - 1, out=None if tmp is None else tmp.view(signed))
    d <<= 1
    d ^= sign.view(layout.uint)
    return d


def decode_delta(enc: str, coded: Any, ub: Any, layout: Layout, out: Any, tmp: Any = None) -> None:
    """Inverse of :func:`encode_delta`, written into ``out`` (raw patterns); ``coded`` is consumed."""
    xp = namespace(coded)
    if enc == "xor":
        xp.bitwise_xor(unrotate(coded, layout, tmp), ub, out=out)
        return
    sign = xp.bitwise_and(coded, 1, out=tmp)
    xp.negative(sign, out=sign)
    coded >>= 1
    coded ^= sign
    xp.add(coded, ub, out=out)
