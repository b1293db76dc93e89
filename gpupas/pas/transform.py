"""One tensor's raw bit patterns <-> its stored byte planes (encoding choice, delta, context split).

Large tensors are cut into segments of at most :data:`SEGMENT` values; each segment's planes are
stored one after the other, so segments encode and decode independently (and in parallel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpupas.pas.context import entropy, group_bounds, order_by, sample_index
from gpupas.pas.delta import decode_delta, encode_delta
from gpupas.pas.planes import Layout, rotate, split_planes, top_byte, unrotate
from gpupas.pas.settings import Setting
from gpupas.xp import namespace, to_numpy

SEGMENT = 1 << 20  # values per segment
MIN_CONTEXT_VALUES = 16384  # below this the split's statistics cost more than they save
MIN_CONTEXT_GAIN = 0.005  # keep the split only if the estimate shrinks by this fraction


@dataclass(frozen=True)
class Plan:
    """How one tensor is stored: ``enc`` is 'mat', 'sub' or 'xor'; ``ctx`` whether it is split."""

    enc: str
    ctx: bool
    estimate: float = 0.0  # estimated stored bits per value


def segments(n: int) -> list[tuple[int, int]]:
    """(start, stop) value ranges of the segments of an ``n``-value tensor."""
    return [(s, min(n, s + SEGMENT)) for s in range(0, n, SEGMENT)]


def _coded(enc: str, u: Any, ub: Any, layout: Layout) -> Any:
    return rotate(u, layout) if enc == "mat" else encode_delta(enc, u, ub, layout)


def choose_plan(u: Any, ub: Any | None, layout: Layout, setting: Setting) -> Plan:
    """Pick the encoding (and context split) with the smallest sampled entropy."""
    idx = sample_index(u.size)
    us = to_numpy(u[idx])
    ubs = None if ub is None else to_numpy(ub[idx])
    w = layout.width
    best: Plan | None = None
    for enc in ("mat",) if ubs is None else ("mat", "sub", "xor"):
        planes = np.empty((w, us.size), np.uint8)
        split_planes(_coded(enc, us, ubs, layout), planes)
        plain = sum(min(8.0, entropy(p)) for p in planes)
        plan = Plan(enc, False, plain)
        if enc in setting.context and u.size >= MIN_CONTEXT_VALUES and (enc != "mat" or w > 1):
            ctx = planes[0] if enc == "mat" else top_byte(ubs, layout)
            split = sum(min(8.0, entropy(p, ctx)) for p in (planes[1:] if enc == "mat" else planes))
            split += entropy(planes[0]) if enc == "mat" else 0.0
            if split < plain * (1 - MIN_CONTEXT_GAIN):
                plan = Plan(enc, True, split)
        if best is None or plan.estimate < best.estimate:
            best = plan
    assert best is not None
    return best


def encode_segment(u: Any, ub: Any | None, layout: Layout, plan: Plan, out: Any, min_group: int) -> list[int]:
    """Write the planes of raw patterns ``u`` into ``out`` (w, n); return group boundaries.

    Boundaries are offsets inside the flattened ``out`` where a coder should restart its tables.
    """
    n = u.size
    if n == 0:
        return []
    coded = _coded(plan.enc, u, ub, layout)
    if not plan.ctx:
        split_planes(coded, out)
        return [p * n for p in range(1, layout.width)]
    ctx = top_byte(u if plan.enc == "mat" else ub, layout)
    split_planes(coded[order_by(ctx)], out)
    groups = group_bounds(to_numpy(ctx), min_group)
    if plan.enc == "mat":
        out[0] = ctx  # the value's own context stays in natural order: the decoder reads it first
    bounds = []
    for p in range(layout.width):
        if p:
            bounds.append(p * n)
        if p or plan.enc != "mat":
            bounds.extend(p * n + g for g in groups)
    return bounds


def decode_segment(planes: Any, ub: Any | None, layout: Layout, plan: Plan, out: Any) -> None:
    """Inverse of :func:`encode_segment`: write the raw patterns into ``out`` (uint, flat)."""
    xp = namespace(planes)
    w, n = planes.shape
    direct = plan.enc == "mat" and not plan.ctx
    coded = out if direct else xp.empty(n, layout.uint)
    rows = coded.view(np.uint8).reshape(n, w)
    for p in range(w):  # one strided copy per plane: 3-4x faster than a transposing copy
        rows[:, w - 1 - p] = planes[p]
    if plan.ctx:
        ctx = planes[0] if plan.enc == "mat" else top_byte(ub, layout)
        order = order_by(ctx)
        if plan.enc == "mat":
            rows[:, w - 1] = ctx[order]
        natural = out if plan.enc == "mat" else xp.empty_like(coded)
        natural[order] = coded
        coded = natural
    if plan.enc == "mat":
        unrotate(out, layout)
    else:
        decode_delta(plan.enc, coded, ub, layout, out)
