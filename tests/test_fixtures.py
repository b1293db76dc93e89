"""Golden archives of every format version ever written, read and compared bit for bit on every run.

Each ``tests/fixtures/format<N>/archive`` was written once by the gpupas that wrote format N
(``tests/fixtures/make_fixture.py``); ``expected.npz`` holds the tensors they must restore to.
These files are never regenerated: a change that breaks one breaks users' archives.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import gpupas

FIXTURES = Path(__file__).parent / "fixtures"
FORMATS = sorted(p.name for p in FIXTURES.glob("format*") if (p / "archive").is_dir())


def _dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def expected(fmt: str) -> dict[str, dict[str, np.ndarray]]:
    """Snapshot id -> tensor name -> the array it must restore to."""
    index = json.loads((FIXTURES / fmt / "expected.json").read_text())
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(FIXTURES / "expected.npz") as raw:
        for key, t in index["tensors"].items():
            sid, name = key.split("|", 1)
            out.setdefault(sid, {})[name] = raw[t["npz"]].view(_dtype(t["dtype"])).reshape(t["shape"])
    return out


@pytest.fixture(params=FORMATS)
def golden(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    """A private copy of one golden archive (reading a repository writes its catalog)."""
    dst = tmp_path / request.param
    shutil.copytree(FIXTURES / request.param / "archive", dst)
    return request.param, dst


def test_every_format_is_present() -> None:
    assert {"format1", "format2", "format3"} <= set(FORMATS)


def test_every_snapshot_restores_bit_exactly(golden: tuple[str, Path]) -> None:
    fmt, path = golden
    want = expected(fmt)
    with gpupas.open_archive(path) as archive:
        assert sorted(archive.snapshots()) == sorted(want)
        for sid, tensors in want.items():
            got = archive.restore(sid)
            assert got.keys() == tensors.keys()
            for name, arr in tensors.items():
                assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, (sid, name)
                assert got[name].tobytes() == arr.tobytes(), (fmt, sid, name)
            archive.verify(sid)


def test_versions_tags_and_files_read(golden: tuple[str, Path]) -> None:
    fmt, path = golden
    index = json.loads((FIXTURES / fmt / "expected.json").read_text())
    want = expected(fmt)
    with gpupas.open_repository(path) as repo:
        versions = repo.versions()
        assert [v.name for v in versions] == ["fixture", "fixture-strong"]
        for v in versions:
            assert [s["id"] for s in v.snapshots] == index["versions"][str(v.id)]
        v1 = repo.version("golden")
        assert v1.hyperparameters == {"lr": 0.01, "opt": {"name": "adam"}}
        assert repo.file_bytes(v1.files["notes/readme.txt"]["sha256"]) == b"golden fixture\n"
        latest = repo.restore("golden")
        assert all(latest[k].tobytes() == a.tobytes() for k, a in want[v1.latest].items())
        result = repo.verify()
        assert result["ok"], result["problems"]
        assert result["checked"]["snapshots"] == len(want)


def test_stored_bytes_add_up_the_same_in_every_report(golden: tuple[str, Path]) -> None:
    """Formats 1 and 2 rounded each tensor's stored bytes on its own, a few bytes off their snapshot's: stats
    and log (tensors summed) then disagreed with show, plan and compact (snapshots' stored bytes), and a
    per-layer table with the snapshot it sits beside."""
    _, path = golden
    with gpupas.open_repository(path) as repo:
        sizes = {}
        for sid in repo.archive.snapshots():
            m = repo.archive.manifest(sid)
            assert sum(e.stored for e in m.tensors) == m.stored_bytes, sid
            sizes[sid] = m.stored_bytes
        named = {s["id"] for v in repo.versions() for s in v.snapshots}
        assert repo.stats()["stored_bytes"] == sum(sizes[s] for s in named)
        for row in repo.log():
            assert row["stored_bytes"] == sum(sizes[s["id"]] for s in repo.version(row["id"]).snapshots)
            d = repo.show(row["id"])
            assert sum(r["stored_bytes"] for r in d["layers"]) == sizes[d["snapshot"]["id"]]


def test_format3_fixture_holds_every_v3_feature() -> None:
    """Plane groups, a revision, the sign on top (rot: false) and every lossy scheme are read forever."""
    with gpupas.open_archive(FIXTURES / "format3" / "archive") as a:
        ms = [a.manifest(s) for s in a.snapshots()]
    tensors = [e for m in ms for e in m.tensors]
    assert any(len(m.streams) == 3 for m in ms) and any(m.revision == 1 for m in ms)
    assert any(not e.rot and e.enc == "sub" for e in tensors) and any(not e.rot and e.lossy for e in tensors)
    assert {e.scheme["name"] for e in tensors if e.scheme} == {"cast", "fixed", "quant"}
    assert {e.scheme.get("method") for e in tensors if e.scheme and e.scheme["name"] == "quant"} == {"uniform",
                                                                                                    "kmeans"}


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f in ("format1", "format2")])
def test_a_legacy_manifest_without_segment_reads_as_the_spec_says_whatever_gpupas_writes_now(
        fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """FORMAT.md 14: a format 1/2 manifest without ``segment`` has 2^20 values per segment, fixed in the spec,
    not whatever segment size the running gpupas writes."""
    from gpupas.format import manifest

    monkeypatch.setattr(manifest, "SEGMENT", 1 << 12)  # a later gpupas writing smaller segments
    path = next((FIXTURES / fmt / "archive" / "manifests").glob("*.json"))
    doc = json.loads(path.read_text())
    del doc["segment"]
    assert manifest.Manifest.from_bytes(json.dumps(doc).encode(), path.stem).segment == 1 << 20
