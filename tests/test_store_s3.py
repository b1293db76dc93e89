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
