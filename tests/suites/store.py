"""A reusable test suite for the :class:`~gpupas.store.base.Store` protocol, run on real stores.

Subclass :class:`StoreTests` in a test module that provides two fixtures:

* ``store``: an empty store, fresh for each test;
* ``archive_location``: ``(location, storage_options)`` of a place where a new archive can be
  created on the same kind of store (for the end-to-end ranged-read test).

Every test goes through the public methods only, so one suite checks every implementation the
same way (in the spirit of zarr-python's ``StoreTests``).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

import gpupas
from gpupas.format import keys
from gpupas.format.sharding import EMPTY, decode_index, index_nbytes
from gpupas.store.base import Store

THREADS = 8


def _slice(data: bytes, start: int, length: int | None) -> bytes:
    """What ``get_range(key, start, length)`` returns for a value ``data``: the model."""
    s = max(0, len(data) + start) if start < 0 else start
    return data[s:] if length is None else data[s : s + length]


def race(n: int, work: Callable[[int], Any]) -> list[Any]:
    """``work(i)`` for i in range(n), in n threads released at the same moment; the results."""
    barrier = threading.Barrier(n)

    def go(i: int) -> Any:
        barrier.wait()
        return work(i)

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(go, range(n)))


def counter_change(old: bytes | None) -> bytes:
    return b"%d" % (int(old or b"0") + 1)


def chunky_archive(location: str, options: dict[str, Any]) -> gpupas.Manifest:
    """An archive at ``location`` holding one snapshot: 'big' (2 MiB of noise in 32 chunks of
    64 KiB, one shard) and 'small' (16 values); its manifest."""
    rng = np.random.default_rng(7)
    tensors = {"big": rng.standard_normal(1 << 19).astype(np.float32), "small": np.arange(16, dtype=np.float32)}
    with gpupas.create_archive(location, storage_options=options) as a:
        return a.commit(tensors, layout=gpupas.Layout(chunk_size=65536))


def shard_facts(store: Store, m: gpupas.Manifest) -> tuple[int, int, int]:
    """(bytes of every shard file, the largest stored chunk, the bytes of one shard index) of ``m``."""
    (stream,) = m.streams
    total, largest = 0, 0
    per = stream.shard_chunks
    for codec_id in stream.codec_ids():
        for shard in range(-(-stream.nchunks // per)):
            key = keys.shard(stream.folder, codec_id, shard)
            data = store.get(key)
            if data is None:
                continue
            total += len(data)
            index = decode_index(data[-index_nbytes(per) :], per, len(data) - index_nbytes(per), key)
            used = index[:, 0] != EMPTY
            largest = max(largest, int(index[used, 1].max(initial=0)))
    return total, largest, index_nbytes(per)


class StoreTests:
    """The whole store protocol, on the store the ``store`` fixture gives."""

    # -- reads of what is not there ----------------------------------------------------------------------
    def test_missing_keys(self, store: Store) -> None:
        assert store.get("nope") is None
        assert store.get("no/such/key") is None
        assert store.get_range("nope", 0, 10) is None
        assert store.get_range("nope", -10, None) is None
        assert store.exists("nope") is False
        assert store.exists("no/such/key") is False
        assert store.size("nope") is None
        assert store.list("nope") == []
        assert store.list("no/such") == []
        assert store.age("nope") is None
        store.delete("nope")  # nothing to do, no error
        store.delete("no/such/key")
        store.delete_prefix("nope")
        store.delete_prefix("no/such")

    # -- whole values ----------------------------------------------------------------------------------------
    def test_put_get_round_trip(self, store: Store) -> None:
        big = os.urandom(5 << 20)
        values = {"empty": b"", "one": b"x", "a/b/c/deep": b"deep", "big": big}
        for k, v in values.items():
            store.put(k, v)
        for k, v in values.items():
            assert store.get(k) == v
            assert store.size(k) == len(v)
            assert store.exists(k)
        store.put("one", b"replaced, longer")
        store.put("big", b"short now")  # an overwrite leaves nothing of the old value
        assert store.get("one") == b"replaced, longer"
        assert store.get("big") == b"short now"
        assert store.size("big") == len(b"short now")

    def test_get_range(self, store: Store) -> None:
        data = bytes(range(256)) * 40  # 10240 bytes
        store.put("r", data)
        n = len(data)
        cases = [(0, 10), (0, None), (100, None), (100, 1), (5, 0), (n - 3, 10), (n, 5), (n + 100, 5), (n, None),
                 (-16, None), (-16, 4), (-1, None), (-n, None), (-(n + 500), None), (-(n + 500), 7)]
        for start, length in cases:
            assert store.get_range("r", start, length) == _slice(data, start, length), (start, length)
        store.put("empty", b"")
        for start, length in [(0, 5), (0, None), (3, 1), (-4, None)]:
            assert store.get_range("empty", start, length) == b"", (start, length)

    def test_get_ranges(self, store: Store) -> None:
        data = os.urandom(100_000)
        store.put("k/v", data)
        ranges = [(0, 10), (99_990, 10), (50_000, 1), (1234, 40_000), (7, 0), (99_995, 100), (200_000, 5)]
        assert store.get_ranges("k/v", ranges) == [data[s : s + n] for s, n in ranges]
        assert store.get_ranges("k/v", []) == []

    # -- listing, existence, size ----------------------------------------------------------------------------
    def test_list(self, store: Store) -> None:
        for k in ("d/a", "d/b", "d/sub/c", "d/sub/deeper/e", "dd/x", "top"):
            store.put(k, b"1")
        assert sorted(store.list("d")) == ["a", "b", "sub"]
        assert sorted(store.list("d/sub")) == ["c", "deeper"]
        assert sorted(store.list("")) == ["d", "dd", "top"]
        assert store.list("d/nope") == []
        assert store.list("e") == []

    def test_exists_and_size(self, store: Store) -> None:
        store.put("f/x", b"12345")
        assert store.exists("f/x") and store.size("f/x") == 5
        assert not store.exists("f")  # a folder is not a value
        assert not store.exists("f/y") and store.size("f/y") is None
        assert not store.exists("f/x/below")

    # -- deletes ---------------------------------------------------------------------------------------------
    def test_delete(self, store: Store) -> None:
        store.put("a/1", b"1")
        store.put("a/2", b"2")
        store.delete("a/1")
        assert store.get("a/1") is None and not store.exists("a/1")
        assert store.get("a/2") == b"2"
        store.delete("a/1")  # again: nothing there, no error

    def test_delete_prefix(self, store: Store) -> None:
        for k in ("p/a", "p/q/b", "p/q/r/c", "pp/keep", "p-keep", "other/keep"):
            store.put(k, k.encode())
        store.delete_prefix("p")
        assert store.list("p") == []
        assert store.get("p/a") is None and store.get("p/q/r/c") is None
        for k in ("pp/keep", "p-keep", "other/keep"):  # a prefix is a folder, not a string prefix
            assert store.get(k) == k.encode(), k
        store.delete_prefix("p")  # idempotent
        store.put("single/file", b"x")
        store.delete_prefix("single/file")  # a prefix naming one value deletes it
        assert store.get("single/file") is None

    # -- create-if-absent ------------------------------------------------------------------------------------
    def test_create(self, store: Store) -> None:
        assert store.create("c/k", b"first") is True
        assert store.create("c/k", b"second") is False
        assert store.get("c/k") == b"first"
        assert store.create("c/empty", b"") is True
        assert store.get("c/empty") == b"" and store.exists("c/empty")
        assert store.create("c/empty", b"x") is False
        assert store.get("c/empty") == b""
        store.put("c/put", b"p")
        assert store.create("c/put", b"x") is False
        assert store.get("c/put") == b"p"
        assert sorted(store.list("c")) == ["empty", "k", "put"]  # no temporary file left behind

    def test_concurrent_create_threads(self, store: Store) -> None:
        for round_ in range(3):
            key = f"race/{round_}"
            won = race(THREADS, lambda i, key=key: store.create(key, b"value of writer %d" % i))
            assert won.count(True) == 1, won
            assert store.get(key) == b"value of writer %d" % won.index(True)
        assert sorted(store.list("race")) == ["0", "1", "2"]

    # -- read-modify-write -----------------------------------------------------------------------------------
    def test_update_semantics(self, store: Store) -> None:
        seen: list[bytes | None] = []

        def first(old: bytes | None) -> bytes:
            seen.append(old)
            return b"1"

        assert store.update("u/k", first) == b"1"
        assert seen == [None]  # a missing key is seen as None
        assert store.get("u/k") == b"1"
        assert store.update("u/k", lambda old: old + b"2") == b"12"
        assert store.update("u/k", lambda old: None) == b"12"  # None: leave it as it is
        assert store.get("u/k") == b"12"
        assert store.update("u/none", lambda old: None) is None  # nothing there, nothing written
        assert not store.exists("u/none")
        assert store.update("u/empty", lambda old: b"") == b""
        assert store.get("u/empty") == b""
        assert sorted(store.list("u")) == ["empty", "k"]  # no temporary file left behind

    def test_update_of_a_key_deleted_meanwhile_writes_it_anew(self, store: Store) -> None:
        """A key deleted between update's read and its write (another process untagging) is written as
        new: not an error (S3 answers a conditional write on a missing key with 404)."""
        store.put("u/t", b"1")
        seen: list[bytes | None] = []

        def change(old: bytes | None) -> bytes:
            seen.append(old)
            if len(seen) == 1:
                store.delete("u/t")
            return b"2"

        assert store.update("u/t", change) == b"2"
        assert store.get("u/t") == b"2" and seen[0] == b"1"

    def test_update_error_leaves_value(self, store: Store) -> None:
        store.put("u/k", b"kept")

        def fail(old: bytes | None) -> bytes:
            raise KeyError("changed my mind")

        try:
            store.update("u/k", fail)
        except KeyError:
            pass
        else:
            raise AssertionError("the change function's error was swallowed")
        assert store.get("u/k") == b"kept"

    def test_concurrent_update_threads(self, store: Store) -> None:
        def work(i: int) -> None:
            for _ in range(10):
                store.update("count", counter_change)

        race(THREADS, work)
        assert store.get("count") == b"%d" % (THREADS * 10)

    # -- writers ---------------------------------------------------------------------------------------------
    def test_writer_concurrent_appends(self, store: Store) -> None:
        rng = np.random.default_rng(1)
        pieces = [rng.integers(0, 256, int(rng.integers(1, 40_000)), dtype=np.uint8) for _ in range(96)]
        pieces.append(rng.integers(0, 256, 3000, dtype=np.uint8))  # appended in 1000 parts: over one pwritev's
        w = store.writer("s/c/0")

        def parts(p: np.ndarray, k: int) -> list[Any]:  # a chunk in parts (views, bytes, an empty one)
            cuts = sorted(int(x) for x in rng.integers(0, len(p) + 1, k))
            edges = [0, *cuts, len(p)]
            return [memoryview(p)[a:b] if j % 2 else p[a:b].tobytes()
                    for j, (a, b) in enumerate(itertools.pairwise(edges))]

        appends = [(p.tobytes() if i % 3 == 0 else p if i % 3 == 1 else parts(p, 3)) for i, p in enumerate(pieces[:-1])]
        appends.append(parts(pieces[-1], 999))  # arrays, bytes and lists of parts alike
        with ThreadPoolExecutor(THREADS) as ex:
            offsets = list(ex.map(w.append, appends))
            w.flush()
        w.close()
        spans = sorted((off, len(p)) for off, p in zip(offsets, pieces))
        assert spans[0][0] == 0
        for (a, n), (b, _) in itertools.pairwise(spans):
            assert a + n == b  # no overlap, no gap
        data = store.get("s/c/0")
        assert len(data) == sum(len(p) for p in pieces) == store.size("s/c/0")
        for off, p in zip(offsets, pieces):
            assert data[off : off + len(p)] == p.tobytes()

    def test_writer_empty_and_abort(self, store: Store) -> None:
        w = store.writer("s/empty")
        w.close()
        assert store.get("s/empty") == b""
        w = store.writer("s/aborted")
        w.append(b"partial")
        w.abort()  # may leave a partial file; must not raise
        got = store.get("s/aborted")
        assert got in (None, b"", b"partial")

    # -- age -------------------------------------------------------------------------------------------------
    def test_age(self, store: Store) -> None:
        store.put("g/a/b", b"1")
        store.put("g/c", b"2")
        for p in ("g", "g/a", "g/a/b", "g/c"):
            age = store.age(p)
            assert age is not None and 0 <= age < 60, (p, age)
        assert store.age("g/nope") is None
        store.sync(["g", "g/a"])  # nothing to check but that it runs

    # -- counted reads: a chunk costs its bytes and its shard's index, not the shard -------------------------
    def test_ranged_reads_are_counted(self, store: Store) -> None:
        data = os.urandom(10_000)
        store.put("k", data)
        before = store.bytes_read
        store.get_range("k", 100, 50)
        store.get_range("k", -20, None)
        store.get_ranges("k", [(0, 5), (9_000, 7)])
        assert store.bytes_read - before == 50 + 20 + 5 + 7
        store.get("k")
        assert store.bytes_read - before == 82 + 10_000

    def test_restore_one_tensor_reads_one_chunk(self, archive_location: tuple[str, dict[str, Any]]) -> None:
        location, options = archive_location
        m = chunky_archive(location, options)
        (stream,) = m.streams
        assert stream.nchunks >= 32
        with gpupas.open_archive(location, storage_options=options) as fresh:
            store = fresh.store.store
            if store.local_root is not None:  # read by ranges as from a remote store, not through a memory map
                store.local_root = None
            fresh.manifest(m.id)  # the manifest is read (whole) before we count
            before, requests = store.bytes_read, store.requests
            out = fresh.restore(m.id, names=["small"])
            read, requests = store.bytes_read - before, store.requests - requests
            shards, largest, index = shard_facts(store, m)
        assert out["small"].tobytes() == np.arange(16, dtype=np.float32).tobytes()
        # 'small' is 64 bytes: at most two chunks (it may straddle a boundary), each with its shard's index
        assert read <= 2 * (largest + index), (read, largest, index)
        assert read < shards / 10, (read, shards)
        assert requests <= 8, requests
