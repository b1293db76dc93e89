"""The store suite on a local directory, plus what only a local store meets: links, FIFOs, processes
racing, read-only directories."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from suites.store import StoreTests, chunky_archive, shard_facts

from gpupas.errors import IntegrityError, ReadOnlyError
from gpupas.store.base import open_store
from gpupas.store.local import LocalStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    st = open_store(tmp_path / "store", create=True)
    assert isinstance(st, LocalStore)
    return st


@pytest.fixture
def archive_location(tmp_path: Path) -> tuple[str, dict[str, Any]]:
    return str(tmp_path / "arc"), {}


class TestLocalStore(StoreTests):
    pass


# -- processes racing ----------------------------------------------------------------------------------------
_RACER = """
import os, sys, time
sys.path.insert(0, {root!r})
from gpupas.store.local import LocalStore
store, go, what, i = LocalStore({path!r}, durable=False), {go!r}, {what!r}, {i}
while not os.path.exists(go):
    time.sleep(0.001)
if what == "create":
    print(store.create("race/key", b"process %d" % i))
else:
    for _ in range(10):
        store.update("count", lambda old: b"%d" % (int(old or b"0") + 1))
"""


def _race_processes(store: LocalStore, tmp_path: Path, what: str, n: int) -> list[str]:
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _RACER.format(root=str(ROOT), path=str(store.root), go=str(go),
                                                                   what=what, i=i)],
                              stdout=subprocess.PIPE, text=True) for i in range(n)]
    time.sleep(0.3)  # let them start and wait at the line
    go.touch()
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * n
    return outs


def test_concurrent_create_processes(store: LocalStore, tmp_path: Path) -> None:
    won = _race_processes(store, tmp_path, "create", 6)
    assert won.count("True") == 1 and won.count("False") == 5, won
    assert store.get("race/key") == b"process %d" % won.index("True")
    assert store.list("race") == ["key"]  # no temporary file left behind


def test_concurrent_update_processes(store: LocalStore, tmp_path: Path) -> None:
    _race_processes(store, tmp_path, "update", 4)
    assert store.get("count") == b"40"


# -- links planted in an archive are refused, never followed -------------------------------------------------
def _reads(store: LocalStore, key: str) -> list[Callable[[], Any]]:
    return [lambda: store.get(key), lambda: store.get_range(key, 0, 4), lambda: store.get_range(key, -4, None),
            lambda: store.get_ranges(key, [(0, 4)]), lambda: store.open_file(key)]


def test_symlinked_file_is_refused(store: LocalStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret outside the archive")
    store.put("d/real", b"inside")
    os.symlink(outside, store.root / "d" / "link")
    for read in _reads(store, "d/link"):
        with pytest.raises(IntegrityError, match="link"):
            read()
    assert not store.exists("d/link")
    with pytest.raises(IntegrityError):
        store.put("d/link", b"overwrite")
    with pytest.raises(IntegrityError):
        store.writer("d/link")
    with pytest.raises(IntegrityError):
        store.update("d/link", lambda old: b"overwrite")
    assert store.create("d/link", b"x") is False  # the name is taken
    assert outside.read_bytes() == b"secret outside the archive"
    assert store.get("d/real") == b"inside"
    store.delete("d/link")  # removes the link, not its target
    assert outside.exists() and not os.path.lexists(store.root / "d" / "link")


def test_a_folder_moved_elsewhere_and_linked_back_is_named(store: LocalStore, tmp_path: Path) -> None:
    """A user moved a folder of the archive to another disk and linked it back (``mv snapshots /big; ln -s``):
    the error names that link, not the deeper folder being opened (which ``ls`` shows as a plain folder), and
    says what to do."""
    store.put("refs/tags/t.json", b"{}")
    os.rename(store.root / "refs", tmp_path / "refs_elsewhere")
    os.symlink(tmp_path / "refs_elsewhere", store.root / "refs")
    for read in (*_reads(store, "refs/tags/t.json"), lambda: store.list("refs/tags")):
        with pytest.raises(IntegrityError, match=r": refs is a symbolic link.*move the folder itself back") as exc:
            read()
        assert "refs/tags" not in str(exc.value)


def test_symlinked_folder_is_refused(store: LocalStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside_dir"
    outside.mkdir()
    (outside / "x").write_bytes(b"secret")
    os.symlink(outside, store.root / "e")
    for read in _reads(store, "e/x"):
        with pytest.raises(IntegrityError, match="link"):
            read()
    assert not store.exists("e/x")
    with pytest.raises(IntegrityError):
        store.list("e")
    for write in (lambda: store.put("e/y", b"1"), lambda: store.create("e/y", b"1"),
                  lambda: store.update("e/y", lambda old: b"1"), lambda: store.writer("e/y")):
        with pytest.raises(IntegrityError):
            write()
    assert sorted(os.listdir(outside)) == ["x"]  # nothing was written through the link
    store.delete_prefix("e")  # removes the link only
    assert (outside / "x").read_bytes() == b"secret" and not os.path.lexists(store.root / "e")


# -- a FIFO in place of a file is refused at once ------------------------------------------------------------
def _within(seconds: float, fn: Callable[[], Any], fifo: Path) -> BaseException | None:
    """Run ``fn`` in a thread; the error it raised (None if none). Fails if it is still running
    after ``seconds`` (blocked on the FIFO: we then open its other end to free the thread)."""
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK):
            try:
                os.close(os.open(fifo, flags))
            except OSError:
                pass
        t.join(5)
        pytest.fail(f"{fn} blocked on a FIFO")
    return result[0]


def test_fifo_is_refused_promptly(store: LocalStore) -> None:
    store.put("f/real", b"x")
    fifo = store.root / "f" / "pipe"
    os.mkfifo(fifo)
    ops: list[Callable[[], Any]] = [*_reads(store, "f/pipe"), lambda: store.put("f/pipe", b"data"),
                                    lambda: store.writer("f/pipe"), lambda: store.update("f/pipe", lambda old: b"1")]
    for op in ops:
        err = _within(5, op, fifo)
        assert isinstance(err, IntegrityError), err
    assert not store.exists("f/pipe")
    assert store.create("f/pipe", b"x") is False
    assert os.path.exists(fifo)


# -- a read-only directory -----------------------------------------------------------------------------------
_READ_ONLY = """
import sys
sys.path.insert(0, {root!r})
from gpupas.errors import ReadOnlyError
from gpupas.store.local import LocalStore
store = LocalStore({path!r})
assert store.get("k") == b"v" and store.list("") == ["k"]
for name, write in [("put", lambda: store.put("new", b"x")), ("put over", lambda: store.put("k", b"x")),
                    ("put below", lambda: store.put("sub/new", b"x")), ("create", lambda: store.create("new", b"x")),
                    ("update", lambda: store.update("k", lambda old: b"x")), ("writer", lambda: store.writer("new"))]:
    try:
        write()
    except ReadOnlyError:
        continue
    raise SystemExit(f"{{name}} did not raise ReadOnlyError")
assert store.update("k", lambda old: None) == b"v"  # no change asked: nothing to write
assert store.get("k") == b"v" and store.list("") == ["k"]
print("ok")
"""


def test_read_only_directory_raises_read_only_error() -> None:
    base = Path(tempfile.mkdtemp(prefix="gpupas-ro-"))  # not under tmp_path: its parents are private to root
    try:
        base.chmod(0o755)
        root = base / "arc"
        LocalStore(root, create=True).put("k", b"v")
        os.chmod(root / "k", 0o444)
        root.chmod(0o555)
        script = _READ_ONLY.format(root=str(ROOT), path=str(root))
        if os.geteuid() != 0:
            prefix: list[str] = []
        elif shutil.which("setpriv"):  # root ignores permissions: run it as nobody
            prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        elif shutil.which("runuser"):
            prefix = ["runuser", "-u", "nobody", "--"]
        else:
            pytest.skip("running as root without setpriv or runuser: permissions cannot be tested")
        probe = subprocess.run([*prefix, sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                                "import gpupas.store.local"], capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            pytest.skip(f"cannot run gpupas as another user here: {probe.stderr.strip()[-300:]}")
        done = subprocess.run([*prefix, sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
    finally:
        for p in (base / "arc", base):
            if p.exists():
                p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_read_only_error_in_process(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Errors the kernel gives for a read-only file system become ReadOnlyError (as root, too)."""
    import errno

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(ReadOnlyError):
        store.put("new/folder/k", b"x")


def test_a_full_disk_names_the_archive_and_the_remedy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard write that finds the disk full (ENOSPC) raised the bare OSError, which the command line showed
    as "[Errno 28] No space left on device" naming neither the archive nor what to do; the error stays an
    OSError with that errno, now naming both, and the earlier snapshot stays readable."""
    import errno

    import gpupas

    w = np.arange(50_000, dtype=np.float32)
    with gpupas.create_archive(tmp_path / "arc") as a:
        a.commit({"w": w}, snapshot="s0")

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    monkeypatch.setattr(os, "pwrite", full)
    with gpupas.open_archive(tmp_path / "arc") as a:
        with pytest.raises(OSError, match=rf"No space left.*{tmp_path / 'arc'}.*free space there") as got:
            a.commit({"w": w + 1}, snapshot="s1")
        assert got.value.errno == errno.ENOSPC
        monkeypatch.undo()
        assert a.snapshots() == ["s0"] and a.restore("s0")["w"].tobytes() == w.tobytes()


def test_sync_works_while_the_interpreter_exits(tmp_path: Path) -> None:
    """A sync from an exit hook (or a thread still committing after the main thread returned): the shared
    fsync pool takes no more work by then (concurrent.futures refuses it); the fsyncs run on the caller's
    thread instead of the commit failing with 'cannot schedule new futures after shutdown'."""
    code = f"""
import atexit
from gpupas.store.local import LocalStore
store = LocalStore({str(tmp_path / 'store')!r}, create=True)
for k in ("a/x", "b/y"):
    store.put(k, b"1", sync=False)
store.sync(["a/x", "b/y", "a", "b", ""])
def last():
    store.put("c/z", b"2", sync=False)
    store.sync(["c/z", "c", "a/x", ""])
    print("synced")
atexit.register(last)
"""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert got.stdout.strip() == "synced", got.stderr[-2000:]


def test_a_failed_early_flush_of_a_shard_fails_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard's early flush (fdatasync while coding goes on) that fails (EIO) fails the commit: its error
    was dropped once a later flush was queued, and the snapshot published, though the file system had said
    that error to that fdatasync only (the final fsync, on a descriptor opened later, does not say it again)."""
    import errno

    import gpupas
    from gpupas.store import local, shards

    calls, real = [0], local._datasync

    def failing_once(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(shards, "FLUSH_EVERY", 1 << 12)
    monkeypatch.setattr(local, "_datasync", failing_once)
    w = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    with gpupas.create_archive(tmp_path / "arc", workers=2) as a:
        with pytest.raises(OSError, match="Input/output error"):
            a.commit({"w": w}, snapshot="s")
        assert calls[0] > 1 and a.snapshots() == []


def test_an_archive_round_trips_where_python_has_no_vectored_io(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``os.preadv`` and ``os.pwritev`` (a Python built where the OS lacks them) a commit writes
    its chunks joined and a restore reads each raw chunk with ``pread``: the same archive, bit-exact."""
    import gpupas

    monkeypatch.delattr(os, "preadv", raising=False)
    monkeypatch.delattr(os, "pwritev", raising=False)
    rng = np.random.default_rng(3)
    tensors = {"noise": rng.standard_normal(1 << 17).astype(np.float32),  # raw chunks: read straight into place
               "ramp": np.linspace(-1, 1, 5001, dtype=np.float32), "empty": np.zeros((0, 3), np.float16)}
    with gpupas.create_archive(tmp_path / "arc") as a:
        m = a.commit(tensors, layout=gpupas.Layout(chunk_size=65536))
        assert "z" in "".join(s.chunks for s in m.streams)
    with gpupas.open_archive(tmp_path / "arc") as fresh:
        out = fresh.restore(m.id)
        assert fresh.verify(m.id) == len(tensors)
    for name, v in tensors.items():
        assert out[name].dtype == v.dtype and out[name].shape == v.shape and out[name].tobytes() == v.tobytes()


def test_a_commit_failing_as_it_writes_a_shard_index_closes_the_shard(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up as the shard indexes are written: each failed commit left its shard's descriptor open
    (taken off the sink before the write failed, so the abort never closed it), one more per try for the life
    of the process. Nothing is left open and nothing is published; once there is room again the commit works."""
    import errno

    import gpupas
    from gpupas.store import local, shards

    indexes: set[int] = set()
    encode_index, append = shards.encode_index, local.LocalWriter.append

    def index(*args: Any) -> Any:
        out = encode_index(*args)
        indexes.add(id(out))
        return out

    def full(self: local.LocalWriter, data: Any) -> int:
        if id(data) in indexes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return append(self, data)

    tensors = {"w": np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32)}
    with gpupas.create_archive(tmp_path / "arc") as a:
        a.commit(tensors)  # (the worker threads are started)
        before = len(os.listdir("/proc/self/fd"))
        with monkeypatch.context() as m:
            m.setattr(shards, "encode_index", index)
            m.setattr(local.LocalWriter, "append", full)
            for _ in range(5):
                with pytest.raises(OSError, match="No space left"):
                    a.commit(tensors)
        assert len(os.listdir("/proc/self/fd")) == before
        assert len(a.snapshots()) == 1 and a.restore(a.commit(tensors).id)["w"].tobytes() == tensors["w"].tobytes()


# -- a local restore reads its chunks only (pread, chunk by chunk) -------------------------------------------
def test_local_restore_reads_only_its_chunks(tmp_path: Path) -> None:
    import gpupas

    m = chunky_archive(str(tmp_path / "arc"), {})
    with gpupas.open_archive(tmp_path / "arc") as fresh:
        store = fresh.store.store
        assert store.local_root is not None
        fresh.manifest(m.id)
        before = store.bytes_read
        out = fresh.restore(m.id, names=["small"])
        read = store.bytes_read - before
        shards, _, _ = shard_facts(store, m)
    assert out["small"].tobytes() == np.arange(16, dtype=np.float32).tobytes()
    assert read < shards / 10


@pytest.mark.parametrize("vectored", [True, False])
def test_read_into_fills_views_in_order_and_stops_at_the_end(store: LocalStore, vectored: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A scattered read (a raw chunk straight into its place): the views filled one after another from
    the offset, empty views skipped, and at the file's end the bytes there, counted once; also where
    Python has no ``os.preadv`` (one ``pread`` per view)."""
    if not vectored:
        monkeypatch.delattr(os, "preadv", raising=False)
    data = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    store.put("blob", data)
    fd = store.open_file("blob")
    assert fd is not None
    try:
        bufs = [bytearray(n) for n in (5, 0, 1000, 7, 1)]
        before = store.requests
        assert store.read_into(fd, [memoryview(b) for b in bufs], 100) == 1013
        assert b"".join(bufs) == data[100:1113] and store.requests == before + 1
        tail = [bytearray(10), bytearray(10)]
        assert store.read_into(fd, [memoryview(b) for b in tail], 2985) == 15  # past the end: what is there
        assert bytes(tail[0]) + bytes(tail[1][:5]) == data[2985:] and bytes(tail[1][5:]) == bytes(5)
        one = bytearray(8)
        assert store.read_into(fd, memoryview(one), 0) == 8 and bytes(one) == data[:8]  # one view as before
    finally:
        os.close(fd)


def test_durable_writes_use_full_fsync_where_the_os_has_it(tmp_path, monkeypatch) -> None:
    """macOS's fsync stops at the drive's cache: there (F_FULLFSYNC defined) a durable store flushes with
    fcntl(F_FULLFSYNC), and with os.fsync where the file system refuses it; elsewhere os.fsync/fdatasync."""
    import fcntl

    import numpy as np

    import gpupas
    from gpupas import outputs

    calls: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(fcntl, "F_FULLFSYNC", 51, raising=False)  # macOS's value
    refuse = {"on": False}

    def fake_fcntl(fd, cmd, *args):
        assert cmd == 51
        calls.append("full")
        if refuse["on"]:
            raise OSError(45, "Operation not supported")
        return 0

    def counting_fsync(fd):
        calls.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(fcntl, "fcntl", fake_fcntl)
    monkeypatch.setattr(os, "fsync", counting_fsync)
    w = np.arange(4096, dtype=np.float32)
    with gpupas.create_archive(tmp_path / "a") as arc:
        arc.commit({"w": w}, snapshot="s0")
    assert calls and set(calls) == {"full"}, calls
    calls.clear()
    refuse["on"] = True
    fd = os.open(tmp_path / "a", os.O_RDONLY)
    try:
        outputs.fsync(fd)
    finally:
        os.close(fd)
    assert calls == ["full", "fsync"]


def _exit_code(pid: int, seconds: float) -> int | None:
    """The exit code of child ``pid``, or None (and the child killed) if it has not exited within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*:DeprecationWarning")  # 3.12+: forking threads on purpose
def test_sync_in_a_forked_child_uses_threads_of_its_own(store: LocalStore) -> None:
    """The fsync threads a sync() hands work to are per process: a child forked after the parent synced (a
    Dask worker, a DataLoader) has none of the parent's threads, and its sync must not wait on them."""
    for k in ("a/x", "b/y", "c/z"):
        store.put(k, b"1", sync=False)
    store.sync(["a/x", "b/y", "c/z", "a", "b", "c", ""])  # the parent's pool now exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its sync returns
        try:
            store.put("d/w", b"2", sync=False)
            store.sync(["d/w", "d", "a/x", "b/y", ""])
            os._exit(0)
        finally:
            os._exit(1)
    assert _exit_code(pid, 30) == 0, "a forked child's sync() hung on its parent's fsync threads"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*:DeprecationWarning")  # 3.12+: forking threads on purpose
def test_sync_in_a_child_forked_while_another_thread_takes_the_pool(store: LocalStore) -> None:
    """A thread in the middle of taking the fsync pool (every sync does) while another forks: the child
    inherits the pool's lock held by a thread it does not have; its sync must not wait on it forever."""
    from gpupas.store import local

    store.put("a/x", b"1", sync=False)
    held, done = threading.Event(), threading.Event()

    def hold() -> None:  # as a committing thread does, between taking the lock and letting it go
        with local._SYNCERS_LOCK:
            held.set()
            done.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        held.wait(30)
        pid = os.fork()
        if pid == 0:
            try:
                store.sync(["a/x", "a", ""])
                os._exit(0)
            finally:
                os._exit(1)
        assert _exit_code(pid, 10) == 0, "a child forked while a thread held the fsync pool's lock hung in sync()"
    finally:
        done.set()
        t.join()
