"""Shard files: all chunks of one snapshot and kind in one file (Zarr v3 ``sharding_indexed``).

One file per kind and up to :data:`SHARD_CHUNKS` chunks instead of one file per chunk: a commit
makes two files and two fsyncs, not hundreds, and an object store gets two PUTs. Layout (the Zarr
v3 sharding spec, index at the end): the chunks' bytes in any order, then per chunk (offset,
nbytes) as little-endian uint64 (2^64-1 twice for a chunk stored in the other kind's file), then
the CRC32C of that index.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np

from gpupas.errors import IntegrityError
from gpupas.pas.codecs import crc32c
from gpupas.pas.store import ArchiveStore

SHARD_CHUNKS = 4096  # chunks per shard file: 1 GiB of planes
FLUSH_EVERY = 16 << 20  # durable stores: start writing a shard to disk after this many new bytes
_EMPTY = np.uint64(2**64 - 1)


def shard_chunks(nchunks: int) -> int:
    """Chunks per shard for a snapshot of ``nchunks`` chunks (small snapshots: one small index)."""
    return max(1, min(SHARD_CHUNKS, nchunks))


class ShardWriter:
    """Appends coded chunks of one snapshot to its shard files, from any thread, in any order."""

    def __init__(self, store: ArchiveStore, data: str, nchunks: int):
        self.store, self.data, self.per = store, data, shard_chunks(nchunks)
        self._lock = threading.Lock()
        self._open: dict[tuple[str, int], list[Any]] = {}  # key -> [fd or BytesIO, index, size, unsynced]
        self._syncs: list[threading.Thread] = []  # fdatasyncs running while the coders go on
        self._sync_errors: list[OSError] = []

    def add(self, kind: str, c: int, payload: bytes) -> None:
        key = (kind, c // self.per)
        with self._lock:  # only the place is decided under the lock; the bytes go in outside it
            entry = self._open.get(key)
            if entry is None:  # a file on local stores; memory (one PUT at close) on remote ones
                root = self.store.local_root
                sink: Any = io.BytesIO() if root is None else os.open(
                    root / self.store.chunk_key(self.data, kind, key[1]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                entry = self._open[key] = [sink, np.full((self.per, 2), _EMPTY, np.uint64), 0, 0]
            sink, index, offset, unsynced = entry
            index[c % self.per] = (offset, len(payload))
            entry[2] = offset + len(payload)
            if isinstance(sink, io.BytesIO):
                sink.seek(offset)
                sink.write(payload)
                return
            flush = self.store.durable and unsynced + len(payload) >= FLUSH_EVERY
            entry[3] = 0 if flush else unsynced + len(payload)
        _pwrite_all(sink, payload, offset)
        if flush:  # the disk writes overlap the coding; close() then has little left to wait for
            sync = threading.Thread(target=self._flush, args=(sink,), daemon=True)
            sync.start()
            with self._lock:
                self._syncs = [t for t in self._syncs if t.is_alive()] + [sync]

    def _flush(self, fd: int) -> None:
        try:
            _datasync(fd)
        except OSError as exc:  # a later fsync may not report it again: close() must
            with self._lock:
                self._sync_errors.append(exc)

    def _join_syncs(self) -> None:
        for sync in self._syncs:
            sync.join()
        self._syncs.clear()
        if self._sync_errors:
            raise self._sync_errors[0]

    def close(self) -> None:
        """Write each shard's index and make it durable (fsync where the store asks for it)."""
        self._join_syncs()
        while self._open:
            (kind, shard), (sink, index, size, _) = self._open.popitem()
            tail = index.astype("<u8").tobytes()
            tail += struct.pack("<I", crc32c(tail))
            if isinstance(sink, io.BytesIO):
                self.store.put(self.store.chunk_key(self.data, kind, shard), sink.getvalue() + tail)
                continue
            try:
                _pwrite_all(sink, tail, size)
                if self.store.durable:
                    os.fsync(sink)
            finally:
                os.close(sink)

    def abort(self) -> None:
        """Close open files without an index (the snapshot is never published)."""
        try:
            self._join_syncs()
        except OSError:
            pass  # the snapshot is being dropped anyway
        for sink, *_ in self._open.values():
            if not isinstance(sink, io.BytesIO):
                os.close(sink)
        self._open.clear()


_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(f"could not write shard data at offset {offset}")
        view, offset = view[n:], offset + n


class ShardReader:
    """Reads single chunks of one snapshot out of its shard files (thread-safe).

    Local shard files are memory-mapped (they never change once written): a chunk is a view of
    the page cache, read by the decoder with no copy and no system call.
    """

    def __init__(self, store: ArchiveStore, data: str, nchunks: int):
        self.store, self.data, self.per = store, data, shard_chunks(nchunks)
        self._lock = threading.Lock()
        self._index: dict[tuple[str, int], np.ndarray | None] = {}
        self._files: dict[tuple[str, int], Any] = {}

    def _shard(self, kind: str, shard: int) -> tuple[np.ndarray | None, Any]:
        key = (kind, shard)
        with self._lock:
            if key not in self._index:
                self._index[key], self._files[key] = self._load(kind, shard)
            return self._index[key], self._files[key]

    def _load(self, kind: str, shard: int) -> tuple[np.ndarray | None, Any]:
        path_key = self.store.chunk_key(self.data, kind, shard)
        size = self.per * 16 + 4
        root = self.store.local_root
        if root is not None:
            try:
                fd = os.open(Path(root) / path_key, os.O_RDONLY)
            except FileNotFoundError:
                return None, None
            try:
                end = os.fstat(fd).st_size
                try:
                    source: Any = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if end else b""
                except (OSError, ValueError):  # a file system without mmap: read the file
                    source = os.pread(fd, end, 0)
            finally:
                os.close(fd)
            tail = source[max(0, end - size) : end]
        else:
            blob = self.store.get(path_key)
            if blob is None:
                return None, None
            tail, source, end = blob[-size:], blob, len(blob)
        if len(tail) != size or struct.unpack("<I", tail[-4:])[0] != crc32c(tail[:-4]):
            raise IntegrityError(f"the index of shard {path_key} is damaged or truncated")
        index = np.frombuffer(tail[:-4], "<u8").reshape(self.per, 2)
        used = index[:, 0] != _EMPTY
        if np.any(index[used, 0] + index[used, 1] > end - size):
            raise IntegrityError(f"the index of shard {path_key} points past its data")
        return index, source

    def get(self, kind: str, c: int) -> memoryview | None:
        """The stored payload of chunk ``c``, a view (None where this kind's file does not hold it)."""
        index, source = self._shard(kind, c // self.per)
        if index is None or index[c % self.per, 0] == _EMPTY:
            return None
        off, n = (int(x) for x in index[c % self.per])
        return memoryview(source)[off : off + n]

    def close(self) -> None:
        for source in self._files.values():
            if isinstance(source, mmap.mmap):
                try:
                    source.close()
                except BufferError:  # a view is still held (an error's traceback): unmapped when freed
                    pass
        self._files.clear()
        self._index.clear()

