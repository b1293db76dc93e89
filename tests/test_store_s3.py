"""The store suite on a real S3-compatible server (moto's, on 127.0.0.1): RemoteStore over s3fs."""

from __future__ import annotations

from typing import Any

import pytest
from s3server import s3_endpoint, s3_options, split
from suites.store import THREADS, StoreTests, race

from gpupas.store.base import open_store
from gpupas.store.remote import RemoteStore

__all__ = ["s3_endpoint", "s3_options"]  # fixtures this module uses


@pytest.fixture
def store(s3_options: dict[str, Any]) -> RemoteStore:
    url, opts = split(s3_options, "store")
    st = open_store(url, storage_options=opts)
    assert isinstance(st, RemoteStore) and st.s3
    return st


@pytest.fixture
def archive_location(s3_options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return split(s3_options, "arc")


class TestS3Store(StoreTests):
    pass


def test_two_stores_race_on_one_bucket(s3_options: dict[str, Any]) -> None:
    """Writers in separate clients (as separate machines would be) still serialize through S3's
    conditional writes."""
    url, opts = split(s3_options, "store")
    stores = [open_store(url, storage_options=opts) for _ in range(THREADS)]
    won = race(THREADS, lambda i: stores[i].create("race/key", b"client %d" % i))
    assert won.count(True) == 1, won
    assert stores[0].get("race/key") == b"client %d" % won.index(True)

    def work(i: int) -> None:
        for _ in range(5):
            stores[i].update("count", lambda old: b"%d" % (int(old or b"0") + 1))

    race(THREADS, work)
    assert stores[0].get("count") == b"%d" % (THREADS * 5)


def test_requests_are_counted(store: RemoteStore) -> None:
    store.put("k", b"0123456789")
    before = store.requests
    store.get_range("k", 2, 3)
    store.get_ranges("k", [(0, 1), (5, 2), (9, 1)])
    assert store.requests - before == 4


def test_touching_ranges_are_one_request(store: RemoteStore) -> None:
    """A stream's consecutive chunks are read by one request (not one a chunk), no byte more; ranges that
    do not touch, or pass the merge limit, are asked for apart; a range past the end reads short."""
    from gpupas.store import remote

    data = bytes(range(256)) * 64  # 16 KiB
    store.put("k", data)
    ranges = [(0, 100), (100, 50), (150, 1000), (4000, 10), (4010, 5), (16000, 1000), (200, 0), (9000, 3)]
    before, read = store.requests, store.bytes_read
    got = store.get_ranges("k", ranges)
    assert got == [data[a : a + n] for a, n in ranges]
    assert store.requests - before == 4 and store.bytes_read - read == sum(len(g) for g in got)
    old, remote.MERGE_BYTES = remote.MERGE_BYTES, 120
    try:
        before = store.requests
        assert store.get_ranges("k", ranges[:3]) == [data[a : a + n] for a, n in ranges[:3]]
        assert store.requests - before == 3  # 0-150 would pass 120 bytes: apart
    finally:
        remote.MERGE_BYTES = old
