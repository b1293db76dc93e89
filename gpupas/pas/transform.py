"""One tensor's bit patterns <-> its stored byte planes (encoding choice, delta, context split)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpupas.pas.context import entropy, group_bounds, order_by, sample_index, top_byte
from gpupas.pas.delta import decode_delta, encode_delta
from gpupas.pas.planes import Layout, join_planes, split_planes
from gpupas.pas.settings import Setting
from gpupas.xp import namespace, to_numpy

MIN_CONTEXT_VALUES = 16384  # below this the split's statistics cost more than they save
MIN_CONTEXT_GAIN = 0.005  # keep the split only if the estimate shrinks by this fraction


@dataclass(frozen=True)
class Plan:
    """How one tensor is stored: ``enc`` is 'mat', 'sub' or 'xor'; ``ctx`` whether it is split."""

    enc: str
    ctx: bool
    estimate: float  # estimated stored bits per value


def choose_plan(r: Any, rb: Any | None, layout: Layout, setting: Setting) -> Plan:
    """Pick the encoding (and context split) with the smallest sampled entropy."""
    idx = sample_index(r.size)
    rs = to_numpy(r[idx])
    rbs = None if rb is None else to_numpy(rb[idx])
    w = layout.width
    can_split = setting.context and r.size >= MIN_CONTEXT_VALUES
    best: Plan | None = None
    for enc in ("mat",) if rbs is None else ("mat", "sub", "xor"):
        coded = rs if enc == "mat" else encode_delta(enc, rs, rbs, layout)
        planes = np.empty((w, coded.size), np.uint8)
        split_planes(coded, planes)
        plain = sum(min(8.0, entropy(p)) for p in planes)
        plan = Plan(enc, False, plain)
        if can_split and (enc != "mat" or w > 1):
            ctx = planes[0] if enc == "mat" else top_byte(rbs, layout.bits)
            rows = planes[1:] if enc == "mat" else planes
            split = sum(min(8.0, entropy(p, ctx)) for p in rows)
            split += entropy(planes[0]) if enc == "mat" else 0.0
            if split < plain * (1 - MIN_CONTEXT_GAIN):
                plan = Plan(enc, True, split)
        if best is None or plan.estimate < best.estimate:
            best = plan
    assert best is not None
    return best


def encode_tensor(r: Any, rb: Any | None, layout: Layout, plan: Plan, out: Any, min_group: int) -> list[int]:
    """Write the planes of rotated patterns ``r`` into ``out`` (w, n); return group boundaries.

    Boundaries are offsets inside the flattened ``out`` where a coder should restart its tables.
    """
    n = r.size
    if n == 0:
        return []
    coded = r if plan.enc == "mat" else encode_delta(plan.enc, r, rb, layout)
    if not plan.ctx:
        split_planes(coded, out)
        return [p * n for p in range(1, layout.width)]
    ctx = top_byte(r if plan.enc == "mat" else rb, layout.bits)
    order = order_by(ctx)
    split_planes(coded[order], out)
    groups = group_bounds(to_numpy(ctx), min_group)
    first = 1 if plan.enc == "mat" else 0
    if plan.enc == "mat":
        out[0] = ctx
    bounds = []
    for p in range(layout.width):
        if p:
            bounds.append(p * n)
        if p >= first:
            bounds.extend(p * n + g for g in groups)
    return bounds


def decode_tensor(planes: Any, rb: Any | None, layout: Layout, plan: Plan) -> Any:
    """Inverse of :func:`encode_tensor`: the rotated bit patterns."""
    xp = namespace(planes)
    coded = join_planes(planes, layout.uint)
    if plan.ctx:
        ctx = planes[0] if plan.enc == "mat" else top_byte(rb, layout.bits)
        order = order_by(ctx)
        if plan.enc == "mat":
            coded.view(np.uint8).reshape(-1, layout.width)[:, -1] = ctx[order]
        natural = xp.empty_like(coded)
        natural[order] = coded
        coded = natural
    return coded if plan.enc == "mat" else decode_delta(plan.enc, coded, rb, layout)
