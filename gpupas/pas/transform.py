"""One tensor's raw bit patterns <-> its stored byte planes (encoding choice, delta, context split).

Large tensors are cut into segments of at most :data:`SEGMENT` values; each segment's planes are
stored one after the other, so segments encode and decode independently (and in parallel).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpupas.pas.context import group_bounds, order_by, plan_samples, plane_entropies, sample_index
from gpupas.pas.delta import decode_delta, encode_delta
from gpupas.pas.planes import Layout, join_planes, rotate, split_planes, top_byte, unrotate
from gpupas.pas.settings import Setting
from gpupas.xp import namespace, to_numpy

SEGMENT = 1 << 20  # values per segment
MIN_SEGMENT = 64  # the least a manifest may declare: a reader's work per segment stays small per value
MIN_CONTEXT_VALUES = 16384  # below this the split's statistics cost more than they save
MIN_ESTIMATE_VALUES = 2048  # smaller deltas are stored as SUB without estimating
MIN_CONTEXT_GAIN = 0.005  # keep the split only if the estimate shrinks by this fraction
# 'mat-float': a whole float tensor is split by its own top byte only where that saves this fraction. Dense weights
# save little (not worth the sort a split restore does), mostly-zero ones (pruned, sparse rows) much more: BENCHMARKS.md
MIN_WHOLE_FLOAT_GAIN = 0.10
# ... and only where a quick look (ZERO_LOOK values, evenly spread) finds this fraction of zeros: where it does not,
# the split cannot save a tenth and the sampled estimate (a pass over the plan's sample) is not made
MIN_ZERO_FRACTION = 1 / 16
ZERO_LOOK = 4096


@dataclass(frozen=True)
class Plan:
    """How one tensor is stored: ``enc`` is 'mat', 'sub', 'xor' or 'pred' (SUB against the
    prediction of :mod:`gpupas.pas.predict`, passed as the base); ``ctx`` whether it is split."""

    enc: str
    ctx: bool
    estimate: float = 0.0  # estimated stored bits per value


_local = threading.local()


def scratch(k: int, n: int, dtype: Any, xp: Any = np) -> Any:
    """Thread-local scratch array ``k`` of ``n`` values: reused, so its pages stay warm."""
    key = (k, np.dtype(dtype).str, xp.__name__)
    cache: dict[Any, Any] = _local.__dict__
    have = cache.get(key)
    if have is None or have.size < n:
        have = xp.empty(max(n, min(SEGMENT, 4 * n)), dtype)
        cache[key] = have
    return have[:n]


def _coded(enc: str, u: Any, ub: Any, layout: Layout, xp: Any = np) -> Any:
    """Coded patterns in scratch 0 (scratch 1 used as temporary)."""
    out, tmp = scratch(0, u.size, layout.uint, xp), scratch(1, u.size, layout.uint, xp)
    return rotate(u, layout, out, tmp) if enc == "mat" else encode_delta(enc, u, ub, layout, out, tmp)


def choose_plan(u: Any, ub: Any | None, layout: Layout, setting: Setting,
                encs: tuple[str, ...] | None = None, of: int | None = None) -> Plan:
    """Pick the encoding (and context split) with the smallest sampled entropy (among ``encs``);
    ``of``: ``u`` and ``ub`` are a sample already, of a tensor of ``of`` values (all of it is read)."""
    if ub is None and not may_split_whole(u, setting, layout):
        return Plan("mat", False)  # nothing to choose
    if ub is not None and u.size < MIN_ESTIMATE_VALUES:
        return Plan("sub", False)  # too small for the choice to matter, or for a fair estimate
    n = u.size if of is None else of
    idx = slice(None) if of is not None else sample_index(n, plan_samples(n))
    us = to_numpy(u[idx])
    ubs = None if ub is None else to_numpy(ub[idx])
    w = layout.width
    best: Plan | None = None
    for enc in encs if encs is not None else candidates(ubs is not None, setting, layout):
        planes = np.empty((w, us.size), np.uint8)
        coded = rotate(us, layout) if enc == "mat" else encode_delta(enc, us, ubs, layout)
        split_planes(coded, planes)
        h = plane_entropies(planes)
        hc = None
        if splits(enc, setting, n, layout):
            hc = plane_entropies(planes, planes[0] if enc == "mat" else top_byte(ubs, layout))
        plan = plan_of(enc, h, hc, min_gain(enc, setting, layout))
        if best is None or plan.estimate < best.estimate:
            best = plan
    assert best is not None
    return best


def _ints_split(setting: Setting, layout: Layout) -> bool:
    return "mat" in setting.context or ("mat-int" in setting.context and layout.dtype.kind in "iu")


def whole_splits(setting: Setting, layout: Layout) -> bool:
    """Whether ``setting`` may split whole values ('mat') of ``layout``'s dtype by their own top byte:
    'mat' in its context, or 'mat-int' and an integer dtype (whose top byte says what the sign-extension
    bytes below it hold: split by it, they cost nothing), or 'mat-float' and a float dtype of more than one
    byte (where the split saves :data:`MIN_WHOLE_FLOAT_GAIN`: a zero's top byte is 0, so the lower planes of
    mostly-zero weights, split, pay for where the zeros are once instead of in every plane)."""
    return _ints_split(setting, layout) or ("mat-float" in setting.context and layout.dtype.kind not in "iub"
                                            and layout.width > 1)


def may_split_whole(u: Any, setting: Setting, layout: Layout) -> bool:
    """Whether whole values ``u`` (raw patterns, flat) are worth estimating split (:func:`whole_splits`): always
    where the setting splits them as such ('mat', or 'mat-int' and integers), else ('mat-float') where
    :data:`ZERO_LOOK` values spread over ``u`` hold :data:`MIN_ZERO_FRACTION` zeros (+0.0 or -0.0: pruned or
    sparse weights)."""
    if not whole_splits(setting, layout):
        return False
    if _ints_split(setting, layout):
        return True
    look = to_numpy(u[:: max(1, u.size // ZERO_LOOK)])
    return bool(look.size > 0 and np.count_nonzero(np.left_shift(look, 1) == 0) >= MIN_ZERO_FRACTION * look.size)


def min_gain(enc: str, setting: Setting, layout: Layout) -> float:
    """The fraction of the estimate the context split of ``enc`` must save to be kept."""
    return MIN_CONTEXT_GAIN if enc != "mat" or _ints_split(setting, layout) else MIN_WHOLE_FLOAT_GAIN


def candidates(with_base: bool, setting: Setting, layout: Layout) -> tuple[str, ...]:
    """The encodings :func:`choose_plan` estimates. With a base, XOR under the split carries the
    information a whole value does, so 'mat' is only worth estimating where the setting may split a
    whole value too ('mat-float' only splits whole floats committed without a base)."""
    return ("mat",) if not with_base else ("sub", "xor") + (("mat",) if _ints_split(setting, layout) else ())


def splits(enc: str, setting: Setting, n: int, layout: Layout) -> bool:
    """Whether the context split of encoding ``enc`` of ``n`` values is estimated."""
    if enc == "mat":
        return whole_splits(setting, layout) and n >= MIN_CONTEXT_VALUES and layout.width > 1
    return enc in setting.context and n >= MIN_CONTEXT_VALUES


def plan_of(enc: str, h: Any, hc: Any | None, gain: float = MIN_CONTEXT_GAIN) -> Plan:
    """The plan of ``enc`` from its sampled plane entropies, plain (``h``) and split by context (``hc``, None
    where not estimated): the split where it saves at least the fraction ``gain``."""
    plain = float(np.minimum(h, 8.0).sum())
    if hc is not None:
        if enc == "mat":
            hc[0] = h[0]  # a whole value's context is its own top plane: that plane is coded plain
        split = float(np.minimum(hc, 8.0).sum())
        if split < plain * (1 - gain):
            return Plan(enc, True, split)
    return Plan(enc, False, plain)


def encode_segment(u: Any, ub: Any | None, layout: Layout, plan: Plan, out: Any, min_group: int) -> list[list[int]]:
    """Write the planes of raw patterns ``u`` into ``out`` (w planes of n bytes: a (w, n) array or a
    list of w views); return, per plane, the offsets inside it where a coder should restart its
    tables (context groups)."""
    n = u.size
    w = layout.width
    if n == 0:
        return [[] for _ in range(w)]
    xp = namespace(u)
    coded = _coded(plan.enc, u, ub, layout, xp)
    if not plan.ctx:
        split_planes(coded, out, scratch(1, n, layout.uint, xp))
        return [[] for _ in range(w)]
    ctx = top_byte(u if plan.enc == "mat" else ub, layout)
    split_planes(xp.take(coded, order_by(ctx), out=scratch(1, n, layout.uint, xp)), out, coded)
    groups = group_bounds(to_numpy(ctx), min_group)
    if plan.enc == "mat":
        out[0][...] = ctx  # the value's own context stays in natural order: the decoder reads it first
    return [groups if p or plan.enc != "mat" else [] for p in range(w)]


def decode_segment(planes: Any, ub: Any | None, layout: Layout, plan: Plan, out: Any) -> None:
    """Inverse of :func:`encode_segment`: write the raw patterns into ``out`` (uint, flat).

    ``planes``: the w planes of the segment, a (w, n) array or a list of views.
    """
    xp = namespace(planes[0])
    w, n = len(planes), planes[0].size
    direct = plan.enc == "mat" and not plan.ctx
    coded = out if direct else scratch(0, n, layout.uint, xp)
    join_planes(planes, coded)
    if plan.ctx:
        ctx = planes[0] if plan.enc == "mat" else top_byte(ub, layout)
        order = order_by(ctx)
        if plan.enc == "mat":
            coded.view(np.uint8).reshape(n, w)[:, w - 1] = ctx[order]  # the sorted context, on top
        natural = out if plan.enc == "mat" else scratch(1, n, layout.uint, xp)
        natural[order] = coded
        coded = natural
    tmp = scratch(2, n, layout.uint, xp)
    if plan.enc == "mat":
        unrotate(out, layout, tmp)
    else:
        decode_delta(plan.enc, coded, ub, layout, out, tmp)
