"""Shard files of a stream: its chunks, one Zarr ``sharding_indexed`` file per codec and shard.

The writer appends coded chunks from any thread, in any order (the spec allows it), and starts
making the data durable while coding goes on; the index goes at the end on close. The reader
takes a shard's index from its tail and each chunk by its range: a view of a memory map locally,
a ranged GET remotely.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import numpy as np

from gpupas.format import keys
from gpupas.format.manifest import Stream
from gpupas.format.sharding import EMPTY, decode_index, empty_index, encode_index, index_nbytes
from gpupas.store.base import Store

FLUSH_EVERY = 16 << 20  # durable stores: start writing a shard to disk after this many new bytes


class ShardSink:
    """Collects the coded chunks of one stream into its shard files."""

    def __init__(self, store: Store, stream: Stream, background: Callable[..., Future[Any]] | None = None):
        self.store, self.stream, self.per = store, stream, stream.shard_chunks
        self.background = background
        self._lock = threading.Lock()
        self._open: dict[tuple[str, int], list[Any]] = {}  # (codec id, shard) -> [writer, index, unsynced]
        self._flushes: list[Future[Any]] = []

    def add(self, c: int, letter: str, payload: Any) -> None:
        """Store chunk ``c`` (its bytes with their CRC) in the array of codec ``letter``."""
        codec_id = self.stream.codecs[letter]
        key = (codec_id, c // self.per)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                writer = self.store.writer(keys.shard(self.stream.folder, codec_id, key[1]))
                entry = self._open[key] = [writer, empty_index(self.per), 0]
        writer, index, _ = entry
        n = memoryview(payload).nbytes
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
                self._flushes = [f for f in self._flushes if not f.done()] + [fut]

    def _wait(self) -> None:
        flushes, self._flushes = self._flushes, []
        errors = [f.exception() for f in flushes]  # waits for each
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def close(self) -> None:
        """Write each shard's index and make every shard durable (where the store is)."""
        self._wait()
        while self._open:
            _, (writer, index, _) = self._open.popitem()
            writer.append(encode_index(index))
            writer.close()

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
    """Reads chunks of one stream (thread-safe)."""

    def __init__(self, store: Store, stream: Stream):
        self.store, self.stream, self.per = store, stream, stream.shard_chunks
        self._lock = threading.Lock()
        self._shards: dict[tuple[str, int], tuple[np.ndarray | None, Any]] = {}
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
            source = self.store.view(path)
            if source is None:
                return None, None
            end = len(source)
            tail = source[max(0, end - size) : end]
        else:
            tail = self.store.get_range(path, -size, None)
            if tail is None:
                return None, None
            source, end = None, self.store.size(path) or 0
        return decode_index(tail, self.per, end - size, path), source

    def locate(self, c: int) -> tuple[str, int, int] | None:
        """(shard key, offset, nbytes) of chunk ``c``, or None where its shard does not hold it."""
        codec_id, shard = key = self._key(c)
        index, _ = self._shard(key)
        if index is None or index[c % self.per, 0] == EMPTY:
            return None
        off, n = (int(x) for x in index[c % self.per])
        return keys.shard(self.stream.folder, codec_id, shard), off, n

    def get_many(self, chunks: Iterable[int]) -> dict[int, Any]:
        """The stored bytes (payload + CRC) of each chunk (None where its shard does not list it),
        as views where the store can map files. A damaged shard index raises IntegrityError."""
        out: dict[int, Any] = {}
        remote: dict[str, list[tuple[int, int, int]]] = {}
        for c in chunks:
            where = self.locate(c)
            if where is None:
                out[c] = None
                continue
            path, off, n = where
            if self.local:
                out[c] = memoryview(self._shard(self._key(c))[1])[off : off + n]
            else:
                remote.setdefault(path, []).append((c, off, n))
        for path, wanted in remote.items():
            for (c, _, _), data in zip(wanted, self.store.get_ranges(path, [(o, n) for _, o, n in wanted])):
                out[c] = data
        return out

    def close(self) -> None:
        for _, source in self._shards.values():
            close = getattr(source, "close", None)
            if close is not None:
                try:
                    close()
                except BufferError:  # a view is still held (an error's traceback): unmapped when freed
                    pass
        self._shards.clear()

