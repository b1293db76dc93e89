"""Bit layouts, deltas and context split: bit-exact round trips over every dtype."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gpupas.pas.context import entropies, entropy, group_bounds
from gpupas.pas.delta import decode_delta, encode_delta
from gpupas.pas.planes import LAYOUTS, join_planes, rotate, split_planes, to_bits
from gpupas.pas.settings import SETTINGS
from gpupas.pas.transform import Plan, choose_plan, decode_segment, encode_segment
from tests.conftest import adversarial

PLANS = [Plan(e, c, 0.0) for e in ("mat", "sub", "xor") for c in (False, True)]


def _roundtrip(values: np.ndarray, base: np.ndarray, plan: Plan, min_group: int = 64) -> None:
    layout = LAYOUTS[values.dtype.name]
    u, ub = to_bits(values, layout), to_bits(base, layout)
    before = u.copy(), ub.copy()
    ub_arg = None if plan.enc == "mat" else ub
    planes = np.empty((layout.width, u.size), np.uint8)
    groups = encode_segment(u, ub_arg, layout, plan, planes, min_group)
    assert len(groups) == layout.width and all(0 < b < u.size for g in groups for b in g)
    back = np.empty_like(u)
    decode_segment(planes.copy(), ub_arg, layout, plan, back)
    assert back.tobytes() == values.tobytes()
    assert (u == before[0]).all() and (ub == before[1]).all()  # inputs untouched


def test_every_dtype_every_plan(dtype_name: str) -> None:
    for n in (0, 1, 7, 4099):
        values, base = adversarial(dtype_name, n, 1), adversarial(dtype_name, n, 2)
        for plan in PLANS:
            _roundtrip(values, base, plan)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(LAYOUTS)),
    data=st.binary(min_size=0, max_size=600),
    base=st.binary(min_size=600, max_size=600),
    plan=st.sampled_from(PLANS),
)
def test_hypothesis_bit_patterns(name: str, data: bytes, base: bytes, plan: Plan) -> None:
    layout = LAYOUTS[name]
    n = len(data) // layout.width
    values = np.frombuffer(data[: n * layout.width], dtype=layout.dtype)
    base_values = np.frombuffer(base[: n * layout.width], dtype=layout.dtype)
    _roundtrip(values, base_values, plan, min_group=8)


def test_float32_layout_puts_exponent_in_top_plane() -> None:
    values = np.array([1.0, -1.0, 2.0, -0.0], np.float32)
    r = rotate(to_bits(values, LAYOUTS["float32"]), LAYOUTS["float32"])
    planes = np.empty((4, 4), np.uint8)
    split_planes(r, planes)
    assert planes[0].tolist() == [127, 127, 128, 0]  # exponent bytes, sign moved out
    assert planes[3].tolist() == [0, 1, 0, 1]  # the sign now sits in the lowest bit
    assert (join_planes(planes, np.empty(4, np.uint32)) == r).all()


def test_sub_delta_of_close_values_is_small() -> None:
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(1000) * 0.02).astype(np.float32)
    b = a + np.float32(1e-7) * rng.standard_normal(1000).astype(np.float32)
    layout = LAYOUTS["float32"]
    ua, ub = to_bits(a, layout), to_bits(b.astype(np.float32), layout)
    z = encode_delta("sub", ua, ub, layout)
    assert np.median(z) < 1 << 12  # zigzag keeps both signs of change small
    out = np.empty_like(ua)
    decode_delta("sub", z, ub, layout, out)
    assert (out == ua).all()


def test_choice_prefers_delta_for_fine_tune_and_mat_for_unrelated() -> None:
    rng = np.random.default_rng(0)
    layout = LAYOUTS["float32"]
    a = (rng.standard_normal(50000) * 0.02).astype(np.float32)
    near = (a + rng.standard_normal(50000).astype(np.float32) * 1e-5).astype(np.float32)
    unrelated = (rng.standard_normal(50000) * 0.02).astype(np.float32)
    cfg = SETTINGS["default"]
    assert choose_plan(to_bits(near, layout), to_bits(a, layout), layout, cfg).enc in ("sub", "xor")
    assert choose_plan(to_bits(unrelated, layout), to_bits(a, layout), layout, SETTINGS["strong"]).enc in ("mat", "xor")
    # with the split, XOR against an unrelated base carries the same information as the value
    mat = choose_plan(to_bits(unrelated, layout), None, layout, cfg)
    other = choose_plan(to_bits(unrelated, layout), to_bits(a, layout), layout, cfg)
    assert other.estimate > 0.98 * mat.estimate


def test_group_bounds_merge_small_groups() -> None:
    ctx = np.repeat(np.arange(5, dtype=np.uint8), [10, 10, 100, 5, 200])
    bounds = group_bounds(ctx, 50)
    assert bounds == sorted(bounds) and all(0 < b < ctx.size for b in bounds)
    assert all(b - a >= 50 for a, b in zip([0, *bounds], bounds))


def test_entropies_of_many_samples_are_each_ones_entropy() -> None:
    rng = np.random.default_rng(7)
    samples = [rng.integers(0, k, size=n).astype(np.uint8) for k, n in
               [(1, 5), (256, 3000), (3, 1), (17, 0), (200, 2048), (2, 2), (256, 0)]]
    got = entropies(samples)
    assert got.shape == (len(samples),)
    np.testing.assert_allclose(got, [entropy(x) for x in samples], rtol=0, atol=1e-12)
    assert entropies([np.zeros(0, np.uint8)]).tolist() == [0.0]


def test_a_plan_samples_a_bounded_share_of_a_tensor() -> None:
    """Small tensors are read whole, mid-sized ones a quarter (at least PLAN_SAMPLE_MIN values), large ones
    SAMPLE values: thousands of small tensors are not planned value by value."""
    from gpupas.pas.context import PLAN_SAMPLE_MIN, SAMPLE, plan_samples

    assert [plan_samples(n) for n in (0, 1000, PLAN_SAMPLE_MIN, 16384, 40000, 10**8)] == [
        0, 1000, PLAN_SAMPLE_MIN, PLAN_SAMPLE_MIN, 10000, SAMPLE]


def test_a_sample_is_planned_for_the_tensor_it_stands_for() -> None:
    """A plan made from a sample given with ``of`` (as the 'pred' test does) weighs a context split as
    for the whole tensor: a 4,096-value sample of 40,000 values may split, the same values alone may not."""
    from gpupas.backend import fast
    from gpupas.pas.planes import coding_layout
    from gpupas.pas.transform import MIN_CONTEXT_VALUES

    rng = np.random.default_rng(0)
    n = 40000
    base = (rng.normal(0, 1, n) * 10 ** rng.uniform(-3, 1, n)).astype(np.float32)
    new = base + np.float32(1e-3) * rng.normal(0, 1, n).astype(np.float32)  # ULPs of change: by the exponent
    layout = coding_layout("float32", True)
    idx = np.linspace(0, n - 1, 4096).astype(np.int64)
    u, ub = to_bits(new, layout)[idx], to_bits(base, layout)[idx]
    assert idx.size < MIN_CONTEXT_VALUES <= n
    for plan in (choose_plan, fast.choose_plan) if fast.enabled() else (choose_plan,):
        assert plan(u, ub, layout, SETTINGS["default"], encs=("sub",), of=n).ctx
        assert not plan(u, ub, layout, SETTINGS["default"], encs=("sub",)).ctx


def test_default_splits_whole_signed_integers_by_their_top_byte(tmp_path: Path) -> None:
    """A small signed integer's upper bytes repeat its sign: coded plane by plane they cost a bit a byte
    each (a Huffman code's least), split by the top byte they cost nothing. The default setting splits
    whole integers (not floats, whose sizes stay as they were) where the estimate says it pays, and
    both paths plan alike (tests/test_fast.py: ``ints``)."""
    import gpupas

    rng = np.random.default_rng(3)
    n = 200_000
    for dtype in (np.int64, np.int32, np.int16):
        v = rng.normal(0, 60, n).round().astype(dtype)
        layout = LAYOUTS[np.dtype(dtype).name]
        plan = choose_plan(to_bits(v, layout), None, layout, SETTINGS["default"])
        assert plan.enc == "mat" and plan.ctx, (dtype, plan)
        with gpupas.create_archive(tmp_path / np.dtype(dtype).name) as a:
            m = a.commit({"v": v})
            assert m.tensors[0].ctx and m.stored_bytes < 1.25 * n, (dtype, m.stored_bytes)  # ~8 bits of entropy
            assert a.restore(m.id)["v"].tobytes() == v.tobytes()
    f = rng.standard_normal(n).astype(np.float32)
    assert not choose_plan(to_bits(f, LAYOUTS["float32"]), None, LAYOUTS["float32"], SETTINGS["default"]).ctx


def test_default_splits_whole_sparse_floats_by_their_top_byte(tmp_path: Path) -> None:
    """A magnitude-pruned float tensor is mostly exact zeros: coded plane by plane, each plane pays for where
    the zeros are again; split by the top byte (a zero's is 0), the zeros' lower planes are one run. The
    default setting splits a whole float tensor where that saves at least MIN_WHOLE_FLOAT_GAIN (dense weights
    save a percent or so, not worth their restore's sort: they stay as they were), on both paths alike."""
    import gpupas
    from gpupas.backend import fast

    rng = np.random.default_rng(4)
    n = 200_000
    for dtype, frac in ((np.float32, 0.5), (np.float32, 0.9), (np.float16, 0.7)):
        v = rng.normal(0, 0.02, n).astype(dtype)
        v[np.abs(v) < np.quantile(np.abs(v), frac)] = 0
        layout = LAYOUTS[np.dtype(dtype).name]
        for plan in (choose_plan, fast.choose_plan) if fast.enabled() else (choose_plan,):
            got = plan(to_bits(v, layout), None, layout, SETTINGS["default"])
            assert got.enc == "mat" and got.ctx, (dtype, frac, got)
        with gpupas.create_archive(tmp_path / f"{np.dtype(dtype).name}-{frac}") as a:
            m = a.commit({"v": v})
            plain = a.commit({"v": v}, setting="fast")
            assert m.tensors[0].ctx and m.stored_bytes < 0.85 * plain.stored_bytes, (dtype, frac, m.stored_bytes,
                                                                                    plain.stored_bytes)
            assert a.restore(m.id)["v"].tobytes() == v.tobytes()
    for dtype in (np.float32, np.float16):
        f = rng.normal(0, 0.02, n).astype(dtype)
        layout = LAYOUTS[np.dtype(dtype).name]
        for plan in (choose_plan, fast.choose_plan) if fast.enabled() else (choose_plan,):
            assert not plan(to_bits(f, layout), None, layout, SETTINGS["default"]).ctx, dtype
            # dense (no zeros in a quick look): not even estimated, as before 'mat-float' (a materialized commit
            # pays nothing for it); a few zeros more than MIN_ZERO_FRACTION: estimated, and the split refused
            assert plan(to_bits(f, layout), None, layout, SETTINGS["default"]).estimate == 0.0, dtype
            some = f.copy()
            some[:: 8] = 0
            got = plan(to_bits(some, layout), None, layout, SETTINGS["default"])
            assert got.estimate > 0 and not got.ctx, dtype
