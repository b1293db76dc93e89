"""Planning a snapshot: each tensor's bits, what of it gets coded, and against what.

A tensor of the same dtype and shape as in the base is a delta candidate: rows that did not
change are masked out where enough of them did not (:mod:`gpupas.pas.rows`), then the encoding
(mat / SUB / XOR, context split or not) with the smallest sampled entropy is chosen
(:func:`gpupas.pas.transform.choose_plan`), and where the base is itself a delta on its own base,
the row extrapolation ('pred', :mod:`gpupas.pas.predict`) is kept when a sample says it pays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpupas.backend import fast
from gpupas.errors import InvalidInputError
from gpupas.format.manifest import TensorEntry
from gpupas.pas import schemes
from gpupas.pas.context import plan_samples, sample_index
from gpupas.pas.planes import Layout, coding_layout, layout_of, to_bits
from gpupas.pas.predict import alpha_planes, fit, predict, supports
from gpupas.pas.rows import changed_rows, gather, mask_bytes, rows_of
from gpupas.pas.settings import Setting
from gpupas.pas.transform import MIN_ESTIMATE_VALUES, Plan, choose_plan


@dataclass
class Staged:
    """One tensor on its way into a snapshot: its bits, and what gets coded (the changed rows only,
    where a row mask pays; against the base, or a prediction from it and its own base)."""

    name: str
    layout: Layout  # what its planes are coded with (a lossy tensor's: its representation's)
    shape: tuple[int, ...]  # the tensor's
    bits: Any  # all its raw patterns (flat), as restored
    crc: int  # of ``bits``
    u: Any  # the patterns that get coded
    ub: Any | None  # what they are coded against
    coded_shape: tuple[int, ...]  # the shape of ``u`` (rows kept, values per row)
    plan: Plan = field(default_factory=lambda: Plan("mat", False))
    changed: np.ndarray | None = None  # bool per row, where a row mask is stored
    alpha: np.ndarray | None = None  # prediction factors, for 'pred'
    ub2: Any | None = None  # the base's base (rows as ``u``), for 'pred': predicted segment by segment
    dtype: str = ""  # the tensor's (default: the layout's)
    scheme: dict[str, Any] | None = None  # the lossy scheme with its parameters; ``u`` is its representation
    source: tuple[Any, int] | None = None  # (input bits, CRC-32) where ``bits`` are not the input's
    rows: np.ndarray | None = None  # the compiled path's row mask: the coded rows (see _RowStaged)

    @property
    def values(self) -> int:
        """Values coded (the changed rows' only, where a row mask is stored)."""
        return int(self.u.size) if self.rows is None else int(self.rows.size) * self.coded_shape[1]

    def full(self, name: str) -> Any:
        """``u``, ``ub`` or ``ub2`` with every row of the tensor where ``rows`` lists the coded ones (the
        compiled kernels read them through ``rows``), else as they are."""
        return getattr(self, name)

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    @property
    def unchanged(self) -> tuple[Any, int]:
        """The input's bits and their CRC-32 as staged (to check nothing changed them since)."""
        return self.source or (self.bits, self.crc)

    def extra(self) -> np.ndarray:
        """What is stored at the tensor's extras: the row mask, then the prediction factors."""
        parts = [] if self.changed is None else [mask_bytes(self.changed)]
        if self.alpha is not None:
            parts.append(alpha_planes(self.alpha))
        return np.concatenate(parts) if parts else np.empty(0, np.uint8)

    def base_for(self, a: int, b: int) -> Any | None:
        """What values ``a:b`` of ``u`` are coded against (the prediction, for 'pred')."""
        if self.ub is None:
            return None
        if self.alpha is None:
            return self.ub[a:b]
        assert self.ub2 is not None  # (factors are fitted against the base's base)
        return predict(self.ub[a:b], self.ub2[a:b], self.alpha, self.layout, rows_of(self.coded_shape)[1], a)


def delta_candidate(base: TensorEntry | None, dtype: str, shape: Any) -> bool:
    """Whether a tensor of ``dtype`` and ``shape`` may be coded against ``base`` (the base's entry of its name)."""
    return base is not None and base.dtype == dtype and tuple(base.shape) == tuple(shape)


def stage(name: str, arr: Any, crc32: Any, setting: Setting, base: TensorEntry | None = None,
          base_bits: Any = None, grand_bits: Any = None, rotate: bool = True,
          scheme: dict[str, Any] | None = None) -> Staged:
    """Plan one tensor ``arr`` (against ``base_bits`` where the base has it with the same dtype and
    shape; ``grand_bits``: the base's own base, for 'pred'). ``rotate=False`` codes floats with the
    sign in the top plane; ``scheme``: store it in that lossy representation (whole)."""
    if scheme is not None:
        return _stage_lossy(name, arr, crc32, setting, scheme, rotate)
    layout = coding_layout(layout_of(arr.dtype).name, rotate)
    u = to_bits(arr, layout)
    same = base_bits is not None and delta_candidate(base, layout.name, arr.shape)
    st = Staged(name, layout, tuple(arr.shape), u, crc32(u), u, base_bits if same else None, tuple(arr.shape),
                dtype=layout.name)
    if fast.applies(u, st.ub, grand_bits if same else None):
        return _stage_fast(st, setting, grand_bits if same else None)
    if st.ub is not None and setting.row_mask:
        st.changed = changed_rows(u, st.ub, arr.shape)
        if st.changed is not None:  # code the changed rows only
            per = rows_of(arr.shape)[1]
            st.u, st.ub = gather(u, st.changed, per), gather(st.ub, st.changed, per)
            st.coded_shape = (int(st.changed.sum()), per)
    st.plan = choose_plan(st.u, st.ub, layout, setting)
    ub2 = grand_bits if same else None
    if ub2 is not None and st.ub is not None and ub2.size == u.size and supports(layout) \
            and st.u.size >= MIN_ESTIMATE_VALUES:
        if st.changed is not None:
            ub2 = gather(ub2, st.changed, st.coded_shape[1])
        alpha = fit(st.u, st.ub, ub2, layout, st.coded_shape)
        if alpha is not None:  # keep the prediction only where it beats the plain delta (on a sample)
            idx = sample_index(st.u.size, plan_samples(st.u.size))  # the plan's sample
            pos = idx if isinstance(idx, np.ndarray) else np.arange(st.u.size)  # a slice: few values
            rows = pos // rows_of(st.coded_shape)[1]
            pred = predict(st.ub[idx], ub2[idx], alpha[rows], layout, 1)  # one value per "row"
            alt = choose_plan(st.u[idx], pred, layout, setting, encs=("sub",), of=st.u.size)
            if alt.estimate * st.u.size + 16 * alpha.size < st.plan.estimate * st.u.size:
                st.plan, st.alpha, st.ub2 = Plan("pred", alt.ctx, alt.estimate), alpha, ub2
    return st


def _stage_fast(st: Staged, setting: Setting, ub2: Any) -> Staged:
    """:func:`stage` on the compiled path: the same mask, plan and factors, with the changed rows read
    through ``st.rows`` instead of gathered."""
    st.__class__ = _RowStaged
    layout, u = st.layout, st.full("u")
    if st.full("ub") is not None and setting.row_mask:
        st.changed = fast.changed_rows(u, st.full("ub"), st.shape)
        if st.changed is not None:
            st.rows = np.flatnonzero(st.changed)
            st.coded_shape = (int(st.rows.size), rows_of(st.shape)[1])
    per = rows_of(st.coded_shape)[1]
    st.plan = fast.choose_plan(u, st.full("ub"), layout, setting, rows=st.rows, per=per)
    n = st.values
    if ub2 is not None and ub2.size == u.size and supports(layout) and n >= MIN_ESTIMATE_VALUES:
        alpha = fast.fit(u, st.full("ub"), ub2, layout, st.coded_shape, st.rows)
        if alpha is not None:  # keep the prediction only where it beats the plain delta (on a sample)
            pos = fast.sample_positions(n)  # the plan's sample
            rows = pos // per
            us, ubs, ub2s = (fast.gather(x, pos, st.rows, per) for x in (u, st.full("ub"), ub2))
            pred = predict(ubs, ub2s, alpha[rows], layout, 1)  # one value per "row"
            alt = fast.choose_plan(us, pred, layout, setting, encs=("sub",), of=n)
            if alt.estimate * n + 16 * alpha.size < st.plan.estimate * n:
                st.plan, st.alpha, st.ub2 = Plan("pred", alt.ctx, alt.estimate), alpha, ub2
    return st


class _RowStaged(Staged):
    """A tensor staged by the compiled path with a row mask: ``u``, ``ub`` and ``ub2`` are kept with every
    row and gathered to the coded rows only when something reads them (the NumPy reference, the GPU
    backend); the compiled kernels read :meth:`full` through ``rows`` and never gather a copy."""

    def full(self, name: str) -> Any:
        return self.__dict__[name]

    def _coded(self, name: str) -> Any:
        x = self.__dict__[name]
        if x is None or self.rows is None:
            return x
        got = self.__dict__.get("_gathered_" + name)
        if got is None:
            got = self.__dict__["_gathered_" + name] = x.reshape(-1, self.coded_shape[1])[self.rows].reshape(-1)
        return got

    def _keep(self, name: str, value: Any) -> None:
        self.__dict__[name] = value
        self.__dict__.pop("_gathered_" + name, None)

    u = property(lambda self: self._coded("u"), lambda self, v: self._keep("u", v))  # type: ignore[assignment]
    ub = property(lambda self: self._coded("ub"), lambda self, v: self._keep("ub", v))  # type: ignore[assignment]
    ub2 = property(lambda self: self._coded("ub2"), lambda self, v: self._keep("ub2", v))  # type: ignore[assignment]


def _stage_lossy(name: str, arr: Any, crc32: Any, setting: Setting, scheme: dict[str, Any], rotate: bool) -> Staged:
    """Stage the lossy representation of ``arr`` (on the host: the schemes are NumPy code); the
    snapshot records the bits it restores to, and what the scheme cost (``error``)."""
    from gpupas.xp import to_numpy

    layout = layout_of(arr.dtype)
    src = to_bits(arr, layout)
    host = to_numpy(arr)
    try:
        rep, params = schemes.apply(host, scheme)
    except InvalidInputError as exc:  # name the tensor: a checkpoint has many
        raise InvalidInputError(f"tensor {name!r}: {exc}") from None
    restored = schemes.restore(rep, params, layout.name)
    params.setdefault("error", schemes.error(host, restored))
    coding = coding_layout(rep.dtype.name, rotate)
    u = to_bits(rep, coding)
    bits = to_bits(restored, layout)
    st = Staged(name, coding, tuple(arr.shape), bits, crc32(bits), u, None, tuple(arr.shape), dtype=layout.name,
                scheme=params, source=(src, crc32(src)))
    st.plan = choose_plan(u, None, coding, setting)
    return st


def stage_all(arrays: Mapping[str, Any], setting: Setting, crc32: Any, executor: Any, small: bool,
              base: Mapping[str, TensorEntry] | None = None, base_bits: Mapping[str, Any] | None = None,
              grand_bits: Mapping[str, Any] | None = None, rotate: bool = True,
              lossy: Mapping[str, dict[str, Any]] | None = None) -> list[Staged]:
    """:func:`stage` every tensor (in parallel on the executor); ``lossy``: schemes by tensor name."""
    base, base_bits, grand_bits, lossy = base or {}, base_bits or {}, grand_bits or {}, lossy or {}

    def one(item: tuple[str, Any]) -> Staged:
        name, arr = item
        return stage(name, arr, crc32, setting, base.get(name), base_bits.get(name), grand_bits.get(name), rotate,
                     lossy.get(name))

    return executor.map(one, list(arrays.items()), inline=small)


def twins(staged: Sequence[Staged]) -> dict[int, int]:
    """Tensors that would be coded exactly as an earlier one of the same snapshot (tied weights: one storage
    under two names, or equal copies, against equal bases): index -> that earlier tensor's index. Such a
    tensor is coded once; its entry names the earlier one's parts (FORMAT.md 8)."""
    first: dict[tuple[Any, ...], list[int]] = {}
    out: dict[int, int] = {}
    for i, st in enumerate(staged):
        if st.values == 0:
            continue
        key = (st.dtype, st.layout, st.shape, st.crc, st.plan, st.coded_shape)
        j = next((j for j in first.get(key, ()) if _coded_alike(staged[j], st)), None)
        if j is None:
            first.setdefault(key, []).append(i)
        else:
            out[i] = j
    return out


def _coded_alike(a: Staged, b: Staged) -> bool:
    """Whether ``a`` and ``b`` code to the same bytes: the same bits against the same base (and prediction).
    What is coded (``u``: the bits, or their changed rows) follows from the bits and the row mask; a lossy
    tensor's (its representation) from the input and the scheme, which must be the same too (levels closer than
    the dtype can part restore to equal bits from other codes)."""
    return (_same(a.bits, b.bits) and all(_same(a.full(k), b.full(k)) for k in ("ub", "ub2"))
            and all(_same(getattr(a, k), getattr(b, k)) for k in ("changed", "rows", "alpha"))
            and a.scheme == b.scheme and (a.scheme is None or _same(a.u, b.u)))


def _same(x: Any, y: Any, step: int = 1 << 22) -> bool:
    """Arrays (NumPy or CuPy) of equal dtype, shape and elements, compared a piece at a time (no temporary
    the size of a large tensor); None only equals None."""
    if x is None or y is None:
        return x is y
    if x is y:
        return True
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    fx, fy = x.reshape(-1), y.reshape(-1)
    return all(bool((fx[k:k + step] == fy[k:k + step]).all()) for k in range(0, int(fx.size), step))
