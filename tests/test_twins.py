"""Tensors coded exactly as an earlier one of their snapshot (tied weights) are coded once: their entry names the
earlier one's parts (FORMAT.md 8), and every read gives each its own bits back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gpupas
from gpupas.backend import fast
from gpupas.pas.planes import to_bits


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


def _check(arc: gpupas.Archive, sid: str, want: dict[str, np.ndarray]) -> None:
    got = arc.restore(sid)
    assert list(got) == list(want)
    for name, v in want.items():
        assert got[name].dtype == v.dtype and got[name].shape == v.shape and _bits(got[name]) == _bits(v), name
    for names in (["head"], ["o", "head"], ["head", "emb"]):
        part = arc.restore(sid, names=names)
        assert all(_bits(part[n]) == _bits(want[n]) for n in names), names
    arc.verify(sid)


@pytest.mark.parametrize("compiled", [True, False])
def test_tied_weights_are_coded_once_and_read_back_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           compiled: bool) -> None:
    monkeypatch.setattr(fast, "WINDOW", 1 << 16)  # a restore's window far below a tensor: each read on its own
    rng = np.random.default_rng(7)
    emb = (rng.standard_normal((1200, 257)) * 0.02).astype(np.float32)
    o = (rng.standard_normal((64, 33)) * 0.02).astype(np.float32)
    with fast.use(compiled), gpupas.create_archive(tmp_path / "a") as arc:
        alone = arc.commit({"emb": emb, "o": o}, snapshot="alone")
        s0 = arc.commit({"emb": emb, "o": o, "head": emb}, snapshot="s0")  # one array under two names
        assert s0.stored_bytes == alone.stored_bytes and s0.raw_bytes == alone.raw_bytes + emb.nbytes
        e, h = s0.tensor("emb"), s0.tensor("head")
        assert h.parts == e.parts and h.stored == 0 and e.stored > 0
        assert sum(t.stored for t in s0.tensors) == s0.stored_bytes
        _check(arc, "s0", {"emb": emb, "o": o, "head": emb})

        step = emb + np.float32(1e-4) * rng.standard_normal(emb.shape).astype(np.float32)
        step[:300] = emb[:300]  # rows left as they were: a row mask
        s1 = arc.commit({"emb": step, "o": o, "head": step.copy()}, base="s0", snapshot="s1")  # equal copies
        assert s1.tensor("head").parts == s1.tensor("emb").parts and s1.tensor("head").enc != "mat"
        _check(arc, "s1", {"emb": step, "o": o, "head": step})

        untied = step + np.float32(1e-3)
        s2 = arc.commit({"emb": step, "o": o, "head": untied}, base="s1", snapshot="s2")
        assert s2.tensor("head").parts != s2.tensor("emb").parts
        _check(arc, "s2", {"emb": step, "o": o, "head": untied})
        # equal bits against bases that differ (s2's head is not its emb): coded apart, each against its own
        s3 = arc.commit({"emb": step, "o": o, "head": step}, base="s2", snapshot="s3")
        assert s3.tensor("head").parts != s3.tensor("emb").parts
        _check(arc, "s3", {"emb": step, "o": o, "head": step})
    with gpupas.open_archive(tmp_path / "a") as arc:  # from the store, not the commit's cache
        for sid, want in (("s0", emb), ("s1", step), ("s3", step)):
            _check(arc, sid, {"emb": step if sid != "s0" else emb, "o": o, "head": want})


def test_twins_of_other_dtypes_and_of_lossy_ones_under_one_scheme_not_of_empty_tensors(tmp_path: Path) -> None:
    """A tied embedding stored ``lossy="bf16"`` was coded twice (lossy tensors were left out of the twins): coded
    once where the scheme, its parameters and the representation are the same."""
    rng = np.random.default_rng(8)
    import ml_dtypes

    b = (rng.standard_normal(40_000) * 0.02).astype(ml_dtypes.bfloat16)
    i = rng.integers(-5, 5, 30_000).astype(np.int16)
    f = (rng.standard_normal(10_000) * 0.02).astype(np.float32)
    z = np.zeros((0, 3), np.float32)
    tensors = {"b": b, "b2": b.copy(), "i": i, "i2": i, "f": f, "f2": f, "f3": f, "f4": f, "z": z, "z2": z}
    with gpupas.create_archive(tmp_path / "a") as arc:
        m = arc.commit(tensors, lossy={"f": "fixed:16", "f2": "fixed:16", "f3": "fixed:8", "f4": "bf16"})
        assert m.tensor("b2").parts == m.tensor("b").parts and m.tensor("i2").parts == m.tensor("i").parts
        assert m.tensor("f2").parts == m.tensor("f").parts and m.tensor("f2").stored == 0  # one scheme: coded once
        assert m.tensor("f2").scheme == m.tensor("f").scheme
        assert len({m.tensor(n).parts for n in ("f", "f3", "f4")}) == 3  # other schemes: each coded on its own
        assert sum(t.stored for t in m.tensors) == m.stored_bytes
        got = arc.restore(m.id)
        for name in ("b", "b2", "i", "i2", "z", "z2"):
            assert _bits(got[name]) == _bits(tensors[name]) and got[name].shape == tensors[name].shape, name
        assert _bits(got["f"]) == _bits(got["f2"]) != _bits(got["f3"])
        assert _bits(got["f4"]) == _bits(f.astype(ml_dtypes.bfloat16).astype(np.float32))
        arc.verify(m.id)
        # a revision re-encodes from restored (separate) arrays: still coded once
        r = arc.revise(m.id, setting="strong")
        assert r.tensor("b2").parts == r.tensor("b").parts and r.stored_bytes <= m.stored_bytes
        got = arc.restore(m.id)
        assert all(_bits(got[n]) == _bits(tensors[n]) for n in ("b", "b2", "i", "i2"))


def test_twin_detection_compares_every_value(tmp_path: Path) -> None:
    """Equal CRC-32, shape and dtype are not enough: one flipped bit codes a tensor on its own."""
    from gpupas.engine.stage import _same

    a = np.arange(10_000, dtype=np.uint32)
    b = a.copy()
    b[9_999] ^= 1
    assert _same(a, a.copy(), step=97) and not _same(a, b, step=97) and not _same(a, None) and _same(None, None)
    assert not _same(a, a.astype(np.uint64)) and not _same(a, a.reshape(100, 100))
    x = to_bits(np.float32([0.0, -0.0]), gpupas.pas.planes.LAYOUTS["float32"])  # -0.0 == 0.0 as floats, not as bits
    assert not _same(x[:1], x[1:])
