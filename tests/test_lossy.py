"""Lossy schemes (issue 12) and planes coded with the sign on top (``Layout(rotate=False)``).

A lossy tensor restores to exactly what its scheme kept (the same bits on every restore, after a
revision, as a delta base), its error is measured and recorded, and every listing says it is lossy.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import gpupas
import gpupas.inspect
from gpupas.engine.encode import Layout
from gpupas.errors import InvalidInputError
from gpupas.pas import schemes
from tests.conftest import adversarial

SCHEMES = ["bf16", "bf16:truncate", "fp16", "fp16:truncate", "fixed:8", "fixed:16", "fixed:32", "quant:1",
           "quant:4", "quant:8", "kmeans:2", "kmeans:4", "kmeans:8"]


@pytest.fixture
def arc(tmp_path):
    with gpupas.create_archive(tmp_path / "arc") as a:
        yield a


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": (rng.standard_t(4, size=(257, 33)) * 0.02).astype(np.float32),
            "h": rng.normal(size=(5, 7)).astype(np.float64),
            "b": rng.normal(size=9).astype(np.float16), "steps": np.arange(11, dtype=np.int64),
            "empty": np.zeros((0, 4), np.float32)}


@pytest.mark.parametrize("spec", SCHEMES)
def test_lossy_restores_what_the_scheme_kept(arc, spec):
    t = _weights()
    m = arc.commit(t, lossy=spec)
    scheme = schemes.parse(spec)
    lossy = {e.name for e in m.tensors if e.scheme is not None}
    assert lossy == {n for n, a in t.items() if schemes.applies(scheme, a.dtype.name)}
    assert "steps" not in lossy and m.lossy
    r = arc.restore(m.id)
    for name, a in t.items():
        assert r[name].dtype == a.dtype and r[name].shape == a.shape
        if name not in lossy:
            assert r[name].tobytes() == a.tobytes()
            continue
        e = m.tensor(name)
        rep, _ = schemes.apply(a, e.scheme)  # its own parameters: the same representation again
        expect = schemes.restore(rep, e.scheme, a.dtype.name)
        assert r[name].tobytes() == expect.tobytes()
        err = np.abs(r[name].astype(np.float64) - a.astype(np.float64))
        recorded = e.scheme["error"]
        assert recorded["max_abs"] == pytest.approx(float(err.max()) if err.size else 0.0, rel=1e-9, abs=1e-300)
        if scheme["name"] == "fixed" and a.size:  # half a step at most
            assert err.max() <= 2.0 ** e.scheme["exponent"] / 2
        if scheme["name"] == "cast" and scheme["round"] == "truncate":
            assert np.all(np.abs(r[name].astype(np.float64)) <= np.abs(a.astype(np.float64)))
    arc.bases.clear()
    again = arc.restore(m.id)
    assert all(again[k].tobytes() == r[k].tobytes() for k in r)


def test_cast_rounds_like_the_dtype(arc):
    x = adversarial(np.dtype(np.float32), 4096, seed=2)
    x = x[np.isfinite(x)]
    m = arc.commit({"x": x}, lossy="bf16")
    assert arc.restore(m.id)["x"].tobytes() == x.astype(ml_dtypes.bfloat16).astype(np.float32).tobytes()
    m = arc.commit({"x": x}, lossy="fp16")
    with np.errstate(over="ignore"):
        assert arc.restore(m.id)["x"].tobytes() == x.astype(np.float16).astype(np.float32).tobytes()


def test_bf16_of_float64_rounds_once_to_nearest(arc):
    """float64 to bfloat16 rounds to the nearest bfloat16 (ties to even), not through float32 first: that rounds
    twice (1 + 2**-8 + 2**-30 became 1.0, not 1 + 2**-7)."""
    rng = np.random.default_rng(4)
    x = np.concatenate([[1 + 2**-8 + 2**-30, -(3 + 3 * 2**-8 + 2**-40), 1 + 2**-8, 1 + 3 * 2**-8],
                        rng.standard_normal(20000) * 10.0 ** rng.integers(-30, 30, 20000)])
    b = x.view(np.uint64)  # the nearest by the bits: keep 7 of 52 fraction bits, round half to even
    rest, keep = b & np.uint64((1 << 45) - 1), b >> np.uint64(45)
    up = (rest > np.uint64(1 << 44)) | ((rest == np.uint64(1 << 44)) & (keep & np.uint64(1) == 1))
    nearest = ((keep + up.astype(np.uint64)) << np.uint64(45)).view(np.float64)
    got = arc.restore(arc.commit({"x": x}, lossy="bf16").id)["x"]
    assert got[0] == 1 + 2**-7 and got.tobytes() == nearest.tobytes()
    truncated = arc.restore(arc.commit({"x": x}, lossy="bf16:truncate").id)["x"]
    assert truncated.tobytes() == (b & ~np.uint64((1 << 45) - 1)).view(np.float64).tobytes()


def test_nan_and_inf_survive_a_cast_and_are_refused_by_fixed_point(arc):
    x = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.0], np.float32)
    r = arc.restore(arc.commit({"x": x}, lossy="bf16").id)["x"]
    assert np.isnan(r[0]) and r[1] == np.inf and r[2] == -np.inf and np.signbit(r[3])
    for spec in ("fixed:8", "quant:4"):
        with pytest.raises(InvalidInputError, match=r"tensor 'x': the \w+ scheme cannot hold NaN or Inf"):
            arc.commit({"w": np.ones(4, np.float32), "x": x}, lossy=spec)  # named: a checkpoint has many
    assert len(arc.snapshots()) == 1


def test_a_scheme_that_makes_no_tensor_smaller_stores_losslessly_and_says_so(arc, tmp_path):
    """fixed:32 of float32, or bf16 of int32, makes nothing smaller: stored losslessly (a version's snapshots
    share one option, and some may have nothing to shrink), and the CLI says so instead of "LOSSY"."""
    from typer.testing import CliRunner

    from gpupas.cli.app import app
    from gpupas.integrations.safetensors import save_file

    for arrays, spec in (({"w": np.ones(8, np.float32)}, "fixed:32"), ({"w": np.ones(8, np.int32)}, "bf16")):
        assert not arc.commit(arrays, lossy=spec).lossy
    save_file({"w": np.ones(8, np.float32)}, tmp_path / "c.safetensors")
    res = CliRunner().invoke(app, ["-A", str(tmp_path / "r"), "init"])
    res = CliRunner().invoke(app, ["-A", str(tmp_path / "r"), "commit", str(tmp_path / "c.safetensors"), "-n", "m",
                                   "--lossy", "fixed:32"])
    assert res.exit_code == 0 and "LOSSY" not in res.output and "stored losslessly" in res.output, res.output


@pytest.mark.parametrize("spec", ["fixed:2", "fixed:8", "fixed:32", "quant:1", "quant:4", "kmeans:3"])
def test_values_at_the_float64_limits_stay_finite(arc, spec):
    """Near float64's largest and smallest values no step, span or level overflows or underflows: the
    commit works, every finite value restores finite, and the exponent stays in FORMAT.md 9.9's range."""
    huge = np.array([1.7e308, -1.7e308, 1.79e308, 1.0, 0.0])
    tiny = np.array([5e-324, -5e-324, 1e-310, 0.0])
    lone = np.array([5e-324])
    single = np.array([3.4e38, -3.4e38, 1e-45, 0.0], np.float32)
    with np.errstate(over="raise", invalid="raise"):  # no overflow along the way either
        for x in (huge, tiny, lone, single):
            m = arc.commit({"x": x}, lossy=spec)
            r = arc.restore(m.id)["x"]
            sc = m.tensor("x").scheme
            if sc is None:  # stored losslessly: the scheme would not make it smaller
                assert not schemes.applies(schemes.parse(spec), x.dtype.name) and r.tobytes() == x.tobytes()
                continue
            assert np.isfinite(r).all() and sc["error"]["overflow"] == 0, (x, sc)
            assert sc["error"]["max_abs"] <= np.abs(x).max()
            if sc["name"] == "fixed":
                assert -1100 <= sc["exponent"] <= 1100
                assert r[np.argmax(np.abs(x))] != 0 or np.abs(x).max() == 0  # the peak is not lost

def test_quantization_error_shrinks_with_bits_and_kmeans_beats_uniform_on_heavy_tails(arc):
    w = _weights()["w"]
    rms = {}
    for spec in ("quant:2", "quant:4", "quant:8", "kmeans:4"):
        rms[spec] = arc.commit({"w": w}, lossy=spec).tensor("w").scheme["error"]["rms"]
    assert rms["quant:2"] > rms["quant:4"] > rms["quant:8"]
    assert rms["kmeans:4"] < rms["quant:4"]
    sizes = {s: arc.commit({"w": w}, lossy=s).stored_bytes for s in ("quant:2", "quant:8", "bf16")}
    lossless = arc.commit({"w": w}).stored_bytes
    assert sizes["quant:2"] < sizes["quant:8"] < lossless and sizes["bf16"] < lossless


def test_revision_and_children_keep_the_restored_bits(arc):
    t = _weights()
    m = arc.commit(t, lossy="kmeans:4")
    before = arc.restore(m.id)
    before = {k: v.copy() for k, v in before.items()}
    child = arc.commit({k: v + 1 if v.dtype.kind == "f" else v for k, v in before.items()}, base=m.id)
    new = arc.revise(m.id, setting="strong", layout=Layout(groups=(1,), rotate=False))
    assert new.revision > m.revision and [e.scheme for e in new.tensors] == [e.scheme for e in m.tensors]
    arc.bases.clear()
    after = arc.restore(m.id)
    assert all(after[k].tobytes() == before[k].tobytes() for k in before)
    got = arc.restore(child.id)
    assert got["w"].tobytes() == (before["w"] + 1).tobytes()


def test_per_tensor_schemes_and_bad_specs(arc):
    t = _weights()
    m = arc.commit(t, lossy={"w": "fixed:12", "h": {"name": "cast", "to": "float16"}})
    assert {e.name: e.scheme and schemes.describe(e.scheme) for e in m.tensors} == {
        "w": "fixed:12", "h": "fp16", "b": None, "steps": None, "empty": None}
    with pytest.raises(InvalidInputError, match="bfloat16 tensors only: leave it out"):
        arc.commit(t, lossy={"steps": "bf16"})
    with pytest.raises(InvalidInputError, match=r"is float8_e4m3fn; .*bfloat16 tensors only"):  # a float, not of those
        arc.commit({"f8": np.zeros(4, ml_dtypes.float8_e4m3fn)}, lossy={"f8": "bf16"})
    with pytest.raises(InvalidInputError, match="no tensor 'nope'"):
        arc.commit(t, lossy={"nope": "bf16"})
    for bad in ("int4", "quant:9", "fixed:1", "kmeans", "bf16:sideways", "fixed:\u00b2", "quant:\u0663"):
        with pytest.raises(InvalidInputError):
            arc.commit(t, lossy=bad)
    for name, bits in (("fixed", 8), ("quant", 4)):  # an integer of another type (from a config) is taken
        m = arc.commit(t, lossy={"name": name, "bits": np.int64(bits)})
        given = [e.scheme for e in m.tensors if e.scheme]
        assert given and all(sc["bits"] == bits and type(sc["bits"]) is int for sc in given)
        for bad in (True, 8.0, "8"):  # not an integer: refused saying so
            with pytest.raises(InvalidInputError, match="bits must be an integer"):
                arc.commit(t, lossy={"name": name, "bits": bad})


def test_lossy_versions_say_so_everywhere(tmp_path):
    from gpupas.versions.inspect import lineage, show
    from gpupas.versions.repository import create_repository

    repo = create_repository(tmp_path / "arc")
    repo.commit("exact", _weights())
    repo.commit("small", _weights(), lossy="bf16")
    rows = {r["name"]: r for r in lineage(repo)}
    assert rows["exact"]["lossy"] is None and rows["small"]["lossy"] == "bf16"
    d = show(repo, "small")
    assert d["snapshots"][0]["lossy"] == "bf16"
    assert {r["name"]: r["lossy"] for r in d["tensors"]}["w"] == "bf16"
    assert show(repo, "exact")["snapshots"][0].get("lossy") is None
    repo.commit("coded", _weights(), lossy={"w": "kmeans:4", "h": "fixed:12"})
    sid = repo.version("coded").snapshot(None)["id"]  # gpupas inspect --by tensor: the scheme, not its family
    assert {r["name"]: r["lossy"] for r in gpupas.inspect.tensors(repo, sid)} == {
        "w": "kmeans:4", "h": "fixed:12", "b": None, "steps": None, "empty": None}


def test_sign_on_top_planes_restore_bit_exact(arc):
    t = {d: adversarial(np.dtype(d), 3001, seed=i) for i, d in enumerate(
        ["float32", "float64", "float16", ml_dtypes.bfloat16, "int32", "uint8"])}
    t = {np.dtype(k).name: v for k, v in t.items()}
    m = arc.commit(t, layout=Layout(rotate=False))
    assert {e.name: e.rot for e in m.tensors} == {n: not n.startswith(("float", "bfloat")) for n in t}
    t2 = {k: v.copy() for k, v in t.items()}
    for v in t2.values():
        v.view(np.uint8)[::7] ^= 1
    c = arc.commit(t2, base=m.id, layout=Layout(rotate=False))
    arc.bases.clear()
    for sid, want in ((m.id, t), (c.id, t2)):
        got = arc.restore(sid)
        assert all(got[k].tobytes() == want[k].tobytes() for k in want)


@pytest.mark.parametrize("spec", [{"name": "fixed", "bits": 8, "exponent": -2000}, {"name": "fixed", "bits": 8,
                                  "exponent": "3"}, {"name": "quant", "bits": 1, "levels": [0.0, 0.5, 1.0]},
                                  {"name": "quant", "bits": 4, "levels": []}, {"name": "quant", "bits": 4,
                                  "levels": [float("nan"), 1.0]}, {"name": "cast", "to": "float16", "exponent": 3},
                                  {"name": "quant", "bits": 2, "levels": [0.0, 1e300]},
                                  {"name": "quant", "bits": 2, "levels": [-1e39, 0.0, 1.0]}])
def test_parameters_given_with_a_scheme_are_checked_before_anything_is_written(arc, spec):
    """A scheme's parameters given by the caller (an exponent, a table of levels) were written as given: the
    commit made a snapshot whose manifest no reader accepts, or failed with a bare TypeError/ValueError (levels
    finite in float64 but past the tensor's dtype: rounded to it, ±Inf, which no manifest can hold)."""
    x = np.linspace(-1, 1, 100, dtype=np.float32)
    with pytest.raises(InvalidInputError, match=r"leave (it|them) out"):
        arc.commit({"x": x}, lossy={"x": spec})
    assert arc.snapshots() == []


@pytest.mark.parametrize("spec", [{"name": "fixed", "bits": 8, "offset": 3}, {"name": "cast", "to": "float16",
                                  "method": "kmeans"}, {"name": "quant", "bits": 4, "scale": 2.0}])
def test_members_no_scheme_has_are_refused_not_written(arc, spec):
    """A scheme's members went into the manifest as the caller gave them: a member the format does not define
    (FORMAT.md 9.9) was written into a snapshot that readers restore ignoring it, so a later format could never
    give such a member a meaning."""
    x = np.linspace(-1, 1, 100, dtype=np.float32)
    with pytest.raises(InvalidInputError, match=r"has no member"):
        arc.commit({"x": x}, lossy={"x": spec})
    with pytest.raises(InvalidInputError, match=r"has no member"):
        arc.commit({"x": x}, lossy=spec)
    assert arc.snapshots() == []


def test_an_error_given_with_a_scheme_is_measured_instead(arc):
    x = np.linspace(-1, 1, 100, dtype=np.float32)
    m = arc.commit({"x": x}, lossy={"x": {"name": "cast", "to": "float16", "error": "none at all"}})
    assert m.tensor("x").scheme["error"]["max_abs"] > 0
    good = arc.commit({"x": x}, lossy={"x": {"name": "fixed", "bits": 8, "exponent": -6}})
    assert good.tensor("x").scheme["exponent"] == -6 and arc.restore(good.id)["x"][-1] == 1.0


@pytest.mark.parametrize("dtype,exponent", [(np.float32, 122), (ml_dtypes.bfloat16, 122), (np.float16, 10)])
def test_a_given_exponent_never_restores_a_finite_value_as_inf(arc, dtype, exponent):
    """A fixed-point exponent given by the caller was used whole: its largest steps (``q * 2**exponent``) passed
    the tensor's dtype, so finite values restored as Inf, and the snapshot could not be revised (nor tiered):
    re-coding its restored values refused the Inf."""
    x = np.array([float(ml_dtypes.finfo(dtype).max), -float(ml_dtypes.finfo(dtype).max), 1.0, 0.0], dtype)
    m = arc.commit({"x": x}, lossy={"x": {"name": "fixed", "bits": 8, "exponent": exponent}})
    got = arc.restore(m.id)["x"].copy()
    assert np.isfinite(got.astype(np.float64)).all() and m.tensor("x").scheme["error"]["overflow"] == 0
    assert 0 <= float(x[0]) - float(got[0]) < np.ldexp(1.0, exponent)  # the largest step the dtype holds
    arc.revise(m.id, setting="strong")
    arc.bases.clear()
    assert arc.restore(m.id)["x"].tobytes() == got.tobytes()


@pytest.mark.parametrize("spec", ["quant:8", "kmeans:8"])
def test_a_table_of_levels_holds_one_zero_so_a_revision_recodes_the_same_bits(arc, spec):
    """Levels rounded to a narrow dtype could hold both -0.0 and +0.0: a restored zero re-coded to the other
    one, so revising the snapshot failed ("changed while being revised")."""
    x = np.array([9.18355e-41, -9.18355e-41, 1.17549e-38, 0.0], ml_dtypes.bfloat16)
    m = arc.commit({"x": x}, lossy=spec)
    before = arc.restore(m.id)["x"].copy()
    rep, _ = schemes.apply(before, m.tensor("x").scheme)
    assert schemes.restore(rep, m.tensor("x").scheme, "bfloat16").tobytes() == before.tobytes()
    arc.revise(m.id, setting="strong")
    arc.bases.clear()
    assert arc.restore(m.id)["x"].tobytes() == before.tobytes()


@pytest.mark.parametrize("spec", ["quant:3", "kmeans:4", "quant:8"])
def test_a_value_restores_to_the_nearest_level_its_table_holds(arc, spec):
    """Codes pick the nearest of the levels recorded (those of the tensor's dtype), not of the levels before
    they were rounded to it: values near a midpoint restored to the farther level, and the recorded scheme,
    applied to the tensor again, gave another representation."""
    rng = np.random.default_rng(7)
    for dtype in (ml_dtypes.bfloat16, np.float16):
        x = (rng.standard_normal(4000) * 10.0 ** rng.uniform(-3, 3)).astype(dtype)
        tiny = (np.arange(1, 400) * float(ml_dtypes.finfo(dtype).smallest_subnormal)).astype(dtype)
        for t in (x, tiny):
            m = arc.commit({"t": t}, lossy=spec)
            sc, r = m.tensor("t").scheme, arc.restore(m.id)["t"]
            v, levels = t.astype(np.float64), np.array(sc["levels"])
            assert np.all(np.abs(r.astype(np.float64) - v) <= np.abs(levels[None, :] - v[:, None]).min(axis=1))
            again = schemes.restore(schemes.apply(t, sc)[0], sc, r.dtype.name)  # its own parameters: the same
            assert again.tobytes() == r.tobytes()


def test_kmeans_levels_do_not_depend_on_the_tensors_scale():
    """Lloyd's iterations stopped on an absolute tolerance of 1e-12: on values of 1e-14 (an optimizer's second
    moments) k-means stopped at its first guess, the quantiles, at twice the error of the same tensor scaled up."""
    w = np.random.default_rng(0).standard_t(4, size=20000)
    k = schemes.parse("kmeans:4")
    for e in (-50, -20, 0, 20):
        rep, p = schemes.apply(np.ldexp(w, e), k)
        ref, q = schemes.apply(w, k)
        assert rep.tobytes() == ref.tobytes() and p["levels"] == [float(np.ldexp(v, e)) for v in q["levels"]], e
