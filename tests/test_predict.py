"""Row-wise extrapolation along a delta chain ('pred'): bit-exact, and it pays where rows keep moving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gpupas
from gpupas.errors import IntegrityError, InvalidInputError
from gpupas.pas.planes import layout_of, to_bits
from gpupas.pas.predict import alpha_from_planes, alpha_planes, fit, predict, rows_of
from gpupas.pas.settings import Setting
from gpupas.pas.transform import SEGMENT
from tests.conftest import adversarial

FLOATS = ["float32", "float16", "bfloat16"]
NO_PREDICT = Setting("default", predict=False)


def _chain(dtype: str, rows: int = 600, per: int = 96, links: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Snapshots where most rows keep moving along their last change, shrinking (as Adam leaves a row
    it no longer gets gradients for), and some rows move afresh."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, per)) * 0.05
    step = rng.standard_normal((rows, per)) * 2e-3
    out = [w.copy()]
    for _ in range(links - 1):
        fresh = rng.random(rows) < 0.2
        step = np.where(fresh[:, None], rng.standard_normal((rows, per)) * 2e-3, step * 0.4)
        w = w + step
        out.append(w.copy())
    return [x.astype(layout_of(dtype).dtype) for x in out]


def _commit_chain(arc: gpupas.Archive, snaps: list[dict[str, np.ndarray]], setting: str | Setting = "default"
                  ) -> list[gpupas.Manifest]:
    ms, base = [], None
    for i, s in enumerate(snaps):
        ms.append(arc.commit(s, snapshot=f"s{i}", base=base, setting=setting))
        base = f"s{i}"
    return ms


@pytest.mark.parametrize("dtype", FLOATS)
def test_pred_chain_is_bit_exact_and_smaller(tmp_path: Path, dtype: str) -> None:
    snaps = [{"w": w, "flat": w[:40].reshape(-1).copy()} for w in _chain(dtype)]  # one row: one factor
    with gpupas.create_archive(tmp_path / "a") as a, gpupas.create_archive(tmp_path / "b") as b:
        ms = _commit_chain(a, snaps)
        plain = _commit_chain(b, snaps, NO_PREDICT)
    assert [m.tensors[0].enc for m in ms] == ["mat", "sub", "pred"]
    assert ms[2].tensors[1].enc in ("sub", "pred")
    assert ms[2].stored_bytes < 0.85 * plain[2].stored_bytes, (ms[2].stored_bytes, plain[2].stored_bytes)
    with gpupas.open_archive(tmp_path / "a") as cold:  # nothing cached: the chain is decoded from disk
        for i, s in enumerate(snaps):
            got = cold.restore(f"s{i}")
            assert all(got[k].tobytes() == v.tobytes() for k, v in s.items())
        assert cold.verify("s2") == 2


@pytest.mark.parametrize("dtype", FLOATS)
def test_pred_with_adversarial_values(tmp_path: Path, dtype: str) -> None:
    chain = _chain(dtype, seed=1)
    rng = np.random.default_rng(2)
    for k, w in enumerate(chain):  # NaN payloads, Inf, -0.0, subnormals and random patterns in every link
        flat = w.reshape(-1)
        where = rng.choice(flat.size, 300, replace=False)
        flat[where] = adversarial(dtype, 300, seed=10 + k)
    snaps = [{"w": w} for w in chain]
    with gpupas.create_archive(tmp_path / "a") as a:
        ms = _commit_chain(a, snaps)
    assert ms[2].tensors[0].enc == "pred"
    with gpupas.open_archive(tmp_path / "a") as cold:
        assert cold.restore("s2")["w"].tobytes() == snaps[2]["w"].tobytes()


def test_prediction_of_any_slice_matches_the_whole(tmp_path: Path) -> None:
    w0, w1, w2 = _chain("float32", rows=50, per=37)
    layout = layout_of(np.float32)
    u, ub, ub2 = (to_bits(x, layout) for x in (w2, w1, w0))
    alpha = fit(u, ub, ub2, layout, w2.shape)
    assert alpha is not None and alpha.dtype == np.int16 and alpha.size == 50
    assert np.array_equal(alpha_from_planes(alpha_planes(alpha)), alpha)
    per = rows_of(w2.shape)[1]
    whole = predict(ub, ub2, alpha, layout, per)
    for a, b in [(0, 1), (5, 37), (36, 38), (40, 500), (37 * 49, u.size), (0, u.size)]:
        assert np.array_equal(predict(ub[a:b], ub2[a:b], alpha, layout, per, a), whole[a:b]), (a, b)
    flat = fit(u, ub, ub2, layout, (u.size,))  # a 1-d tensor is one row
    assert flat is not None and flat.size == 1
    assert np.array_equal(predict(ub[7:99], ub2[7:99], flat, layout, u.size, 7),
                          predict(ub, ub2, flat, layout, u.size)[7:99])


def test_pred_across_segments(tmp_path: Path) -> None:
    rows, per = 2900, 401  # more than one segment, rows straddling the segment boundaries
    assert rows * per > SEGMENT and SEGMENT % per
    snaps = [{"big": w, "small": w[:3, :5].copy()} for w in _chain("float32", rows, per)]
    with gpupas.create_archive(tmp_path / "a") as a:
        ms = _commit_chain(a, snaps)
    assert ms[2].tensors[0].enc == "pred"
    with gpupas.open_archive(tmp_path / "a") as cold:
        out = cold.restore("s2")
    assert all(out[k].tobytes() == snaps[2][k].tobytes() for k in out)


def test_cold_restore_decodes_each_link_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snaps = [{"w": w} for w in _chain("float32", rows=200, per=64, links=8)]
    with gpupas.create_archive(tmp_path / "a") as a:
        ms = _commit_chain(a, snaps)
    assert sum(m.tensors[0].enc == "pred" for m in ms) >= 5
    from gpupas.engine import decode

    calls: list[str] = []
    real = decode.decode_snapshot

    def counting(store: object, m: gpupas.Manifest, *args: object) -> object:
        calls.append(m.id)
        return real(store, m, *args)

    monkeypatch.setattr(decode, "decode_snapshot", counting)
    with gpupas.open_archive(tmp_path / "a") as cold:
        assert cold.restore("s7")["w"].tobytes() == snaps[7]["w"].tobytes()
    assert sorted(calls) == [f"s{i}" for i in range(8)]  # each once, not once per path to it


@pytest.mark.parametrize("gone", ["s0", "s1"])  # the base's base, or the base itself
def test_missing_base_of_pred_snapshot_is_named(tmp_path: Path, gone: str) -> None:
    snaps = [{"w": w} for w in _chain("float32")]
    with gpupas.create_archive(tmp_path / "a") as a:
        ms = _commit_chain(a, snaps)
        readers = sorted(m.id for m in ms if gone in (m.base, m.grand))  # 'pred' snapshots read their grand-base
        assert readers, [(m.id, m.base, m.grand) for m in ms]
        with pytest.raises(InvalidInputError, match=f"{gone} is read by {', '.join(readers)} .their base, or the "):
            a.discard(gone)
        a.discard(gone, force=True)
    with gpupas.open_archive(tmp_path / "a") as cold, pytest.raises(IntegrityError, match=gone):
        cold.restore("s2")


def test_real_adam_training_uses_pred(tmp_path: Path) -> None:
    """A real Adam run with an embedding whose tokens come and go: later snapshots extrapolate."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(400, 48), torch.nn.Flatten(), torch.nn.Linear(48 * 4, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    snaps = []
    for step in range(1, 61):
        lo = (step * 37) % 360  # each batch draws from a window of 40 tokens that moves along
        ids = torch.randint(lo, lo + 40, (16, 4))
        loss = torch.nn.functional.cross_entropy(model(ids), ids[:, 0] % 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 15 == 0:
            snaps.append({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    with gpupas.create_archive(tmp_path / "a") as a, gpupas.create_archive(tmp_path / "b") as b:
        ms = _commit_chain(a, snaps)
        plain = _commit_chain(b, snaps, NO_PREDICT)
    encs = {e.name: e.enc for e in ms[3].tensors}
    assert encs["0.weight"] == "pred"
    assert sum(m.stored_bytes for m in ms[2:]) < sum(m.stored_bytes for m in plain[2:])
    with gpupas.open_archive(tmp_path / "a") as cold:
        for i, s in enumerate(snaps):
            out = cold.restore(f"s{i}")
            assert all(out[k].tobytes() == v.tobytes() for k, v in s.items())


def test_unknown_encoding_asks_for_an_upgrade(tmp_path: Path) -> None:
    from gpupas.errors import FormatError
    from gpupas.format.sealed import seal, unseal

    snaps = [{"w": w} for w in _chain("float32")]
    with gpupas.create_archive(tmp_path / "a") as a:
        _commit_chain(a, snaps)
    path = tmp_path / "a" / "manifests" / "s2.json"
    m = unseal(path.read_bytes(), "s2")
    m["tensors"][0]["enc"] = "future"  # as a newer gpupas would write it
    path.write_bytes(seal(m))
    with gpupas.open_archive(tmp_path / "a") as cold, pytest.raises(FormatError, match="upgrade gpupas"):
        cold.restore("s2")
    m["tensors"][0]["enc"] = "sub"
    path.write_bytes(seal(m)[:-30] + b"}")  # damaged, not newer: its checksum is gone
    with gpupas.open_archive(tmp_path / "a") as cold, pytest.raises(IntegrityError, match="s2"):
        cold.restore("s2")
