"""The compiled CPU path (gpupas.backend.fast) against the NumPy reference, bit for bit.

Every kernel is checked on adversarial values (NaN payloads, -0.0, Inf, subnormals, random bits)
for every dtype, encoding ('mat', 'sub', 'xor', 'pred'), context split on and off, rotation on and
off, row masks, segment starts inside a row, empty and odd sizes; then whole archives: the same
bytes from both paths, each path reading the other's.
"""

from __future__ import annotations

import json
import logging
import zlib

import numpy as np
import pytest
from conftest import adversarial
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpupas
from gpupas.backend import fast
from gpupas.pas import context, predict, rows, transform
from gpupas.pas.planes import LAYOUTS, coding_layout
from gpupas.pas.settings import SETTINGS
from gpupas.pas.transform import Plan

pytestmark = pytest.mark.skipif(not fast.enabled(), reason="the compiled kernels are unavailable")
NAMES = sorted(LAYOUTS)
HYP = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _values(layout, n, seed, base=None, kind="random"):
    """Patterns of ``n`` values: adversarial bits, or near ``base`` (small deltas, unchanged runs)."""
    rng = np.random.default_rng(seed)
    u = adversarial(layout.dtype, max(n, 1), seed).view(layout.uint)[:n].copy()
    if base is not None and kind != "random":
        step = rng.integers(-40, 41, n).astype(np.int64)
        u = (base.astype(np.int64) + step).astype(layout.uint) if layout.width < 8 else base + step.astype(layout.uint)
        keep = rng.random(n) < 0.3
        u[keep] = base[keep]
        if n > 10:
            u[rng.integers(0, n, 3)] = adversarial(layout.dtype, 3, seed + 1).view(layout.uint)
    return u


def _case(data):
    """A tensor's values, base, base's base, shape, row mask and factors, and a segment of it."""
    name = data.draw(st.sampled_from(NAMES), label="dtype")
    rotate = data.draw(st.booleans(), label="rotate")
    layout = coding_layout(name, rotate)
    nrows = data.draw(st.integers(0, 40), label="rows")
    per = data.draw(st.sampled_from([1, 3, 7, 64, 129]), label="per")
    n = nrows * per
    seed = data.draw(st.integers(0, 2**31), label="seed")
    ub2 = _values(layout, n, seed + 7)
    ub = _values(layout, n, seed + 3, ub2, data.draw(st.sampled_from(["random", "near"]), label="base kind"))
    u = _values(layout, n, seed, ub, data.draw(st.sampled_from(["random", "near"]), label="kind"))
    masked = nrows > 0 and data.draw(st.booleans(), label="masked")
    sel = None
    if masked:
        pick = np.random.default_rng(seed).random(nrows) < 0.6
        sel = np.flatnonzero(pick)
    coded_rows = nrows if sel is None else sel.size
    values = coded_rows * per
    a = data.draw(st.integers(0, values), label="a")
    b = data.draw(st.integers(a, values), label="b")
    encs = ["mat", "sub", "xor"] + (["pred"] if layout.width <= 4 else [])
    enc = data.draw(st.sampled_from(encs), label="enc")
    ctx = data.draw(st.booleans(), label="ctx")
    alpha = None
    if enc == "pred":
        alpha = np.random.default_rng(seed).integers(-32768, 32768, coded_rows).astype(np.int16)
        alpha[: min(3, coded_rows)] = np.array([0, -32768, 32767], np.int16)[: min(3, coded_rows)]
    return layout, u, ub, ub2, (nrows, per), sel, alpha, a, b, Plan(enc, ctx)


def _gathered(x, sel, per):
    return x if sel is None else x.reshape(-1, per)[sel].reshape(-1)


@HYP
@given(st.data())
def test_segments_match_the_reference(data) -> None:
    layout, u, ub, ub2, (_nrows, per), sel, alpha, a, b, plan = _case(data)
    min_group = data.draw(st.sampled_from([1, 16, 8192]), label="min_group")
    n, w = b - a, layout.width
    gu, gub, gub2 = (_gathered(x, sel, per) for x in (u, ub, ub2))
    base = None if plan.enc == "mat" else gub[a:b]
    if plan.enc == "pred":
        base = predict.predict(gub[a:b], gub2[a:b], alpha, layout, per, a)
    want = np.zeros((w, n), np.uint8)
    want_groups = transform.encode_segment(gu[a:b], base, layout, plan, want, min_group)
    flat = np.full(w * n + 5, 0xAB, np.uint8)
    offs = np.arange(w, dtype=np.int64) * n + 5
    got_groups = fast.encode_segment(u, None if plan.enc == "mat" else ub, ub2 if plan.enc == "pred" else None,
                                     alpha, sel, per, a, b, layout, plan, flat, offs, min_group)
    assert flat[5:].tobytes() == want.tobytes()
    assert got_groups == want_groups
    # decoding: the fast path writes the values into their places in the whole tensor
    out = np.zeros_like(u)
    fast.decode_segment(flat, offs, None if plan.enc == "mat" else ub, ub2 if plan.enc == "pred" else None, alpha,
                        sel, per, a, b, layout, plan, out)
    assert _gathered(out, sel, per)[a:b].tobytes() == gu[a:b].tobytes()
    ref = np.empty(n, layout.uint)
    transform.decode_segment(list(want), base, layout, plan, ref)
    assert ref.tobytes() == gu[a:b].tobytes()


@HYP
@given(st.data())
def test_plans_and_factors_match_the_reference(data) -> None:
    name = data.draw(st.sampled_from(NAMES), label="dtype")
    layout = coding_layout(name, data.draw(st.booleans(), label="rotate"))
    per = data.draw(st.sampled_from([1, 5, 64, 300]), label="per")
    nrows = data.draw(st.sampled_from([1, 7, 40, 200, 700]), label="rows")
    seed = data.draw(st.integers(0, 2**31), label="seed")
    n = nrows * per
    ub2 = _values(layout, n, seed + 7)
    ub = _values(layout, n, seed + 3, ub2, "near")
    u = _values(layout, n, seed, ub, data.draw(st.sampled_from(["random", "near"]), label="kind"))
    sel = np.flatnonzero(np.random.default_rng(seed).random(nrows) < 0.5) if data.draw(st.booleans()) else None
    gu, gub, gub2 = (_gathered(x, sel, per) for x in (u, ub, ub2))
    setting = SETTINGS[data.draw(st.sampled_from(sorted(SETTINGS)), label="setting")]
    for base in (None, ub):
        want = transform.choose_plan(gu, None if base is None else gub, layout, setting)
        got = fast.choose_plan(u, base, layout, setting, rows=sel, per=per)
        assert got == want
    coded = (nrows if sel is None else sel.size, per)
    want_alpha = predict.fit(gu, gub, gub2, layout, coded)
    got_alpha = fast.fit(u, ub, ub2, layout, coded, sel)
    assert (want_alpha is None) == (got_alpha is None)
    if want_alpha is not None:
        assert got_alpha.tobytes() == want_alpha.tobytes()
    want_rows = rows.changed_rows(u, ub, (nrows, per))
    got_rows = fast.changed_rows(u, ub, (nrows, per))
    assert (want_rows is None) == (got_rows is None)
    if want_rows is not None:
        assert got_rows.tobytes() == want_rows.tobytes()


def test_a_whole_plan_of_some_rows_looks_for_zeros_in_those_rows_only() -> None:
    """Whole values of the coded rows only: the compiled plan looked for zeros (may a whole float split?) over
    every row, the reference over the coded ones, so their estimates differed (2.72 against 0.0 bits)."""
    layout = coding_layout("bfloat16", False)
    u = _values(layout, 7, 50, _values(layout, 7, 53, _values(layout, 7, 57), "near"), "random")
    sel = np.flatnonzero(np.random.default_rng(50).random(7) < 0.5)
    setting = SETTINGS["default"]
    want = transform.choose_plan(_gathered(u, sel, 1), None, layout, setting)
    assert fast.choose_plan(u, None, layout, setting, rows=sel, per=1) == want


def test_factors_of_adam_like_rows() -> None:
    """Rows that keep moving by an exact ratio (a factor that pays) and rows at the cost threshold."""
    rng = np.random.default_rng(1)
    layout = LAYOUTS["float32"]
    base2 = rng.normal(0, 0.02, (300, 128)).astype(np.float32)
    step = rng.normal(0, 1e-4, base2.shape).astype(np.float32)
    base = base2 + step
    new = base + step * np.float32(0.234)
    new[::3] += rng.normal(0, 1e-6, new[::3].shape).astype(np.float32)
    u, ub, ub2 = (x.reshape(-1).view(np.uint32) for x in (new, base, base2))
    want = predict.fit(u, ub, ub2, layout, base.shape)
    got = fast.fit(u, ub, ub2, layout, base.shape)
    assert want is not None and got is not None and got.tobytes() == want.tobytes()


@given(st.lists(st.integers(0, 255), max_size=5000), st.sampled_from([1, 64, 8192]))
@settings(max_examples=60, deadline=None)
def test_group_bounds_from_the_sample(keys, min_group) -> None:
    ctx = np.array(keys, np.uint8)
    n = ctx.size
    step = max(1, n // context.SAMPLE)
    counts = np.bincount(ctx[::step], minlength=256)
    assert fast.bounds_of_sample(counts, -(-n // step), n, min_group) == context.group_bounds(ctx, min_group)


_STEPS = st.sampled_from([1, 2, 7, 70, 2**62])


@given(st.binary(max_size=3000), st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 3000), _STEPS), max_size=12))
@settings(max_examples=100, deadline=None)
def test_range_entropies_are_numpys(data, ranges) -> None:
    buf = np.frombuffer(data, np.uint8)
    rg = np.array([(min(a, buf.size), min(b, buf.size), s) for a, b, s in ranges], np.int64).reshape(-1, 3)
    want = context.count_entropies(context.sample_counts([buf[a:b:s] for a, b, s in rg]))
    assert fast.range_entropies(buf, rg).tolist() == want.tolist()  # the same doubles, not close ones


@given(st.data())
@settings(max_examples=400, deadline=None)
def test_huffman_deflate_is_zlib_ngs(data) -> None:
    """The compiled Huffman-only Deflate writes zlib-ng's very stream: block ends every 32767 literals and at
    each bound, stored/fixed/dynamic as zlib-ng picks them (window slides included: sizes near 64 KiB)."""
    from gpupas.codecs import deflate

    n = data.draw(st.sampled_from([0, 1, 3, 300, 32766, 32767, 32768, 65273, 65274, 65300, 98301, 131072, 262144]))
    seed = data.draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    kind = data.draw(st.sampled_from(["random", "skewed", "runs", "mixed"]))
    if kind == "random":
        d = rng.integers(0, 256, n, dtype=np.uint8)
    elif kind == "skewed":
        d = rng.geometric(data.draw(st.sampled_from([0.01, 0.3, 0.9])), n).clip(0, 255).astype(np.uint8)
    elif kind == "runs":
        d = np.repeat(rng.integers(0, 4, n // 50 + 1, dtype=np.uint8), 50)[:n]
    else:
        d = rng.geometric(0.1, n).clip(0, 255).astype(np.uint8)
        d[: n // 3] = rng.integers(0, 256, n // 3, dtype=np.uint8)
    bounds = sorted(set(data.draw(st.lists(st.integers(0, max(n, 1)), max_size=40))))
    got = deflate.code(memoryview(d), bounds)
    assert deflate.compiled() is not None
    saved = list(deflate._FAST)
    try:
        deflate._FAST[:] = [None]
        want = deflate.code(memoryview(d), bounds)
    finally:
        deflate._FAST[:] = saved
    assert got == want
    # with a limit: the member where it fits (the planned length is the written one), None one byte short
    assert deflate.code(memoryview(d), bounds, limit=len(want)) == want
    assert deflate.code(memoryview(d), bounds, limit=len(want) - 1) is None


def test_huffman_deflate_after_a_stored_block() -> None:
    """A regression: long codes right after a block header that left many bits pending."""
    from gpupas.codecs import deflate

    rng = np.random.default_rng(1)
    for n, cut in ((32767, 10287), (40000, 5000), (70000, 33333)):
        d = rng.geometric(0.1, n).clip(0, 255).astype(np.uint8)
        d[: n // 3] = rng.integers(0, 256, n // 3, dtype=np.uint8)
        got = deflate.code(memoryview(d), [cut])
        assert zlib.decompress(got, 31) == d.tobytes()
        saved = list(deflate._FAST)
        try:
            deflate._FAST[:] = [None]
            assert deflate.code(memoryview(d), [cut]) == got
        finally:
            deflate._FAST[:] = saved


def _chain(seed: int = 0):
    """Snapshots of every dtype with a base and a base's base: masks, 'pred', context split."""
    rng = np.random.default_rng(seed)
    first = {f"t.{name}": adversarial(LAYOUTS[name].dtype, 3001, seed + i) for i, name in enumerate(NAMES)}
    first["emb"] = rng.normal(0, 0.02, (600, 96)).astype(np.float32)
    first["dense"] = rng.normal(0, 0.02, (200, 300)).astype(np.float32)
    first["scalar"] = np.float32(1.5)
    first["empty"] = np.zeros((0, 4), np.float32)
    first["ints"] = rng.normal(0, 60, (200, 100)).round().astype(np.int64)  # whole: split by its top byte
    snaps = [first]
    velocity = {k: rng.normal(0, 1e-4, np.shape(first[k])).astype(np.float32) for k in ("emb", "dense")}
    for _ in range(3):
        nxt = dict(snaps[-1])
        for k, v in velocity.items():
            moved = v.copy()
            if k == "emb":
                moved[rng.random(v.shape[0]) < 0.5] = 0  # untouched rows: a row mask
            nxt[k] = snaps[-1][k] + moved
            velocity[k] = v * np.float32(0.9)
        snaps.append(nxt)
    return snaps


def _commit_all(path, snaps, setting):
    with gpupas.create_archive(path, durable=False) as arc:
        ms = [arc.commit(s, snapshot=f"s{i}", base=None if i == 0 else f"s{i - 1}", setting=setting)
              for i, s in enumerate(snaps)]
    return ms


def _shape_of(m):
    return ([(s.length, s.chunks, s.stored) for s in m.streams],
            [(e.name, e.enc, e.ctx, e.rows, e.parts, e.extras, e.stored, e.plane_bytes, e.crc32) for e in m.tensors])


@pytest.mark.parametrize("setting", ["fast", "default", "strong"])
def test_archives_are_the_same_and_read_each_other(tmp_path, setting) -> None:
    snaps = _chain()
    with fast.use(False):
        ref = _commit_all(tmp_path / "ref", snaps, setting)
    with fast.use(True):
        got = _commit_all(tmp_path / "fast", snaps, setting)
    assert [_shape_of(m) for m in got] == [_shape_of(m) for m in ref]
    assert any(e.enc == "pred" for m in got for e in m.tensors) or setting == "fast"
    assert any(e.rows is not None for m in got for e in m.tensors)
    assert (got[0].tensor("ints").ctx and got[0].tensor("ints").enc == "mat") == (setting != "fast")
    for on in (False, True):
        for where in ("ref", "fast"):
            with fast.use(on), gpupas.open_archive(tmp_path / where) as arc:
                for i, s in enumerate(snaps):
                    out = arc.restore(f"s{i}")
                    for k, v in s.items():
                        assert out[k].tobytes() == np.asarray(v).tobytes(), (on, where, i, k)


def test_without_the_compiled_kernels_the_reference_runs_and_says_so(tmp_path, monkeypatch, caplog) -> None:
    import sys

    from gpupas.codecs import deflate

    monkeypatch.setattr(deflate, "_FAST", [])
    monkeypatch.setitem(fast._state, "kernels", None)
    monkeypatch.setitem(sys.modules, "gpupas._fastc", None)  # importing it now raises ImportError
    monkeypatch.delattr(gpupas, "_fastc", raising=False)
    with caplog.at_level(logging.WARNING, logger="gpupas"):
        assert not fast.enabled()
        assert not fast.enabled()
        snaps = _chain()[:3]
        ms = _commit_all(tmp_path / "a", snaps, "default")
        assert deflate.compiled() is None  # zlib-ng coded the Deflate chunks
    said = [r for r in caplog.records if "compiled CPU kernels are unavailable" in r.getMessage()]
    assert len(said) == 1
    monkeypatch.undo()
    assert fast.enabled()
    with gpupas.open_archive(tmp_path / "a") as arc:
        assert arc.restore(ms[2].id)["emb"].tobytes() == snaps[2]["emb"].tobytes()


@pytest.mark.parametrize("window", [1, 20000, 1 << 30])
@pytest.mark.parametrize("layout", [{}, {"groups": (1,), "chunk_size": 4096}, {"chunk_size": 4096, "segment": 1000},
                                    {"groups": (1, 2), "chunk_size": 1024, "segment": 777}])
def test_restores_through_small_windows(tmp_path, monkeypatch, window, layout) -> None:
    """Restores one window of decoded planes at a time: segments, row masks and factors across windows and
    plane groups (streams), masks read apart where they lie outside their tensor's first window."""
    monkeypatch.setattr(fast, "WINDOW", window)
    snaps = _chain(1)
    with gpupas.create_archive(tmp_path / "a", durable=False) as arc:
        for i, s in enumerate(snaps):
            arc.commit(s, snapshot=f"s{i}", base=None if i == 0 else f"s{i - 1}", layout=gpupas.Layout(**layout))
    with gpupas.open_archive(tmp_path / "a") as arc:
        assert any(e.rows is not None for e in arc.manifest("s3").tensors)
        for i, s in enumerate(snaps):
            out = arc.restore(f"s{i}")
            for k, v in s.items():
                assert out[k].tobytes() == np.asarray(v).tobytes(), (i, k)
            part = arc.restore(f"s{i}", ["emb"])  # one tensor: only its chunks, its window
            assert part["emb"].tobytes() == s["emb"].tobytes()


def test_a_chunk_larger_than_the_window_is_decoded_once(tmp_path, monkeypatch) -> None:
    """A chunk holding many segments, larger than the window: one window for all of them, not one each
    (which decoded the chunk again for every segment: a 1 GiB chunk did not restore in 10 minutes)."""
    monkeypatch.setattr(fast, "WINDOW", 1 << 16)
    x = np.random.default_rng(0).standard_normal(1 << 17).astype(np.float32)  # 512 KiB: 4 chunks, 128 segments
    with gpupas.create_archive(tmp_path / "a", durable=False) as arc:
        m = arc.commit({"x": x}, layout=gpupas.Layout(chunk_size=1 << 17, segment=1024))
    asked: list[int] = []
    real = fast.decode_windows

    def counting(backend, m, entries, read, *a, **k):
        return real(backend, m, entries, lambda s, cs, *r: (asked.extend(cs), read(s, cs, *r))[1], *a, **k)

    monkeypatch.setattr(fast, "decode_windows", counting)
    with gpupas.open_archive(tmp_path / "a") as arc:
        assert arc.restore(m.id)["x"].tobytes() == x.tobytes()
    assert sorted(asked) == list(range(m.streams[0].nchunks))  # each chunk once


def test_segment_by_segment_checksums_catch_wrong_bits(tmp_path) -> None:
    """The compiled restore's per-segment CRC-32s, joined, are each tensor's CRC-32: a restore passes, and a
    tensor whose recorded checksum does not match its decoded bits is refused by name (a multi-segment one,
    a masked one, a one-value one)."""
    from dataclasses import replace

    from gpupas.backend import get_backend
    from gpupas.engine.decode import decode_snapshot
    from gpupas.errors import IntegrityError

    rng = np.random.default_rng(7)
    big = (rng.standard_normal((40, 100)) * 0.02).astype(np.float32)
    moved = big.copy()
    moved[3] += np.float32(1e-3)  # one changed row of forty: a masked delta
    tensors = {"big": big, "one": np.float32([1.5]), "half": rng.standard_normal(3001).astype(np.float16)}
    with gpupas.create_archive(tmp_path / "a", durable=False) as arc:
        layout = gpupas.Layout(segment=1000)
        m0 = arc.commit(tensors, snapshot="s0", layout=layout)
        m1 = arc.commit({**tensors, "big": moved}, snapshot="s1", base="s0", layout=layout)
        assert m1.tensor("big").rows is not None
        backend = get_backend("numpy")
        for m, base in ((m0, {}), (m1, arc.restore("s0"))):
            bits = {k: np.ascontiguousarray(v).view(np.uint8).view(m.tensor(k).layout.uint).reshape(-1)
                    for k, v in base.items()}
            got = decode_snapshot(arc.store, m, m.tensors, bits, {}, backend, arc.executor)
            assert sorted(got) == sorted(tensors)
            for e in m.tensors:
                bad = replace(m, tensors=tuple(replace(x, crc32=x.crc32 ^ 1) if x.name == e.name else x
                                                for x in m.tensors))
                with pytest.raises(IntegrityError, match=rf"tensor {e.name!r} does not match its checksum"):
                    decode_snapshot(arc.store, bad, bad.tensors, bits, {}, backend, arc.executor)


_OVERFLOWS = {  # sizes whose products or sums overflow 64 bits: each once crashed the kernels
    "huffman_floor stride": "K.huffman_floor(b'x' * 10, E, 2**62)",
    "copy_rows rows*per": "K.copy_rows(1, bytearray(16), bytes(16), E, 2**62, 4)",
    "row_changes rows*per": "K.row_changes(1, bytes(8), bytes(8), 4, 2**62, bytearray(4))",
    "fit_rows rows*per": "K.fit_rows(1, bytes(16), bytes(16), bytes(16), E, 2**62, 4, np.array([0]), bytearray(2), "
                         "bytearray(8), bytearray(8))",
    "decode plane offset": "o = bytearray(1); K.decode(1, 0, 0, 0, bytes(8), np.array([2**63 - 1]), o, o, E16, E, "
                           "1, 0, 1, o, bytearray(0), bytearray(0), bytearray(0))",
    "decode start": "o = bytearray(1); K.decode(1, 0, 0, 0, bytes(8), np.array([0]), o, o, E16, E, 1, 2**63 - 1, 1, o, "
                    "bytearray(0), bytearray(0), bytearray(0))",
    "decode row map": "o = bytearray(6); K.decode(1, 0, 0, 0, bytes(8), np.array([0]), o, o, E16, np.array([2**62]), "
                      "6, 0, 6, o, bytearray(0), bytearray(0), bytearray(0))",
    "gather row map": "K.gather(1, bytes(6), np.arange(6), np.array([2**62]), 6, bytearray(6))",
    "range_entropies past the end": "K.range_entropies(bytes(8), np.array([0, 9, 1]), np.zeros(10), 1.0, np.zeros(1))",
    "range_entropies h": "K.range_entropies(bytes(8), np.array([0, 8, 1, 0, 8, 1]), np.zeros(10), 1.0, np.zeros(1))",
    "range_entropies nlogn": "K.range_entropies(bytes(8), np.array([0, 8, 1]), np.zeros(8), 1.0, np.zeros(1))",
}


def test_sizes_that_overflow_are_refused_not_crashed_on() -> None:
    """Every kernel checks its sizes without overflowing (run in a child: a crash must not take pytest down)."""
    import subprocess
    import sys

    code = ("import json, numpy as np\nfrom gpupas import _fastc as K\nE = np.zeros(0, np.int64)\n"
            "E16 = np.zeros(0, np.int16)\nout = {}\n")
    for name, call in _OVERFLOWS.items():
        code += (f"try:\n    {call}\n    out[{name!r}] = 'ran'\n"
                 f"except ValueError as exc:\n    out[{name!r}] = str(exc)\n")
    code += "print(json.dumps(out))\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(got) == set(_OVERFLOWS) and "ran" not in got.values(), got


def test_kernels_given_nothing_to_do_return_at_once() -> None:
    """Rows of no values (per 0) copy nothing however many there are: copy_rows once looped over each of 2^62
    of them (a hang, found by fuzzing the kernels' sizes); an empty segment is not offset by its start, which
    it never checks (UBSan: pointer overflow). Run in a child: a hang must not hold pytest."""
    import subprocess
    import sys

    code = ("import numpy as np\nfrom gpupas import _fastc as K\nE = np.zeros(0, np.int64)\n"
            "E16 = np.zeros(0, np.int16)\nZ = bytearray(0)\n"
            "K.copy_rows(4, Z, bytes(0), E, 2**62, 0)\nK.copy_rows(4, Z, bytes(0), E, 0, 2**62)\n"
            "for k in range(3):\n"
            "    K.decode(2, k, 1, k % 2, bytes(8), np.array([0, 0]), Z, Z, E16, E, 4, 2**62, 0, Z, Z, Z, Z)\n"
            "    K.encode(2, k, 1, k % 2, Z, Z, Z, E16, E, 4, 2**62, 0, bytearray(8), np.array([0, 0]), 1, "
            "bytearray(2048), Z, Z, Z)\n"
            "print('returned')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "returned", res.stderr[-2000:]


@pytest.mark.parametrize("cc", ["gcc", "clang"])
def test_the_kernels_compile_without_warnings(cc, tmp_path) -> None:
    """-Wall -Wextra clean under GCC and Clang (a Mac builds with Clang): the unused 'self' of each function
    and the module definition's fields left out were warned about."""
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    if shutil.which(cc) is None:
        pytest.skip(f"no {cc}")
    src = Path(fast.__file__).resolve().parents[1] / "_fastc.c"
    args = [cc, "-c", "-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", f"-I{sysconfig.get_paths()['include']}", str(src),
            "-o", str(tmp_path / "k.o")]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _misaligned(a):
    """``a``'s values in a view one byte off the alignment of its dtype (np.frombuffer at an odd offset)."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    v = np.frombuffer(buf.data, a.dtype, count=a.size, offset=1).reshape(a.shape)
    buf[1:] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    return v


def test_misaligned_tensors_are_coded_the_same_off_the_compiled_path(tmp_path) -> None:
    """A tensor viewed at an odd offset (a safetensors-like buffer read with np.frombuffer): the kernels read
    whole values through typed pointers, UB in C where they are misaligned (UBSan flags it), so gpupas hands
    them an aligned copy (the same bits, the same archive)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    snaps = [{"w": w}, {"w": w + (rng.standard_normal(w.shape) * 1e-4).astype(np.float32)}]
    odd = [{k: _misaligned(v) for k, v in s.items()} for s in snaps]
    assert not odd[0]["w"].flags.aligned and np.array_equal(odd[1]["w"], snaps[1]["w"])
    want = _commit_all(tmp_path / "aligned", snaps, "default")
    got = _commit_all(tmp_path / "odd", odd, "default")
    assert [_shape_of(m) for m in got] == [_shape_of(m) for m in want]
    with gpupas.open_archive(tmp_path / "odd") as arc:
        assert arc.restore("s1")["w"].tobytes() == snaps[1]["w"].tobytes()
    assert not fast.applies(odd[0]["w"])


def test_bases_a_dask_worker_receives_misaligned_are_aligned_before_coding(tmp_path) -> None:
    """A base another task decoded reaches a worker as a view into its message, at any offset: fed to the
    archive's cache aligned (a compaction on a process cluster revised with such a base)."""
    from gpupas.jobs.tasks import Link, _feed

    w = np.arange(64, dtype=np.float32).view(np.uint32)
    with gpupas.create_archive(tmp_path / "a") as arc:
        _feed(arc, (Link("s0", {"w": _misaligned(w)}),))
        got = arc.bases._items["s0"]["w"]
        assert got.flags.aligned and got.tobytes() == w.tobytes()
