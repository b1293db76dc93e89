"""gpupas.inspect: DataFrame-ready records per snapshot, tensor, layer and plane, consistent with the
manifests, and the CLI printing the same records."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import gpupas
from gpupas import inspect
from tests.conftest import flip_chunks_of

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[gpupas.Repository]:
    rng = np.random.default_rng(0)
    w = {"enc.0.weight": (rng.standard_normal((128, 96)) * 0.05).astype(np.float32),
         "enc.0.bias": np.zeros(128, np.float32),
         "head.weight": (rng.standard_normal((10, 128)) * 0.1).astype(np.float32),
         "step": np.arange(3, dtype=np.int32)}
    w2 = {k: v.copy() for k, v in w.items()}
    w2["enc.0.weight"][:64] += 1e-3  # half the rows change
    w2["head.weight"][3, 5] = 7.0  # one value
    with gpupas.create_repository(tmp_path / "arc") as r:
        r.commit("net", [w, w2])
    r = gpupas.open_repository(tmp_path / "arc")
    yield r
    r.close()


def test_snapshot_tensor_and_layer_records_add_up(repo: gpupas.Repository) -> None:
    rows = inspect.snapshots(repo)
    assert [(r["version_name"], r["index"], r["depth"]) for r in rows] == [("net", 1, 0), ("net", 2, 1)]
    assert rows[1]["base"] == rows[0]["snapshot"] and rows[1]["delta_tensors"] >= 2
    assert [r["snapshot"] for r in inspect.snapshots(repo.archive)] == [r["snapshot"] for r in rows]
    for r in rows:
        m = repo.archive.manifest(r["snapshot"])
        assert r["stored_bytes"] == m.stored_bytes == r["local_bytes"] and r["tier_bytes"] == 0
        tensors = inspect.tensors(repo, r["snapshot"])
        assert sum(t["nbytes"] for t in tensors) == m.raw_bytes
        layers = inspect.layers(repo, r["snapshot"])
        assert [x["layer"] for x in layers] == ["enc.0", "head", "step"]
        assert sum(x["stored"] for x in layers) == sum(t["stored"] for t in tensors)
        assert all(json.dumps(x) for x in [*tensors, *layers, r])  # flat, plain values
    assert inspect.layer_of("encoder.layer.0.attention.self.query.weight") == "encoder.layer.0.attention.self.query"


def test_plane_records(repo: gpupas.Repository) -> None:
    sid = inspect.snapshots(repo)[0]["snapshot"]
    m = repo.archive.manifest(sid)
    rows = inspect.planes(repo, sid)
    assert len(rows) == sum(e.width for e in m.tensors)
    assert all(0 <= r["entropy"] <= 8.1 and r["tier"] == "local" for r in rows if r["entropy"] is not None)
    zeros = [r for r in rows if r["tensor"] == "enc.0.bias"]
    assert all(r["entropy"] == 0.0 for r in zeros)  # a zero tensor's planes: one symbol
    top = inspect.planes(repo, sid, planes=1)
    assert {r["plane"] for r in top} == {0} and len(top) == len(m.tensors)
    assert [r["entropy"] for r in top] == [r["entropy"] for r in rows if r["plane"] == 0]
    summary = inspect.plane_summary(repo, sid, entropy=True)
    assert [r["plane"] for r in summary] == [0, 1, 2, 3]
    assert summary[0]["bytes"] == sum(e.values for e in m.tensors)
    assert sum(r["stored"] for r in summary) == sum(sum(e.plane_bytes) for e in m.tensors)
    exact = inspect.read_plane_bytes(repo.archive, sid, planes=2)
    w = repo.restore("net", 1)["head.weight"].reshape(-1)
    assert len(exact[("head.weight", 0)]) == w.size  # the coded planes of a whole tensor, one byte per value


def test_changes_against_the_base(repo: gpupas.Repository) -> None:
    first, second = (r["snapshot"] for r in inspect.snapshots(repo))
    rows = {r["tensor"]: r for r in inspect.changes(repo, second)}
    assert rows["enc.0.weight"]["rows_changed"] == 0.5 and rows["enc.0.weight"]["changed"] == 0.5
    assert rows["head.weight"]["rows_changed"] == 0.1 and rows["head.weight"]["changed"] == pytest.approx(1 / 1280)
    m = repo.archive.manifest(second)
    assert rows["enc.0.bias"]["changed"] == 0.0
    assert {r["tensor"]: r["enc"] for r in rows.values()} == {e.name: e.enc for e in m.tensors}  # as coded on it
    assert inspect.changes(repo, first) == []  # stored whole: no base to compare with
    back = {r["tensor"]: r for r in inspect.changes(repo, first, base=second)}
    assert back["enc.0.weight"]["changed"] == 0.5 and back["enc.0.weight"]["enc"] is None


def test_changes_read_only_the_tensors_both_snapshots_have(tmp_path: Path) -> None:
    """changes compares a snapshot's tensors with its base's: a base tensor the snapshot dropped is never
    read (every chunk holding only it damaged, the comparison still succeeds)."""
    rng = np.random.default_rng(8)
    w = {k: (rng.standard_normal(1_000_000) * 0.02).astype(np.float32) for k in "abc"}
    with gpupas.create_archive(tmp_path / "arc") as a:
        m0 = a.commit(w)
        m1 = a.commit({"a": w["a"] + np.float32(1e-4), "c": w["c"]}, base=m0.id)
    assert flip_chunks_of(tmp_path / "arc", m0, "b") >= 2
    with gpupas.open_archive(tmp_path / "arc") as a:
        rows = inspect.changes(a, m1.id)
    assert [(r["tensor"], r["changed"] > 0.5) for r in rows] == [("a", True), ("c", False)]


def test_a_damaged_manifest_has_its_row_and_the_others_theirs(repo: gpupas.Repository) -> None:
    """A snapshot whose manifest is damaged is listed (as Archive.snapshots lists it) with what is wrong in
    ``damaged`` and nothing else, and so is its delta, whose depth needs that manifest; the CLI prints the
    table and exits 3 naming it."""
    before = inspect.snapshots(repo)
    first, second = (r["snapshot"] for r in before)
    path = Path(repo.location) / "manifests" / f"{first}.json"
    data = bytearray(path.read_bytes())
    data[30] ^= 1
    path.write_bytes(bytes(data))
    with gpupas.open_repository(repo.location) as fresh:
        rows = {r["snapshot"]: r for r in inspect.snapshots(fresh.archive)}
    assert set(rows) == {first, second}
    assert "checksum" in rows[first]["damaged"] and rows[first]["stored_bytes"] is None
    assert rows[second]["damaged"] is not None and rows[second]["depth"] is None  # its base's manifest
    assert set(rows[first]) == set(rows[second]) == set(before[0]) and before[0]["damaged"] is None
    got = subprocess.run([sys.executable, "-m", "gpupas", "-A", repo.location, "inspect", "net", "--by", "snapshot"],
                         capture_output=True, text=True, cwd=ROOT)
    assert got.returncode == 3 and first in got.stderr and "version 1 (net)" in got.stdout, got
    got = subprocess.run([sys.executable, "-m", "gpupas", "-A", repo.location, "inspect", "net", "--by", "snapshot",
                          "--json"], capture_output=True, text=True, cwd=ROOT)
    assert got.returncode == 3 and [r["damaged"] is not None for r in json.loads(got.stdout)] == [True, True], got


def test_savings_and_tradeoff(repo: gpupas.Repository) -> None:
    saved = inspect.savings(repo)
    assert saved[0]["whole_measured"] and saved[0]["saved_bytes"] == 0
    assert not saved[1]["whole_measured"] and saved[1]["saved_bytes"] > 0
    rows = inspect.tradeoff(repo, alphas=(1.0, 4.0))
    planners = {r["planner"] for r in rows}
    assert {"materialized", "mst", "spt", "pas-mt", "pas-pt", "current"} <= planners
    spt = [r for r in rows if r["planner"] == "spt"]
    assert all(r["over_budget"] == 0 for r in spt) and len(rows) == 2 * len(planners)


def test_docstring_examples_run() -> None:
    import gpupas.tiers

    for module in (inspect, gpupas.tiers):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_cli_inspect_prints_the_same_records(repo: gpupas.Repository) -> None:
    def gp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gpupas", "-A", repo.location, *args], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)

    sid = inspect.snapshots(repo)[1]["snapshot"]
    got = json.loads(gp("inspect", "net", "--by", "tensor", "--json").stdout)
    assert got == inspect.tensors(repo, sid)
    table = gp("inspect", "net", "--by", "plane")
    assert table.returncode == 0 and "bits/byte" in table.stdout and "entropy" in table.stdout
    bad = gp("inspect", "net", "--by", "row")
    assert bad.returncode == 2 and "--by must be one of" in bad.stderr


def test_cli_inspect_by_tensor_says_which_tensors_are_lossy(tmp_path: Path) -> None:
    """The tensor table names a lossy tensor's scheme, as its record, show and log do: it printed 'mat' alone, the
    same as a tensor stored bit-exactly."""
    w = {"w": np.linspace(-1, 1, 4096, dtype=np.float32), "step": np.arange(3, dtype=np.int32)}
    with gpupas.create_repository(tmp_path / "arc") as r:
        r.commit("net", [w], lossy="kmeans:4")
    got = subprocess.run([sys.executable, "-m", "gpupas", "-A", str(tmp_path / "arc"), "inspect", "net", "--by",
                          "tensor"], capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ,
                                                                                              "COLUMNS": "200"})
    rows = {line.split()[1]: line for line in got.stdout.splitlines() if line.startswith("│")}
    assert got.returncode == 0 and "lossy" in got.stdout, got
    assert "kmeans:4" in rows["w"] and "kmeans" not in rows["step"]


def test_cli_inspect_refuses_options_its_view_does_not_use(repo: gpupas.Repository) -> None:
    """--planes reads part of a snapshot for --by plane only, and --by snapshot lists every snapshot of the
    version: given with another view, they were ignored (the full records printed, exit 0)."""
    def gp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gpupas", "-A", repo.location, *args], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)

    for by in ("tensor", "layer", "snapshot"):
        got = gp("inspect", "net", "--by", by, "--planes", "1")
        assert got.returncode == 2 and "--planes" in got.stderr and "--by plane" in got.stderr, got
    got = gp("inspect", "net", "--by", "snapshot", "-s", "1")
    assert got.returncode == 2 and "--snapshot" in got.stderr, got
    assert gp("inspect", "net", "--by", "plane", "--planes", "1", "-s", "1").returncode == 0
    assert gp("inspect", "net", "--by", "tensor", "-s", "1").returncode == 0


def test_plane_rows_and_the_bytes_in_no_plane_add_up_to_the_snapshot(tmp_path: Path) -> None:
    """A row mask is counted in its tensor's stored bytes but in no plane: the plane view's rows came to less
    than the snapshot stores, and nothing said so; the CLI now names the rest."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 64)).astype(np.float32)
    w2 = w.copy()
    w2[:40] += np.float32(1e-3)  # a few rows change: a delta with a row mask
    with gpupas.create_repository(tmp_path / "arc") as repo:
        v = repo.commit("a", [{"w": w}, {"w": w2}])
        sid = v.snapshots[1]["id"]
        m = repo.archive.manifest(sid)
        assert m.tensors[0].rows is not None
        extras = m.stored_bytes - sum(r["stored"] for r in inspect.plane_summary(repo, sid))
    assert extras > 0
    got = subprocess.run([sys.executable, "-m", "gpupas", "-A", str(tmp_path / "arc"), "inspect", "a", "--by", "plane"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert got.returncode == 0 and f"row masks and 'pred' factors: {extras} B more, in no plane" in got.stderr, got


def test_diff_statistics_take_bounded_memory() -> None:
    """Comparing two large tensors works a block at a time (whole-tensor float64 temporaries took ~23x a
    bf16 tensor: ~49 GB for an LLM's 2.1 GB embedding)."""
    import tracemalloc

    import ml_dtypes

    from gpupas.versions.inspect import DIFF_BLOCK, diff_tensors

    x = np.random.default_rng(0).standard_normal(16 * DIFF_BLOCK + 3).astype(ml_dtypes.bfloat16)
    y = (x.astype(np.float32) * 1.01).astype(ml_dtypes.bfloat16)
    tracemalloc.start()
    try:
        row = diff_tensors({"e": x}, {"e": y})["tensors"][0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * DIFF_BLOCK < 3 * x.nbytes, peak  # about a block's float64 temporaries
    d = y.astype(np.float64) - x.astype(np.float64)
    assert row["changed"] == np.mean(x.view(np.uint16) != y.view(np.uint16))
    assert row["max_abs"] == np.abs(d).max() and np.isclose(row["mean_abs"], np.abs(d).mean(), rtol=1e-12)


def test_diff_counts_values_changed_to_or_from_inf_or_nan_apart_from_the_finite_statistics(
        capsys: pytest.CaptureFixture[str]) -> None:
    """+Inf swapped for -Inf showed 'changed 80%' beside 'max |Δ| 0' (the statistics skip non-finite
    differences): such changes are counted apart, and the CLI says so."""
    from gpupas.cli import render
    from gpupas.versions.inspect import diff_tensors

    x = np.array([np.inf, -np.inf, 1.0, 2.0, np.nan], np.float32)
    y = np.array([-np.inf, np.inf, 1.5, 2.0, np.nan], np.float32)
    y[4] = np.frombuffer(np.uint32(0x7FC00001).tobytes(), np.float32)[0]  # another NaN payload
    d = diff_tensors({"w": x}, {"w": y})
    row = d["tensors"][0]
    assert row["changed"] == 0.8 and row["not_finite"] == 3 and row["max_abs"] == 0.5 and row["mean_abs"] == 0.25
    render.diff(render.Output(), {"a": {"id": 1, "name": "a"}, "b": {"id": 2, "name": "b"}, "network": {},
                                  "hyperparameters": {}, "metrics": {}, "files": {}, "weights": d}, 0)
    out = capsys.readouterr().out
    assert "80.0% (3 Inf/NaN)" in out and "leave them out" in out, out


def test_plane_entropies_sample_the_planes_without_joining_them(tmp_path: Path) -> None:
    """``planes`` samples each plane from the decoded streams: a copy of every plane beside them took twice
    the snapshot (8.9 GB to inspect a 4.2 GiB one), and the sampled entropies are those of the joined plane."""
    import tracemalloc

    w = np.random.default_rng(0).standard_normal(1 << 21).astype(np.float32)  # 8 MiB, 32 segments
    with gpupas.create_archive(tmp_path / "a", durable=False) as a:
        sid = a.commit({"w": w, "v": w[:1000].copy()}, layout=gpupas.Layout(segment=1 << 16)).id
        joined = inspect.read_plane_bytes(a, sid)
        tracemalloc.start()
        try:
            rows = inspect.planes(a, sid)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 1.5 * w.nbytes, peak
    for r in rows:
        data = joined[(r["tensor"], r["plane"])]
        step = max(1, data.size // inspect.SAMPLE)
        want = inspect._entropy(data[: step * inspect.SAMPLE : step] if data.size > inspect.SAMPLE else data)
        assert r["entropy"] == float(want), r


def test_a_snapshot_that_is_not_there_or_out_of_reach_is_no_damaged_row(repo: gpupas.Repository,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only damage makes a ``damaged`` row: a snapshot that is not there (a mistyped id, one discarded since the
    listing) is SnapshotNotFoundError as before (exit 1), and a store out of reach its own error (exit 4), not
    a row that `gpupas inspect` turns into exit 3 and "run `gpupas verify`"."""
    from gpupas.errors import SnapshotNotFoundError, StoreUnavailableError

    with pytest.raises(SnapshotNotFoundError, match="nope"):
        inspect.snapshots(repo, ["nope"])

    def gone(sid: str) -> None:
        raise StoreUnavailableError("s3://bucket/arc cannot be reached")

    monkeypatch.setattr(repo.archive, "manifest", gone)
    with pytest.raises(StoreUnavailableError):
        inspect.snapshots(repo)


def test_diff_norms_match_numpy_across_blocks_and_scales() -> None:
    """rel_l2 is ||b - a|| / ||a|| over every block, also where the squares pass a double's range."""
    from gpupas.versions.inspect import DIFF_BLOCK, diff_tensors

    rng = np.random.default_rng(5)
    for scale in (1e-300, 1.0, 1e200):
        a = {"w": rng.standard_normal(2 * DIFF_BLOCK + 17) * scale, "z": np.zeros(4)}
        b = {"w": a["w"] + rng.standard_normal(a["w"].size) * scale * 1e-3, "z": np.ones(4)}
        got = {r["name"]: r["rel_l2"] for r in diff_tensors(a, b)["tensors"]}
        d, x = (b["w"] / scale - a["w"] / scale), a["w"] / scale  # numpy's norms, of values scaled back to 1
        assert got["w"] == pytest.approx(np.linalg.norm(d) / np.linalg.norm(x), rel=1e-12), scale
        assert got["z"] is None  # ||a|| = 0, ||b - a|| > 0


def test_plane_entropy_never_exceeds_8_bits_per_byte(tmp_path: Path) -> None:
    """A plane of evenly spread bytes has exactly 8 bits per byte; the small-sample correction added
    to the estimate carried it past what any byte can hold (8.04)."""
    a = gpupas.create_archive(tmp_path / "arc")
    sid = a.commit({"u": (np.arange(4096) % 256).astype(np.uint8)}).id
    [row] = inspect.planes(a, sid)
    assert 7.99 <= row["entropy"] <= 8.0
    assert inspect.plane_summary(a, sid, entropy=True)[0]["entropy"] <= 8.0
