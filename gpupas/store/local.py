"""A local directory as a store.

Every path is opened component by component below the archive root without following symbolic
links (a link planted inside an archive is refused, never followed), and only regular files are
read (a FIFO or device in place of a file is refused instead of hanging). Atomic writes: a
temporary file is fsync'd, then linked into place (create-if-absent) or renamed over the old
one under an exclusive ``flock`` of its folder (read-modify-write); then the folder is fsync'd.
Files written with ``sync=False`` (a stream's shards and documents) are made durable by one
:meth:`LocalStore.sync` of them and their folders, fsync'd together.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpupas.errors import (
    ArchiveExistsError,
    ArchiveNotFoundError,
    IntegrityError,
    InvalidInputError,
    LinkedError,
    ReadOnlyError,
)
from gpupas.outputs import fsync
from gpupas.store.base import buffers

log = logging.getLogger("gpupas")
SILENT_WAIT = 2.0  # seconds a lock is waited for before the wait is said


def _try_flock(fd: int, mode: int, seconds: float) -> bool:
    """Take ``flock(fd, mode)`` within ``seconds`` (polled); False if it is still held elsewhere."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS)
_FULL = (errno.ENOSPC, errno.EDQUOT)
SYNC_THREADS = 8  # fsyncs of one sync() at once, besides the caller's


_SYNCERS: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child makes its own
_SYNCERS_LOCK = threading.Lock()


def _syncers() -> ThreadPoolExecutor:
    global _SYNCERS
    with _SYNCERS_LOCK:
        if _SYNCERS is None or _SYNCERS[0] != os.getpid():
            _SYNCERS = (os.getpid(), ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="gpupas-fsync"))
        return _SYNCERS[1]


def _unlock_syncers() -> None:
    """In a forked child: a lock of its own (a parent's thread taking the pool at the fork left it held)."""
    global _SYNCERS_LOCK
    _SYNCERS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_unlock_syncers)


def _fsync_all(fds: Sequence[int]) -> None:
    """fsync every descriptor, several at once: the file system makes them durable together (on ext4 one
    journal commit serves them all) instead of one after another. Returns once every fsync has ended, even
    when interrupted; raises the first error."""
    futures: list[Future[None]] = []
    here = list(fds[:1])  # fsync'd on the caller's thread
    if len(fds) > 1:
        pool = _syncers()
        for i, fd in enumerate(fds[1:], 1):
            try:
                futures.append(pool.submit(fsync, fd))
            except RuntimeError:  # the interpreter is exiting (an exit hook's commit): the pool takes no more
                here += fds[i:]
                break
    try:
        for fd in here:
            fsync(fd)
    finally:
        wait(futures)  # the caller closes these descriptors next: never while a thread still uses one
    for f in futures:
        if f.exception() is not None:
            raise f.exception()  # type: ignore[misc]


def _datasync(fd: int) -> None:
    """fdatasync where the OS has it (Linux); else :func:`fsync` (macOS has no fdatasync)."""
    if hasattr(os, "fdatasync") and not hasattr(fcntl, "F_FULLFSYNC"):
        os.fdatasync(fd)
    else:
        fsync(fd)


def _parts(key: str) -> list[str]:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise ValueError(f"bad store key {key!r}")
    return parts


class LocalStore:
    """Keys are files under ``root`` (the archive directory)."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False, durable: bool = True):
        path = Path(root).expanduser()
        self.location = os.fspath(root)
        if path.exists() and not path.is_dir():
            if create:
                raise ArchiveExistsError(f"{root} is a file, not a folder; give the archive a folder of its own "
                                         "(an empty or a missing one)")
            raise ArchiveNotFoundError(f"no archive at {root}: it is a file, not an archive folder")
        if create:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                if exc.errno in _WRITE_ERRORS:
                    raise ReadOnlyError(f"cannot create the archive folder {path}: {exc.strerror}; pick a location "
                                        "you can write to") from None
                if exc.errno == errno.ENOTDIR:
                    above = next((q for q in path.parents if q.exists() and not q.is_dir()), path.parent)
                    raise InvalidInputError(f"cannot create the archive folder {path}: {above} is a file, not a "
                                            "folder; pick another location") from None
                raise
        elif not path.is_dir():
            raise ArchiveNotFoundError(f"no archive at {root}: the directory does not exist; create one with "
                                       f"`gpupas init {root}`")
        self.root = path
        self.local_root: str | None = str(path)
        self.storage_options: dict[str, Any] | None = None
        self.durable = durable
        self.requests = 0  # files opened for reading: tests count them
        self.bytes_read = 0  # bytes the read calls returned
        self._counter = threading.Lock()

    def _count(self, data: Any) -> Any:
        """``data`` (bytes, or a list of them) after counting one read of its bytes."""
        n = sum(len(b) for b in data) if isinstance(data, list) else len(data)
        with self._counter:
            self.requests += 1
            self.bytes_read += n
        return data

    # -- opening below the root, never through a link ------------------------------------------------
    def _walk(self, parts: list[str], create: bool = False) -> int:
        """A descriptor of the folder ``parts`` below the root (made if ``create``)."""
        fd = self._root_fd()
        try:
            for i, p in enumerate(parts):
                try:
                    nfd = os.open(p, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(p, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                    nfd = os.open(p, _DIR, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # named where the walk stopped, not below
                        where = "/".join(parts[: i + 1])
                        if os.path.islink(os.path.join(self.root, where)):
                            raise LinkedError(f"{self.location}: {where} is a symbolic link; gpupas does not follow "
                                              "links inside an archive: move the folder itself back in its place (a "
                                              "link to the archive's root folder is followed)") from None
                        raise IntegrityError(f"{self.location}: {where} is not a folder") from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    @contextmanager
    def _folder(self, key: str, create: bool = False) -> Iterator[tuple[int, str]]:
        parts = _parts(key)
        fd = self._walk(parts[:-1], create)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def open_file(self, key: str) -> int | None:
        """A descriptor of the regular file at ``key`` (not through a link), or None; close it."""
        return self._open_read(key)

    def read_at(self, fd: int, n: int, offset: int) -> bytes:
        """``n`` bytes from ``offset`` of an open file (fewer at its end)."""
        return self._count(os.pread(fd, n, offset))

    def read_into(self, fd: int, view: memoryview | Sequence[memoryview], offset: int) -> int:
        """Fill ``view`` (or the views one after another) from ``offset`` of an open file; returns the
        bytes read (fewer at its end)."""
        views = [view] if isinstance(view, memoryview) else [v for v in view if len(v)]
        got = 0
        while views:
            n = _preadv(fd, views, offset + got)
            if n <= 0:
                break
            got += n
            _advance(views, n)
        with self._counter:
            self.requests += 1
            self.bytes_read += got
        return got

    def _open_read(self, key: str) -> int | None:
        """A descriptor of the regular file at ``key``, or None where nothing is there."""
        try:
            with self._folder(key) as (dfd, name):
                fd = os.open(name, _READ, dir_fd=dfd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LinkedError(f"{self.location}: {key} is a symbolic link; gpupas does not follow links inside "
                                  "an archive: move the file itself back in its place") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise IntegrityError(f"{self.location}: {key} is not a regular file")
        return fd

    def _write_error(self, exc: OSError, what: str) -> Exception:
        if exc.errno in _WRITE_ERRORS:
            return ReadOnlyError(f"cannot write {what} in archive {self.location}: {exc.strerror}; the archive is "
                                 "read-only here (read commands still work)")
        if exc.errno in _FULL:  # an OSError still (callers tell a full disk by its errno), naming where and what to do
            return OSError(exc.errno, f"{exc.strerror}: cannot write {what} in {self.location}; free space there "
                                      "(`gpupas gc` removes data no snapshot needs) and run the command again: "
                                      "nothing half-written is visible")
        return exc

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            err = self._write_error(exc, what)
            if err is exc:
                raise
            raise err from None

    # -- reads ---------------------------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        fd = self._open_read(key)
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            chunks, got = [], 0
            while True:
                b = os.read(fd, max(size - got, 1 << 16))
                if not b:
                    break
                chunks.append(b)
                got += len(b)
            return self._count(b"".join(chunks))
        finally:
            os.close(fd)

    def get_range(self, key: str, start: int, length: int | None) -> bytes | None:
        fd = self._open_read(key)
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            if start < 0:
                start = max(0, size + start)
            n = size - start if length is None else min(length, max(0, size - start))
            return self._count(os.pread(fd, n, start) if n > 0 else b"")
        finally:
            os.close(fd)

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        fd = self._open_read(key)
        if fd is None:
            raise FileNotFoundError(key)
        try:
            return self._count([os.pread(fd, n, s) for s, n in ranges])
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        try:
            with self._folder(key) as (dfd, name):
                return stat.S_ISREG(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode)
        except (FileNotFoundError, NotADirectoryError, IntegrityError):
            return False

    def size(self, key: str) -> int | None:
        """Bytes of the regular file at ``key`` (None if missing; a link or non-file is refused)."""
        fd = self._open_read(key)
        if fd is None:
            return None
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def _root_fd(self) -> int:
        return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _tree(self, prefix: str) -> Iterator[os.stat_result]:
        """The stat of ``prefix`` (a file or a folder) and of everything below it, never through a link."""
        try:
            if not prefix:
                fd = self._root_fd()
            else:
                with self._folder(prefix) as (dfd, name):
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode):
                        if stat.S_ISREG(st.st_mode):
                            yield st
                        return
                    fd = os.open(name, _DIR, dir_fd=dfd)
        except (FileNotFoundError, NotADirectoryError, IntegrityError):
            return
        try:
            yield os.fstat(fd)
            for _, _, files, dfd in os.fwalk(".", dir_fd=fd, follow_symlinks=False):
                yield os.fstat(dfd)
                for n in files:
                    try:
                        yield os.stat(n, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        pass
        finally:
            os.close(fd)

    def list(self, prefix: str) -> list[str]:
        try:
            fd = self._walk(_parts(prefix)) if prefix else self._root_fd()
        except (FileNotFoundError, NotADirectoryError):
            return []
        try:
            with os.scandir(fd) as it:
                return [e.name for e in it]
        finally:
            os.close(fd)

    def age(self, prefix: str) -> float | None:
        newest = max((st.st_mtime for st in self._tree(prefix)), default=None)
        return None if newest is None else max(0.0, time.time() - newest)

    # -- writes --------------------------------------------------------------------------------------------
    def _write_tmp(self, dfd: int, name: str, data: bytes) -> str:
        tmp = f".{name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        try:
            _write_all(fd, data)
            if self.durable:
                fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dfd)
            raise
        os.close(fd)
        return tmp

    def _open_write(self, dfd: int, name: str, key: str) -> int:
        """A descriptor of the regular file ``name`` in folder ``dfd``, made or emptied for writing.

        A link there is refused, never followed; so is a FIFO (O_NONBLOCK: opening one without a
        reader fails at once instead of waiting for one) or a device.
        """
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         0o644, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise IntegrityError(f"{self.location}: {key} is a symbolic link; gpupas does not follow links "
                                     "inside an archive") from None
            if exc.errno == errno.ENXIO:
                raise IntegrityError(f"{self.location}: {key} is not a regular file") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise IntegrityError(f"{self.location}: {key} is not a regular file")
        return fd

    def put(self, key: str, data: bytes, sync: bool = True) -> None:
        with self._writing(key), self._folder(key, create=True) as (dfd, name):
            fd = self._open_write(dfd, name, key)
            try:
                _write_all(fd, data)
                if self.durable and sync:
                    fsync(fd)
            finally:
                os.close(fd)

    def create(self, key: str, data: bytes) -> bool:
        with self._writing(key), self._folder(key, create=True) as (dfd, name):
            tmp = self._write_tmp(dfd, name, data)
            try:
                os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)  # atomic create-if-absent
            except FileExistsError:
                os.unlink(tmp, dir_fd=dfd)
                return False
            except BaseException:
                os.unlink(tmp, dir_fd=dfd)
                raise
            self._settle(dfd, key, tmp)
            return True

    def update(self, key: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        with self._writing(key), self._folder(key, create=True) as (dfd, name):
            fcntl.flock(dfd, fcntl.LOCK_EX)  # dropped by the kernel if this process dies
            try:
                old = self.get(key)
                new = change(old)
                if new is None:
                    return old
                tmp = self._write_tmp(dfd, name, new)
                try:
                    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                except BaseException:
                    os.unlink(tmp, dir_fd=dfd)
                    raise
                self._settle(dfd, key)
                return new
            finally:
                fcntl.flock(dfd, fcntl.LOCK_UN)

    def _settle(self, dfd: int, key: str, tmp: str | None = None) -> None:
        """What follows a value's atomic appearance (drop the temporary name, fsync the folder): it
        is visible now, so a failure here is a warning, never an error that would make the caller
        undo what others may already read."""
        try:
            if tmp is not None:
                os.unlink(tmp, dir_fd=dfd)
            if self.durable:
                fsync(dfd)
        except OSError as exc:
            warnings.warn(f"{self.location}: {key} was written but may not survive a power loss ({exc})",
                          stacklevel=3)

    @contextmanager
    def lock(self, prefix: str, exclusive: bool = False) -> Iterator[None]:
        """Hold a shared or exclusive ``flock`` on folder ``prefix`` (made if missing); the kernel drops
        it if this process dies."""
        fd = self._walk(_parts(prefix), create=True)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            if not _try_flock(fd, mode, SILENT_WAIT):  # a longer wait is said, then waited for: silence looks hung
                log.warning("gpupas: %s: waiting for %s to finish", self.location,
                            "commits, revisions or another gc" if exclusive else "a gc, discard or tier removal")
                fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    def delete(self, key: str) -> None:
        with self._writing(key):
            try:
                with self._folder(key) as (dfd, name):
                    os.unlink(name, dir_fd=dfd)
            except (FileNotFoundError, NotADirectoryError):
                pass

    def delete_prefix(self, prefix: str) -> None:
        _parts(prefix)  # checks the key
        with self._writing(prefix):
            try:
                with self._folder(prefix) as (dfd, name):
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        shutil.rmtree(name, dir_fd=dfd)  # never follows links inside
                    else:
                        os.unlink(name, dir_fd=dfd)
            except (FileNotFoundError, NotADirectoryError):
                pass

    def writer(self, key: str) -> LocalWriter:
        with self._writing(key), self._folder(key, create=True) as (dfd, name):
            fd = self._open_write(dfd, name, key)
        return LocalWriter(fd, self.durable, lambda exc: self._write_error(exc, key))

    def sync(self, keys: Sequence[str]) -> None:
        if not self.durable:
            return
        fds: list[int] = []
        with self._writing(keys[0] if keys else "the archive"):  # a full or read-only disk said as for writes
            try:
                for key in keys:
                    if not key:
                        fds.append(self._root_fd())
                        continue
                    with self._folder(key) as (dfd, name):
                        fds.append(os.open(name, _READ, dir_fd=dfd))  # a folder or a file alike
                _fsync_all(fds)
            finally:
                for fd in fds:
                    os.close(fd)

    # -- what the catalog and stats need ---------------------------------------------------------------
    def get_stat(self, key: str) -> tuple[bytes, tuple[int, int, int]] | None:
        """The value of ``key`` and its fingerprint (inode, mtime_ns, size), from one open file."""
        fd = self._open_read(key)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            data = self._count(os.pread(fd, st.st_size, 0) if st.st_size else b"")
        finally:
            os.close(fd)
        return data, (st.st_ino, st.st_mtime_ns, st.st_size)

    def stat_children(self, prefix: str) -> dict[str, tuple[int, int, int]]:
        """Fingerprint (inode, mtime_ns, size) of each regular file directly under ``prefix``."""
        try:
            fd = self._walk(_parts(prefix))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        out = {}
        try:
            with os.scandir(fd) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        out[e.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
        finally:
            os.close(fd)
        return out

    def usage(self, prefix: str) -> int:
        """Bytes of every file under ``prefix`` ("" for the whole archive)."""
        return sum(st.st_size for st in self._tree(prefix) if stat.S_ISREG(st.st_mode))


class LocalWriter:
    """A file appended from many threads: the place is taken under a lock, the bytes go in outside it."""

    def __init__(self, fd: int, durable: bool, error: Callable[[OSError], Exception] = lambda exc: exc):
        self.fd, self.durable, self._error = fd, durable, error  # error(exc): what to raise for a failed write
        self._lock = threading.Lock()
        self._size = 0

    def append(self, data: Any) -> int:
        views = buffers(data)
        with self._lock:
            offset = self._size
            self._size += sum(len(v) for v in views)
        try:
            _write_all(self.fd, views[0] if len(views) == 1 else views, offset)
        except OSError as exc:
            raise self._error(exc) from None
        return offset

    def flush(self) -> None:
        if self.durable:
            try:
                _datasync(self.fd)
            except OSError as exc:
                raise self._error(exc) from None

    def close(self, sync: bool = True) -> None:
        try:
            if self.durable and sync:
                fsync(self.fd)
        except OSError as exc:
            raise self._error(exc) from None
        finally:
            os.close(self.fd)

    def abort(self) -> None:
        os.close(self.fd)


def _write_all(fd: int, data: Any, offset: int | None = None) -> None:
    if isinstance(data, list):  # several buffers at ``offset``: one system call where the OS has pwritev
        if offset is not None and hasattr(os, "pwritev"):
            _pwritev_all(fd, data, offset)
            return
        data = b"".join(data)
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        if offset is not None:
            offset += n


def _pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    views = [v for v in views if len(v)]
    while views:
        n = os.pwritev(fd, views[:_IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        offset += n
        _advance(views, n)


def _preadv(fd: int, views: list[memoryview], offset: int) -> int:
    """One vectored read into ``views`` at ``offset`` (a ``pread`` into the first where the OS's Python
    has no ``preadv``); returns the bytes read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, views[:_IOV_MAX], offset)
    return _pread_into(fd, views[0], offset)


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def _advance(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes of ``views`` in place (after a vectored read or write moved that many):
    the buffers done, then the front of one partly done."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views.pop(0)
    if views and n:
        views[0] = views[0][n:]


_IOV_MAX = 512  # buffers per pwritev call (POSIX guarantees at least 16; Linux and macOS take 1024)
