"""A commit killed at any moment leaves every earlier snapshot intact and no half snapshot visible."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gpupas

CHILD = r"""
import sys, time, numpy as np, gpupas
from gpupas.store.shards import ShardSink
add = ShardSink.add
written = [0]

def slow_add(self, c, letter, payload):  # the real writes, with a pause after a few chunks for the kill
    add(self, c, letter, payload)
    written[0] += 1
    if written[0] == 6:
        print("half", flush=True)
        time.sleep(float(sys.argv[3]))

ShardSink.add = slow_add
path = sys.argv[1]
a = gpupas.create_archive(path) if sys.argv[2] == "0" else gpupas.open_archive(path)
base = None
for i in range(100):
    rng = np.random.default_rng(i)
    t = {f"w{j}": (rng.standard_normal(200_000) * 0.02).astype(np.float32) for j in range(8)}
    print("start", i, flush=True)
    written[0] = 0
    m = a.commit(t, base=base, snapshot=f"k{sys.argv[2]}-{i:03d}")
    base = m.id
    print("done", i, flush=True)
"""


def expected(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {f"w{j}": (rng.standard_normal(200_000) * 0.02).astype(np.float32) for j in range(8)}


def test_kill_during_commit(tmp_path: Path) -> None:
    path = tmp_path / "arc"
    # (line to wait for, its count, sleep before the kill): mid-chunk-writes, and at random moments
    plans = [("half", 2, 0.0), ("half", 3, 0.0), ("start", 2, 0.05), ("start", 2, 0.15), ("done", 1, 0.0)]
    for attempt, (signal_line, count, delay) in enumerate(plans):
        pause = "5" if signal_line == "half" else "0"
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(attempt), pause],
                                stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        seen = 0
        for line in proc.stdout:
            if line.startswith(signal_line):
                seen += 1
                if seen == count:
                    break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        archive = gpupas.open_archive(path)
        ids = archive.snapshots()
        assert ids, "the first commit finished before the kill"
        for sid in ids:  # every visible snapshot is whole and bit-exact
            got = archive.restore(sid)
            want = expected(900 + int(sid[5:]) if sid.startswith("after") else int(sid[-3:]))
            assert all(got[k].tobytes() == want[k].tobytes() for k in want), sid
        # the next commit works: no lock, no half state in the way
        m = archive.commit(expected(900 + attempt), snapshot=f"after{attempt}")
        assert archive.restore(m.id)["w0"].tobytes() == expected(900 + attempt)["w0"].tobytes()
    written = {p.name.rsplit(".", 1)[0] for p in (path / "snapshots").iterdir() if p.is_dir()}
    orphans = written - set(gpupas.open_archive(path).snapshots())
    assert {"k0-001", "k1-002"} <= orphans  # killed mid-write: chunks on disk, never visible


def test_orphan_folders_are_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpupas.store.archive import ArchiveStore

    archive = gpupas.create_archive(tmp_path / "arc")
    m = archive.commit(expected(0), snapshot="kept")

    def fail(*a: object, **k: object) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as mp:
        mp.setattr(ArchiveStore, "publish_manifest", fail)
        with pytest.raises(OSError, match="disk full"):  # the failure reaches the caller, not swallowed
            archive.commit(expected(1), snapshot="lost")
    assert archive.snapshots() == ["kept"]  # the failed commit published nothing
    assert archive.store.orphan_folders() == []  # a failed commit removes what it wrote
    partial = tmp_path / "arc" / "snapshots" / "lost.0badf00d" / "zstd" / "c"  # what a killed one leaves
    partial.mkdir(parents=True)
    (partial / "0").write_bytes(b"partial")
    orphans = archive.store.orphan_folders()
    assert orphans == ["lost.0badf00d"] and not set(m.folders()) & set(orphans)
    assert archive.gc(min_age=3600) == []  # too young: might be a commit still in progress
    assert archive.gc(min_age=0, dry_run=True) == orphans and archive.store.orphan_folders() == orphans
    assert archive.gc(min_age=0) == orphans
    assert archive.store.orphan_folders() == []
    assert archive.restore("kept")["w0"].tobytes() == expected(0)["w0"].tobytes()


def test_gc_removes_nothing_while_a_version_record_is_damaged(tmp_path: Path) -> None:
    """A damaged record could be repaired; its snapshots must not look unused meanwhile."""
    from gpupas.errors import IntegrityError

    w = np.arange(1000, dtype=np.float32)
    with gpupas.create_repository(tmp_path / "arc") as repo:
        repo.commit("a", {"w": w})
        v2 = repo.commit("b", {"w": w + 1})
    record = tmp_path / "arc" / "versions" / f"{v2.id}.json"
    good = record.read_bytes()
    record.write_bytes(good.replace(b'"b"', b'"c"', 1))  # one byte: the checksum no longer matches
    with gpupas.open_repository(tmp_path / "arc") as repo:
        with pytest.raises(IntegrityError, match="gc removes nothing"):
            repo.gc(min_age=0)
    record.write_bytes(good)
    with gpupas.open_repository(tmp_path / "arc") as repo:
        assert repo.gc(min_age=0) == [] and repo.verify()["ok"]
        assert repo.restore(v2.id)["w"].tobytes() == (w + 1).tobytes()


def test_an_unreadable_manifests_folders_are_not_called_garbage(tmp_path: Path) -> None:
    """gc keeps the data of a snapshot whose manifest it cannot read (verify reports it); the orphan
    listing and ``stats`` agree with that, and stats says which snapshots its totals leave out."""
    from gpupas.format import keys

    with gpupas.create_repository(tmp_path / "arc") as repo:
        repo.commit("m", expected(0))
        v = repo.commit("n", expected(1))
        dotted = repo.archive.commit(expected(2), snapshot="ckpt.100")  # an id with a dot: folder ckpt.100.<tag>
        sids = [v.snapshots[0]["id"], dotted.id]
        folders = [f for sid in sids for f in repo.archive.manifest(sid).folders()]
    for sid in sids:
        path = tmp_path / "arc" / keys.manifest(sid)
        path.write_bytes(path.read_bytes()[:-7] + b"garbage")  # damaged (or written by a gpupas that mis-wrote it)
    with gpupas.open_repository(tmp_path / "arc") as repo:
        assert repo.archive.store.orphan_folders() == []
        repo.gc(min_age=0)
        assert all((tmp_path / "arc" / keys.folder(f)).is_dir() for f in folders)
        from gpupas.versions.inspect import stats

        s = stats(repo)
        assert s["unreadable_snapshots"] == sorted(sids) and s["incomplete_snapshots"] == []


def test_a_format1_archive_killed_while_its_format_is_raised_still_gets_its_snapshots_group(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first commit into a format 1/2 archive raises its root to format 3 and creates ``snapshots/zarr.json``
    (FORMAT.md 2). Killed between the two writes, the archive must not be left saying format 3 without that group:
    the next session would never create it (stock Zarr then cannot open ``snapshots/``)."""
    import json
    import shutil

    from test_fixtures import FIXTURES
    from test_fixtures import expected as golden

    from gpupas.store.local import LocalStore

    path = tmp_path / "arc"
    shutil.copytree(FIXTURES / "format1" / "archive", path)
    want = golden("format1")
    sid = next(iter(want))
    create = LocalStore.create

    def killed(self: LocalStore, key: str, data: bytes) -> bool:
        if key == "snapshots/zarr.json":
            raise KeyboardInterrupt  # the process dies here
        return create(self, key, data)

    monkeypatch.setattr(LocalStore, "create", killed)
    with gpupas.open_archive(path) as a, pytest.raises(KeyboardInterrupt):
        a.commit(want[sid], base=sid)
    monkeypatch.setattr(LocalStore, "create", create)
    with gpupas.open_archive(path) as a:
        m = a.commit(want[sid], base=sid)
        assert a.restore(m.id)["adv.float32"].tobytes() == want[sid]["adv.float32"].tobytes()
    assert json.loads((path / "zarr.json").read_text())["attributes"]["gpupas"]["format"] == 3
    assert json.loads((path / "snapshots" / "zarr.json").read_text())["node_type"] == "group"


def test_the_folders_of_a_snapshot_whose_manifest_a_copy_lost_are_kept(tmp_path: Path) -> None:
    """A half-finished copy (``cp -a``, a sync cut short) lacks a manifest that a version record and a delta's
    ``base`` name: its folder is the snapshot's data, not a killed commit's, and gc keeps it (verify reports the
    manifest missing); the manifest copied over afterwards makes the archive whole again."""
    from gpupas.format import keys

    with gpupas.create_repository(tmp_path / "arc") as repo:
        v1 = repo.commit("a", expected(0))
        v2 = repo.commit("b", expected(1), parents=[v1.id])
        sids = [v1.snapshots[0]["id"], v2.snapshots[0]["id"]]  # the second is a delta on the first
        assert repo.archive.manifest(sids[1]).base == sids[0]
        folders = [f for sid in sids for f in repo.archive.manifest(sid).folders()]
    saved = {sid: (tmp_path / "arc" / keys.manifest(sid)).read_bytes() for sid in sids}
    for sid in sids:
        (tmp_path / "arc" / keys.manifest(sid)).unlink()
    with gpupas.open_repository(tmp_path / "arc") as repo:
        from gpupas.versions.inspect import stats

        assert stats(repo)["incomplete_snapshots"] == []
        assert repo.gc(min_age=0) == []
        assert all((tmp_path / "arc" / keys.folder(f)).is_dir() for f in folders)
        assert not repo.verify()["ok"]
    for sid, data in saved.items():
        (tmp_path / "arc" / keys.manifest(sid)).write_bytes(data)
    with gpupas.open_repository(tmp_path / "arc") as repo:
        assert repo.verify()["ok"]
        assert repo.restore(v2.id)["w0"].tobytes() == expected(1)["w0"].tobytes()


def test_the_snapshots_of_a_version_whose_record_a_copy_lost_are_kept(tmp_path: Path) -> None:
    """A killed commit leaves snapshots naming a version that no record names: a new version's by
    ``version_name`` alone, an appended one's by the ``version_id`` of a version whose record is there. A
    ``version_id`` with no record (here the newest, so no gap in the ids shows it) means the record was lost: gc
    keeps that snapshot and what it is built on, verify reports it; as it does a record lost below the newest,
    while which snapshots were its cannot be told: gc then removes no version's snapshot."""
    with gpupas.create_repository(tmp_path / "arc") as repo:
        v1 = repo.commit("a", expected(0))
        v2 = repo.commit("a", expected(1), parents=[v1.id])
        v2 = repo.add_snapshot(v2.id, expected(2))
        killed = repo.archive.commit(expected(3), meta={"version_name": "k"})  # as a commit killed before publishing
    record = tmp_path / "arc" / "versions" / f"{v2.id}.json"
    saved = record.read_bytes()
    record.unlink()
    with gpupas.open_repository(tmp_path / "arc") as repo:
        report = repo.verify()
        assert not report["ok"] and any(f"versions/{v2.id}.json" in p for p in report["problems"]), report
        assert any(killed.id in n for n in report["notes"])
        assert [r["name"] for r in repo.gc(min_age=0)] == [killed.id]  # the killed commit's, not version 2's
    record.write_bytes(saved)
    with gpupas.open_repository(tmp_path / "arc") as repo:
        assert repo.verify()["ok"] and repo.restore(v2.id)["w0"].tobytes() == expected(2)["w0"].tobytes()
        killed = repo.archive.commit(expected(3), meta={"version_name": "k"})
    first = tmp_path / "arc" / "versions" / f"{v1.id}.json"
    saved = first.read_bytes()
    first.unlink()
    with gpupas.open_repository(tmp_path / "arc") as repo:
        assert any(f"versions/{v1.id}.json is missing" in p for p in repo.verify()["problems"])
        assert repo.gc(min_age=0) == []  # version 1's first snapshot may be any of them
    first.write_bytes(saved)
    with gpupas.open_repository(tmp_path / "arc") as repo:
        assert [r["name"] for r in repo.gc(min_age=0)] == [killed.id] and repo.verify()["ok"]


def test_zarr_documents_a_copy_skipped_are_reported(tmp_path: Path) -> None:
    """A copy that skipped the ``zarr.json`` files of a stream folder or of ``snapshots/`` reads fine in gpupas,
    but stock Zarr, which FORMAT.md promises reads an archive, cannot open those nodes: verify says which."""
    import zarr

    from gpupas.format import keys

    with gpupas.create_repository(tmp_path / "arc") as repo:
        v = repo.commit("a", expected(0))
        stream = repo.archive.manifest(v.latest).streams[0]
    group = tmp_path / "arc" / keys.folder(stream.folder) / "zarr.json"
    array = tmp_path / "arc" / keys.array(stream.folder, next(iter(stream.codecs.values()))) / "zarr.json"
    top = tmp_path / "arc" / "snapshots" / "zarr.json"
    saved = {p: p.read_bytes() for p in (group, array, top)}
    for p in saved:
        p.unlink()
    with pytest.raises(KeyError):
        zarr.open_group(tmp_path / "arc", mode="r")["snapshots"]
    with gpupas.open_repository(tmp_path / "arc") as repo:
        assert repo.restore(v.id)["w0"].tobytes() == expected(0)["w0"].tobytes()
        report = repo.verify()
        assert not report["ok"] and len(report["problems"]) == 1, report
        assert all(str(p.relative_to(tmp_path / "arc")) in report["problems"][0] for p in saved)
    for p, data in saved.items():
        p.write_bytes(data)
    with gpupas.open_repository(tmp_path / "arc") as repo:
        assert repo.verify()["ok"]
