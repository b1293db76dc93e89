"""Issue 15, case by case: what an attacker or an unlucky user does to an archive.

Data loss (a commit says OK, the snapshot cannot be restored), archives someone hands you (every
byte attacker-controlled: nothing may escape the archive, explode in memory or hang), and everyday
faults (read-only archives, files truncated under a reader). Each test asserts the clear error (its
class, the snapshot or file it names, the remedy) or the correct result; reads that could hang run
with a deadline, memory is measured in a child process, and files outside the archive are checked
unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpupas
from gpupas import archive as archive_mod
from gpupas import catalog as catalog_mod
from gpupas.errors import (
    IntegrityError,
    InvalidInputError,
    SnapshotNotFoundError,
    UnsupportedDtypeError,
)
from gpupas.format.checksum import crc32c
from gpupas.format.sealed import seal, unseal
from gpupas.format.sharding import empty_index, encode_index
from gpupas.versions.records import Records
from gpupas.versions.repository import Repository, create_repository, open_repository

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
ENV = {k: v for k, v in os.environ.items() if k != "GPUPAS_ARCHIVE"} | {
    "PYTHONPATH": PYTHONPATH, "COLUMNS": "200", "GPUPAS_AUTHOR": "tester", "PYTHONUNBUFFERED": "1"}
Arg = str | bytes | Path


# -- helpers ----------------------------------------------------------------------------------------------------
def _argv(args: tuple[Arg, ...], archive: Arg | None) -> list[str | bytes]:
    out: list[str | bytes] = [sys.executable, "-m", "gpupas"]
    out += [a if isinstance(a, bytes) else str(a) for a in args]
    if archive is not None:
        out += ["-A", archive if isinstance(archive, bytes) else str(archive)]
    return out


def gp(*args: Arg, archive: Arg | None = None, timeout: float = 120, prefix: tuple[str, ...] = (),
       env: dict[str, str] | None = None, cwd: Path | None = None,
       preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    """``gpupas ARGS -A archive`` in a fresh interpreter (arguments may be bytes: not UTF-8 on purpose)."""
    res = subprocess.run([*prefix, *_argv(args, archive)], capture_output=True, env=ENV | (env or {}),
                         cwd=cwd or ROOT, timeout=timeout, preexec_fn=preexec)
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(errors="replace"),
                                       res.stderr.decode(errors="replace"))


def gp_many(*calls: tuple[Arg, ...], archive: Arg | None = None, **kw: Any) -> list[subprocess.CompletedProcess[str]]:
    """Several independent commands at once (three at a time); results in order."""
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda c: gp(*c, archive=archive, **kw), calls))


def gp_popen(*args: Arg, archive: Arg) -> subprocess.Popen[str]:
    return subprocess.Popen(_argv(args, archive), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=ROOT)


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, f"rc={res.returncode}\nstdout={res.stdout[-2000:]}\nstderr={res.stderr[-2000:]}"
    return res.stdout


def js(res: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(res))


def fails(res: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """Exit ``code``, one ``error:`` line on stderr (after any ``damaged:`` or ``not read:`` lines of verify)
    naming each of ``words`` somewhere on stderr, no traceback."""
    assert res.returncode == code, f"rc={res.returncode} (want {code})\nstdout={res.stdout}\nstderr={res.stderr}"
    lines = [x for x in res.stderr.splitlines()
             if x.strip() and not x.startswith(("warning:", "damaged:", "not read:"))]
    assert lines and lines[-1].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)
    return res.stderr


def run_py(code: str, *args: str, timeout: float = 120, prefix: tuple[str, ...] = (),
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=ENV | (env or {}), cwd=ROOT, timeout=timeout)


def last_json(res: subprocess.CompletedProcess[str]) -> Any:
    assert res.returncode == 0, f"rc={res.returncode}\nstdout={res.stdout[-3000:]}\nstderr={res.stderr[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def model(seed: int, rows: int = 64, shift: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"fc1.weight": (rng.standard_normal((rows, 16)) * 0.02 + shift).astype(np.float32),
            "fc1.bias": (rng.standard_normal(rows) + shift).astype(np.float32)}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()`` on a thread; its result (its exception re-raised); fails if it is still running after ``seconds``."""
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # handed to the caller
            box.append((False, exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"{fn} did not return within {seconds} s (a hang)")
    good, value = box[0]
    if not good:
        raise value
    return value


class Background(threading.Thread):
    """Runs ``fn`` on a thread; :meth:`result` joins and returns its value or raises its exception."""

    def __init__(self, fn: Callable[[], Any]):
        super().__init__(daemon=True)
        self.fn, self.value, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:  # handed to result()
            self.error = exc

    def result(self, timeout: float = 120) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "background work did not finish"
        if self.error is not None:
            raise self.error
        return self.value


def pause_after(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> tuple[threading.Event, threading.Event]:
    """Make ``owner.name`` stop after it ran, until ``go`` is set; ``inside`` is set when it got there."""
    inside, go = threading.Event(), threading.Event()
    real = getattr(owner, name)

    def paused(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        inside.set()
        assert go.wait(120), "never released"
        return out

    monkeypatch.setattr(owner, name, paused)
    return inside, go


def waiting_on_a_lock(proc: subprocess.Popen[str]) -> Callable[[], tuple[str, str]]:
    """Return once ``proc`` says on stderr that it waits for a lock (said after 2 s of waiting), still running;
    fail if it ends first or 60 s pass. A fixed sleep proved nothing on a loaded machine: a process still
    starting up after it passed as one waiting. Returns what finishes it: its (stdout, stderr)."""
    lines: list[str] = []
    err = proc.stderr
    assert err is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(err.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not any("waiting for" in x for x in lines):
        if not reader.is_alive() or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never said it waited for a lock (rc {proc.wait()}): {''.join(lines)}")
        time.sleep(0.05)
    assert proc.poll() is None, "".join(lines)

    def finish() -> tuple[str, str]:
        out = proc.stdout.read() if proc.stdout else ""
        proc.wait(120)
        reader.join(10)
        return out, "".join(lines)

    return finish


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (links as their target) with a hash of its bytes: to check it was left alone."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(path))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(path))] = "dir"
    return out


def sentinel(tmp: Path) -> tuple[Path, dict[str, str]]:
    """A folder outside the archive with files an escaping read or delete would touch; and its digest."""
    out = tmp / "outside"
    (out / "snapshots").mkdir(parents=True)
    (out / "secret.txt").write_bytes(b"not yours")
    (out / "snapshots" / "zarr.json").write_bytes(b"{}")
    return out, tree_digest(out)


def manifest_path(arc: Path, sid: str) -> Path:
    return arc / "manifests" / f"{sid}.json"


def read_doc(arc: Path, sid: str) -> dict[str, Any]:
    return unseal(manifest_path(arc, sid).read_bytes(), sid)


def write_doc(arc: Path, sid: str, doc: dict[str, Any]) -> None:
    doc = dict(doc, id=sid)
    manifest_path(arc, sid).write_bytes(seal(doc))


def shard_files(arc: Path, m: Any) -> list[Path]:
    return sorted(p for s in m.streams for p in (arc / "snapshots" / s.folder).rglob("c/*") if p.is_file())


def small_repo(path: Path) -> Repository:
    """Two versions of "m" (the second a delta on the first) and a tag."""
    repo = create_repository(path)
    repo.commit("m", model(1), hyperparameters={"lr": 0.1}, message="first")
    repo.commit("m", model(1, shift=0.001), parents=[1], hyperparameters={"lr": 0.05}, message="second")
    repo.tag("t1", 1)
    return repo


def test_stats_calls_a_snapshot_committed_meanwhile_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """A snapshot committed (by another process) after `stats` brought its catalog up to date and before
    it listed the snapshots is new, not unreadable; a manifest that cannot be read still is."""
    repo = small_repo(tmp_path / "arc")
    real = Repository.catalog
    late: list[str] = []

    def catalog_then_a_commit(self: Repository) -> Any:
        cat = real(self)
        if not late:
            with gpupas.open_archive(tmp_path / "arc") as other:
                late.append(other.commit(model(7)).id)
        return cat

    monkeypatch.setattr(Repository, "catalog", catalog_then_a_commit)
    s = repo.stats()
    assert late and late[0] in s["unreferenced_snapshots"] and s["unreadable_snapshots"] == []
    monkeypatch.undo()
    manifest_path(tmp_path / "arc", late[0]).write_bytes(b"{")
    assert repo.stats()["unreadable_snapshots"] == late
    repo.close()


# -- data loss: a commit says OK, the snapshot cannot be restored ------------------------------------------------
def test_gc_waits_for_commits_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpupas gc --min-age 0` from another process while a commit is between writing its chunks and
    publishing them (a plain snapshot; a version between its snapshot and its record): gc waits, and
    removes nothing the commit publishes."""
    arc = tmp_path / "arc"
    repo = create_repository(arc)
    v1 = repo.commit("m", model(1))
    (arc / "snapshots" / "dead.0123abcd").mkdir()  # garbage gc may remove

    inside, go = pause_after(monkeypatch, archive_mod, "write_streams")
    work = Background(lambda: repo.archive.commit(model(2), base=v1.latest))
    assert inside.wait(60)
    gc = gp_popen("gc", "--min-age", "0", "--json", archive=arc)
    finish = waiting_on_a_lock(gc)  # not finished while a commit was writing
    go.set()
    m = work.result()
    out, err = finish()
    assert gc.returncode == 0, err
    removed = {r["name"] for r in json.loads(out)["removed"]}
    assert "dead.0123abcd" in removed and not any(n.startswith(m.id) for n in removed), removed
    monkeypatch.undo()

    inside, go = pause_after(monkeypatch, Records, "publish_version")
    work = Background(lambda: repo.commit("m", model(3), parents=[1]))
    assert inside.wait(60)
    gc = gp_popen("gc", "--min-age", "0", "--json", archive=arc)
    finish = waiting_on_a_lock(gc)  # not finished while a version was being published
    go.set()
    v3 = work.result()
    out, err = finish()
    assert gc.returncode == 0, err
    assert json.loads(out)["removed"] == []
    monkeypatch.undo()
    repo.close()
    with open_repository(arc) as fresh:
        assert same(fresh.archive.restore(m.id), model(2))
        assert same(fresh.restore(v3.id), model(3))
        assert fresh.verify()["ok"]


def _fail_folder_fsync_after(monkeypatch: pytest.MonkeyPatch, folder: str) -> dict[str, bool]:
    """From the moment a file appears in ``folder`` (link or rename), every fsync of a folder fails with EIO."""
    armed = {"on": False}
    real_link, real_replace, real_fsync = os.link, os.replace, os.fsync

    def in_folder(dir_fd: int | None) -> bool:
        return dir_fd is not None and os.readlink(f"/proc/self/fd/{dir_fd}").endswith("/" + folder)

    def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real_link(src, dst, *args, **kwargs)
        armed["on"] |= in_folder(kwargs.get("dst_dir_fd"))

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real_replace(src, dst, *args, **kwargs)
        armed["on"] |= in_folder(kwargs.get("dst_dir_fd"))

    def fsync(fd: int) -> None:
        if armed["on"] and stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    return armed


@pytest.mark.parametrize("how", ["commit", "add_snapshot"])
def test_io_error_after_a_version_is_published_keeps_its_snapshots(tmp_path: Path, how: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder fsync fails (EIO) right after the version record appeared: what was published stays
    published and restorable (a warning says it may not survive a power loss)."""
    arc = tmp_path / "arc"
    with create_repository(arc) as repo:
        repo.commit("m", model(1))
        armed = _fail_folder_fsync_after(monkeypatch, "versions")
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            try:
                if how == "commit":
                    repo.commit("m", model(2), parents=[1])
                else:
                    repo.add_snapshot(1, model(2), step=2)
            except OSError:
                pass  # an error is allowed; losing what is visible is not
        assert armed["on"], "the version record was never published"
        monkeypatch.undo()
    with open_repository(arc) as fresh:
        for v in fresh.versions():
            for s in v.snapshots:
                assert fresh.archive.store.has_manifest(s["id"]), f"version {v.id} lost snapshot {s['id']}"
        newest = fresh.versions()[-1]
        assert same(fresh.restore(newest.id), model(2))
        assert fresh.verify()["ok"], fresh.verify()["problems"]


@pytest.mark.parametrize("how", [
    "commit",
    "add_snapshot",
])
def test_interrupt_after_a_version_is_published_keeps_its_snapshots(tmp_path: Path, how: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the catalog is brought up to date, after the version record was published: the
    version must still restore (its snapshots were published with it)."""
    arc = tmp_path / "arc"
    with create_repository(arc) as repo:
        repo.commit("m", model(1))

        def interrupted(self: Any, *keys: Any) -> int:
            raise KeyboardInterrupt

        monkeypatch.setattr(catalog_mod.Catalog, "sync", interrupted)
        monkeypatch.setattr(catalog_mod.Catalog, "refresh", interrupted)  # (a write indexes what it wrote)
        with pytest.raises(KeyboardInterrupt):
            if how == "commit":
                repo.commit("m", model(2), parents=[1])
            else:
                repo.add_snapshot(1, model(2), step=2)
        monkeypatch.undo()
    with open_repository(arc) as fresh:
        newest = max(fresh.versions(), key=lambda v: (v.id, len(v.snapshots)))
        target = newest if how == "commit" else fresh.version(1)
        assert fresh.archive.store.has_manifest(target.latest), f"published snapshot {target.latest} was deleted"
        assert same(fresh.restore(target.id), model(2))


def test_full_verify_fails_when_versions_lost_their_snapshots(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    with small_repo(arc) as repo:
        v2 = repo.add_snapshot(2, model(1, shift=0.002), step=3)
        lost = v2.latest
    manifest_path(arc, lost).unlink()
    err = fails(gp("verify", archive=arc), 3, lost, "version 2")
    assert "ok:" not in err
    fails(gp("verify", "2", archive=arc), 3, lost)
    for p in (arc / "manifests").iterdir():  # every snapshot gone: never "ok ... 0 tensors"
        p.unlink()
    res = gp("verify", archive=arc)
    fails(res, 3, "missing")
    assert "ok:" not in res.stdout


def test_checkout_refuses_an_attached_file_named_like_its_outputs(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    arc, src = tmp_path / "arc", tmp_path / "src"
    src.mkdir()
    save_file(model(1), src / "ck.safetensors")
    (src / "model.safetensors").write_bytes(b"an attachment, not the weights")
    (src / "gpupas-version.json").write_bytes(b"{}")
    ok(gp("init", archive=arc))
    ok(gp("commit", src / "ck.safetensors", "-n", "m", "-f", src / "model.safetensors", archive=arc))
    fails(gp("checkout", "m", "-o", tmp_path / "out", archive=arc), 2, "model.safetensors", "--weights-name")
    assert not (tmp_path / "out").exists()
    ok(gp("checkout", "m", "-o", tmp_path / "out", "--weights-name", "weights.safetensors", archive=arc))
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"an attachment, not the weights"
    assert same(load_file(tmp_path / "out" / "weights.safetensors"), model(1))
    ok(gp("commit", src / "ck.safetensors", "-n", "n", "-f", src / "gpupas-version.json", archive=arc))
    fails(gp("checkout", "n", "-o", tmp_path / "out2", archive=arc), 2, "gpupas-version.json")
    assert not (tmp_path / "out2").exists()


def test_checkout_refusing_an_attached_metadata_file_names_a_remedy_that_works(tmp_path: Path) -> None:
    """A version with a file attached as gpupas-version.json cannot be checked out whatever the weights' name:
    the error told to choose another name for the weights (--weights-name), which was refused the same way."""
    from safetensors.numpy import load_file, save_file

    arc, src = tmp_path / "arc", tmp_path / "src"
    src.mkdir()
    save_file(model(1), src / "ck.safetensors")
    (src / "gpupas-version.json").write_bytes(b"{}")
    ok(gp("init", archive=arc))
    ok(gp("commit", src / "ck.safetensors", "-n", "n", "-f", src / "gpupas-version.json", archive=arc))
    err = fails(gp("checkout", "n", "-o", tmp_path / "out", archive=arc), 2, "gpupas-version.json", "gpupas export")
    assert "--weights-name" not in err
    ok(gp("export", "n", "-o", tmp_path / "w.safetensors", archive=arc))
    assert same(load_file(tmp_path / "w.safetensors"), model(1))


def _listing(arc: Path) -> set[str]:
    return {str(p.relative_to(arc)) for d in ("manifests", "snapshots") for p in (arc / d).iterdir()}


def _no_new_files(arc: Path, before: set[str]) -> None:
    now = _listing(arc)
    assert now == before, f"left behind: {sorted(now - before)}"


def test_tensor_changed_in_place_during_its_commit_fails_the_commit(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A training step lands while the checkpoint is coded: the commit fails clearly, stores nothing."""
    arc = tmp_path / "arc"
    a = gpupas.create_archive(arc)
    w = model(1, rows=4096)
    s1 = a.commit(w)
    real = archive_mod.write_streams

    def stepped(*args: Any, **kwargs: Any) -> Any:
        w["fc1.weight"] += np.float32(0.5)  # the optimizer step, in place
        return real(*args, **kwargs)

    monkeypatch.setattr(archive_mod, "write_streams", stepped)
    for base in (None, s1.id):
        before = _listing(arc)
        with pytest.raises(InvalidInputError, match="changed while it was being committed") as err:
            a.commit(w, base=base)
        assert "fc1.weight" in str(err.value) and "copy" in str(err.value)
        _no_new_files(arc, before)
    monkeypatch.undo()
    a.close()


def test_training_thread_stepping_while_commits_run(tmp_path: Path) -> None:
    """A thread steps the weights in place (+=) while another commits them, each a delta on the last: every
    commit raises the clear error or publishes a snapshot that restores bit-exact (its CRC-32s, checked on
    decode, are the manifest's). Bases are decoded from the archive here (cache_size=0): the in-memory base
    cache has its own bug, pinned by test_base_stepped_in_place_during_a_commit and tests/test_stress.py."""
    arc = tmp_path / "arc"
    a = gpupas.create_archive(arc, cache_size=0)
    w = {"w": np.random.default_rng(0).standard_normal(1 << 19).astype(np.float32),
         "b": np.zeros(1 << 16, np.float32)}
    stop = threading.Event()

    def train() -> None:
        pace = np.random.default_rng(1)
        while not stop.is_set():
            w["w"] += np.float32(1e-3)
            w["b"] += np.float32(1.0)
            time.sleep(float(pace.uniform(0, 0.03)))

    t = threading.Thread(target=train, daemon=True)
    t.start()
    published, refused, base = [], 0, None
    try:
        for _ in range(12):
            try:
                m = a.commit(w, base=base)
            except InvalidInputError as exc:
                assert "changed while it was being committed" in str(exc)
                refused += 1
                continue
            published.append(m)
            base = m.id
    finally:
        stop.set()
        t.join(30)
    a.close()
    with gpupas.open_archive(arc) as fresh:
        for m in published:
            assert fresh.verify(m.id) == 2
            got = fresh.restore(m.id)
            assert {k: zlib.crc32(v.tobytes()) for k, v in got.items()} == {e.name: e.crc32 for e in m.tensors}
    assert len(published) + refused == 12


@pytest.mark.parametrize("how", ["same arrays, step before staging", "a copy, the live base steps while coding"])
def test_base_stepped_in_place_during_a_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """The previous commit handed the archive the live weights; the optimizer steps them during the next
    commit (of the same arrays, or of a copy, as the error message recommends): the snapshot restores to what
    was committed, or the commit fails."""
    arc = tmp_path / "arc"
    a = gpupas.create_archive(arc)
    live = {"w": np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)}
    s1 = a.commit(live)  # checkpoint 1 of the live weights
    if how.startswith("same"):
        target, hook = live, "stage_all"
    else:
        target, hook = {"w": live["w"] + np.float32(0.01)}, "write_streams"  # every row changed: no row mask
    real = getattr(archive_mod, hook)

    def stepping(*args: Any, **kwargs: Any) -> Any:
        live["w"] += np.float32(0.5)  # the training thread's step lands here
        return real(*args, **kwargs)

    monkeypatch.setattr(archive_mod, hook, stepping)
    try:
        s2 = a.commit(target, base=s1.id)
    except (InvalidInputError, IntegrityError):
        return  # refusing is fine
    finally:
        monkeypatch.undo()
        a.close()
    with gpupas.open_archive(arc) as fresh:
        assert same(fresh.restore(s2.id), {"w": target["w"]})


_DISCARD = """
import sys, gpupas
a = gpupas.open_archive(sys.argv[1])
try:
    a.discard(sys.argv[2])
    print("discarded")
except gpupas.GpupasError as exc:
    print(type(exc).__name__, exc)
"""


def test_base_discarded_by_another_process_before_or_during_a_commit(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    arc = tmp_path / "arc"
    a = gpupas.create_archive(arc)
    s1 = a.commit(model(1))
    s2 = a.commit(model(1, shift=0.01), base=s1.id)
    assert a.snapshots() == [s1.id, s2.id]  # this process has s2 cached as a base
    res = run_py(_DISCARD, str(arc), s2.id)  # a leaf: another process may discard it
    assert res.stdout.strip() == "discarded", res.stdout + res.stderr
    before = _listing(arc)
    with pytest.raises(SnapshotNotFoundError, match=s2.id):
        a.commit(model(1, shift=0.02), base=s2.id)
    _no_new_files(arc, before)

    inside, go = pause_after(monkeypatch, archive_mod, "write_streams")
    work = Background(lambda: a.commit(model(1, shift=0.03), base=s1.id))
    assert inside.wait(60)
    proc = subprocess.Popen([sys.executable, "-c", _DISCARD, str(arc), s1.id], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    finish = waiting_on_a_lock(proc)  # the discard waits for the commit using its snapshot
    go.set()
    s3 = work.result()
    out, err = finish()
    assert out.startswith("InvalidInputError") and "is read by" in out and s3.id in out, out + err
    monkeypatch.undo()
    a.close()
    with gpupas.open_archive(arc) as fresh:
        assert same(fresh.restore(s3.id), model(1, shift=0.03))
        assert s3.base == s1.id and fresh.verify(s3.id) == 2


ODD = ["wéird ☃ \u202e rtl", "[/]", "[bold red]x[/bold red]", "tab\tnew\nline", "quote\"'`", "100%_sq\\l';--",
       "ends with space ", "e\u0301 (combining)", "\U0001f600 emoji", "[link=file:///etc/passwd]x[/link]"]


def test_unusual_names_and_messages_are_listed_or_refused(tmp_path: Path) -> None:
    """Whatever text a commit accepts is listed by log, found by query and kept by a rebuilt catalog;
    what it cannot keep is refused with a clear error (nothing published)."""
    arc = tmp_path / "arc"
    with create_repository(arc) as repo:
        for i, text in enumerate(ODD):
            repo.commit(f"odd{i}", {text: np.full(3, i, np.float32), f"x.{text}": np.zeros(2, np.int8)},
                        message=text, author=text, hyperparameters={text: text, "i": i}, metrics={text: [0.5, 0.25]})
        for bad in ("caf\udce9", "bad\ud800"):  # lone surrogates: not text
            with pytest.raises(InvalidInputError, match="UTF-8"):
                repo.commit("bad", {bad: np.zeros(2, np.float32)})
            with pytest.raises(InvalidInputError, match="UTF-8"):
                repo.commit("bad", {"w": np.zeros(2, np.float32)}, message=bad)
        for fname in ("notes [v1].txt", "caf\udce9.txt", "../escape.txt", "a//b"):
            with pytest.raises(InvalidInputError, match="file name"):
                repo.commit("bad", {"w": np.zeros(2, np.float32)}, files={fname: b"x"})
        assert len(repo.versions()) == len(ODD)
    for fresh_catalog in (False, True):
        with open_repository(arc) as repo:
            if fresh_catalog:
                repo.reindex()
            rows = {r["name"]: r for r in repo.log()}
            assert sorted(rows) == sorted(f"odd{i}" for i in range(len(ODD)))
            for i, text in enumerate(ODD):
                assert rows[f"odd{i}"]["message"] == text and rows[f"odd{i}"]["author"] == text
                sid = repo.version(f"odd{i}").latest
                names = {r["name"] for r in repo.catalog().query("SELECT name FROM tensors WHERE snapshot=?", (sid,))}
                assert names == {text, f"x.{text}"}
                found = repo.query(f"select m where m.name = \"odd{i}\" and m.hp.i = {i}")
                assert [r["id"] for r in found] == [repo.version(f"odd{i}").id]
            assert len(repo.query("select m where m.hp.i >= 0")) == len(ODD)
    logged = js(gp("log", "--json", archive=arc))
    assert sorted(r["message"] for r in logged) == sorted(ODD)


def test_latin1_bytes_from_the_command_line(tmp_path: Path) -> None:
    """Arguments that are not UTF-8 (a Latin-1 terminal): refused clearly (exit 2, nothing stored), or stored
    and then listed by log."""
    from safetensors.numpy import save_file

    arc, src = tmp_path / "arc", tmp_path / "src"
    src.mkdir()
    save_file(model(1), src / "ck.safetensors")
    notes = os.fsencode(src) + b"/caf\xe9 notes.txt"
    Path(os.fsdecode(notes)).write_bytes(b"notes")
    ok(gp("init", archive=arc))
    ck = src / "ck.safetensors"
    extras = ([b"-m", b"caf\xe9 na\xefve"], [b"--author", b"J\xf6rg"], [b"--hp", b"caf\xe9=1"],
              [b"--hp", b"lr=caf\xe9"], [b"--metric", b"acc\xe9=0.5"], [b"-f", notes])
    results = gp_many(*[("commit", ck, "-n", f"latin{i}", *extra) for i, extra in enumerate(extras)], archive=arc)
    for i, res in enumerate(results):
        if res.returncode == 0:
            assert f"latin{i}" in {r["name"] for r in js(gp("log", "--json", archive=arc))}
        else:
            fails(res, 2)
    assert not (arc / "versions").exists() or len(js(gp("log", "--json", archive=arc))) == sum(
        1 for _ in (arc / "versions").glob("*.json"))
    fails(gp("query", b"select m where m.hp.caf\xe9 > 0", archive=arc), 2)
    fails(gp("show", b"caf\xe9", archive=arc), 2)  # not a name: bad input, not a crash
    # an archive whose own path is not UTF-8
    latin = os.fsencode(tmp_path) + b"/caf\xe9/arc"
    ok(gp("init", archive=latin))
    ok(gp("commit", ck, "-n", "m", archive=latin))
    assert [r["name"] for r in js(gp("log", "--json", archive=latin))] == ["m"]
    ok(gp("verify", archive=latin))


# -- an archive someone hands you ------------------------------------------------------------------------------
def test_manifest_folders_outside_the_archive_are_refused(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    out, digest = sentinel(tmp_path)
    a = gpupas.create_archive(arc)
    s1 = a.commit(model(1))
    doc = read_doc(arc, s1.id)
    bad_folders = ["../../outside", "../outside/snapshots", str(out), "/etc", "..", ".", "", "a/b", "x/../..",
                   "snapshots/../../outside", "\u0000x", "x" * 300, 7, None]
    for i, folder in enumerate(bad_folders):
        d = json.loads(json.dumps(doc))
        d["streams"][0]["folder"] = folder
        write_doc(arc, f"evil{i}", d)
    legacy = {"format": 2, "id": "legacy", "created": "2020-01-01", "base": None, "data": "../../outside",
              "length": 4, "chunks": "z", "tensors": [{"name": "w", "dtype": "float32", "shape": [1], "offset": 0,
                                                         "enc": "mat", "crc32": 0, "nbytes": 4}]}
    manifest_path(arc, "legacy").write_text(json.dumps(legacy))
    a.close()
    with gpupas.open_archive(arc) as fresh:
        for sid in [f"evil{i}" for i in range(len(bad_folders))] + ["legacy"]:
            for op in (fresh.restore, fresh.verify):
                with pytest.raises(IntegrityError, match=sid) as err:
                    within(30, lambda op=op, sid=sid: op(sid))
                assert "restore the archive from a copy" in str(err.value) or "damaged" in str(err.value)
            within(30, lambda sid=sid: fresh.discard(sid))
            assert not manifest_path(arc, sid).exists()
        results = dict(within(60, lambda: list(fresh.verify_all())))
        assert results == {s1.id: 2}
        assert same(fresh.restore(s1.id), model(1))
    assert tree_digest(out) == digest
    ok(gp("gc", "--min-age", "0", archive=arc))
    assert tree_digest(out) == digest


def test_a_manifest_flag_that_is_not_a_boolean_is_named(tmp_path: Path) -> None:
    """A tensor's ``ctx`` or ``rot`` that is not true or false: the message names the field that is."""
    from gpupas.format.manifest import Manifest

    arc = tmp_path / "arc"
    with gpupas.create_archive(arc) as a:
        s1 = a.commit(model(1))
    doc = read_doc(arc, s1.id)
    for flag in ("ctx", "rot"):
        d = json.loads(json.dumps(doc))
        d["tensors"][0][flag] = "yes"
        with pytest.raises(IntegrityError, match=rf"{flag} of tensor '{d['tensors'][0]['name']}' is not true or false"):
            Manifest.from_bytes(seal(d), s1.id)

def test_discard_of_a_hostile_manifest_spares_other_snapshots(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    a = gpupas.create_archive(arc)
    victim = a.commit(model(1))
    other = a.commit(model(2))
    doc = read_doc(arc, other.id)
    doc["streams"][0]["folder"] = victim.streams[0].folder
    write_doc(arc, "evil", doc)
    doc["streams"][0]["folder"] = "zarr.json"
    write_doc(arc, "evil2", doc)
    a.close()
    with gpupas.open_archive(arc) as fresh:
        with pytest.raises(IntegrityError):
            fresh.restore("evil")
        fresh.discard("evil")
        assert same(fresh.restore(victim.id), model(1))
        fresh.discard("evil2")
        assert (arc / "snapshots" / "zarr.json").is_file()


def _template(arc: Path) -> tuple[gpupas.Manifest, dict[str, Any]]:
    """A snapshot of one float32 tensor of 65536 values: one stream, one 256 KiB chunk, one shard."""
    with gpupas.create_archive(arc) as a:
        m = a.commit({"w": np.arange(65536, dtype=np.float32)})
    return m, read_doc(arc, m.id)


def plant_chunk(arc: Path, template: gpupas.Manifest, doc: dict[str, Any], sid: str, body: bytes,
                letter: str) -> None:
    """Snapshot ``sid``: the template's manifest, its only chunk replaced by ``body`` coded as ``letter``."""
    d = json.loads(json.dumps(doc))
    folder = f"{sid}.0000abcd"
    d["streams"][0]["folder"] = folder
    d["streams"][0]["chunks"] = letter
    dst = arc / "snapshots" / folder
    shutil.copytree(arc / "snapshots" / template.streams[0].folder, dst)
    for c in dst.glob("*/c"):
        shutil.rmtree(c)
    codec = d["streams"][0]["codecs"][letter]
    (dst / codec / "c").mkdir()
    payload = body + struct.pack("<I", crc32c(body))
    index = empty_index(d["streams"][0]["shard_chunks"])
    index[0] = (0, len(payload))
    (dst / codec / "c" / "0").write_bytes(payload + encode_index(index))
    write_doc(arc, sid, d)


_PROBE = r"""
import json, os, resource, sys, time
limit = int(os.environ.get("PROBE_RLIMIT_AS", "0"))
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import gpupas
root, sids = sys.argv[1], sys.argv[2:]
out = {}
for sid in sids:
    for op in ("restore", "verify"):
        t = time.time()
        try:
            with gpupas.open_archive(root) as a:
                getattr(a, op)(sid)
            res = ["ok", ""]
        except BaseException as exc:
            res = [type(exc).__name__, str(exc)]
        out[op + " " + sid] = res + [time.time() - t]
try:  # this process's own peak: ru_maxrss keeps the parent's RSS across fork and exec on Linux
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
    out["maxrss_mb"] = int(hwm[0].split()[1]) / 1024
except (OSError, IndexError):
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def probe(arc: Path, *sids: str, rlimit_as: int = 0, timeout: float = 120) -> dict[str, Any]:
    """Restore and verify each snapshot in a child process: the error (class, message, seconds) and its peak memory."""
    return last_json(run_py(_PROBE, str(arc), *sids, timeout=timeout, env={"PROBE_RLIMIT_AS": str(rlimit_as)}))


def test_declared_shapes_beyond_memory_are_refused_before_allocating(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    _, doc = _template(arc)
    for sid, n, chunk in (("huge44", 1 << 44, 1 << 30), ("huge40", 1 << 40, 1 << 30)):
        d = json.loads(json.dumps(doc))
        st, t = d["streams"][0], d["tensors"][0]
        st.update(length=4 * n, chunk_size=chunk, chunks="z" * (4 * n // chunk), shard_chunks=4096)
        t.update(shape=[n], nbytes=4 * n)
        write_doc(arc, sid, d)
    got = probe(arc, "huge44", "huge40")
    for key in ("restore huge44", "verify huge44", "restore huge40", "verify huge40"):
        kind, msg, seconds = got[key]
        assert kind == "IntegrityError", got
        assert key.split()[1] in msg and "damaged or hostile" in msg
        assert seconds < 60  # a refusal, not a decode (a loaded machine is slow to load kernels)
    assert got["maxrss_mb"] < 600, got  # nothing of the declared size was allocated
    res = gp("verify", archive=arc, timeout=120)
    fails(res, 3, "huge44", "huge40")


def test_declared_size_is_bounded_by_the_stored_bytes_under_a_memory_limit(tmp_path: Path) -> None:
    import resource

    arc = tmp_path / "arc"
    _, doc = _template(arc)
    n = 1 << 30  # 4 GiB of float32, below this machine's memory; the shard holds 4 KiB
    d = json.loads(json.dumps(doc))
    d["streams"][0].update(length=4 * n, chunk_size=1 << 30, chunks="z" * 4, shard_chunks=4)
    d["tensors"][0].update(shape=[n], nbytes=4 * n)
    write_doc(arc, "declares4g", d)
    limit = 3 << 30  # the 4 GiB the manifest declares cannot be had; numba and the rest fit
    got = probe(arc, "declares4g", rlimit_as=limit)
    assert got["restore declares4g"][0] == "IntegrityError", got
    assert got["verify declares4g"][0] == "IntegrityError", got

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    res = gp("verify", archive=arc, preexec=cap)
    fails(res, 3, "declares4g")


def test_verify_reports_a_snapshot_coded_for_a_gpu_and_checks_the_rest(tmp_path: Path) -> None:
    from gpupas.errors import CodecUnavailableError

    arc = tmp_path / "arc"
    with gpupas.create_archive(arc) as a:
        gpu, cpu = a.commit(model(1)), a.commit(model(2))
    doc = read_doc(arc, gpu.id)
    doc["streams"][0]["codecs"]["a"] = "nvcomp-ans"
    doc["streams"][0]["chunks"] = "a" * len(doc["streams"][0]["chunks"])
    write_doc(arc, gpu.id, doc)
    with gpupas.open_archive(arc) as fresh:
        with pytest.raises(CodecUnavailableError, match="nvcomp-ans"):
            fresh.restore(gpu.id)
        results = dict(fresh.verify_all())
    assert results[cpu.id] == 2 and isinstance(results[gpu.id], CodecUnavailableError)


def test_inflation_bombs_stop_at_the_declared_chunk_size(tmp_path: Path) -> None:
    """Chunks of 256 KiB whose bodies inflate to 1 GiB: refused after at most one byte past the chunk size."""
    import zstandard
    from isal import isal_zlib

    arc = tmp_path / "arc"
    template, doc = _template(arc)
    mib = bytes(1 << 20)
    gz = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
    plant_chunk(arc, template, doc, "deflatebomb", b"".join([gz.compress(mib) for _ in range(1024)] + [gz.flush()]),
                "d")
    zs = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    plant_chunk(arc, template, doc, "zstdbomb", b"".join([zs.compress(mib) for _ in range(1024)] + [zs.flush()]), "z")
    zs = zstandard.ZstdCompressor(level=1).compressobj(size=1 << 30)  # a frame that declares 1 GiB of content
    plant_chunk(arc, template, doc, "zstdsized", b"".join([zs.compress(mib) for _ in range(1024)] + [zs.flush()]),
                "z")
    raw = b"\x28\xb5\x2f\xfd\xa0" + struct.pack("<I", 1 << 18)  # gpupas's raw frame, then RLE blocks past the size
    rle = [((1 << 1) | ((1 << 17) << 3)).to_bytes(3, "little") + b"\0" for _ in range(8191)]  # 1 GiB of zeros
    last = (1 | (1 << 1) | ((1 << 17) << 3)).to_bytes(3, "little") + b"\0"
    plant_chunk(arc, template, doc, "rlebomb", raw + b"".join(rle) + last, "z")
    sids = ["deflatebomb", "zstdbomb", "zstdsized", "rlebomb"]
    got = probe(arc, *sids)
    for sid in sids:
        for op in ("restore", "verify"):
            kind, msg, seconds = got[f"{op} {sid}"]
            assert kind == "IntegrityError" and sid in msg and "chunk 0" in msg, got
            assert seconds < 60, got  # stopped at the cap: no 1 GiB decode
    assert got["maxrss_mb"] < 600, got  # never the 1 GiB a bomb inflates to


def _cycle(arc: Path) -> tuple[gpupas.Manifest, gpupas.Manifest]:
    a = gpupas.create_archive(arc)
    s1 = a.commit(model(1, rows=256))
    s2 = a.commit(model(1, rows=256, shift=0.01), base=s1.id)
    a.close()
    doc = read_doc(arc, s2.id)
    assert any(t["enc"] != "mat" for t in doc["tensors"])
    write_doc(arc, "loopa", dict(doc, base="loopb"))
    write_doc(arc, "loopb", dict(doc, base="loopa"))
    write_doc(arc, "loopc", dict(doc, base="loopd"))  # a chain into the loop
    write_doc(arc, "loopd", dict(doc, base="loopa"))
    return s1, s2


def test_delta_chains_that_loop_are_damage_not_recursion(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    s1, s2 = _cycle(arc)
    doc = read_doc(arc, s2.id)
    write_doc(arc, "selfbase", dict(doc, base="selfbase"))
    write_doc(arc, "selfgrand", dict(doc, grand="selfgrand"))
    with gpupas.open_archive(arc) as a:
        for sid in ("loopa", "loopb", "loopc"):
            for op in (a.restore, a.verify, a.depth):
                with pytest.raises(IntegrityError, match="loop"):
                    within(30, lambda op=op, sid=sid: op(sid))
            with pytest.raises(IntegrityError):
                within(30, lambda sid=sid: a.commit(model(2, rows=256), base=sid))
        for sid in ("selfbase", "selfgrand"):
            with pytest.raises(IntegrityError, match=sid):
                a.restore(sid)
        results = dict(within(60, lambda: list(a.verify_all())))
        assert results[s1.id] == 2 and results[s2.id] == 2
        assert all(isinstance(results[s], IntegrityError) for s in ("loopa", "loopb", "loopc", "loopd", "selfbase"))
        assert same(a.restore(s2.id), model(1, rows=256, shift=0.01))


def test_verify_command_reports_delta_chains_that_loop(tmp_path: Path) -> None:
    import resource

    arc = tmp_path / "arc"
    _cycle(arc)

    def cap() -> None:  # the walk grows without bound: keep it from eating the machine
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    try:
        res = gp("verify", archive=arc, timeout=20, preexec=cap)
    except subprocess.TimeoutExpired:
        pytest.fail("`gpupas verify` did not answer within 20 s on an archive with a delta loop")
    err = fails(res, 3, "loopa", "loopb", "loop")
    assert "Recursion" not in err and "Memory" not in err


def _edit_record(arc: Path, key: str, change: Callable[[dict[str, Any]], None]) -> None:
    path = arc / key
    doc = unseal(path.read_bytes(), key)
    change(doc)
    path.write_bytes(seal(doc))


def test_version_parents_in_a_cycle_are_all_listed(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    with small_repo(arc) as repo:
        repo.commit("n", model(3), parents=[2])
    _edit_record(arc, "versions/1.json", lambda d: d.__setitem__("parents", [3]))  # 1 <- 3 <- 2 <- 1
    _edit_record(arc, "versions/2.json", lambda d: d.__setitem__("parents", [2, 1]))  # and its own parent
    logs = gp_many(("log", "--json"), ("log", "1", "--json"), ("log", "2", "--json"), ("log", "n", "--json"),
                   archive=arc, timeout=60)
    for res in logs:
        assert sorted(r["id"] for r in js(res)) == [1, 2, 3]
    tree, shown, found = gp_many(("log",), ("show", "2", "--json"), ("query", "select m where m.parent = 1", "--json"),
                                 archive=arc, timeout=60)
    ok(tree)
    assert js(shown)["id"] == 2
    assert sorted(r["id"] for r in js(found)) == [2]


def test_verify_reports_version_parents_in_a_cycle(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    with small_repo(arc) as repo:
        repo.commit("n", model(3), parents=[2])
    _edit_record(arc, "versions/1.json", lambda d: d.__setitem__("parents", [3]))
    fails(gp("verify", archive=arc), 3, "cycle")


_NON_REGULAR = r"""
import json, os, sys, threading, time
import gpupas
root, child, target, kind = sys.argv[1:5]
keep = target + ".keep"
os.rename(target, keep)
if kind == "fifo":
    os.mkfifo(target)
elif kind == "dir":
    os.mkdir(target)
elif kind == "devzero":
    os.symlink("/dev/zero", target)
elif kind == "outside":
    os.symlink(sys.argv[5], target)
out = {}
for op in ("restore", "verify", "verify_all", "snapshots"):
    box = []
    def run():
        try:
            with gpupas.open_archive(root) as a:
                if op == "verify_all":
                    r = [v for _, v in a.verify_all() if isinstance(v, Exception)]
                    box.append(["errors", [f"{type(e).__name__}: {e}" for e in r]])
                elif op == "snapshots":
                    box.append(["ok", a.snapshots()])
                else:
                    getattr(a, op)(child)
                    box.append(["ok", ""])
        except BaseException as exc:
            box.append([type(exc).__name__, str(exc)])
    t = threading.Thread(target=run, daemon=True)
    t0 = time.time()
    t.start()
    t.join(60)
    out[op] = box[0] if box else ["HANG", ""]
    out[op].append(time.time() - t0)
if kind == "dir":
    os.rmdir(target)
else:
    os.unlink(target)
os.rename(keep, target)
print(json.dumps(out))
"""


@pytest.mark.parametrize("kind", ["fifo", "dir", "devzero", "outside"])
def test_shards_and_manifests_replaced_by_non_regular_files(tmp_path: Path, kind: str) -> None:
    """A FIFO, a directory, a link to /dev/zero or to a file outside, in place of a shard or of a base's
    manifest: a clear integrity error naming the file, promptly, without reading it; the rest still reads."""
    arc = tmp_path / "arc"
    out, digest = sentinel(tmp_path)
    a = gpupas.create_archive(arc)
    s1 = a.commit(model(1, rows=1024))
    s2 = a.commit(model(1, rows=1024, shift=0.01), base=s1.id)
    s3 = a.commit(model(3))
    a.close()
    shutil.copy(shard_files(arc, s1)[0], out / "copy-of-shard")
    shutil.copy(manifest_path(arc, s1.id), out / "copy-of-manifest")
    digest = tree_digest(out)
    for target, outside in ((shard_files(arc, s1)[0], out / "copy-of-shard"),
                            (manifest_path(arc, s1.id), out / "copy-of-manifest")):
        got = last_json(run_py(_NON_REGULAR, str(arc), s2.id, str(target), kind, str(outside), timeout=300))
        for op in ("restore", "verify"):
            what, msg, seconds = got[op]
            assert what in ("IntegrityError", "LinkedError"), got  # LinkedError: an IntegrityError naming the link
            assert str(target.relative_to(arc)) in msg and ("link" in msg or "not a regular file" in msg), got
            assert seconds < 60, got  # promptly: never blocked on the FIFO
        errors = got["verify_all"][1]
        assert len(errors) == 2 and all(e.startswith(("IntegrityError", "LinkedError")) for e in errors), \
            got  # s1 and s2, not s3
        assert got["snapshots"][0] in ("ok", "IntegrityError"), got
    assert tree_digest(out) == digest
    with gpupas.open_archive(arc) as fresh:
        assert fresh.verify(s2.id) == 2 and same(fresh.restore(s3.id), model(3))


def test_snapshot_listing_survives_one_damaged_manifest(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    with gpupas.create_archive(arc) as a:
        s1, s2 = a.commit(model(1)), a.commit(model(2))
    data = bytearray(manifest_path(arc, s1.id).read_bytes())
    data[30] ^= 1
    manifest_path(arc, s1.id).write_bytes(bytes(data))
    with gpupas.open_archive(arc) as fresh:
        assert s2.id in fresh.snapshots()


def test_symlinks_planted_in_and_around_the_archive(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    out, _ = sentinel(tmp_path)
    (out / "victim.safetensors").write_bytes(b"VICTIM")
    with small_repo(arc):
        pass
    (out / "folder").mkdir()
    (out / "folder" / "keep").write_bytes(b"keep")
    os.symlink(out / "folder", arc / "snapshots" / "evil.0123abcd")  # a link where gc looks for garbage
    os.symlink(out / "secret.txt", arc / "manifests" / "linked.json")
    digest = tree_digest(out)
    gone = js(gp("gc", "--min-age", "0", "--json", archive=arc))["removed"]
    reported = {r["name"] for r in gone}
    assert ("evil.0123abcd" in reported) == (not os.path.lexists(arc / "snapshots" / "evil.0123abcd")), reported
    assert tree_digest(out) == digest
    ok(gp("log", archive=arc))
    fails(gp("verify", archive=arc), 3, "linked")
    (arc / "manifests" / "linked.json").unlink()
    # exports never write through a link at the output path or at a temporary name beside it
    dst = tmp_path / "exports"
    dst.mkdir()
    os.symlink(out / "victim.safetensors", dst / "w.safetensors.tmp")
    os.symlink(out / "victim.safetensors", dst / ".w.safetensors.tmp")
    ok(gp("export", "1", "-o", dst / "w.safetensors", archive=arc))
    os.symlink(out / "victim.safetensors", dst / "linked.safetensors")
    fails(gp("export", "1", "-o", dst / "linked.safetensors", archive=arc), 2, "exists")
    ok(gp("export", "1", "-o", dst / "linked.safetensors", "--force", archive=arc))
    assert not (dst / "linked.safetensors").is_symlink()
    co = tmp_path / "co"
    co.mkdir()
    os.symlink(out / "victim.safetensors", co / "model.safetensors")
    ok(gp("checkout", "1", "-o", co, "--force", archive=arc))
    assert not (co / "model.safetensors").is_symlink()
    assert tree_digest(out) == digest


@contextmanager
def sqlite(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to ``path`` that commits and is closed on leaving (no lock outlives the block)."""
    c = sqlite3.connect(path)
    try:
        with c:
            yield c
    finally:
        c.close()


def _sqlite_dump(path: Path) -> list[Any]:
    with sqlite(path) as c:
        return sorted(c.execute("SELECT type, name, sql FROM sqlite_master").fetchall(), key=str) + sorted(
            c.execute("SELECT * FROM precious").fetchall())


def test_catalog_link_to_another_database_is_never_written(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    with small_repo(arc):
        pass
    other = tmp_path / "other.sqlite"
    with sqlite(other) as c:
        c.execute("CREATE TABLE precious(x)")
        c.execute("CREATE TABLE versions(id)")  # a name gpupas uses too
        c.execute("INSERT INTO precious VALUES (42)")
    before, raw = _sqlite_dump(other), other.read_bytes()
    (arc / "catalog.sqlite").unlink()
    os.symlink(other, arc / "catalog.sqlite")
    for res in gp_many(("log",), ("query", "select m where m.id > 0"), ("stats",), ("show", "1"), archive=arc):
        if res.returncode != 0:
            fails(res, 4, "symbolic link", "reindex")
    with open_repository(arc) as repo:
        repo.commit("m", model(5), parents=[2])  # publishing updates the catalog: never through the link
    assert other.read_bytes() == raw and _sqlite_dump(other) == before
    ok(gp("reindex", archive=arc))
    assert not (arc / "catalog.sqlite").is_symlink()
    assert sorted(r["id"] for r in js(gp("log", "--json", archive=arc))) == [1, 2, 3]
    assert other.read_bytes() == raw and _sqlite_dump(other) == before


# -- metadata carries checksums ---------------------------------------------------------------------------------
def _flips_escaping_verify(arc: Path, path: Path, positions: range) -> list[tuple[int, bytes]]:
    data = path.read_bytes()
    escaped = []
    try:
        for i in positions:
            flipped = bytearray(data)
            flipped[i] ^= 1
            path.write_bytes(bytes(flipped))
            with open_repository(arc) as repo:  # a fresh reader, as the command line is
                if repo.verify()["ok"]:
                    escaped.append((i, data[max(0, i - 6) : i + 6]))
    finally:
        path.write_bytes(data)
    return escaped


def _seal_start(path: Path) -> int:
    return path.read_bytes().rindex(b',"checksum":"crc32c:')


def test_flipped_bits_in_manifests_records_and_tags_are_caught_by_verify(tmp_path: Path) -> None:
    """One bit flipped anywhere in the body of a manifest, a version record or a tag (a tensor renamed, a tag
    re-pointed, a network attribute changed...): `verify` fails. (The manifest's seal is checked too.)"""
    arc = tmp_path / "arc"
    with small_repo(arc) as repo:
        sid = repo.version(2).latest
    man, rec, tag = manifest_path(arc, sid), arc / "versions" / "2.json", arc / "refs" / "tags" / "t1.json"
    assert _flips_escaping_verify(arc, man, range(len(man.read_bytes()) - 1)) == []  # not the final newline
    assert _flips_escaping_verify(arc, rec, range(_seal_start(rec))) == []
    assert _flips_escaping_verify(arc, tag, range(_seal_start(tag))) == []
    # the named cases, through the command line
    data = man.read_bytes()
    man.write_bytes(data.replace(b'"name":"fc1.bias"', b'"name":"fc1.biat"'))
    fails(gp("verify", archive=arc), 3, sid)
    man.write_bytes(data)
    data = tag.read_bytes()
    tag.write_bytes(data.replace(b'"version":1', b'"version":2'))
    fails(gp("verify", archive=arc), 3, "t1")
    tag.write_bytes(data)
    ok(gp("verify", archive=arc))


def test_flipped_bits_in_the_seal_of_records_and_tags_are_caught(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    with small_repo(arc):
        pass
    for path in (arc / "versions" / "2.json", arc / "refs" / "tags" / "t1.json"):
        end = len(path.read_bytes()) - 1  # the final newline may flip to other whitespace
        assert _flips_escaping_verify(arc, path, range(_seal_start(path), end)) == []


def test_verify_in_a_long_running_process_rereads_manifests(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    with small_repo(arc) as repo:
        assert repo.verify()["ok"]
        man = manifest_path(arc, repo.version(2).latest)
        data = man.read_bytes()
        man.write_bytes(data.replace(b'"name":"fc1.bias"', b'"name":"fc1.biat"'))
        assert not repo.verify()["ok"]


def test_version_ids_of_19_digits_and_the_last_id(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    arc = tmp_path / "arc"
    with small_repo(arc):
        pass
    save_file(model(7), tmp_path / "ck.safetensors")
    for name in ("1234567890123456789.json", "99999999999999999999999.json", "0003.json", "-4.json", "5.json.bak"):
        shutil.copy(arc / "versions" / "1.json", arc / "versions" / name)
    t0 = time.time()
    out = ok(gp("commit", tmp_path / "ck.safetensors", "-n", "next", archive=arc, timeout=60))
    assert "committed version 3 " in out and time.time() - t0 < 60
    assert sorted(r["id"] for r in js(gp("log", "--json", archive=arc))) == [1, 2, 3]
    fails(gp("show", "1234567890123456789", archive=arc), 1, "1234567890123456789")
    shutil.copy(arc / "versions" / "3.json", arc / "versions" / "999999999999999999.json")  # the largest id
    fails(gp("commit", tmp_path / "ck.safetensors", "-n", "more", archive=arc, timeout=60), 2, "used up")
    ok(gp("log", archive=arc))


def test_rich_markup_in_user_text_is_printed_as_it_is(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    markup = "[/] [bold red]x[/bold red] [link=file:///etc/passwd]y[/link] [/nope]"
    with create_repository(arc) as repo:
        repo.commit("m", {"[/]": np.ones(3, np.float32), "a.[bold]b": np.zeros(3, np.float32)}, message=markup,
                    author="[/]", hyperparameters={"[/]": "[/]", "lr": 0.1}, metrics={"[/]loss": [1.0, 0.5]})
        repo.commit("m", {"[/]": np.full(3, 2, np.float32)}, parents=[1], message="[/]")
        repo.tag("v1", 1)
    cmds = [("log",), ("log", "1"), ("show", "1"), ("show", "1", "-t", "-N"), ("diff", "1", "2"),
            ("query", "select m where m.id > 0"), ("query", 'select m where m.message like "%[/]%"'), ("stats",),
            ("tag",), ("verify",)]
    for cmd, res in zip(cmds, gp_many(*cmds, archive=arc)):
        out = ok(res)
        if cmd[0] in ("log", "show", "query"):
            assert "[/]" in out, (cmd, out)
        if cmd == ("show", "1"):
            assert "[bold red]x[/bold red]" in out


def test_control_characters_in_user_text_are_printed_as_escapes(tmp_path: Path) -> None:
    """A name from someone else's checkpoint cannot clear the screen, colour it, or forge a table row."""
    arc = tmp_path / "arc"
    evil = "w\x1b[2J\x1b[31mred\nforged row\u202egnp.exe"
    with create_repository(arc) as repo:
        repo.commit("m", {evil: np.ones(3, np.float32), "plain": np.zeros(2, np.float32)}, message=f"msg {evil}")
        repo.commit("m", {evil: np.full(3, 2, np.float32), "plain": np.zeros(2, np.float32)}, parents=[1])
    cmds = [("log",), ("show", "1"), ("show", "1", "-t", "-N"), ("diff", "1", "2")]
    for cmd, res in zip(cmds, gp_many(*cmds, archive=arc)):
        out = ok(res)
        assert "\x1b" not in out and "\u202e" not in out and "\nforged" not in out, (cmd, out)
        assert "\\x1b[2J" in out, (cmd, out)  # shown, as an escape


def test_the_progress_bar_prints_names_as_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint file's name in the progress bar: neither rich markup nor a terminal escape."""
    import io

    from rich.console import Console

    from gpupas.cli import app, render

    out = render.Output()
    out.err = Console(file=io.StringIO(), force_terminal=True, width=120)
    monkeypatch.setattr(app, "_out", lambda: out)
    with app._progress("commit") as update:
        update("m: [red]step\x1b[2J.safetensors", 1, 2)
    shown = out.err.file.getvalue()
    assert "[red]step\\x1b[2J.safetensors" in shown and "\x1b[2J" not in shown and "\x1b[31m" not in shown


def _catalog_objects(path: Path) -> list[tuple[str, str]]:
    with sqlite(path) as c:
        return sorted(c.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall())


def _plant_triggers(cat: Path) -> list[tuple[str, str]]:
    clean = _catalog_objects(cat)
    with sqlite(cat) as c:
        c.execute("CREATE TRIGGER hide AFTER INSERT ON versions BEGIN DELETE FROM versions WHERE name='m1'; END")
        c.execute("CREATE TRIGGER lie AFTER INSERT ON hparams BEGIN UPDATE hparams SET num=999; END")
        c.execute("CREATE TRIGGER slow AFTER INSERT ON parents BEGIN SELECT count(*) FROM (WITH RECURSIVE "
                  "r(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM r WHERE x < 2000000000) SELECT x FROM r); END")
        c.execute("CREATE VIEW extra AS SELECT 1")
        c.execute("CREATE TABLE foreign_rows(x)")
        c.execute("DELETE FROM versions WHERE name='m2'")
    return clean


def _three(arc: Path) -> None:
    with create_repository(arc) as repo:
        for i in range(3):
            repo.commit(f"m{i}", model(i), parents=[i] if i else [], hyperparameters={"lr": 0.1 * (i + 1)})


def test_reindex_drops_triggers_views_and_tables_of_the_old_catalog(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    _three(arc)
    cat = arc / "catalog.sqlite"
    clean = _plant_triggers(cat)
    t0 = time.time()
    ok(gp("reindex", archive=arc, timeout=60))
    assert time.time() - t0 < 30  # the slow trigger never runs
    assert _catalog_objects(cat) == clean
    with open_repository(arc) as repo:
        repo.commit("m3", model(3), parents=[3], hyperparameters={"lr": 0.5})  # inserts: no trigger fires
    assert [r["name"] for r in js(gp("log", "--json", archive=arc))] == ["m0", "m1", "m2", "m3"]
    rows = js(gp("query", "select m where m.hp.lr > 0.25", "--json", archive=arc))
    assert sorted(r["name"] for r in rows) == ["m2", "m3"]


def test_log_does_not_trust_a_catalog_with_foreign_triggers(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    _three(arc)
    with sqlite(arc / "catalog.sqlite") as c:
        c.execute("CREATE TRIGGER hide AFTER INSERT ON versions BEGIN DELETE FROM versions WHERE name='m1'; END")
    with open_repository(arc) as repo:
        repo.commit("m3", model(3))
    assert [r["name"] for r in js(gp("log", "--json", archive=arc))] == ["m0", "m1", "m2", "m3"]


_HOT_JOURNAL = """
import os, sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA journal_mode=DELETE")
c.execute("PRAGMA cache_size=1")
c.execute("BEGIN IMMEDIATE")
c.execute("DROP TRIGGER hide")
c.execute("CREATE TABLE junk(x)")
for i in range(2000):
    c.execute("INSERT INTO junk VALUES (?)", (os.urandom(200),))
os._exit(0)  # killed mid-transaction: a hot journal is left beside the database
"""


def test_reindex_is_not_undone_by_a_stale_hot_journal(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    _three(arc)
    cat = arc / "catalog.sqlite"
    clean = _catalog_objects(cat)
    with sqlite(cat) as c:
        c.execute("PRAGMA journal_mode=DELETE")
        c.execute("CREATE TRIGGER hide AFTER INSERT ON versions BEGIN DELETE FROM versions WHERE name='m1'; END")
    subprocess.run([sys.executable, "-c", _HOT_JOURNAL, str(cat)], check=True, timeout=60)
    assert (arc / "catalog.sqlite-journal").exists()
    ok(gp("reindex", archive=arc))
    assert _catalog_objects(cat) == clean
    with open_repository(arc) as repo:
        repo.commit("m3", model(3))
    assert [r["name"] for r in js(gp("log", "--json", archive=arc))] == ["m0", "m1", "m2", "m3"]


def test_reindex_removes_a_planted_journal_link(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    _three(arc)
    victim = tmp_path / "victim"
    victim.write_bytes(b"VICTIM " * 100)
    os.symlink(victim, arc / "catalog.sqlite-journal")
    res = gp("log", archive=arc)
    if res.returncode != 0:
        fails(res, 4, "reindex")
    ok(gp("reindex", archive=arc))
    assert [r["name"] for r in js(gp("log", "--json", archive=arc))] == ["m0", "m1", "m2"]
    assert victim.read_bytes() == b"VICTIM " * 100


def test_stray_files_in_manifests_do_not_break_the_archive(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    with small_repo(arc) as repo:
        sid = repo.version(1).latest
    man = manifest_path(arc, sid)
    shutil.copy(man, arc / "manifests" / "backup copy.json")
    shutil.copy(man, arc / "manifests" / f"{sid}.json.bak")
    shutil.copy(man, arc / "manifests" / f"{sid}.json~")
    shutil.copy(man, arc / "manifests" / "Copy of (2).json")
    (arc / "manifests" / "notes dir.json").mkdir()
    (arc / "manifests" / "README").write_text("hello")
    ok(gp("gc", "--min-age", "0", archive=arc))
    for res in gp_many(("stats",), ("log",), ("verify",), ("show", "2"), archive=arc):
        ok(res)
    ok(gp("reindex", archive=arc))
    assert js(gp("stats", "--json", archive=arc))["snapshots"] == 2
    assert (arc / "manifests" / "backup copy.json").exists()  # not ours: left alone


def test_torch_sparse_and_meta_tensors_are_refused_clearly(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    arc = tmp_path / "arc"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = {"sparse_coo": torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,)),
                 "sparse_csr": torch.eye(3).to_sparse_csr(), "meta": torch.empty(3, 4, device="meta")}
    with gpupas.create_archive(arc) as a:
        remedy = {"meta": "meta", "sparse_coo": r"t.to_dense\(\), or its t.indices\(\) and t.values\(\)",
                  "sparse_csr": r"crow_indices\(\), col_indices\(\) and values\(\)"}  # (a CSR has no .indices())
        for what, t in cases.items():
            with pytest.raises(UnsupportedDtypeError, match=remedy[what]):
                a.commit({"ok": torch.ones(2), "bad": t})
        with pytest.raises(UnsupportedDtypeError, match=r"store t.to_dense\(\)$"):
            a.commit({"bad": torch.ones(2, 2).to_mkldnn()})  # no parts to name
        odd = [torch.zeros(3).to(torch.complex64), torch.zeros(3, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)]
        for bad in odd:  # not stored (float4 x2: NumPy has no such dtype): named, with the remedy
            with pytest.raises(UnsupportedDtypeError, match=r"cannot be archived.*Convert it first"):
                a.commit({"ok": torch.ones(2), "bad": bad})
        assert a.snapshots() == []
    ok(gp("init", archive=tmp_path / "cli"))
    for what in ("sparse_coo", "meta"):
        torch.save({"w": torch.ones(2), "x": cases[what]}, tmp_path / f"{what}.pt")
        fails(gp("commit", tmp_path / f"{what}.pt", "-n", what, archive=tmp_path / "cli"), 2,
              "meta" if what == "meta" else "sparse")
    assert js(gp("log", "--json", archive=tmp_path / "cli")) == []


# -- everyday faults --------------------------------------------------------------------------------------------
def _as_nobody() -> tuple[str, ...]:
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv"):  # root ignores permissions: run it as nobody
        return ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
    if shutil.which("runuser"):
        return ("runuser", "-u", "nobody", "--")
    pytest.skip("running as root without setpriv or runuser: permissions cannot be tested")


@contextmanager
def read_only_archive() -> Iterator[tuple[Path, Path, dict[str, str], tuple[str, ...]]]:
    """An archive nobody may write (files 0444, folders 0555, owned by root), a place the user may write,
    and how to run a command as that user."""
    base = Path(tempfile.mkdtemp(prefix="gpupas-ro-"))  # not under tmp_path: its parents are private to root
    try:
        base.chmod(0o755)
        arc = base / "arc"
        with small_repo(arc) as repo:
            repo.add_snapshot(2, model(1, shift=0.002), step=3)
            repo.commit("f", model(4), files={"notes.txt": b"notes"})
        (arc / "snapshots" / "dead.0123abcd").mkdir()  # garbage only gc would remove
        mine = base / "mine"
        mine.mkdir()
        from safetensors.numpy import save_file

        save_file(model(9), mine / "ck.safetensors")
        prefix = _as_nobody()
        for p in [arc, *arc.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        if prefix:
            os.chown(mine, 65534, 65534)
            os.chown(mine / "ck.safetensors", 65534, 65534)
        probe = run_py("import sys, gpupas.cli.app", prefix=prefix, timeout=60)
        if probe.returncode != 0:
            pytest.skip(f"cannot run gpupas as another user here: {probe.stderr.strip()[-300:]}")
        env = {"XDG_CACHE_HOME": str(mine / "cache"), "HOME": str(mine)}
        yield arc, mine, env, prefix
    finally:
        for p in [base, *base.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_read_only_archive_reads_work_and_writes_fail_clearly() -> None:
    with read_only_archive() as (arc, mine, env, prefix):
        before = tree_digest(arc)

        def run(*cmds: tuple[Arg, ...]) -> list[subprocess.CompletedProcess[str]]:
            return gp_many(*cmds, archive=arc, prefix=prefix, env=env, cwd=mine)

        ok(run(("log",))[0])  # the first reader builds the catalog (in the user's cache)
        logged, tree, shown, table, checked, stats, diff, found, tags, written, exported, dry = run(
            ("log", "--json"), ("log", "m"), ("show", "2", "--json"), ("show", "m", "-t"), ("verify",),
            ("stats", "--json"), ("diff", "1", "2"), ("query", "select m where m.hp.lr < 0.08", "--json"),
            ("tag", "--json"), ("checkout", "f", "-o", mine / "co", "--json"),
            ("export", "2", "-o", mine / "w.safetensors"), ("gc", "--dry-run", "--min-age", "0"))
        assert [r["id"] for r in js(logged)] == [1, 2, 3]
        assert js(shown)["id"] == 2 and js(stats)["versions"] == 3 and js(tags) == {"t1": 1}
        assert "ok:" in ok(checked) and len(js(found)) == 1
        for res in (tree, table, diff, exported, dry):
            ok(res)
        assert sorted(Path(p).name for p in js(written)) == ["gpupas-version.json", "model.safetensors", "notes.txt"]
        ck = mine / "ck.safetensors"
        writes = [("commit", ck, "-n", "x"), ("commit", ck, "-n", "m", "-p", "2"), ("import", mine, "-n", "imp"),
                  ("tag", "t2", "2"), ("tag", "-d", "t1"), ("copy", "1", "-n", "cp"), ("gc", "--min-age", "0")]
        for res in run(*writes):
            err = fails(res, 4, "read-only", str(arc))
            assert "Permission denied" in err or "Read-only" in err, err
        assert tree_digest(arc) == before
        assert list((mine / "cache" / "gpupas" / "catalogs").glob("*.sqlite"))  # the catalog went to the cache


def test_read_only_archive_whose_path_is_not_utf8() -> None:
    with read_only_archive() as (arc, mine, env, prefix):
        parent = arc.parent
        latin = parent / os.fsdecode(b"caf\xe9")
        parent.chmod(0o755)
        os.rename(arc, latin)
        try:
            res = gp("log", "--json", archive=os.fsencode(latin), prefix=prefix, env=env, cwd=mine)
            assert [r["id"] for r in js(res)] == [1, 2, 3]
            ok(gp("show", "1", archive=os.fsencode(latin), prefix=prefix, env=env, cwd=mine))
        finally:
            os.rename(latin, arc)


_TRUNCATE = r"""
import json, os, sys
import gpupas
from gpupas.cli.app import app
from gpupas.store import shards

root, sid = sys.argv[1], sys.argv[2]
real = shards.ShardReader.prepare
cut = []

def prepare(self, chunks):
    missing = real(self, chunks)  # the shard indexes are read; now the files shrink under the reader
    for (codec, k), (index, fd) in list(self._shards.items()):
        if index is not None:
            path = os.path.join(root, "snapshots", self.stream.folder, codec, "c", str(k))
            data = open(path, "rb").read()
            cut.append((path, data))
            os.truncate(path, len(data) // 3)
    return missing

def restore_files():
    while cut:
        path, data = cut.pop()
        with open(path, "wb") as f:
            f.write(data)

shards.ShardReader.prepare = prepare
out = {}
for op in ("restore", "verify", "verify_all"):
    try:
        with gpupas.open_archive(root) as a:
            if op == "verify_all":
                out[op] = [[s, type(r).__name__, str(r)] for s, r in a.verify_all()]
            else:
                getattr(a, op)(sid)
                out[op] = ["ok", ""]
    except BaseException as exc:
        out[op] = [type(exc).__name__, str(exc)]
    restore_files()
try:
    app(["verify", "-A", root])
except SystemExit as exc:
    out["cli"] = exc.code
restore_files()
print(json.dumps(out))
"""


def test_shard_truncated_while_it_is_read(tmp_path: Path) -> None:
    """The shard shrinks between the index read and the chunk reads: an integrity error naming the snapshot,
    the chunk and the shard file; never SIGBUS; exit 3 from `gpupas verify`."""
    arc = tmp_path / "arc"
    with create_repository(arc) as repo:
        rng = np.random.default_rng(0)
        w = {"w": rng.standard_normal((512, 1024)).astype(np.float32)}
        v = repo.commit("m", w)
        sid = v.latest
    res = run_py(_TRUNCATE, str(arc), sid, timeout=180)
    assert res.returncode == 0, f"child died (rc={res.returncode}: a signal?)\n{res.stdout}\n{res.stderr[-3000:]}"
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for op in ("restore", "verify"):
        kind, msg = got[op]
        assert kind == "IntegrityError", got
        assert sid in msg and "shard" in msg and "restore the archive from a copy" in msg.lower(), got
    assert got["verify_all"][0][:2] == [sid, "IntegrityError"], got
    assert got["cli"] == 3, got
    with gpupas.open_archive(arc) as fresh:
        assert same(fresh.restore(sid), w)


def test_tiny_segments_and_wide_pred_are_refused_by_the_manifest(tmp_path: Path) -> None:
    """A segment of a few values would cost a reader Python objects per value (a hostile manifest's
    denial of service), and 'pred' is defined for values of up to 4 bytes: both are refused up front."""
    arc = tmp_path / "arc"
    _, doc = _template(arc)
    d = json.loads(json.dumps(doc))
    d["segment"] = 1
    write_doc(arc, "tiny", d)
    with gpupas.create_archive(tmp_path / "wide") as a:
        m = a.commit({"w": np.arange(64, dtype=np.float64)})
    wide = read_doc(tmp_path / "wide", m.id)
    wide["tensors"][0]["enc"] = "pred"
    write_doc(arc, "wide", dict(wide, base=doc["id"], grand=doc["id"]))
    with gpupas.open_archive(arc) as a:
        with pytest.raises(gpupas.IntegrityError, match=r"segment is 1, not an integer in \[64"):
            a.restore("tiny")
        with pytest.raises(gpupas.IntegrityError, match="'pred' is defined for values of up to 4 bytes"):
            a.restore("wide")
    with pytest.raises(gpupas.InvalidInputError, match="a segment holds 64"):
        gpupas.Layout(segment=8)


def test_a_manifest_whose_commit_seconds_is_past_a_double_still_reads(tmp_path: Path) -> None:
    """commit_seconds (informative) of 10**400, valid JSON under a valid seal, reads as 0.0 as 1e400 does: it
    raised OverflowError from math.isfinite, so the snapshot could not be read, listed or discarded."""
    from gpupas.format.manifest import Manifest

    a = gpupas.create_archive(tmp_path / "arc")
    m = a.commit({"w": np.arange(10, dtype=np.float32)}, snapshot="s1")
    obj = unseal(m.to_bytes(), "manifest")
    obj["commit_seconds"] = 10**400
    assert Manifest.from_bytes(seal(obj), "s1").commit_seconds == 0.0


def test_verify_of_a_chunk_folder_linked_back_in_place_says_so_not_damaged(tmp_path: Path) -> None:
    """A snapshot's chunk folder moved to another disk and linked back (``mv``, ``ln -s``) is intact: verify
    names the link and the remedy (move the folder back), and calls nothing damaged nor asks for a copy."""
    arc = tmp_path / "arc"
    with small_repo(arc) as repo:
        folder = repo.archive.manifest(repo.version(1).latest).folders()[0]
    os.rename(arc / "snapshots" / folder, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", arc / "snapshots" / folder)
    with open_repository(arc) as repo:
        report = repo.verify()
    assert not report["ok"] and report["problems"], report
    for problem in report["problems"]:
        assert f"snapshots/{folder} is a symbolic link" in problem and "move the folder itself back" in problem
        assert "from a copy" not in problem and "nothing found damaged" in problem, problem
    err = fails(gp("verify", archive=arc), 3, f"snapshots/{folder} is a symbolic link")
    assert "damaged:" not in err and "not read:" in err
    os.unlink(arc / "snapshots" / folder)
    os.rename(tmp_path / "elsewhere", arc / "snapshots" / folder)
    ok(gp("verify", archive=arc))
