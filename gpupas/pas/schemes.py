"""Lossy schemes (ModelHub, ICDE 2017, sec. 3): a float tensor kept as a smaller representation, on request only.

- ``cast``: float16 or bfloat16, rounded to nearest (even) or truncated toward zero;
- ``fixed``: one exponent per tensor and ``bits``-bit signed integers (``x ~ q * 2**exponent``);
- ``quant``: ``bits``-bit codes (``bits <= 8``) into a table of levels, spaced uniformly between the
  tensor's extremes or placed by k-means on its values.

:func:`apply` turns values into (representation, parameters); :func:`restore` turns a
representation back into values of the original dtype, deterministically, so a lossy snapshot
restores to the same bits every time (and other snapshots can be deltas on it).
"""

from __future__ import annotations

import numbers
from typing import Any

import ml_dtypes
import numpy as np

from gpupas.errors import InvalidInputError

FLOATS = ("float64", "float32", "float16", "bfloat16")
NAMES = ("cast", "fixed", "quant")
# the members each scheme has (FORMAT.md 9.9), ``error`` (what it cost, measured at commit) aside: a caller's scheme
# may hold no other, since readers restore ignoring members they do not know
MEMBERS = {"cast": ("name", "to", "round"), "fixed": ("name", "bits", "exponent"),
           "quant": ("name", "bits", "method", "levels")}
_SHORT = {"fp16": {"name": "cast", "to": "float16"}, "bf16": {"name": "cast", "to": "bfloat16"}}


def parse(spec: str | dict[str, Any]) -> dict[str, Any]:
    """A scheme from its short form: ``"bf16"``, ``"fp16"``, ``"bf16:truncate"``, ``"fixed:16"``,
    ``"quant:8"`` (uniform levels), ``"kmeans:4"`` (k-means levels), or a dict."""
    if isinstance(spec, dict):
        s = dict(spec)
    else:
        name, _, arg = str(spec).partition(":")
        if name in _SHORT:
            s = dict(_SHORT[name]) | {"round": arg or "nearest"}
        elif name in ("fixed", "quant", "kmeans") and arg.isascii() and arg.isdigit():  # not "²": int() refuses it
            s = ({"name": "fixed", "bits": int(arg)} if name == "fixed" else
                 {"name": "quant", "bits": int(arg), "method": "kmeans" if name == "kmeans" else "uniform"})
        else:
            raise InvalidInputError(f"lossy scheme {spec!r} is not one of bf16, fp16 (':truncate'), fixed:BITS, "
                                    "quant:BITS, kmeans:BITS")
    kind = s.get("name")
    if isinstance(s.get("bits"), numbers.Integral) and not isinstance(s["bits"], (bool, np.bool_)):
        s["bits"] = int(s["bits"])  # np.int64(8) from a config: written into the manifest as JSON
    if kind == "cast":
        if s.get("to") not in ("float16", "bfloat16") or s.setdefault("round", "nearest") not in ("nearest",
                                                                                                   "truncate"):
            raise InvalidInputError(f"cast scheme {s}: 'to' is float16 or bfloat16, 'round' nearest or truncate")
    elif kind == "fixed":
        if type(s.get("bits")) is not int or not 2 <= s["bits"] <= 32:
            raise InvalidInputError(f"fixed-point scheme {s}: bits must be an integer of 2..32")
    elif kind == "quant":
        if type(s.get("bits")) is not int or not 1 <= s["bits"] <= 8:
            raise InvalidInputError(f"quantization scheme {s}: bits must be an integer of 1..8")
        if s.setdefault("method", "uniform") not in ("uniform", "kmeans"):
            raise InvalidInputError(f"quantization scheme {s}: method is uniform or kmeans")
    else:
        raise InvalidInputError(f"unknown lossy scheme {kind!r}; use one of {', '.join(NAMES)}")
    _check_params(s)
    return s


def _check_params(s: dict[str, Any]) -> None:
    """Refuse parameters given with a scheme that no stored tensor could carry (FORMAT.md 9.9): they would be
    written as they are, into a snapshot no reader accepts."""
    e, lv, top = s.get("exponent"), s.get("levels"), float(np.finfo(np.float64).max)
    if e is not None and (s["name"] != "fixed" or not isinstance(e, int) or isinstance(e, bool)
                          or not -1100 <= e <= 1100):
        raise InvalidInputError(f"lossy scheme {describe(s)}: 'exponent' is an int in -1100..1100 of a fixed-point "
                                "scheme; leave it out and gpupas picks it")
    if lv is not None and (s["name"] != "quant" or not isinstance(lv, list) or not 1 <= len(lv) <= 2 ** s["bits"]
                           or not all(isinstance(v, int | float) and not isinstance(v, bool) and -top <= v <= top
                                      for v in lv)):
        raise InvalidInputError(f"lossy scheme {describe(s)}: 'levels' are 1..2**bits finite numbers of a "
                                "quantization scheme; leave them out and gpupas picks them")


def check_members(s: dict[str, Any]) -> None:
    """Refuse a parsed scheme ``s`` the caller gave that holds a member its scheme does not have (``error``
    aside): it would be written into the manifest as given, and ignored by every reader."""
    extra = sorted(set(s) - set(MEMBERS[s["name"]]) - {"error"}, key=str)
    if extra:
        raise InvalidInputError(f"lossy scheme {describe(s)} has no member(s) {', '.join(map(repr, extra))}; "
                                f"a {s['name']} scheme has {', '.join(MEMBERS[s['name']])}")


def describe(scheme: dict[str, Any]) -> str:
    """A scheme in its short form (``bf16``, ``fp16:truncate``, ``fixed:16``, ``quant:4``, ``kmeans:4``)."""
    if scheme["name"] == "cast":
        short = "bf16" if scheme["to"] == "bfloat16" else "fp16"
        return short + (":truncate" if scheme.get("round") == "truncate" else "")
    if scheme["name"] == "fixed":
        return f"fixed:{scheme['bits']}"
    return f"{'kmeans' if scheme.get('method') == 'kmeans' else 'quant'}:{scheme['bits']}"


def applies(scheme: dict[str, Any], dtype: str) -> bool:
    """Whether ``scheme`` makes a tensor of ``dtype`` smaller (a cast never widens)."""
    if dtype not in FLOATS:
        return False
    return np.dtype(_np(repr_dtype(scheme))).itemsize < np.dtype(_np(dtype)).itemsize


def repr_dtype(scheme: dict[str, Any]) -> str:
    """The dtype the representation is stored as."""
    if scheme["name"] == "cast":
        return scheme["to"]
    if scheme["name"] == "fixed":
        return "int8" if scheme["bits"] <= 8 else "int16" if scheme["bits"] <= 16 else "int32"
    return "uint8"


def _np(name: str) -> Any:
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def apply(values: np.ndarray, scheme: dict[str, Any], sample: int = 1 << 16) -> tuple[np.ndarray, dict[str, Any]]:
    """(representation, the scheme with its parameters) of float ``values`` under ``scheme``.

    Parameters already in ``scheme`` (a fixed-point exponent, a table of levels) are used as they
    are: applied to values it restored, a scheme gives back the same representation."""
    name = scheme["name"]
    if name == "cast":
        x = values.astype(np.float64) if values.dtype.name == "bfloat16" else values
        with np.errstate(over="ignore", invalid="ignore"):  # beyond the target's range: Inf, as a cast does
            y = x.astype(_np(scheme["to"]))
        if x.dtype == np.float64 and scheme["to"] == "bfloat16":  # ml_dtypes rounds twice, through float32
            fin = np.isfinite(x)
            y[fin] = _odd32(x[fin]).astype(ml_dtypes.bfloat16)
        if scheme.get("round") == "truncate":  # toward zero: step back where rounding went up in magnitude
            with np.errstate(invalid="ignore"):
                up = np.abs(y.astype(np.float64)) > np.abs(x.astype(np.float64))
            if up.any():
                bits = y.view(np.uint16).copy()
                bits[up] -= 1  # the next representable value toward zero (same sign)
                y = bits.view(y.dtype)
        return y, dict(scheme)
    x = values.astype(np.float64).reshape(-1)
    if x.size and not np.isfinite(x).all():
        raise InvalidInputError(f"the {name} scheme cannot hold NaN or Inf; store this tensor losslessly (a "
                                "mapping of tensor names to schemes leaves it out) or cast it")
    bits = scheme["bits"]
    if name == "fixed":
        top = 2 ** (bits - 1) - 1
        peak = float(np.abs(x).max()) if x.size else 0.0
        limit = float(ml_dtypes.finfo(_np(values.dtype.name)).max)
        exponent = scheme.get("exponent")  # given: the parameters of a stored tensor (a revision keeps them)
        if exponent is None:
            exponent = _exponent(peak, top, limit)
        with np.errstate(over="ignore"):  # a given exponent's top steps may pass the dtype: those would restore as Inf
            cap = top if np.ldexp(float(top), exponent) <= limit else int(np.ldexp(limit, -exponent))
        q = np.clip(np.rint(np.ldexp(x, -exponent)), -cap, cap).astype(repr_dtype(scheme))
        return q.reshape(values.shape), dict(scheme) | {"exponent": exponent}
    levels = _levels(x, 2**bits, scheme.get("levels", scheme.get("method", "uniform")), sample)
    with np.errstate(over="ignore"):
        table = levels.astype(_np(values.dtype.name)).astype(np.float64)
    if not np.isfinite(table).all():  # given levels past the dtype's range: ±Inf, which no manifest holds
        raise InvalidInputError(f"lossy scheme {describe(scheme)}: 'levels' must be values of the tensor's dtype "
                                f"({values.dtype.name}), not past its range; leave them out and gpupas picks them")
    if "levels" not in scheme:  # one zero: levels -0.0 and +0.0 both would re-code a restored zero to the other
        table = table + 0.0
    codes = np.searchsorted(_midpoints(table), x).astype(np.uint8)  # the nearest of the levels it restores to
    return codes.reshape(values.shape), dict(scheme) | {"levels": [float(v) for v in table]}


def _odd32(x: np.ndarray) -> np.ndarray:
    """Finite float64 ``x`` as float32 rounded to odd (toward zero, the last bit set where inexact): rounded
    again to a type of at most 22 bits of significand (bfloat16), as if rounded once."""
    with np.errstate(over="ignore"):
        bits = x.astype(np.float32).view(np.uint32).copy()
    bits[np.abs(bits.view(np.float32).astype(np.float64)) > np.abs(x)] -= 1  # toward zero (past float32: its max)
    bits[bits.view(np.float32).astype(np.float64) != x] |= 1
    return bits.view(np.float32)


def _levels(x: np.ndarray, n: int, how: Any, sample: int) -> np.ndarray:
    """``n`` sorted levels (fewer where the tensor has fewer distinct values)."""
    if x.size == 0:
        return np.zeros(1)
    if isinstance(how, list):
        return np.sort(np.asarray(how, np.float64))
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return np.array([lo])
    # Values near float64's limits: a span or a sum would overflow, so work on values scaled by a power
    # of two (exact for every value but the subnormals, which then round; a level table, not data).
    scale = 2.0 ** max(0, int(np.frexp(max(abs(lo), abs(hi)))[1]) - 1000)
    if how == "uniform":
        return np.linspace(lo / scale, hi / scale, n) * scale
    s = x[np.linspace(0, x.size - 1, min(x.size, sample)).astype(np.int64)] / scale
    centers = np.unique(np.quantile(s, (np.arange(n) + 0.5) / n))
    for _ in range(25):  # Lloyd's algorithm in one dimension
        cut = np.searchsorted((centers[1:] + centers[:-1]) / 2, s)
        sums, counts = np.bincount(cut, s, centers.size), np.bincount(cut, minlength=centers.size)
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), centers)
        if np.allclose(moved, centers, rtol=0, atol=1e-12 * (hi / scale - lo / scale)):  # relative: any scale
            break
        centers = np.unique(moved)
    return centers * scale


def _midpoints(levels: np.ndarray) -> np.ndarray:
    """The points halfway between neighbouring ``levels`` (no overflow near float64's limits)."""
    with np.errstate(over="ignore"):
        mids = (levels[1:] + levels[:-1]) / 2
    wide = ~np.isfinite(mids)
    mids[wide] = levels[1:][wide] / 2 + levels[:-1][wide] / 2
    return mids


def _exponent(peak: float, top: int, limit: float) -> int:
    """The smallest exponent ``e`` with ``peak <= top * 2**e`` (0 for a tensor of zeros), kept where
    ``top * 2**e`` is at most ``limit`` (the dtype's largest value): values past it clip to the largest
    step the dtype holds instead of restoring as Inf."""
    if peak <= 0:
        return 0
    e = int(np.frexp(peak)[1]) - int(np.frexp(float(top))[1])  # within one of the answer (no log of a subnormal)
    e = max(e, -1100)  # the format's range (FORMAT.md 9.9): a larger step still holds the values
    with np.errstate(over="ignore"):
        while np.ldexp(float(top), e) < peak:
            e += 1
        while e > -1100 and np.ldexp(float(top), e - 1) >= peak:
            e -= 1
        while np.ldexp(float(top), e) > limit:
            e -= 1
    return e


def restore(rep: np.ndarray, scheme: dict[str, Any], dtype: str) -> np.ndarray:
    """Values of ``dtype`` from representation ``rep`` (the inverse of :func:`apply`, up to its loss)."""
    name, out = scheme["name"], _np(dtype)
    if name == "cast":
        return rep.astype(out)  # widening: exact (NaN payloads as NumPy/ml_dtypes convert them)
    if name == "fixed":
        with np.errstate(over="ignore"):  # an exponent that overflowed (written before 2026-12-06): Inf
            return np.ldexp(rep.astype(np.float64), int(scheme["exponent"])).astype(out)
    table = np.asarray(scheme["levels"], np.float64)
    if rep.size and int(rep.max(initial=0)) >= table.size:
        from gpupas.errors import IntegrityError

        raise IntegrityError(f"a quantized tensor has codes beyond its {table.size} levels (damaged)")
    return table[rep].astype(out)


def error(values: np.ndarray, restored: np.ndarray) -> dict[str, float]:
    """What a scheme cost a tensor, over the values finite in both: max and RMS absolute error, RMS
    relative to the values' RMS; and ``overflow``, how many finite values became Inf or NaN."""
    x, y = values.astype(np.float64).reshape(-1), restored.astype(np.float64).reshape(-1)
    fin = np.isfinite(x)
    ok = fin & np.isfinite(y)
    scale = float(np.abs(x[ok]).max()) if ok.any() else 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        d = (y - x)[ok]
        def rms(v: np.ndarray) -> float:  # scaled: no overflow for values near the float64 limit
            return scale * float(np.sqrt(np.mean((v / scale) ** 2))) if scale > 0 and v.size else 0.0

        err, ref = rms(d), rms(x[ok])
        peak = float(np.abs(d).max()) if d.size else 0.0
    out = {"max_abs": peak, "rms": err, "rel_rms": err / ref if ref else 0.0, "overflow": int((fin & ~ok).sum())}
    return {k: v if np.isfinite(v) else float(np.finfo(np.float64).max) for k, v in out.items()}
