"""Archive-wide jobs on Dask: compaction along chains (inline and on a LocalCluster of 2 worker processes),
re-encoding, verification, 30 random kills of a compaction then a rerun, and compaction on S3 (moto)."""

from __future__ import annotations

import multiprocessing
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from s3server import s3_endpoint, s3_options, split  # noqa: F401  (fixtures)

import gpupas
from gpupas.jobs import ArchiveSpec, compact_graph, reencode_graph, run, verify_graph
from gpupas.jobs.compact import compact_archive
from gpupas.jobs.tasks import Reencode

N = 7


def snapshots(seed: int = 0) -> list[dict[str, np.ndarray]]:
    """A run whose weights drift steadily (so 'pred' pays), with rows that never change."""
    rng = np.random.default_rng(seed)
    w0 = {"w": (rng.standard_normal((128, 96)) * 0.02).astype(np.float32),
          "e": (rng.standard_normal((256, 32)) * 0.02).astype(np.float32),
          "h": rng.standard_normal(200).astype(np.float16), "n": np.arange(5, dtype=np.int64)}
    drift = {k: rng.standard_normal(v.shape) * 1e-3 for k, v in w0.items() if v.dtype != np.int64}
    out = []
    for k in range(N):
        s = {name: (v + k * drift[name] + rng.standard_normal(v.shape) * 1e-6).astype(v.dtype) if name in drift
             else v.copy() for name, v in w0.items()}
        s["e"][:128] = w0["e"][:128]
        out.append(s)
    return out


def build(location: str, snaps: list[dict[str, np.ndarray]], **kw: Any) -> list[str]:
    with gpupas.create_archive(location, **kw) as a:
        ids: list[str] = []
        for i, s in enumerate(snaps):
            ids.append(a.commit(s, snapshot=f"s{i}", base=ids[-1] if ids else None).id)
    return ids


def same_everywhere(location: str, snaps: list[dict[str, np.ndarray]], **kw: Any) -> None:
    with gpupas.open_archive(location, **kw) as a:
        for i, s in enumerate(snaps):
            got = a.restore(f"s{i}")
            assert got.keys() == s.keys()
            assert all(got[k].dtype == s[k].dtype and got[k].tobytes() == s[k].tobytes() for k in s), i


TARGET_A = {"s0": None, "s1": "s0", "s2": "s0", "s3": None, "s4": "s3", "s5": "s4", "s6": "s3"}
TARGET_B = {"s0": None, "s1": "s0", "s2": "s1", "s3": "s2", "s4": None, "s5": "s4", "s6": "s5"}


@pytest.fixture
def arc(tmp_path: Path) -> tuple[str, list[dict[str, np.ndarray]]]:
    snaps = snapshots()
    build(str(tmp_path / "a"), snaps)
    with gpupas.open_archive(tmp_path / "a") as a:
        assert any(a.manifest(s).has_pred for s in a.snapshots())  # 'grand' matters in these tests
    return str(tmp_path / "a"), snaps


def test_compaction_follows_the_plan_and_keeps_every_bit(arc: tuple[str, list[dict[str, np.ndarray]]]) -> None:
    path, snaps = arc
    job = compact_graph(path, TARGET_A, gc_min_age=0)
    assert job.decodes == N  # each link once
    first = [c.snapshot for c in job.changes]
    assert first.index("s3") < first.index("s6") and "s5" not in first  # s5: same base, its grand s3 stays
    results = run(job, "sync")
    assert any(isinstance(r, list) for r in results)  # the gc ran last
    with gpupas.open_archive(path) as a:
        assert {s: a.manifest(s).base for s in a.snapshots()} == TARGET_A
        for s in a.snapshots():  # a 'pred' tensor reads the base's base: on the planned chain
            m = a.manifest(s)
            assert m.grand is None or m.grand == a.manifest(m.base).base
        assert a.store.orphan_folders() == []
    same_everywhere(path, snaps)
    assert compact_graph(path, TARGET_A).changes == []  # nothing left to do


def test_reencode_with_another_codec_and_setting(arc: tuple[str, list[dict[str, np.ndarray]]]) -> None:
    path, snaps = arc
    results = run(reencode_graph(path, "strong", codecs=["zstd"], gc_min_age=0), "sync")
    assert sum(1 for r in results if getattr(r, "done", False)) == N
    with gpupas.open_archive(path) as a:
        for s in a.snapshots():
            m = a.manifest(s)
            assert m.setting == "strong" and all(set(st.codec_ids()) <= {"zstd"} for st in m.streams)
    same_everywhere(path, snaps)
    assert reencode_graph(path, "strong", codecs=["zstd"]).changes == []


def test_a_plan_that_leaves_snapshots_out_still_reencodes_every_snapshot(
        arc: tuple[str, list[dict[str, np.ndarray]]]) -> None:
    """`gpupas compact --plan FILE --setting strong` re-encodes every snapshot (its help, and compact_archive's),
    yet only those the plan named were: one committed after the plan was made stayed in its old form, and a rerun
    said there was nothing left to do. The others are re-encoded on their bases."""
    path, snaps = arc
    target = {k: v for k, v in TARGET_A.items() if k != "s5"}  # s5: committed after the plan
    res = compact_archive(path, target=target, setting="strong", codecs=["zstd"], scheduler="sync")
    assert sorted(r.snapshot for r in res.results if r.done) == [f"s{i}" for i in range(N)]
    with gpupas.open_archive(path) as a:
        assert {s: a.manifest(s).base for s in a.snapshots()} == TARGET_A
        assert all(a.manifest(s).setting == "strong" for s in a.snapshots())
    same_everywhere(path, snaps)

def _compact_forever(path: str) -> None:
    targets = [TARGET_B, TARGET_A]
    i = 0
    while True:
        run(compact_graph(path, targets[i % 2]), "sync")
        i += 1


# Python 3.12+ warns at each fork() of a process with threads (here gpupas's fsync pool, and in a whole-suite run
# whatever earlier tests left). The child needs none of them: gpupas makes its pool and lock anew after a fork
# (gpupas.store.local), and a child that deadlocked anyway is killed like the others.
@pytest.mark.filterwarnings(r"ignore:This process \(pid=\d+\) is multi-threaded:DeprecationWarning")
def test_killed_compactions_lose_nothing(arc: tuple[str, list[dict[str, np.ndarray]]]) -> None:
    path, snaps = arc
    ctx = multiprocessing.get_context("fork")  # a real process, killed; forked so that 30 starts stay cheap
    rng = random.Random(3)
    revisions = []
    for _ in range(30):
        p = ctx.Process(target=_compact_forever, args=(path,), daemon=True)
        p.start()
        time.sleep(rng.uniform(0.05, 0.6))
        p.kill()
        p.join()
        assert p.exitcode == -9
        with gpupas.open_archive(path) as a:  # after each kill: every snapshot whole, in its old or new form
            revisions.append(sum(a.manifest(s).revision for s in a.snapshots()))
            assert not [(s, r) for s, r in a.verify_all() if isinstance(r, Exception)]
    assert revisions[-1] > revisions[0]  # the kills landed while revisions were being made (the first child, run
    # alone, may still be importing what earlier tests imported when it is killed)
    run(compact_graph(path, TARGET_A, gc_min_age=0), "sync")  # the rerun finishes the job
    with gpupas.open_archive(path) as a:
        assert {s: a.manifest(s).base for s in a.snapshots()} == TARGET_A
        assert a.gc(min_age=0) == [] and a.store.orphan_folders() == []  # no garbage after gc
        assert all(not isinstance(r, Exception) for _, r in a.verify_all())
    same_everywhere(path, snaps)


def test_verify_graph_reads_each_chain_once_not_once_per_snapshot(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """verify walked every snapshot's whole delta chain to check it could be read: n x depth manifest reads,
    each from disk once the archive held more snapshots than its manifest cache (1,024)."""
    w = np.zeros(64, np.float32)
    n = 16
    with gpupas.create_archive(tmp_path / "a") as a:
        base = None
        for i in range(n):  # one chain of 16 (the default limit: the 17th would be stored whole)
            w = w + np.float32(1e-3)
            base = a.commit({"w": w}, base=base, snapshot=f"s{i:02d}").id
    asked: list[str] = []
    manifest = gpupas.Archive.manifest

    def counting(self: gpupas.Archive, sid: str) -> Any:
        asked.append(sid)
        return manifest(self, sid)

    monkeypatch.setattr(gpupas.Archive, "manifest", counting)
    job = verify_graph(str(tmp_path / "a"))
    assert job.decodes == n
    assert len(asked) <= 4 * n, len(asked)  # each snapshot's chain walked: n * (n + 1) / 2 = 136 and more
    monkeypatch.undo()
    assert dict(run(job, "sync")) == {f"s{i:02d}": 1 for i in range(n)}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            Client(lc) as client:
        yield client


def test_verify_on_a_local_cluster_finds_damage(arc: tuple[str, list[dict[str, np.ndarray]]], cluster: Any) -> None:
    path, _ = arc
    assert len(cluster.scheduler_info()["workers"]) == 2
    job = verify_graph(path)
    assert job.decodes == N
    assert dict(run(job, cluster)) == {f"s{i}": 4 for i in range(N)}
    with gpupas.open_archive(path) as a:
        folder = Path(path) / "snapshots" / a.manifest("s3").folders()[0]
    shard = max((p for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    got = dict(run(verify_graph(path), "sync"))
    assert all(got[f"s{i}"] == 4 for i in range(3))
    assert all(isinstance(got[f"s{i}"], str) for i in range(3, N))  # s3, and what is built on it


def test_a_delta_is_revised_while_its_base_is_damaged_only_in_tensors_it_does_not_read(tmp_path: Path) -> None:
    """A delta that dropped ``b`` restores and verifies while every chunk of its base's ``b`` is damaged; so
    it is re-encoded on that base (Archive.revise, the re-encode job), and a snapshot without ``b`` is re-based
    onto that base: each reads only the base tensors it uses. The damaged base stays damaged, nothing else
    changes a bit."""
    from gpupas.errors import IntegrityError
    from tests.conftest import flip_chunks_of

    rng = np.random.default_rng(4)
    t0 = {k: (rng.standard_normal(300_000) * 0.02).astype(np.float32) for k in "abc"}
    t1 = {k: v + np.float32(1e-4) for k, v in t0.items()}
    t2 = {k: t1[k] + np.float32(1e-4) for k in "ac"}
    t3 = {k: t1[k] - np.float32(1e-4) for k in "ac"}
    path = str(tmp_path / "a")
    with gpupas.create_archive(path) as a:
        a.commit(t0, snapshot="s0")
        m1 = a.commit(t1, snapshot="s1", base="s0")
        a.commit(t2, snapshot="s2", base="s1")
        a.commit(t3, snapshot="s3")
    assert flip_chunks_of(tmp_path / "a", m1, "b") >= 2
    with gpupas.open_archive(path) as a:
        assert a.revise("s2", setting="strong").base == "s1"
    assert [r.done for r in run(reencode_graph(path, "fast", snapshots=["s2"]), "sync")] == [True]
    assert [r.base for r in run(compact_graph(path, {"s3": "s1"}), "sync")] == ["s1"]
    with gpupas.open_archive(path) as a:
        assert (a.manifest("s2").setting, a.manifest("s3").base) == ("fast", "s1")
        for sid, want in (("s0", t0), ("s2", t2), ("s3", t3)):
            got = a.restore(sid)
            assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in want.items()}, sid
        with pytest.raises(IntegrityError, match="tensor\\(s\\) b"):
            a.restore("s1")


def test_a_missing_delta_base_is_damage_to_the_chains_through_it(
        arc: tuple[str, list[dict[str, np.ndarray]]]) -> None:
    """A snapshot whose manifest is gone while deltas are built on it: the verify job names each snapshot
    built on it as damaged, and a plan or a compaction that reads them fails as damage (exit 3) naming it,
    not as a snapshot not found (exit 1: a mistyped id) or an archive that kept changing (planned 4 times);
    nothing is changed, and with the manifest back every snapshot restores bit-exact."""
    from gpupas.errors import IntegrityError
    from gpupas.plan.archive import plan_archive

    path, snaps = arc
    gone = Path(path) / "manifests" / "s2.json"
    kept = gone.read_bytes()
    gone.unlink()
    got = dict(run(verify_graph(path), "sync"))
    assert got.keys() == {f"s{i}" for i in range(N)} - {"s2"} and got["s0"] == got["s1"] == 4
    assert all("s2" in str(got[f"s{i}"]) and "missing" in str(got[f"s{i}"]) for i in range(3, N))
    with pytest.raises(IntegrityError, match=r"s2 .*is missing"):
        compact_graph(path, {"s4": "s0"})
    with gpupas.open_archive(path) as a, pytest.raises(IntegrityError, match=r"s2 .*is missing"):
        plan_archive(a, 2.0)
    gone.write_bytes(kept)
    same_everywhere(path, snaps)


def test_compaction_on_s3_with_a_process_cluster(s3_options: dict[str, Any], cluster: Any) -> None:  # noqa: F811
    url, opts = split(s3_options)
    snaps = snapshots(1)
    build(url, snaps, storage_options=opts)
    res = compact_archive(url, target=TARGET_A, scheduler=cluster, storage_options=opts)
    assert res.stored_before > 0 and len(res.job.changes) == 4
    with gpupas.open_archive(url, storage_options=opts) as a:
        assert {s: a.manifest(s).base for s in a.snapshots()} == TARGET_A
    same_everywhere(url, snaps, storage_options=opts)
    assert dict(run(verify_graph(ArchiveSpec(url, opts)), cluster)) == {f"s{i}": 4 for i in range(N)}


def _die_after_the_first_revision(marker: str) -> None:
    """On a worker: the first revision made in the cluster kills its worker process once it is published."""
    import os
    import signal

    from gpupas.archive import Archive

    real = Archive.revise

    def revise(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = real(self, *args, **kwargs)
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return out
        os.kill(os.getpid(), signal.SIGKILL)
        return out

    revise.real = real  # type: ignore[attr-defined]
    Archive.revise = revise  # type: ignore[method-assign]


def _undo_die_after(marker: str) -> None:
    from gpupas.archive import Archive

    Archive.revise = getattr(Archive.revise, "real", Archive.revise)  # type: ignore[method-assign]


def test_a_revision_whose_worker_is_killed_counts_in_the_summary(arc: tuple[str, list[dict[str, np.ndarray]]],
                                                                 cluster: Any, tmp_path: Path) -> None:
    """A worker process killed (SIGKILL) just after it switched a snapshot to its new form: Dask runs the task
    again on another worker, which found the snapshot 'already in that form' and reported it not revised, from
    the bytes of its new form; the summary said 3 snapshot(s) revised of 4. It is counted, from the bytes the
    snapshot stored when the job was planned, and every snapshot reads back bit-exact."""
    path, snaps = arc
    marker = str(tmp_path / "killed")
    with gpupas.open_archive(path) as a:
        planned = {s: a.manifest(s).stored_bytes for s in a.snapshots()}
    cluster.run(_die_after_the_first_revision, marker)
    try:
        res = compact_archive(path, target=TARGET_A, scheduler=cluster)
    finally:
        cluster.run(_undo_die_after, marker)
    assert Path(marker).exists()  # a worker died
    revised = res.to_dict()["revised"]
    assert sorted(r["snapshot"] for r in revised if r["done"]) == ["s2", "s3", "s4", "s6"]
    with gpupas.open_archive(path) as a:
        assert all(r["stored_before"] == planned[r["snapshot"]] for r in revised)
        assert all(r["stored_after"] == a.manifest(r["snapshot"]).stored_bytes for r in revised)
        assert {s: a.manifest(s).base for s in a.snapshots()} == TARGET_A
        assert all(a.manifest(s).revision <= 1 for s in a.snapshots())
    same_everywhere(path, snaps)

def test_a_relative_archive_path_reaches_workers_started_elsewhere(
        arc: tuple[str, list[dict[str, np.ndarray]]], cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpupas -A rel compact --scheduler ADDRESS` handed the workers the path as given: a worker started in another
    directory found "no archive at rel" there (or another archive of that name, ./gpupas-archive the default).
    The job carries the absolute path."""
    path, snaps = arc
    monkeypatch.chdir(Path(path).parent)  # the cluster's workers started in the directory pytest started in
    res = compact_archive(Path(path).name, target=TARGET_A, scheduler=cluster)
    assert sorted(r.snapshot for r in res.results if r.done) == ["s2", "s3", "s4", "s6"]
    same_everywhere(path, snaps)

def test_a_worker_that_dies_is_reported_with_what_to_do() -> None:
    """A worker process that dies (out of memory, most often) is named with the remedy, not as Dask's
    KilledWorker with a task key (the command line called that unexpected)."""
    import os
    from types import SimpleNamespace

    import dask

    from gpupas.errors import GpupasError

    with pytest.raises(GpupasError, match=r"Dask worker died.*fewer workers"):
        run(SimpleNamespace(targets=[dask.delayed(os._exit)(3)]), workers=1)


def test_a_lost_scheduler_leaves_no_dask_traceback_on_stderr() -> None:
    """After the scheduler went away mid-job, distributed's client logged the asyncio.CancelledError of its given-up
    reconnection and of its close, two tracebacks, after the command line's one error line (which says it all)."""
    import asyncio
    import importlib
    import logging

    run_module = importlib.import_module("gpupas.jobs.run")
    run_module._quiet_interrupts()
    log = logging.getLogger("distributed.client")
    try:
        raise asyncio.CancelledError
    except asyncio.CancelledError:
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "", (), sys.exc_info())
    assert not log.filter(record)
    assert log.filter(log.makeRecord(log.name, logging.ERROR, __file__, 0, "Failed to reconnect", (), None))


def test_workers_that_do_not_see_the_archive_are_named_with_what_to_do(
        arc: tuple[str, list[dict[str, np.ndarray]]], tmp_path: Path) -> None:
    """Dask workers that do not see the archive's path (another machine, a container): `gpupas compact --scheduler
    ADDRESS` said "no archive at /abs/path: it has no zarr.json; create one with `gpupas init /abs/path`" of the
    archive it had just planned. The task says the job was built on it, and what the workers need."""
    import shutil

    from gpupas.errors import ArchiveNotFoundError

    path, snaps = arc
    job = compact_graph(path, TARGET_A)
    shutil.move(path, tmp_path / "elsewhere")  # where the job's tasks run, nothing is at that path
    with pytest.raises(ArchiveNotFoundError, match=r"finds no archive at .*which the job was built on: every Dask "
                                                   r"worker must see the archive") as info:
        run(job, "sync")
    assert "gpupas init" not in str(info.value)
    shutil.move(tmp_path / "elsewhere", path)
    same_everywhere(path, snaps)


@pytest.mark.parametrize("given", ["client", "address"])
def test_a_job_whose_scheduler_goes_away_is_reported_with_what_to_do(given: str) -> None:
    """The scheduler killed (or the cluster closed, or a user's client closed) while a job ran: the command line
    said "unexpected FutureCancelledError: revise-s3 cancelled for reason: scheduler-connection-lost ...; please
    report it". It says what happened and what to do."""
    import threading
    from types import SimpleNamespace

    import dask
    from distributed import Client, LocalCluster

    from gpupas.errors import GpupasError

    job = SimpleNamespace(targets=[dask.delayed(time.sleep, pure=False)(2)])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as lc, \
            Client(lc) as client:
        threading.Timer(0.5, client.close if given == "client" else lc.close).start()
        with pytest.raises(GpupasError, match=r"Dask job was cancelled .*scheduler stopped.*run the job again"):
            run(job, client if given == "client" else lc.scheduler_address)


@pytest.mark.parametrize("child", ["unchanged", "whole", "same base, re-encoded"])
def test_a_format2_pred_child_is_made_format3_before_its_base_moves(tmp_path: Path, child: str) -> None:
    """Format 1/2 'pred' tensors extrapolate along their base's own delta base, so ``Archive.revise``
    refuses to re-base a snapshot such a child reads; the plan makes the child format 3 first, also where
    the child itself changes (its own change then follows its base's), and then puts its 'grand' on the new
    chain: a second compaction finds nothing to do."""
    import shutil

    from test_fixtures import FIXTURES, expected

    from gpupas.plan.realize import first_key

    shutil.copytree(FIXTURES / "format2" / "archive", tmp_path / "a")
    with gpupas.open_archive(tmp_path / "a") as a:
        (kid,) = [s for s in a.snapshots() if a.manifest(s).has_pred]
        mid = a.manifest(kid).base
        target = {s: a.manifest(s).base for s in a.snapshots()} | {mid: None}
    if child == "whole":
        target[kid] = None
    how = Reencode("strong", None, force=True) if child == "same base, re-encoded" else None
    job = compact_graph(str(tmp_path / "a"), target, how=how)
    after = {c.key: c.after for c in job.changes}
    assert first_key(kid) in after[mid] and first_key(kid) in after[kid]
    assert (mid in after[kid]) == (child != "whole")  # a delta on mid follows mid's change
    run(job, "sync")
    with gpupas.open_archive(tmp_path / "a") as a:
        assert {s: a.manifest(s).base for s in a.snapshots()} == target
        m = a.manifest(kid)
        assert m.format == 3 and (m.grand is None or m.grand == a.manifest(m.base).base)  # on the new chain
        for sid, tensors in expected("format2").items():
            got = a.restore(sid)
            assert all(got[k].tobytes() == v.tobytes() for k, v in tensors.items()), sid
    assert compact_graph(str(tmp_path / "a"), target, how=how).changes == []


def test_a_format2_pred_child_whose_base_is_missing_is_damage(tmp_path: Path) -> None:
    """A format 1/2 'pred' child names its grand through its base's manifest: with that manifest gone, planning
    fails as damage naming the child, not as an archive that kept changing (planned 4 times)."""
    import shutil

    from test_fixtures import FIXTURES

    from gpupas.errors import IntegrityError
    from gpupas.plan.archive import plan_archive

    shutil.copytree(FIXTURES / "format2" / "archive", tmp_path / "a")
    with gpupas.open_archive(tmp_path / "a") as a:
        (kid,) = [s for s in a.snapshots() if a.manifest(s).has_pred]
        mid = a.manifest(kid).base
    (tmp_path / "a" / "manifests" / f"{mid}.json").unlink()
    with gpupas.open_archive(tmp_path / "a") as a, pytest.raises(IntegrityError, match=f"{kid}.*{mid}.*is missing"):
        plan_archive(a, 2.0)


def test_a_target_that_leaves_out_a_format2_pred_child_still_makes_it_format3_first(tmp_path: Path) -> None:
    """A bare target ({snapshot: base}) need not name every snapshot ("snapshots not in target keep their base"):
    a format 2 'pred' child left out of it was not made format 3, so re-basing its base failed mid-job with
    Archive.revise's error, which says that gpupas compact does both steps in order."""
    import shutil

    from test_fixtures import FIXTURES, expected

    shutil.copytree(FIXTURES / "format2" / "archive", tmp_path / "a")
    with gpupas.open_archive(tmp_path / "a") as a:
        (kid,) = [s for s in a.snapshots() if a.manifest(s).has_pred]
        mid = a.manifest(kid).base
    compact_archive(str(tmp_path / "a"), target={mid: None}, scheduler="sync")
    with gpupas.open_archive(tmp_path / "a") as a:
        assert a.manifest(mid).base is None and a.manifest(kid).base == mid and a.manifest(kid).format == 3
        for sid, tensors in expected("format2").items():
            got = a.restore(sid)
            assert all(got[k].tobytes() == v.tobytes() for k, v in tensors.items()), sid
    assert compact_graph(str(tmp_path / "a"), {mid: None}).changes == []


def test_a_plan_with_chains_too_deep_is_refused_before_any_revision(tmp_path: Path) -> None:
    """Each revision checks its own chain against ``max_chain`` as it runs: a plan file chaining 20 snapshots
    failed at the 17th, after re-basing 16 of them; it is refused up front, naming the snapshot."""
    from gpupas.errors import InvalidInputError

    w = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    with gpupas.create_archive(tmp_path / "a") as a:
        ids = [a.commit({"w": w + i * 1e-3}, snapshot=f"s{i:02d}").id for i in range(20)]
    target = {s: (ids[i - 1] if i else None) for i, s in enumerate(ids)}
    with pytest.raises(InvalidInputError, match="s17 17 delta links deep; at most 16"):
        compact_archive(str(tmp_path / "a"), target=target, scheduler="sync")
    with gpupas.open_archive(tmp_path / "a") as a:
        assert all(a.manifest(s).base is None for s in ids)  # nothing was changed


def test_a_plan_that_moves_a_base_checks_the_chains_of_the_snapshots_left_on_it(tmp_path: Path) -> None:
    """A snapshot the plan leaves on its base goes as deep as that base goes: re-basing c0 (c1, c2 on it) onto
    the end of a 15-link chain left c2 18 links deep, past max_chain (16), silently (each revision checks its
    own chain only). It is refused up front, naming the snapshot."""
    from gpupas.errors import InvalidInputError

    w = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    with gpupas.create_archive(tmp_path / "a") as a:
        a.commit({"w": w}, snapshot="a00")
        for i in range(1, 16):
            a.commit({"w": np.where(np.arange(1000) == i, 0, w)}, snapshot=f"a{i:02d}", base=f"a{i - 1:02d}")
        a.commit({"w": w[::-1].copy()}, snapshot="c0")
        for i in (1, 2):
            a.commit({"w": np.where(np.arange(1000) == i, 0, w[::-1])}, snapshot=f"c{i}", base=f"c{i - 1}")
        assert a.depth("a15") == 15 and a.depth("c2") == 2
    with pytest.raises(InvalidInputError, match=r"c1 17 delta links deep \(kept on a base the plan moves\)"):
        compact_archive(str(tmp_path / "a"), target={"c0": "a15"}, scheduler="sync")
    with gpupas.open_archive(tmp_path / "a") as a:
        assert a.manifest("c0").base is None  # nothing was changed
    compact_archive(str(tmp_path / "a"), target={"c0": "a13"}, scheduler="sync")  # c2 16 deep: allowed
    with gpupas.open_archive(tmp_path / "a") as a:
        assert a.depth("c2") == 16
        assert a.restore("c2")["w"].tobytes() == np.where(np.arange(1000) == 2, 0, w[::-1]).tobytes()


def test_a_compaction_started_twice_at_once_finishes(arc: tuple[str, list[dict[str, np.ndarray]]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The same plan carried out by two jobs at once: where the other job switched a snapshot first, a revision
    failed with ConflictError ("revised by another writer; run the job again"), which aborted the job; with both
    jobs at it, each aborted the other and neither finished. A revision that loses the race looks again: the
    snapshot already in the planned form is left alone, and the job goes on."""
    from gpupas.store.archive import ArchiveStore

    path, snaps = arc
    replace = ArchiveStore.replace_manifest
    raced: list[str] = []

    def other_job_first(self: Any, new: Any, expect_revision: int, check: Any = None) -> Any:
        if new.id not in raced:  # the other job revises the same snapshot the same way, just before this one
            raced.append(new.id)
            with gpupas.open_archive(path) as b:
                b.revise(new.id, base=new.base, descendants=False)
        return replace(self, new, expect_revision, check)

    monkeypatch.setattr(ArchiveStore, "replace_manifest", other_job_first)
    results = run(compact_graph(path, TARGET_A), "sync")
    assert raced and all(r.note == "already in that form" for r in results if r.snapshot in raced)
    with gpupas.open_archive(path) as a:
        assert {s: a.manifest(s).base for s in a.snapshots()} == TARGET_A
        for s in a.snapshots():
            m = a.manifest(s)
            assert m.grand is None or m.grand == a.manifest(m.base).base
    same_everywhere(path, snaps)


def test_a_local_cluster_that_cannot_start_is_a_clear_error(arc: tuple[str, list[dict[str, np.ndarray]]],
                                                             tmp_path: Path) -> None:
    """A local cluster that does not start (here: Dask's temporary directory under a file) failed with
    distributed's RuntimeError ("Cluster failed to start: ...", "Nanny failed to start."), which the command line
    called unexpected and asked to report; it names the cause and the remedy, and nothing changes."""
    import dask

    from gpupas.errors import GpupasError

    path, _ = arc
    (tmp_path / "file").write_text("")
    with dask.config.set({"temporary-directory": str(tmp_path / "file" / "dask")}), \
            pytest.raises(GpupasError, match=r"local Dask cluster .* did not start \(NotADirectoryError.*--scheduler "
                                             r"sync.*Nothing was changed"):
        compact_archive(path, target=TARGET_A, workers=1)
    with gpupas.open_archive(path) as a:
        assert all(a.manifest(s).revision == 0 for s in a.snapshots())

def test_local_names_a_local_cluster_for_every_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpupas verify` runs inline unless given --scheduler local, yet a scheduler address that did not answer said
    "leave --scheduler out for a local cluster", and `gpupas compact --scheduler local` was refused as no
    scheduler: 'local' is a local cluster of worker processes for every job, and the remedy names it."""
    import importlib
    from types import SimpleNamespace

    import dask

    from gpupas.errors import GpupasError

    assert run(SimpleNamespace(targets=[dask.delayed(sum)([1, 2])]), "local", workers=1) == [3]
    monkeypatch.setattr(importlib.import_module("gpupas.jobs.run"), "CONNECT_S", 1.0)
    with pytest.raises(GpupasError, match="give --scheduler local for a cluster of worker processes here"):
        run(SimpleNamespace(targets=[dask.delayed(sum)([1, 2])]), "tcp://127.0.0.1:1")

@pytest.mark.parametrize("answer", [None, b"HTTP/1.0 400 Bad request\r\n\r\n"])
def test_an_address_that_is_no_dask_scheduler_is_a_clear_error(arc: tuple[str, list[dict[str, np.ndarray]]],
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               answer: bytes | None) -> None:
    """--scheduler naming a service that is not a Dask scheduler: one that never answers (an HTTP server waiting
    for its request line) left the job waiting forever, one that answers failed with 'unexpected MemoryError:
    Unable to allocate 3.07 EiB' (its answer read as a frame length). Both name the address, and nothing
    changes."""
    import importlib
    import socket
    import threading

    from gpupas.errors import GpupasError

    run_module = importlib.import_module("gpupas.jobs.run")  # (gpupas.jobs.run the attribute is the function)

    path, snaps = arc
    server = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                c, _ = server.accept()
            except OSError:
                return
            conns.append(c)
            if answer is not None:
                c.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setattr(run_module, "CONNECT_S", 2.0, raising=False)
    address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    t0 = time.monotonic()
    try:
        with pytest.raises(GpupasError, match=f"no Dask scheduler answers at {address}.*Nothing was changed"):
            compact_archive(path, target=TARGET_A, scheduler=address)
    finally:
        server.close()
        for c in conns:
            c.close()
    assert time.monotonic() - t0 < 30
    with gpupas.open_archive(path) as a:
        assert all(a.manifest(s).revision == 0 for s in a.snapshots())
    same_everywhere(path, snaps)


def test_a_refused_scheduler_address_is_said_at_once(arc: tuple[str, list[dict[str, np.ndarray]]]) -> None:
    """Nothing listens at the address: the connection is refused at once, which distributed retried for its
    whole 30 s timeout before saying so."""
    import socket

    from gpupas.errors import GpupasError

    path, _ = arc
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # free once closed: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(GpupasError, match=f"no Dask scheduler answers at tcp://127.0.0.1:{port} .*refused"):
        compact_archive(path, target=TARGET_A, scheduler=f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10
    with gpupas.open_archive(path) as a:
        assert all(a.manifest(s).revision == 0 for s in a.snapshots())


INTERRUPTED = """
import operator, os, signal, socket, sys, threading, time
from types import SimpleNamespace
import dask
from gpupas.jobs import run
try:  # distributed's default port for the scheduler's HTTP server, taken (by another job, say)
    held = socket.create_server(("127.0.0.1", 8787))
except OSError:
    held = None  # taken already
marker = sys.argv[1]
started = dask.delayed(os.makedirs)(marker)
slow = [dask.delayed(time.sleep)(dask.delayed(operator.add)(20 + i, dask.delayed(bool)(started))) for i in range(4)]
def interrupt():
    while not os.path.exists(marker):
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=interrupt, daemon=True).start()
try:
    run(SimpleNamespace(targets=slow), None, workers=2)
except KeyboardInterrupt:
    print("interrupted")
"""


def test_a_local_cluster_job_interrupted_says_nothing_of_dask(tmp_path: Path) -> None:
    """Ctrl-C during a job on a local cluster: asyncio printed "Task exception was never retrieved" and an AllExit
    traceback for every result the job was waiting on (dozens, after the command line's one 'interrupted'
    line); and with distributed's default HTTP port 8787 taken (another job running), every job warned "Port
    8787 is already in use. Perhaps you already have a cluster running?" and of an unclosed socket."""
    import subprocess
    import sys

    got = subprocess.run([sys.executable, "-c", INTERRUPTED, str(tmp_path / "started")], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert got.stdout.strip() == "interrupted", got.stderr[-2000:]
    assert "never retrieved" not in got.stderr and "AllExit" not in got.stderr, got.stderr[-2000:]
    assert "8787" not in got.stderr and "unclosed" not in got.stderr, got.stderr[-2000:]


def test_a_compaction_reports_the_bytes_of_the_snapshots_it_compacted(arc: tuple[str, list[dict[str, np.ndarray]]],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits from other processes while a compaction runs are not the compaction's doing: 'stored before ->
    after' summed every snapshot listed at the end, so a job that saved bytes reported +60% where others
    had committed meanwhile. Both sums are of the snapshots there when it started."""
    from gpupas.jobs import compact as compact_module

    path, snaps = arc
    real_run = compact_module.run

    def run_while_another_commits(*args: Any, **kwargs: Any) -> Any:
        got = real_run(*args, **kwargs)
        with gpupas.open_archive(path) as b:  # another process's commit, published during the job
            b.commit({k: v + 1 if v.dtype != np.int64 else v for k, v in snaps[0].items()}, snapshot="other")
        return got

    monkeypatch.setattr(compact_module, "run", run_while_another_commits)
    res = compact_archive(path, target=TARGET_A, scheduler="sync")
    with gpupas.open_archive(path) as a:
        assert res.stored_after == sum(a.manifest(f"s{i}").stored_bytes for i in range(N))
