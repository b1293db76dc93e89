"""Partial reads through the archive: bounds hold for every encoding the writer may choose (forced here),
only the chunks holding the planes asked for are fetched, and the bytes are counted, bases included."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import adversarial
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpupas
from gpupas import Layout
from gpupas.engine import stage
from gpupas.errors import IntegrityError, InvalidInputError
from gpupas.pas import bounds as B
from gpupas.pas.planes import LAYOUTS
from gpupas.pas.transform import Plan

FLOATS = ["float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"]


@contextlib.contextmanager
def forced(enc: str, ctx: bool, alpha: bool = False) -> Iterator[None]:
    """Commits inside code every delta tensor with ``enc`` (and the split ``ctx``); with ``alpha``, 'pred'
    wherever the writer may use it (rotated floats of up to 32 bits on a delta base)."""
    real = stage.choose_plan

    def choose(u: Any, ub: Any, layout: Any, setting: Any, encs: Any = None, **_: Any) -> Plan:
        if encs == ("sub",):
            return Plan("sub", ctx, 0.0)
        if ub is None:
            return Plan("mat", ctx and layout.width > 1, 1e9)
        return Plan(enc, ctx, 1e9)

    def fit(u: Any, ub: Any, ub2: Any, layout: Any, shape: Any, *_: Any) -> np.ndarray:
        rows = shape[0] if len(shape) >= 2 and shape[0] > 0 else 1
        return np.random.default_rng(rows).integers(-20000, 20000, rows).astype(np.int16)

    with pytest.MonkeyPatch.context() as mp:
        for where in (stage, getattr(stage, "fast", None)):  # the NumPy reference and the compiled path
            if where is not None:
                mp.setattr(where, "choose_plan", choose)
                if alpha:
                    mp.setattr(where, "fit", fit)
        if alpha:
            mp.setattr(stage, "MIN_ESTIMATE_VALUES", 0)
        yield
    assert stage.choose_plan is real


def _values_ok(r: Any, name: str, truth: np.ndarray) -> None:
    lo, hi, unb, approx = r.lo[name], r.hi[name], r.unbounded[name], r.approx[name]
    dt = truth.dtype
    if B.is_float(dt.name):
        with np.errstate(invalid="ignore"):
            v, a, lf, hf = (x.astype(np.float64) for x in (truth, approx, lo, hi))
        assert np.all(unb | ((lf <= v) & (v <= hf))), name
        assert not np.any(np.isnan(v) & ~unb), name
        assert np.all(unb | ((lf <= a) & (a <= hf))), name  # a number inside where the value is bounded
    else:
        assert np.all((lo <= truth) & (truth <= hi)), name


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.tobytes() == b.tobytes()


def _check_all_planes(arc: gpupas.Archive, sid: str, some: bool = False) -> None:
    truth = arc.restore(sid)
    width = max(e.width for e in arc.manifest(sid).tensors)
    for k in sorted({1, width // 2, width - 1, width} - {0}) if some else range(1, width + 1):
        r = arc.read_planes(sid, k)
        for name, v in truth.items():
            _values_ok(r, name, v)
            if k == width:
                assert r.exact[name] and _bits_equal(r.approx[name], v), name
                with np.errstate(invalid="ignore"):
                    assert not r.unbounded[name].any() or np.isnan(v.astype(np.float64)).any()
        assert 0 < r.bytes_read <= r.bytes_total


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bounds_hold_through_the_archive(tmp_path: Path, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from([*FLOATS, "int16", "int32", "uint8"]), label="dtype")
    rot = data.draw(st.booleans(), label="rot")
    enc = data.draw(st.sampled_from(["sub", "xor", "pred"]), label="enc")
    ctx = data.draw(st.booleans(), label="ctx")
    masked = data.draw(st.booleans(), label="row mask")
    seed = data.draw(st.integers(0, 1000), label="seed")
    dt = np.dtype(LAYOUTS[name].dtype)
    rng = np.random.default_rng(seed)
    base = adversarial(dt, 16 * 24, seed).reshape(16, 24)
    mask = (1 << LAYOUTS[name].bits) - 1

    def step(x: np.ndarray) -> np.ndarray:
        u = x.view(LAYOUTS[name].uint).astype(np.uint64)
        moved = (u + rng.integers(-500, 500, u.shape).astype(np.uint64)) & np.uint64(mask)
        out = moved.astype(LAYOUTS[name].uint).view(dt).reshape(x.shape)
        if masked:
            out[::3] = x[::3]  # a third of the rows unchanged: a row mask
        return out

    child = step(base)
    grandchild = step(child)
    layout = Layout(rotate=rot, groups=(1, 2), chunk_size=256)
    arc = gpupas.create_archive(tmp_path / f"a{seed}-{name}-{rot}-{enc}-{ctx}-{masked}")
    with arc, forced(enc if enc != "pred" else "sub", ctx, alpha=enc == "pred"):
        s0 = arc.commit({"w": base}, layout=layout)
        s1 = arc.commit({"w": child}, base=s0.id, layout=layout)
        s2 = arc.commit({"w": grandchild}, base=s1.id, layout=layout)
        e = arc.manifest(s2.id).tensor("w")
        assert e.reads_base and e.ctx == ctx and (e.rows is not None) == masked
        predicts = rot and name in ("float32", "float16", "bfloat16")  # where the writer may extrapolate
        assert e.enc == (enc if enc != "pred" or predicts else "sub")
        for sid in (s1.id, s2.id):
            _check_all_planes(arc, sid, some=True)


@pytest.mark.parametrize("scheme", ["bf16", "fp16:truncate", "fixed:12", "quant:4", "kmeans:3"])
@pytest.mark.parametrize("rot", [True, False])
def test_lossy_snapshots_and_deltas_on_them(tmp_path: Path, scheme: str, rot: bool) -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((40, 30)) * 0.1).astype(np.float32)
    with gpupas.create_archive(tmp_path / "a") as arc:
        lossy = arc.commit({"w": w}, lossy=scheme, layout=Layout(rotate=rot))
        _check_all_planes(arc, lossy.id)
        delta = arc.commit({"w": w + np.float32(1e-3)}, base=lossy.id, layout=Layout(rotate=rot))
        assert arc.manifest(delta.id).tensor("w").reads_base
        _check_all_planes(arc, delta.id)


def test_only_the_needed_chunks_are_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = {"a": (rng.standard_normal((128, 64)) * 0.05).astype(np.float32), "b": rng.standard_normal(999)}
    with gpupas.create_archive(tmp_path / "a") as arc:
        m = arc.commit(w, layout=Layout(rotate=False, groups=(1, 2, 3), chunk_size=4096))
        index = {s: (16 * x.shard_chunks + 4) * len(set(x.chunks)) for s, x in enumerate(m.streams)}  # a shard a codec
        one = arc.read_planes(m.id, 1)
        assert one.bytes_total == sum(s.stored for s in m.streams) + sum(index.values())
        assert one.bytes_read == m.streams[0].stored + index[0]  # stream 0 holds plane 0 of each tensor
        assert one.fraction_read < 0.3 and one.planes_read == {m.id: {"a": 1, "b": 1}}
        two = arc.read_planes(m.id, 2)
        assert two.bytes_read == one.bytes_read + m.streams[1].stored + index[1]
        from gpupas.backend import get_backend
        from gpupas.engine.partial import PartialReader

        with PartialReader(arc.store, arc.manifest, get_backend("numpy"), arc.executor) as reader:
            first = reader.read(m.id, 1, ["a"]).bytes_read
            again = reader.read(m.id, 2, ["a"]).bytes_read  # plane 0's chunks are not fetched twice
            assert first < again < first + m.streams[1].stored + index[1] + 1
        full = arc.read_planes(m.id, 8)
        assert full.bytes_read == full.bytes_total and full.all_exact
        assert _bits_equal(full.approx["b"], w["b"])
        # without plane groups every chunk mixes planes: a partial read fetches them all
        plain = arc.commit(w, layout=Layout(rotate=False))
        assert arc.read_planes(plain.id, 1).fraction_read == 1.0


def test_delta_reads_count_the_base_and_context_splits_read_more_of_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    w0 = (rng.standard_normal((64, 300)) * 0.05).astype(np.float32)
    w1 = w0 + (rng.standard_normal(w0.shape) * 1e-4).astype(np.float32)
    w2 = w1 + (rng.standard_normal(w0.shape) * 1e-4).astype(np.float32)
    layout = Layout(rotate=False, groups=(1, 2, 3))
    with gpupas.create_archive(tmp_path / "a") as arc, forced("sub", ctx=False):
        s0 = arc.commit({"w": w0}, layout=layout)
        s1 = arc.commit({"w": w1}, base=s0.id, layout=layout)
        r = arc.read_planes(s1.id, 1)
        assert r.planes_read == {s0.id: {"w": 1}, s1.id: {"w": 1}}
        whole_bytes = [sum(x.stored + (16 * x.shard_chunks + 4) * len(set(x.chunks)) for x in arc.manifest(s).streams)
                       for s in (s0.id, s1.id)]
        assert r.bytes_total == sum(whole_bytes)  # a full restore reads the base too
        assert r.bytes_read > arc.read_planes(s0.id, 1).bytes_read
        whole = arc.read_planes(s1.id, 2, base_planes=4)
        assert whole.planes_read[s0.id] == {"w": 4}
        tight, loose = (x.hi["w"].astype(float) - x.lo["w"] for x in (whole, arc.read_planes(s1.id, 2)))
        assert np.all(tight <= loose) and np.median(tight) < np.median(loose)
    with gpupas.create_archive(tmp_path / "b") as arc:
        with forced("sub", ctx=False):
            s0 = arc.commit({"w": w0}, layout=layout)
            s1 = arc.commit({"w": w1}, base=s0.id, layout=layout)
        with forced("sub", ctx=True):
            s2 = arc.commit({"w": w2}, base=s1.id, layout=layout)
        r = arc.read_planes(s2.id, 1)  # sorted by s1's context byte, which s1's top plane does not pin
        assert r.planes_read[s2.id] == {"w": 1} and r.planes_read[s1.id]["w"] > 1
        _values_ok(r, "w", w2)


def test_special_values_and_rotation(tmp_path: Path) -> None:
    v = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-40, 3.0, -2.5, 1e30], np.float32)
    with gpupas.create_archive(tmp_path / "a") as arc:
        flat = arc.commit({"v": v}, layout=Layout(rotate=False))
        r = arc.read_planes(flat.id, 1)
        # Inf shares its top bytes with NaN payloads: only the full pattern tells them apart
        assert r.unbounded["v"].tolist() == [False, False, True, True, True, False, False, False, False, False]
        assert r.lo["v"][8] < -2.5 < r.hi["v"][8] < 0 and r.lo["v"][0] == 0 and r.hi["v"][1] == 0
        r = arc.read_planes(flat.id, 4)
        assert r.unbounded["v"].tolist() == [False, False, False, False, True, False, False, False, False, False]
        assert np.isnan(r.approx["v"][4])
        rotated = arc.commit({"v": v}, layout=Layout(rotate=True))
        r = arc.read_planes(rotated.id, 3)  # the sign is in the last plane: symmetric bounds
        finite = np.isfinite(v) & (v != 0)
        assert np.array_equal(r.lo["v"][finite], -r.hi["v"][finite])
        _values_ok(r, "v", v)


def test_empty_scalar_integer_and_bool_tensors(tmp_path: Path) -> None:
    w = {"e": np.zeros((0, 3), np.float32), "s": np.array(2.5, np.float32), "i": np.arange(10, dtype=np.int64) - 5,
         "b": np.array([True, False])}
    layout = Layout(rotate=False, groups=(1, 2, 3))
    with gpupas.create_archive(tmp_path / "a") as arc:
        m = arc.commit(w, layout=layout)
        m2 = arc.commit({n: v + 1 if v.dtype != bool else ~v for n, v in w.items()}, base=m.id, layout=layout)
        for sid in (m.id, m2.id):
            _check_all_planes(arc, sid)
            r = arc.read_planes(sid, 1)
            assert r.exact["e"] and r.exact["b"] and r.approx["e"].shape == (0, 3) and r.lo["s"].shape == ()


def test_bad_requests_and_damage(tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    with gpupas.create_archive(tmp_path / "a") as arc:
        m = arc.commit({"w": w}, layout=Layout(rotate=False, groups=(1,)))
        for bad in (0, -1, 1.5, True):
            with pytest.raises(InvalidInputError, match="planes"):
                arc.read_planes(m.id, bad)  # type: ignore[arg-type]
        for call in (lambda: arc.read_planes(m.id, 1, ["nope"]), lambda: arc.restore(m.id, names=["nope"])):
            with pytest.raises(gpupas.TensorNotFoundError, match=r"'nope'.*list a snapshot's tensors with"):
                call()
        shard = next((tmp_path / "a" / "snapshots" / m.streams[0].folder).rglob("c/0"))
        data = bytearray(shard.read_bytes())
        data[3] ^= 0xFF
        shard.write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match=r"chunk 0 of stream 0 \(in shard file snapshots/.*\) is damaged .*"
                                                 r"it holds tensor\(s\) w\. Restore the archive from a copy"):
            arc.read_planes(m.id, 1)  # named as a restore names it


@pytest.mark.parametrize(("enc", "ctx", "alpha"), [("sub", False, False), ("sub", True, False), ("xor", True, False),
                                                   ("pred", True, True)])
def test_a_tensor_is_bounded_block_by_block_as_in_one_piece(tmp_path: Path, enc: str, ctx: bool, alpha: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounds are worked out BLOCK values at a time (the interval arithmetic's temporaries are ~1 KB a value):
    the same lo, hi and approximation as in one piece, for every delta encoding and a row mask."""
    from gpupas.engine import partial

    rng = np.random.default_rng(5)
    w0 = (rng.standard_normal((70, 700)) * 0.05).astype(np.float32)  # 49,000 values: 3 blocks and a part
    w1 = w0 + (rng.standard_normal(w0.shape) * 1e-4).astype(np.float32)
    w2 = w1.copy()
    w2[::4] += (rng.standard_normal(w2[::4].shape) * 1e-4).astype(np.float32)  # the other rows unchanged: a row mask
    with gpupas.create_archive(tmp_path / "a") as arc:
        with forced("sub" if alpha else enc, ctx):
            s0 = arc.commit({"w": w0})
            s1 = arc.commit({"w": w1 if alpha else np.where(np.arange(70)[:, None] % 4 == 0, w2, w0)},
                            base=s0.id)  # ('pred' needs the base's base)
        with forced(enc, ctx, alpha):
            top = arc.commit({"w": w2}, base=s1.id) if alpha else s1
        assert arc.manifest(top.id).tensors[0].enc == enc and arc.manifest(top.id).tensors[0].masked
        for planes in (1, 2):
            blocked = arc.read_planes(top.id, planes)
            _values_ok(blocked, "w", w2 if alpha else arc.restore(top.id)["w"])
            with monkeypatch.context() as mp:
                mp.setattr(partial, "BLOCK", 1 << 40)
                whole = arc.read_planes(top.id, planes)
            for part in ("lo", "hi", "approx", "unbounded"):
                assert getattr(blocked, part)["w"].tobytes() == getattr(whole, part)["w"].tobytes(), (planes, part)


def test_reading_planes_of_a_delta_holds_tens_of_bytes_a_value(tmp_path: Path) -> None:
    """Bounds of a delta hold each value's intervals and its base's (~40 bytes a value here, against ~126 when
    one tensor was bounded in one piece and every base's kept to the end); docs/partial-reads.md says so."""
    import tracemalloc

    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((400, 1000)) * 0.05).astype(np.float32)
    with gpupas.create_archive(tmp_path / "a") as arc:
        s0 = arc.commit({"w": w0})
        s1 = arc.commit({"w": w0 + (rng.standard_normal(w0.shape) * 1e-4).astype(np.float32)}, base=s0.id)
        arc.refresh()
        tracemalloc.start()
        try:
            arc.read_planes(s1.id, 1)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 60 * w0.nbytes, peak / w0.nbytes


def test_a_delta_on_a_nan_base_approximates_inside_its_bounds(tmp_path: Path) -> None:
    """A SUB delta's approximation is its base's: where the base held NaN and the value is a bounded number
    now, the approximation is a number in the bounds, not the base's NaN."""
    base = np.array([np.nan, 1.0, -2.0, 3.0, np.nan], np.float32)
    child = np.array([0.5, 1.0, -2.0, 3.0, -1e-3], np.float32)
    with gpupas.create_archive(tmp_path / "a") as arc:
        m0 = arc.commit({"w": base})
        m1 = arc.commit({"w": child}, base=m0.id)
        assert m1.tensor("w").enc in ("sub", "xor")
        for k in range(1, 5):
            r = arc.read_planes(m1.id, planes=k, base_planes=4)
            _values_ok(r, "w", child)
            assert not np.any(np.isnan(r.approx["w"]) & ~r.unbounded["w"]), k


def test_a_partial_read_that_cannot_fit_in_memory_is_refused_before_reading(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A partial read holds tens of bytes a value: one larger than the machine's memory (an LLM's 2.4 GB embedding
    needs ~70 GB) is refused before any chunk is read, naming the tensor and what to do instead, not left to a
    NumPy MemoryError after its chunks were read, or to the OOM killer; the tensors that fit still read."""
    from gpupas.engine import decode, partial

    rng = np.random.default_rng(3)
    big = (rng.standard_normal((100, 1000)) * 0.02).astype(np.float32)
    small = np.arange(100, dtype=np.float32)
    with gpupas.create_archive(tmp_path / "a") as arc:
        m = arc.commit({"emb": big, "bias": small})
        monkeypatch.setattr(decode, "memory_bytes", lambda: 40 * big.size)  # below even the least the read holds
        fetched: list[str] = []
        real = partial.PartialReader._fetch
        monkeypatch.setattr(partial.PartialReader, "_fetch",
                            lambda self, m, e, k: (fetched.append(e.name), real(self, m, e, k))[1])
        with pytest.raises(InvalidInputError, match=r"'emb'.*memory.*names=") as exc:
            arc.read_planes(m.id, 1)
        assert str(exc.value).index("'emb'") < str(exc.value).index("'bias'") and fetched == []  # the largest first
        r = arc.read_planes(m.id, 1, names=["bias"])
        _values_ok(r, "bias", small)
