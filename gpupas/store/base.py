"""The store protocol: bytes by key, with the few atomic operations an archive needs.

Two implementations: :class:`~gpupas.store.local.LocalStore` (a directory) and
:class:`~gpupas.store.remote.RemoteStore` (fsspec; S3 with conditional writes). Keys are
'/'-separated paths relative to the archive root (:mod:`gpupas.format.keys`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol


def buffers(data: Any) -> list[memoryview]:
    """``data`` to append (a bytes-like object, or a list or tuple of them, written back to back) as byte
    views: a chunk's parts go out without being joined first."""
    if isinstance(data, (list, tuple)):
        return [memoryview(d).cast("B") for d in data]
    return [memoryview(data).cast("B")]


class Writer(Protocol):
    """A file being written (a shard): chunks appended from any thread, made durable on close."""

    def append(self, data: Any) -> int:
        """Write ``data`` (see :func:`buffers`) after what is there; returns the offset it starts at
        (thread-safe)."""
        ...

    def flush(self) -> None:
        """Start making what was appended durable (local: fdatasync); may run in the background."""
        ...

    def close(self, sync: bool = True) -> None:
        """Make everything durable (when the store is; ``sync=False``: the caller will, by
        :meth:`Store.sync`) and close; the file then exists whole."""
        ...

    def abort(self) -> None:
        """Close without finishing (the file may stay, partial: its folder is never published)."""
        ...


class Store(Protocol):
    """Bytes by key. ``get*`` return None (or raise nothing) for a missing key; writes raise
    ReadOnlyError where the store cannot be written."""

    location: str
    durable: bool
    local_root: str | None  # the directory of a local store, else None

    @property
    def storage_options(self) -> dict[str, Any] | None:
        """What it was opened with (fsspec options of a remote store)."""
        ...

    def get(self, key: str) -> bytes | None: ...

    def get_range(self, key: str, start: int, length: int | None) -> bytes | None:
        """``length`` bytes from ``start`` (a negative ``start``: the last ``-start`` bytes)."""
        ...

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several (start, length) ranges of one key, each fetched alone (no whole-object read)."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int | None: ...

    def list(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (files and folders), in no particular order."""
        ...

    def age(self, prefix: str) -> float | None:
        """Seconds since anything under ``prefix`` was last written (None if nothing is there)."""
        ...

    def put(self, key: str, data: bytes, sync: bool = True) -> None:
        """Write a whole value (over any old one); ``sync=False``: the caller makes it durable by :meth:`sync`."""
        ...

    def create(self, key: str, data: bytes) -> bool:
        """Write ``data`` atomically if ``key`` does not exist; False (nothing written) if it does."""
        ...

    def update(self, key: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Atomic read-modify-write: ``change(old)`` returns the new bytes (None: leave as is).

        No other writer's update is lost: ``change`` is called again if the value moved under it.
        Returns what is stored afterwards.
        """
        ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def writer(self, key: str) -> Writer: ...

    def sync(self, keys: Sequence[str]) -> None:
        """Make the listed folders' entries and files' bytes durable (local: fsync them all at once)."""
        ...

    def get_stat(self, key: str) -> tuple[bytes, tuple[int, int, int]] | None:
        """The value and a fingerprint that changes whenever the value is replaced (one read)."""
        ...

    def stat_children(self, prefix: str) -> dict[str, tuple[int, int, int]]:
        """The fingerprint of each value directly under ``prefix``."""
        ...

    def usage(self, prefix: str) -> int:
        """Bytes stored under ``prefix``."""
        ...

    def lock(self, prefix: str, exclusive: bool = False) -> AbstractContextManager[None]:
        """A lock on folder ``prefix`` held for a ``with`` block (shared, or exclusive), released if the
        process dies; a no-op where the store has no locks (object stores)."""
        ...


def is_remote(location: str | os.PathLike[str]) -> bool:
    loc = os.fspath(location)
    return "://" in loc and not loc.startswith("file://")


def open_store(location: str | os.PathLike[str], *, create: bool = False, durable: bool = True,
               storage_options: dict[str, Any] | None = None) -> Store:
    """The store at ``location``: a local directory, or an fsspec URL (s3://bucket/path)."""
    if is_remote(location):
        from gpupas.store.remote import RemoteStore

        return RemoteStore(os.fspath(location), storage_options=storage_options, durable=durable)
    from gpupas.store.local import LocalStore

    return LocalStore(os.fspath(location).removeprefix("file://"), create=create, durable=durable)
