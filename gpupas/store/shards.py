"""Shard files of a stream: its chunks, one Zarr ``sharding_indexed`` file per codec and shard.

The writer appends coded chunks from any thread, in any order (the spec allows it), and starts
making the data durable while coding goes on; the index goes at the end on close. The reader
takes a shard's index from its tail and each chunk by its range: a ``pread`` locally,
a ranged GET remotely.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from gpupas.format import keys
from gpupas.format.manifest import Stream
from gpupas.format.sharding import EMPTY, decode_index, empty_index, encode_index, index_nbytes
from gpupas.store.base import Store, buffers

FLUSH_EVERY = 4 << 20  # durable stores: start writing a shard to disk after this many new bytes


def _succeeded(f: Future[Any]) -> bool:
    """Whether ``f`` ended without an error (a failed flush is kept for close() to raise)."""
    return f.done() and not f.cancelled() and f.exception() is None


class ShardSink:
    """Collects the coded chunks of one stream into its shard files."""

    def __init__(self, store: Store, stream: Stream, background: Callable[..., Future[Any]] | None = None):
        self.store, self.stream, self.per = store, stream, stream.shard_chunks
        self.background = background
        self._lock = threading.Lock()
        self._open: dict[tuple[str, int], list[Any]] = {}  # (codec id, shard) -> [writer, index, unsynced]
        self._flushes: list[Future[Any]] = []

    def add(self, c: int, letter: str, payload: Any) -> None:
        """Store chunk ``c`` (its bytes with their CRC, whole or in parts: see
        :func:`gpupas.store.base.buffers`) in the array of codec ``letter``."""
        codec_id = self.stream.codecs[letter]
        key = (codec_id, c // self.per)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                writer = self.store.writer(keys.shard(self.stream.folder, codec_id, key[1]))
                entry = self._open[key] = [writer, empty_index(self.per), 0]
        writer, index, _ = entry
        n = sum(len(v) for v in buffers(payload))
        offset = writer.append(payload)
        index[c % self.per] = (offset, n)
        if self.background is None or not self.store.durable:
            return
        with self._lock:
            entry[2] += n
            flush = entry[2] >= FLUSH_EVERY
            if flush:
                entry[2] = 0
        if flush:  # the disk writes overlap the coding; close() then has little left to wait for
            fut = self.background(writer.flush)
            with self._lock:
                self._flushes = [f for f in self._flushes if not _succeeded(f)] + [fut]  # a failure is kept

    def _wait(self) -> None:
        flushes, self._flushes = self._flushes, []
        errors = [f.exception() for f in flushes]  # waits for each
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def close(self, sync: bool = True) -> list[str]:
        """Write each shard's index and make every shard durable (where the store is; ``sync=False``: the
        caller will, by ``Store.sync``). Returns the shards' keys."""
        self._wait()
        written = []
        while self._open:
            (codec_id, shard), (writer, index, _) = self._open.popitem()
            try:
                writer.append(encode_index(index))
            except BaseException:  # (no longer in ``_open``: abort would not close it)
                writer.abort()
                raise
            writer.close(sync)
            written.append(keys.shard(self.stream.folder, codec_id, shard))
        return written

    def abort(self) -> None:
        """Close without indexes: the stream's folder is never published, gc removes it."""
        try:
            self._wait()
        except OSError:
            pass
        for writer, *_ in self._open.values():
            writer.abort()
        self._open.clear()


class ShardReader:
    """Reads chunks of one stream (thread-safe).

    Locally each chunk is read with ``pread`` into a per-thread buffer when its decoder asks for it
    (as fast as a memory map here, and a file truncated under a reader costs an IntegrityError, never
    a SIGBUS), or by :meth:`scatter` straight into buffers the decoder names; remotely the chunks are
    fetched by ranged GETs up front (:meth:`prepare`).
    """

    def __init__(self, store: Store, stream: Stream):
        self.store, self.stream, self.per = store, stream, stream.shard_chunks
        self._lock = threading.Lock()
        self._shards: dict[tuple[str, int], tuple[np.ndarray | None, Any]] = {}
        self._fetched: dict[int, Any] = {}
        self._where: dict[int, tuple[int, int, Any]] = {}  # locally, after prepare: chunk -> (offset, nbytes, fd)
        self._local = threading.local()
        self.local = store.local_root is not None

    def _key(self, c: int) -> tuple[str, int]:
        return self.stream.codec_of(c), c // self.per

    def _shard(self, key: tuple[str, int]) -> tuple[np.ndarray | None, Any]:
        with self._lock:
            got = self._shards.get(key)
            if got is None:
                got = self._shards[key] = self._load(*key)
            return got

    def _load(self, codec_id: str, shard: int) -> tuple[np.ndarray | None, Any]:
        path = keys.shard(self.stream.folder, codec_id, shard)
        size = index_nbytes(self.per)
        if self.local:
            fd = self.store.open_file(path)  # type: ignore[attr-defined]
            if fd is None:
                return None, None
            try:
                end = os.fstat(fd).st_size
                tail = self.store.read_at(fd, size, max(0, end - size))  # type: ignore[attr-defined]
                return decode_index(tail, self.per, end - size, path), fd
            except BaseException:
                os.close(fd)
                raise
        tail = self.store.get_range(path, -size, None)
        if tail is None:
            return None, None
        return decode_index(tail, self.per, (self.store.size(path) or 0) - size, path), None

    def locate(self, c: int) -> tuple[str, int, int] | None:
        """(shard key, offset, nbytes) of chunk ``c``, or None where its shard does not hold it."""
        codec_id, shard = key = self._key(c)
        index, _ = self._shard(key)
        if index is None or index[c % self.per, 0] == EMPTY:
            return None
        off, n = (int(x) for x in index[c % self.per])
        return keys.shard(self.stream.folder, codec_id, shard), off, n

    def prepare(self, chunks: Iterable[int]) -> list[int]:
        """Read the indexes of the shards that hold ``chunks`` (and, remotely, fetch the chunks by
        ranged GETs); returns the chunks that no shard lists. A damaged index raises IntegrityError."""
        missing = []
        remote: dict[str, list[tuple[int, int, int]]] = {}
        if self.local:  # each shard's index read once, as Python ints: fetch then needs no lookup
            rows: dict[tuple[str, int], tuple[list[list[int]] | None, Any]] = {}
            per, codec_of, empty = self.per, self.stream.codec_of, int(EMPTY)
            for c in chunks:
                key = (codec_of(c), c // per)
                got = rows.get(key)
                if got is None:
                    index, fd = self._shard(key)
                    got = rows[key] = (None if index is None else index.tolist(), fd)
                listed, fd = got
                off, n = (empty, 0) if listed is None else listed[c % per]
                if off == empty:
                    missing.append(c)
                else:
                    self._where[c] = (off, n, fd)
            return missing
        for c in chunks:
            where = self.locate(c)
            if where is None:
                missing.append(c)
            else:
                remote.setdefault(where[0], []).append((c, where[1], where[2]))
        for path, wanted in remote.items():
            for (c, _, _), data in zip(wanted, self.store.get_ranges(path, [(o, n) for _, o, n in wanted])):
                self._fetched[c] = data
        return missing

    def fetch(self, c: int) -> Any:
        """The stored bytes (payload + CRC) of chunk ``c`` (after :meth:`prepare`); locally a view of a
        per-thread buffer, valid until the same thread fetches again."""
        if not self.local:
            return self._fetched[c]
        where = self._where.get(c)
        if where is None:
            _, off, n = self.locate(c)  # type: ignore[misc]
            _, fd = self._shard(self._key(c))
        else:
            off, n, fd = where
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._local.buf = bytearray(max(n, 1 << 19))
        view = memoryview(buf)[:n]
        got = self.store.read_into(fd, view, off)  # type: ignore[attr-defined]
        return view[:got]  # short (a file truncated since): its CRC check fails

    def scatter(self, c: int, views: Sequence[memoryview]) -> bool | None:
        """Read the stored bytes of chunk ``c`` (after :meth:`prepare`) straight into ``views``, one after
        another: whether all were read; None, with nothing read, where the chunk is not exactly as long as
        the views together or the store is remote."""
        where = self._where.get(c) if self.local else None
        if where is None or where[1] != sum(len(v) for v in views):
            return None
        off, n, fd = where
        return self.store.read_into(fd, views, off) == n  # type: ignore[attr-defined]

    def release(self) -> None:
        """Forget the chunks prepared so far (their fetched bytes), keeping the shard indexes (and open files)
        for the next :meth:`prepare`: one reader for a restore's windows reads each index once."""
        self._fetched.clear()
        self._where.clear()

    def close(self) -> None:
        for _, fd in self._shards.values():
            if isinstance(fd, int):
                os.close(fd)
        self._shards.clear()
        self._fetched.clear()
        self._where.clear()
