"""Several processes writing one archive at once, and processes killed in the middle of a commit."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpupas.versions.repository import Repository, create_repository, open_repository

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
ENV = os.environ | {"PYTHONPATH": PYTHONPATH, "PYTHONUNBUFFERED": "1"}


def tensors(tag: str) -> dict[str, np.ndarray]:
    """Deterministic tensors for a label such as ``w1-2`` or ``big-0@200000`` (@: size), so the
    parent can recompute what any child committed."""
    n = int(tag.partition("@")[2] or 3000)
    rng = np.random.default_rng([ord(c) for c in tag])
    return {"fc1.weight": (rng.standard_normal((n // 10, 10)) * 0.02).astype(np.float32),
            "fc1.bias": rng.standard_normal(n // 10).astype(np.float32),
            "fc2.weight": (rng.standard_normal((10, n // 10)) * 0.02).astype(np.float32)}


PRELUDE = f"""
import json, os, sys, time
import numpy as np
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_concurrency import tensors
from gpupas.versions.repository import open_repository
"""

WORKER = PRELUDE + r"""
path, worker, n, flag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
while not os.path.exists(flag):
    time.sleep(0.005)
out = []
with open_repository(path) as repo:
    if worker >= 0:  # a line of work: each version the parent of the next
        parent = []
        for i in range(n):
            v = repo.commit(f"w{worker}", tensors(f"{worker}-{i}"), parents=parent, message=f"{worker}-{i}",
                            hyperparameters={"worker": worker, "i": i})
            parent = [v.id]
            out.append(v.id)
        repo.tag(f"t{worker}", parent[0])
    else:  # append snapshots to the shared version 1
        for i in range(n):
            v = repo.add_snapshot(1, tensors(f"add{worker}-{i}"), step=i, source=f"add{worker}-{i}")
            out.append(v.latest)
print(json.dumps(out))
"""


def check_archive(repo: Repository) -> None:
    """Every visible version is whole and bit-exact, and the catalog equals a rebuild from the archive."""
    for v in repo.versions():
        for s in v.snapshots:
            assert repo.archive.store.has_manifest(s["id"]), (v.id, s["id"])
        label = v.snapshot()["source"] or v.message  # the label the latest snapshot was made from
        want, got = tensors(label), repo.restore(v.id)
        assert all(got[k].tobytes() == want[k].tobytes() for k in want), v.id
    live = repo.catalog().dump()
    repo.reindex()
    assert repo.catalog().dump() == live
    assert repo.verify()["ok"]


def test_processes_committing_at_once_get_distinct_ids(tmp_path: Path) -> None:
    arc, flag = tmp_path / "arc", tmp_path / "go"
    with create_repository(arc) as repo:
        repo.commit("shared", tensors("shared-0"), message="shared-0")
    workers, per = 4, 3
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(arc), str(w), str(per), str(flag)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for w in [*range(workers), -1, -2]]
    time.sleep(0.5)
    flag.touch()
    seen_max = 0
    with open_repository(arc) as reader:  # reads while they write: never a partial version
        while any(p.poll() is None for p in procs):
            for v in reader.versions():
                assert all(reader.archive.store.has_manifest(s["id"]) for s in v.snapshots)
            rows = reader.query("select m")
            assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
            seen_max = max([seen_max, *(r["id"] for r in rows)])
            time.sleep(0.05)
    results = []
    for p in procs:
        so, se = p.communicate()
        assert p.returncode == 0, se
        results.append(json.loads(so))
    ids = [i for r in results[:workers] for i in r]
    assert sorted(ids) == list(range(2, 2 + workers * per))  # distinct, no gaps
    with open_repository(arc) as repo:
        for w in range(workers):
            chain = [repo.version(i) for i in results[w]]
            assert [v.name for v in chain] == [f"w{w}"] * per
            assert [v.parents for v in chain] == [[], *[[x] for x in results[w][:-1]]]
            assert repo.tags()[f"t{w}"] == results[w][-1]
        shared = repo.version(1)
        assert len(shared.snapshots) == 1 + 2 * per  # no append lost under the record lock
        assert {s["source"] for s in shared.snapshots[1:]} == {f"add{k}-{i}" for k in (-1, -2) for i in range(per)}
        for s in shared.snapshots[1:]:
            got = repo.archive.restore(s["id"])
            assert got["fc1.bias"].tobytes() == tensors(s["source"])["fc1.bias"].tobytes()
        check_archive(repo)


KILLED = PRELUDE + r"""
import re
from gpupas.catalog import Catalog
from gpupas.store.local import LocalStore
from gpupas.versions.repository import Repository
path, mode = sys.argv[1], sys.argv[2]

def pause(word):
    print(word, flush=True)
    time.sleep(30)

if mode == "chunks":  # in the middle of the second snapshot's chunk writes
    from gpupas.store.shards import ShardSink
    add, count = ShardSink.add, [0]
    def slow_add(self, c, letter, payload):
        add(self, c, letter, payload)
        count[0] += 1
        if count[0] == 4:
            pause("chunks")
    ShardSink.add = slow_add
elif mode == "link":  # version record written to a temporary file, not yet linked into place
    link, create, key = os.link, LocalStore.create, [""]
    def keyed_create(self, k, data):  # the key, not the file name: a snapshot id may be all digits too
        key[0] = k
        return create(self, k, data)
    def slow_link(src, dst, *a, **k):
        if re.fullmatch(r"versions/[0-9]+[.]json", key[0]):
            pause("link")
        return link(src, dst, *a, **k)
    LocalStore.create, os.link = keyed_create, slow_link
elif mode == "catalog":  # inside the catalog transaction
    index = Catalog._index_version
    def slow_index(self, rec):
        index(self, rec)
        if rec["name"] == "killed":
            pause("catalog")
    Catalog._index_version = slow_index
elif mode == "after":  # record published, catalog not yet told
    Repository._after_publish = lambda self, keys: pause("after")
elif mode == "replace":  # appending a snapshot: the record lock is held
    replace, update, key = os.replace, LocalStore.update, [""]
    def keyed_update(self, k, change):
        key[0] = k
        return update(self, k, change)
    def slow_replace(src, dst, *a, **k):
        if re.fullmatch(r"versions/[0-9]+[.]json", key[0]):
            pause("replace")
        return replace(src, dst, *a, **k)
    LocalStore.update, os.replace = keyed_update, slow_replace

with open_repository(path) as repo:
    if mode == "replace":
        repo.add_snapshot(1, tensors("killed-add"), step=9, source="killed-add")
    else:
        big = [tensors(f"killed-{i}@200000") for i in range(3)]
        repo.commit("killed", big, message="killed-2@200000")
print("finished", flush=True)
"""


@pytest.mark.parametrize("mode", ["chunks", "link", "catalog", "after", "replace"])
def test_kill_during_commit(tmp_path: Path, mode: str) -> None:
    arc = tmp_path / "arc"
    with create_repository(arc) as repo:
        repo.commit("before", tensors("before-0"), message="before-0")
        repo.tag("keep", 1)
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(arc), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == mode, (line, proc.stderr.read() if proc.poll() is not None else "")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open_repository(arc) as repo:
        names = [v.name for v in repo.versions()]
        if mode in ("chunks", "link"):  # killed before publishing: no version, nothing half visible
            assert names == ["before"]
        elif mode in ("catalog", "after"):  # published whole; the catalog catches up on the next read
            assert names == ["before", "killed"]
            assert len(repo.version("killed").snapshots) == 3
            assert [r["name"] for r in repo.query("select m")] == ["before", "killed"]
        else:  # the append never happened; the version is as before
            assert names == ["before"] and len(repo.version(1).snapshots) == 1
        check_archive(repo)
        # no lock is left that blocks the next writer: the record lock died with the process
        fd = os.open(repo.root / "versions", os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if still held
        os.close(fd)
        v = repo.add_snapshot(1, tensors("before-1"), step=1, source="before-1")
        assert len(v.snapshots) == 2
        nxt = repo.commit("next", tensors("next-0"), message="next-0")
        assert nxt.id == len(names) + 1 and repo.tags() == {"keep": 1}
        check_archive(repo)
        if mode == "chunks":
            assert repo.stats()["incomplete_snapshots"] or repo.stats()["unreferenced_snapshots"]


def test_gc_removes_the_temporary_record_a_killed_commit_left(tmp_path: Path) -> None:
    """Killed between writing a version record's temporary file and linking it into place: the file stays
    in versions/, where nothing else would ever remove it. gc removes it once it is old enough that no
    write can still be in flight (a tag's write takes no lock), whatever --min-age, and keeps live ones."""
    arc = tmp_path / "arc"
    with create_repository(arc) as repo:
        repo.commit("before", tensors("before-0"), message="before-0")
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(arc), "link"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "link"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (left,) = [p for p in (arc / "versions").iterdir() if p.name.endswith(".tmp")]
    young = arc / "refs" / "tags" / f".t.json.{'0' * 32}.tmp"  # as a tag's write in flight leaves it
    young.parent.mkdir(parents=True, exist_ok=True)
    young.write_bytes(b"{}")
    with open_repository(arc) as repo:
        assert not [r for r in repo.gc(min_age=0) if r["kind"] == "temp"] and left.exists()
        old = time.time() - 7200
        os.utime(left, (old, old))
        removed = [r for r in repo.gc(min_age=0, dry_run=True) if r["kind"] == "temp"]
        assert removed == [{"kind": "temp", "name": f"versions/{left.name}", "bytes": left.stat().st_size}]
        assert left.exists()
        assert [r for r in repo.gc(min_age=0) if r["kind"] == "temp"] == removed
        assert not left.exists() and young.exists()
        check_archive(repo)


REINDEX = PRELUDE + r"""
from gpupas.catalog import Catalog
index = Catalog._index_version
def paused(self, rec):  # building the temporary catalog: the parent says when to go on (or kills this process)
    index(self, rec)
    if self.path.name.endswith(".tmp"):
        print("indexing", flush=True)
        sys.stdin.readline()
Catalog._index_version = paused
with open_repository(sys.argv[1]) as repo:
    print(json.dumps(repo.reindex()), flush=True)
"""


def test_reindex_removes_the_temporary_catalog_a_killed_reindex_left(tmp_path: Path) -> None:
    """A reindex killed while it builds the new catalog leaves its temporary database beside the catalog,
    where nothing removed it. The next reindex removes it, however young, and never one that a reindex
    still running builds: that one finishes and puts its catalog in place."""
    arc = tmp_path / "arc"
    with create_repository(arc) as repo:
        repo.commit("before", tensors("before-0"), message="before-0")

    def paused_reindex() -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", REINDEX, str(arc)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == "indexing", (line, proc.stderr.read() if proc.poll() is not None else "")
        return proc

    def temps() -> set[str]:
        return {p.name for p in arc.iterdir() if p.name.startswith(".catalog.sqlite.")}

    killed = paused_reindex()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    left = temps()
    assert any(n.endswith(".tmp") for n in left)
    live = paused_reindex()
    running = temps() - left
    assert any(n.endswith(".tmp") for n in running)
    with open_repository(arc) as repo:
        repo.reindex()
        assert temps() == running
        assert [r["name"] for r in repo.query("select m")] == ["before"]
    out, err = live.communicate("\n", timeout=120)
    assert live.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["versions"] == 1
    assert temps() == set()
    with open_repository(arc) as repo:
        check_archive(repo)


def test_two_rebases_at_once_cannot_make_a_loop(tmp_path: Path) -> None:
    """Two revisions (two compactions' plans) each make the other snapshot its base: each passes the
    check when it starts; the second to publish is refused, and both snapshots stay readable."""
    import threading

    import gpupas
    from gpupas.errors import InvalidInputError

    snaps = {"s1": tensors("loop-1@20000"), "s2": tensors("loop-2@20000")}
    with gpupas.create_archive(tmp_path / "arc") as a:
        for sid, t in snaps.items():
            a.commit(t, snapshot=sid)
    first, second = gpupas.open_archive(tmp_path / "arc"), gpupas.open_archive(tmp_path / "arc")
    checked, go, errors = threading.Event(), threading.Event(), []
    replace = first.store.replace_manifest

    def held(*args: object, **kw: object) -> None:  # s1's revision has passed its first check: wait here
        checked.set()
        go.wait(30)
        replace(*args, **kw)

    first.store.replace_manifest = held  # type: ignore[method-assign]

    def revise_s1() -> None:
        try:
            first.revise("s1", base="s2")
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=revise_s1)
    t.start()
    assert checked.wait(30)
    second.revise("s2", base="s1")  # publishes first
    go.set()
    t.join(30)
    assert len(errors) == 1 and isinstance(errors[0], InvalidInputError) and "cannot be its base" in str(errors[0])
    first.close()
    second.close()
    with gpupas.open_archive(tmp_path / "arc") as a:
        assert (a.manifest("s1").base, a.manifest("s2").base) == (None, "s1")
        for sid, t in snaps.items():
            got = a.restore(sid)
            assert all(got[k].tobytes() == v.tobytes() for k, v in t.items()), sid
        assert all(not isinstance(r, Exception) for _, r in a.verify_all())


def test_a_commit_waiting_for_gc_says_so(tmp_path: Path) -> None:
    """gc holds the snapshots' lock exclusively (here: this test holds it); a commit in another process
    waits for it, and says it waits instead of looking hung, then commits once it is free."""
    import gpupas

    with gpupas.create_archive(tmp_path / "arc") as a:
        a.commit(tensors("wait-0"))
    fd = os.open(tmp_path / "arc" / "snapshots", os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        np.save(tmp_path / "w.npy", tensors("wait-1")["fc1.weight"])
        p = subprocess.Popen([sys.executable, "-c", PRELUDE + f"""
import gpupas
with gpupas.open_archive({str(tmp_path / 'arc')!r}) as a:
    print(a.commit({{"w": np.load({str(tmp_path / 'w.npy')!r})}}).id)
"""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(p.stderr.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while not any("waiting" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("waiting for a gc, discard or tier removal to finish" in x for x in lines), lines
        assert p.poll() is None  # still waiting
    finally:
        os.close(fd)
    out = p.communicate(timeout=60)[0]
    reader.join(10)
    err = "".join(lines)
    assert p.returncode == 0, err
    with gpupas.open_archive(tmp_path / "arc") as a:
        assert a.restore(out.strip())["w"].tobytes() == np.load(tmp_path / "w.npy").tobytes()


def test_a_snapshot_discarded_while_it_is_read_is_not_called_damaged(tmp_path: Path) -> None:
    """A commit that fails removes the snapshots it already published. A reader that listed one of them
    before (plan and compact read every snapshot; verify too) is told it was discarded, not that the
    archive is damaged; verify skips it; compact refuses bad options before it reads anything."""
    import gpupas
    from gpupas.errors import InvalidInputError, SnapshotNotFoundError
    from gpupas.jobs.compact import compact_archive
    from gpupas.plan.measure import iter_bits

    path = tmp_path / "arc"
    with gpupas.create_archive(path) as writer, gpupas.open_archive(path) as reader:
        keep, gone = writer.commit(tensors("keep")), writer.commit(tensors("gone"))
        reader.manifest(gone.id)  # listed and read before the discard, as plan's reader would
        writer.discard(gone.id)
        with pytest.raises(SnapshotNotFoundError, match="discarded while it was being read"):
            list(iter_bits(reader, [keep.id, gone.id]))
        with pytest.raises(SnapshotNotFoundError):
            reader.read_planes(gone.id, 2)
        (victim,) = [p for p in (path / "snapshots").rglob("*") if p.is_file() and keep.id in str(p)
                     and "zarr.json" not in p.name and p.stat().st_size > 1000]
        victim.unlink()  # a chunk of a snapshot still published is missing: that is damage
        with pytest.raises(gpupas.IntegrityError, match="is damaged"):
            list(iter_bits(reader, [keep.id]))
        with pytest.raises(InvalidInputError, match="lack zstd"):  # before planning would read the damage
            compact_archive(str(path), codecs=["deflate"], scheduler="sync")

    repo = create_repository(tmp_path / "repo")
    repo.commit("m", tensors("v1"))
    plain = repo.archive.commit(tensors("plain"))  # as a multi-file commit publishes its first snapshot

    def discard_meanwhile(what: str, done: int, total: int) -> None:
        if what == "snapshots" and done == 0:  # listed: now the failing commit removes it
            with gpupas.open_archive(tmp_path / "repo") as other:
                other.discard(plain.id)

    result = repo.verify(progress=discard_meanwhile)
    assert result["ok"], result["problems"]
    assert result["checked"]["snapshots"] == 1
    repo.close()


def test_plan_and_compact_beside_a_compaction_and_a_failing_commit(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning reads manifests, then bits. Another process's compaction and a `gc --min-age 0` between
    the two (the old forms gone) make the planner plan again on fresh manifests, not call the archive
    damaged; a snapshot a failing commit discards while compact plans drops out of its plan."""
    import gpupas
    import gpupas.plan.archive as plan_mod
    from gpupas.jobs.compact import compact_archive

    path = tmp_path / "arc"
    with gpupas.create_archive(path) as writer:
        sids = [writer.commit(tensors("p0")).id]
        for k in range(1, 4):
            sids.append(writer.commit(tensors(f"p{k}"), base=sids[-1]).id)
        with gpupas.open_archive(path) as reader:
            assert sorted(reader.snapshots()) == sorted(sids)  # every manifest read (and kept)
            with gpupas.open_archive(path) as other:
                for sid in sids:
                    other.revise(sid, setting="fast")
                assert other.gc(min_age=0)  # the old forms are gone at once
            planned = plan_mod.plan_archive(reader, 2.0)
            assert set(planned.target) == set(sids)
            assert all(reader.restore(s)["fc1.weight"].tobytes() == tensors(f"p{k}")["fc1.weight"].tobytes()
                       for k, s in enumerate(sids))
        plain = writer.commit(tensors("plain")).id  # a failing commit's first snapshot, discarded while planned

    real = plan_mod.plan_archive

    def plan_then_discard(*args: object, **kwargs: object) -> object:
        out = real(*args, **kwargs)
        with gpupas.open_archive(path) as other:
            other.discard(plain)
        return out

    calls: list[int] = []

    def discarded_each_time(*args: Any) -> Any:  # commits failing faster than a plan can finish
        calls.append(1)
        raise SnapshotNotFoundError("no snapshot 'x'")

    from gpupas.errors import ConflictError, SnapshotNotFoundError

    monkeypatch.setattr(plan_mod, "_plan", discarded_each_time)
    with gpupas.open_archive(path) as reader, pytest.raises(ConflictError, match="kept changing while they were "
                                                                                 "planned"):
        plan_mod.plan_archive(reader, 2.0)
    assert len(calls) == plan_mod._TRIES
    monkeypatch.undo()

    monkeypatch.setattr(plan_mod, "plan_archive", plan_then_discard)
    result = compact_archive(str(path), alpha=10.0, scheduler="sync")
    assert plain not in result.target and set(result.target) == set(sids)
    monkeypatch.undo()

    import gpupas.jobs.compact as compact_mod

    with gpupas.open_archive(path) as writer:
        plain = writer.commit(tensors("plain2")).id
    real_graph = compact_mod.compact_graph

    def graph_then_discard(*args: Any, **kwargs: Any) -> Any:  # after the plan and its check: the job meets it
        out = real_graph(*args, **kwargs)
        with gpupas.open_archive(path) as other:
            other.discard(plain)
        return out

    monkeypatch.setattr(compact_mod, "compact_graph", graph_then_discard)
    done = compact_archive(str(path), alpha=10.0, setting="fast", scheduler="sync").to_dict()["revised"]
    assert len(done) > 1 and plain in {r["snapshot"] for r in done}  # the job ran to its end
    assert [r["snapshot"] for r in done if r["note"].startswith("not revised")] == [plain]
    assert [r["done"] for r in done if r["snapshot"] == plain] == [False]


def test_a_failing_commit_whose_snapshot_became_a_base_keeps_it_and_says_why(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A two-file commit publishes its first snapshot, another writer takes it as a base, then the second
    file's commit fails (the disk is full): the first snapshot stays (with a warning saying why), and the
    commit's own error is what the user sees."""
    import errno

    import gpupas
    from gpupas.archive import Archive

    repo = create_repository(tmp_path / "arc")
    real, calls, taken = Archive.commit, [], []

    def commit_then_other_writer(self: Archive, *args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:  # the other writer's commit
            return real(self, *args, **kwargs)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        m = real(self, *args, **kwargs)
        with gpupas.open_archive(tmp_path / "arc") as other:
            taken.append(other.commit(tensors("f2"), base=m.id).id)
        return m

    monkeypatch.setattr(Archive, "commit", commit_then_other_writer)
    with pytest.warns(UserWarning, match="stays"), pytest.raises(OSError, match="No space left"):
        repo.commit("m", [tensors("f1"), tensors("f1b")])
    monkeypatch.undo()
    with gpupas.open_archive(tmp_path / "arc") as a:
        assert a.restore(taken[0])["fc1.bias"].tobytes() == tensors("f2")["fc1.bias"].tobytes()
    repo.close()


def test_tags_and_names_set_by_others_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process between a check and a write: a tag deleted meanwhile is created, not refused as
    pointing at 'None'; a version named like the tag, committed meanwhile, makes the tag back out; a tag
    set while a version of that name is committed is said, since that name now reaches the tag."""
    from gpupas.errors import InvalidInputError
    from gpupas.versions.records import Records

    repo = create_repository(tmp_path / "arc")
    v1, v2 = repo.commit("m", tensors("t1")), repo.commit("m", tensors("t2"))
    repo.tag("T", v1.id)
    real_create = Records.create_tag

    def exists_then_deleted(self: Records, name: str, record: dict) -> bool:
        won = real_create(self, name, record)
        if not won:
            with open_repository(tmp_path / "arc") as other:
                other.untag(name)  # between create_tag finding it and tag() reading it
        return won

    monkeypatch.setattr(Records, "create_tag", exists_then_deleted)
    assert repo.tag("T", v2.id) == v2.id
    monkeypatch.undo()
    assert repo.tags()["T"] == v2.id

    def a_version_named_first(self: Records, name: str, record: dict) -> bool:
        with open_repository(tmp_path / "arc") as other:
            other.commit(name, tensors("named"))  # its commit checked the tags before this tag existed
        return real_create(self, name, record)

    monkeypatch.setattr(Records, "create_tag", a_version_named_first)
    with pytest.raises(InvalidInputError, match="committed meanwhile"):
        repo.tag("U", v1.id)
    monkeypatch.undo()
    assert "U" not in repo.tags() and repo.version("U").name == "U"

    real_publish = Records.publish_version

    def tagged_first(self: Records, record: dict) -> int:
        with open_repository(tmp_path / "arc") as other:
            other.tag(record["name"], v1.id)
        return real_publish(self, record)

    monkeypatch.setattr(Records, "publish_version", tagged_first)
    with pytest.warns(UserWarning, match="tag 'W' was set"):
        w = repo.commit("W", tensors("w"))
    monkeypatch.undo()
    assert repo.version(w.id).name == "W" and repo.resolve("W") == v1.id
    repo.close()


def test_best_marked_by_name_while_another_version_of_that_name_is_committed(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpupas best m 1` while another process commits a new version "m": the snapshot is picked from the
    version the name reached, and that version is marked, not the newer one (it pointed at a snapshot of
    another version: `-s best` then wrote the older version's weights as the newer's)."""
    repo = create_repository(tmp_path / "arc")
    v1 = repo.commit("m", [tensors("a1"), tensors("a2")])
    real_resolve = Repository.resolve
    calls = []

    def newer_meanwhile(self: Repository, ref: Any) -> int:
        vid = real_resolve(self, ref)
        if not calls:
            calls.append(vid)
            with open_repository(tmp_path / "arc") as other:
                other.commit("m", tensors("b1"))
        return vid

    monkeypatch.setattr(Repository, "resolve", newer_meanwhile)
    marked = repo.mark_best("m", 1)
    monkeypatch.undo()
    assert (marked.id, marked.best) == (v1.id, v1.snapshots[0]["id"])
    assert repo.version(v1.id).best == v1.snapshots[0]["id"] and repo.version("m").best is None
    repo.close()


# -- arrays a restore handed out, changed by their holder while another restore reads the cache ------------------------
def _stepped_after_the_check(monkeypatch: pytest.MonkeyPatch, holder: dict[str, np.ndarray], sid: str) -> None:
    """The holder's in-place step lands just after the cache has checked ``sid``'s arrays (another thread's)."""
    from gpupas.engine.bases import BaseCache

    get = BaseCache.get

    def stepped(self: BaseCache, s: str, *args: Any) -> Any:
        got = get(self, s, *args)
        if got is not None and s == sid:
            for v in holder.values():
                v += 1
        return got

    monkeypatch.setattr(BaseCache, "get", stepped)


def test_a_restore_never_returns_what_a_holder_stepped_after_the_check(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import gpupas

    x = tensors("held")
    with gpupas.create_archive(tmp_path / "arc") as a:
        m = a.commit(x)
    with gpupas.open_archive(tmp_path / "arc") as a:
        holder = a.restore(m.id)  # the cache's own arrays, now the caller's too
        _stepped_after_the_check(monkeypatch, holder, m.id)
        got = a.restore(m.id)  # copies, checked after copying: the step is seen and the store read instead
        assert all(got[k].tobytes() == v.tobytes() for k, v in x.items())
        assert all(holder[k].tobytes() != v.tobytes() for k, v in x.items())


def test_a_base_stepped_after_its_check_is_not_called_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gpupas

    x, y = tensors("base"), tensors("base")
    for v in y.values():
        v *= np.float32(1.001)
    with gpupas.create_archive(tmp_path / "arc") as a:
        m0 = a.commit(x)
        m1 = a.commit(y, base=m0.id)
    with gpupas.open_archive(tmp_path / "arc") as a:
        holder = a.restore(m0.id)  # the cached base's arrays, the caller's too
        _stepped_after_the_check(monkeypatch, holder, m0.id)
        got = a.restore(m1.id)  # decoded against the stepped base: the child's CRC-32 fails; read again
        assert all(got[k].tobytes() == v.tobytes() for k, v in y.items())


def test_one_repository_shared_by_threads_keeps_its_catalog_whole(tmp_path: Path) -> None:
    """An asynchronous checkpoint hook appends from its own thread while the training loop (or a second hook)
    queries the same Repository: its one SQLite connection took both threads' transactions at once ("cannot
    start a transaction within a transaction", one thread's COMMIT ending the other's, half-indexed)."""
    import warnings

    with create_repository(tmp_path / "arc") as repo:
        v = repo.commit("run", {"w": np.zeros(4, np.float32)}, metrics={"loss": [[0, 1.0]]})
        errors: list[BaseException] = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                try:
                    repo.query("select m where m.metric.loss < 2")
                except BaseException as exc:  # collected for the assertion
                    errors.append(exc)

        t = threading.Thread(target=reader)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "version published, but the catalog was not updated"
            t.start()
            try:
                for step in range(1, 151):
                    repo.log_metrics(v.id, {"loss": [[step, 1.0 / step]]})
            finally:
                stop.set()
                t.join()
        assert not errors, errors[:3]
        assert repo.query("select m")[0]["n_snapshots"] == 1 and repo.catalog().is_fresh()
        assert repo.catalog().query("SELECT n FROM metric_summary")[0]["n"] == 151


def test_a_commit_while_another_thread_is_importing_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread's first torch import (a checkpoint file read, an asynchronous hook's thread) puts the module in
    sys.modules before it defines ``torch.Tensor`` and ``torch.distributed.is_available``: a commit of NumPy arrays
    and a hook's call on another thread meanwhile failed with AttributeError ("partially initialized module
    'torch' has no attribute 'Tensor'"). A half-imported torch holds no tensor yet, and no initialized group."""
    import types

    from gpupas.integrations.training import CheckpointHook

    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # as another thread's import leaves it
    monkeypatch.setitem(sys.modules, "torch.distributed", types.ModuleType("torch.distributed"))
    w = {"w": np.arange(6, dtype=np.float32)}
    with create_repository(tmp_path / "arc") as repo, CheckpointHook(repo, "run") as hook:
        hook(w, step=1)
        assert repo.restore("run")["w"].tobytes() == w["w"].tobytes()


def test_a_reindex_leaves_the_catalog_other_threads_use_open(tmp_path: Path) -> None:
    """`Repository.reindex()` closed the catalog object and opened another: a thread that had taken the old one
    (``repo.query``, ``repo.log``, ``repo.tags`` take it, then query it) failed with sqlite3's raw "Cannot operate
    on a closed database". The rebuilt database takes the old one's place in the same catalog object."""
    with create_repository(tmp_path / "arc") as repo:
        repo.commit("run", {"w": np.zeros(4, np.float32)}, hyperparameters={"lr": 0.5})
        held = repo.catalog()  # as another thread holds it between taking and querying it
        assert repo.reindex()["versions"] == 1
        assert [r["name"] for r in held.query("SELECT name FROM versions")] == ["run"]
        errors: list[BaseException] = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                try:
                    repo.query("select m where m.hp.lr > 0.1")
                    repo.log()
                except BaseException as exc:  # collected for the assertion
                    errors.append(exc)

        t = threading.Thread(target=reader)
        t.start()
        try:
            for _ in range(20):
                repo.reindex()
        finally:
            stop.set()
            t.join()
        assert not errors, errors[:3]
