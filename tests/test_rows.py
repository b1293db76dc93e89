"""Unchanged-row masks: a delta codes only the rows that changed, bit-exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gpupas
from gpupas.pas.rows import changed_rows, mask_bytes, mask_from_bytes
from tests.conftest import adversarial


def _embedding(dtype: str, rows: int = 3000, per: int = 64, touched: float = 0.2, seed: int = 0):
    rng = np.random.default_rng(seed)
    scale = 1.0 if np.dtype(dtype).kind == "f" else 20000.0  # integers: steps of a few units
    base = (rng.standard_normal((rows, per)) * 0.05 * scale).astype(dtype)
    new = base.copy()
    hit = rng.random(rows) < touched
    new[hit] += (rng.standard_normal((int(hit.sum()), per)) * 1e-3 * scale).astype(dtype)
    return base, new, hit & np.any(new.view(np.uint8).reshape(rows, -1) != base.view(np.uint8).reshape(rows, -1), 1)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32"])
def test_only_changed_rows_are_coded(tmp_path: Path, dtype: str) -> None:
    base, new, hit = _embedding(dtype)
    with gpupas.create_archive(tmp_path / "a") as a:
        a.commit({"e": base}, snapshot="b")
        m = a.commit({"e": new}, snapshot="n", base="b")
        e = m.tensors[0]
        assert e.rows == int(hit.sum()) > 400
        assert m.stored_bytes < 0.35 * new.nbytes
    with gpupas.open_archive(tmp_path / "a") as cold:
        assert cold.restore("n")["e"].tobytes() == new.tobytes()
        assert cold.verify("n") == 1


def test_nan_payloads_and_signed_zeros_count_as_changes(tmp_path: Path) -> None:
    base, new, _ = _embedding("float32", rows=400, touched=0.0)
    base[:5] = adversarial("float32", 5 * 64, seed=3).reshape(5, 64)  # NaN payloads, Inf, -0.0 ...
    new[:5] = base[:5]
    new[7, 3] = -0.0 if base[7, 3].view(np.uint32) == 0 else 0.0  # +0.0 <-> -0.0 only
    bits = new.view(np.uint32)
    bits[9, 0] = 0x7FC00001  # a NaN whose payload differs from the base's value
    bits[11, 1] = 0x7FC00002
    base.view(np.uint32)[11, 1] = 0x7FC00003  # NaN -> another NaN
    with gpupas.create_archive(tmp_path / "a") as a:
        a.commit({"e": base}, snapshot="b")
        m = a.commit({"e": new}, snapshot="n", base="b")
        assert m.tensors[0].rows == 3  # rows 7, 9 and 11; the NaN rows 0-4 are unchanged
    with gpupas.open_archive(tmp_path / "a") as cold:
        assert cold.restore("n")["e"].tobytes() == new.tobytes()


def test_identical_tensor_stores_no_planes(tmp_path: Path) -> None:
    base, _, _ = _embedding("float32")
    with gpupas.create_archive(tmp_path / "a") as a:
        a.commit({"e": base}, snapshot="b")
        m = a.commit({"e": base.copy()}, snapshot="same", base="b")
        assert m.tensors[0].rows == 0
        assert m.stored_bytes < 600  # the mask and chunk overhead
    with gpupas.open_archive(tmp_path / "a") as cold:
        assert cold.restore("same")["e"].tobytes() == base.tobytes()


def test_mask_is_skipped_where_most_rows_change() -> None:
    base, new, _ = _embedding("float32", touched=0.95)
    u, ub = new.reshape(-1).view(np.uint32), base.reshape(-1).view(np.uint32)
    assert changed_rows(u, ub, new.shape) is None
    base, new, hit = _embedding("float32", touched=0.3)
    got = changed_rows(new.reshape(-1).view(np.uint32), base.reshape(-1).view(np.uint32), new.shape)
    assert got is not None and np.array_equal(got, hit)
    assert np.array_equal(mask_from_bytes(mask_bytes(got), got.size), got)


def test_masked_tensor_stored_whole_restores_cold(tmp_path: Path) -> None:
    """strong may store the changed rows whole ('mat'); the unchanged rows still come from the base."""
    rng = np.random.default_rng(5)
    base = (rng.standard_normal((1000, 64)) * 0.05).astype(np.float32)
    new = base.copy()
    new[:500] = 0.0
    with gpupas.create_archive(tmp_path / "a") as a:
        a.commit({"w": base}, snapshot="b")
        m = a.commit({"w": new}, snapshot="n", base="b", setting="strong")
        assert m.tensors[0].rows == 500
    with gpupas.open_archive(tmp_path / "a") as cold:
        assert cold.restore("n")["w"].tobytes() == new.tobytes()


def test_older_archive_is_marked_before_a_newer_snapshot_lands(tmp_path: Path) -> None:
    import json

    base, _, _ = _embedding("float32")
    with gpupas.create_archive(tmp_path / "a") as a:
        root = json.loads((tmp_path / "a" / "zarr.json").read_text())
        root["attributes"]["gpupas"]["format"] = 1  # as an older gpupas made it
        (tmp_path / "a" / "zarr.json").write_text(json.dumps(root))
    with gpupas.open_archive(tmp_path / "a") as a:
        assert json.loads((tmp_path / "a" / "zarr.json").read_text())["attributes"]["gpupas"]["format"] == 1
        a.commit({"e": base}, snapshot="b")  # a format-3 manifest: older readers must refuse the archive now
    assert json.loads((tmp_path / "a" / "zarr.json").read_text())["attributes"]["gpupas"]["format"] == 3
    assert (tmp_path / "a" / "snapshots" / "zarr.json").is_file()  # formats 1, 2 had no group document there
