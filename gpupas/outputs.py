"""Files written for the user outside the archive (exports, checkouts): whole or not at all.

Each file is written to a new temporary file in the target's folder (created exclusively, never
through a link), then moved into place by a rename (which replaces a planted link itself rather
than writing through it) or, without ``replace``, linked into place (which refuses an existing file).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from gpupas.errors import ArchiveExistsError, GpupasError, InvalidInputError

STALE_AFTER = 3600.0  # seconds untouched after which a temporary output beside its target is a killed write's


def fsync(fd: int) -> None:
    """Flush ``fd`` to the disk itself: on macOS fsync stops at the drive's volatile cache (a power loss can
    still lose what it "synced"), so there F_FULLFSYNC; os.fsync where that is missing or refused (a file
    system that does not support it)."""
    full = getattr(fcntl, "F_FULLFSYNC", None)  # macOS only
    if full is not None:
        try:
            fcntl.fcntl(fd, full)
            return
        except OSError:
            pass
    os.fsync(fd)


def write_file(path: str | os.PathLike[str], fill: Callable[[BinaryIO], object] | bytes, *,
               replace: bool = False) -> Path:
    """Write ``path`` with ``fill(file)`` (or the bytes ``fill``); ArchiveExistsError if it exists and not
    ``replace``."""
    p = Path(path)
    if p.is_dir():
        raise InvalidInputError(f"{p} is a folder; give the path of a file to write")
    check_parents(p)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary(p)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:  # named by the file asked for, not by the temporary one
        raise cannot_write(p, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(fill, bytes):
                f.write(fill)
            else:
                fill(f)
            f.flush()
            fsync(f.fileno())
        if replace:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p, follow_symlinks=False)
            except FileExistsError:
                raise ArchiveExistsError(f"{p} exists; nothing written (use --force to overwrite)") from None
            os.unlink(tmp)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, GpupasError) and not exc.filename:  # a full disk: where
            raise cannot_write(p, exc) from None
        raise
    sweep_temporaries(p)
    return p


def temporary(p: Path) -> Path:
    """A new name beside ``p`` to write it under first: its start (a name of up to 255 bytes, the limit, leaves no
    room for the suffix), a random part, .tmp."""
    return p.with_name(f".{p.name[:40]}.{uuid.uuid4().hex}.tmp")


def sweep_temporaries(p: Path, min_age: float = STALE_AFTER) -> None:
    """Remove the temporary files and folders :func:`temporary` named for ``p`` that nothing touched for
    ``min_age`` seconds: what a killed export or checkout of ``p`` left hidden beside it (a write going on has
    a fresh time). Best effort: what cannot be removed stays."""
    pattern = re.compile(re.escape(f".{p.name[:40]}.") + r"[0-9a-f]{32}\.tmp")
    try:
        names = [n for n in os.listdir(p.parent) if pattern.fullmatch(n)]
    except OSError:
        return
    for name in names:
        remove_if_stale(p.parent / name, min_age)


def remove_if_stale(q: Path, min_age: float = STALE_AFTER) -> None:
    """Remove file or folder ``q`` (never what a link leads to) where nothing in it was touched for ``min_age``
    seconds: the leftovers of a killed process. Its folders' times count too: a file made and removed since (a
    plan's measured delta, discarded) leaves only its folder's time. Best effort: what cannot be removed stays."""
    try:
        folder = q.is_dir() and not q.is_symlink()
        touched = max([q.lstat().st_mtime, *(os.lstat(os.path.join(d, n)).st_mtime for d, ds, fs in
                                             (os.walk(q) if folder else ()) for n in (*ds, *fs))])
        if time.time() - touched < min_age:
            return
        if folder:
            shutil.rmtree(q)
        else:
            q.unlink()
    except OSError:
        pass


def check_parents(p: Path) -> None:
    """InvalidInputError where a folder ``p`` would be written in is a file (mkdir's error names only an errno:
    "File exists" or "Not a directory")."""
    for up in p.parents:
        if up.is_dir():
            return
        if up.exists() or up.is_symlink():
            raise InvalidInputError(f"{up} is a file, not a folder; nothing written: {p} cannot be written under it, "
                                    "give a path in a folder")


def cannot_write(p: Path, exc: OSError) -> OSError:
    """``exc`` (raised for a temporary name, or a folder on the way) as an error naming ``p``."""
    return OSError(exc.errno, f"cannot write {p}: {exc.strerror or exc}")
