"""The archive on S3 behind a proxy that loses responses or answers errors (what networks and busy servers do)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from s3proxy import FaultProxy
from s3server import CREDENTIALS, s3_endpoint, s3_options

import gpupas

__all__ = ["s3_endpoint", "s3_options"]  # fixtures this module uses


@pytest.fixture
def proxied(s3_options: dict[str, Any]) -> Iterator[tuple[FaultProxy, str, dict[str, Any]]]:
    """(the proxy, an archive URL, storage options that go through the proxy)."""
    opts = dict(s3_options)
    bucket = opts.pop("bucket")
    proxy = FaultProxy(opts["endpoint_url"])
    try:
        yield proxy, f"s3://{bucket}/arc", opts | {"endpoint_url": proxy.url}
    finally:
        proxy.close()


def _w(k: float = 0.0) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((200, 300)).astype(np.float32) + np.float32(k)


def test_a_lost_response_to_publishing_a_snapshot_keeps_it(proxied: tuple[FaultProxy, str, dict[str, Any]]) -> None:
    """The manifest's conditional PUT lands but its response is lost: the client's retry was refused (the key
    exists), so the commit said "snapshot already exists", deleted its folders and left a published snapshot
    without its data. The write carries a token that tells it was this commit's own."""
    proxy, url, opts = proxied
    with gpupas.create_archive(url, storage_options=opts) as a:
        a.commit({"w": _w()}, snapshot="s0")
        proxy.lose_once("PUT", "/manifests/s1.json", "If-None-Match")
        a.commit({"w": _w(1)}, snapshot="s1")
    assert proxy.applied
    with gpupas.open_archive(url, storage_options=opts) as a:
        assert a.snapshots() == ["s0", "s1"]
        assert a.restore("s1")["w"].tobytes() == _w(1).tobytes() and a.verify("s0") == 1


def test_a_lost_response_to_a_revision_keeps_it(proxied: tuple[FaultProxy, str, dict[str, Any]]) -> None:
    """A tier move's manifest replace (PUT If-Match) lands but its response is lost: the retry was refused
    (the ETag moved), the revision was taken for another writer's (ConflictError) and its new folders were
    deleted under the published manifest. Now the revision stands and reads back."""
    proxy, url, opts = proxied
    with gpupas.create_archive(url, storage_options=opts) as a:
        a.commit({"w": _w()}, snapshot="s0")
        a.add_tier("cold", url + "-cold", storage_options=opts)
        proxy.lose_once("PUT", "/manifests/s0.json", "If-Match")
        a.tier("s0", planes_from=2, to="cold")
    assert proxy.applied
    with gpupas.open_archive(url, storage_options=opts, tier_options={"cold": CREDENTIALS}) as a:
        assert [s.tier for s in a.manifest("s0").streams] == [None, "cold"]
        assert a.restore("s0")["w"].tobytes() == _w().tobytes()


@pytest.mark.parametrize("reads_too", [False, True])
def test_a_publish_whose_every_answer_is_lost_keeps_its_data(proxied: tuple[FaultProxy, str, dict[str, Any]],
                                                             reads_too: bool) -> None:
    """Every answer to the manifest's PUT is lost (the retries' too) though the first landed: the commit
    deleted its folders under the published manifest and said "nothing half-written is visible". Now it reads
    the manifest back (its own: the commit succeeded), and where that cannot be read either it keeps the data
    and says it cannot tell."""
    from gpupas.errors import StoreUnavailableError

    proxy, url, opts = proxied
    opts |= {"config_kwargs": {"retries": {"max_attempts": 1}}}
    with gpupas.create_archive(url, storage_options=opts) as a:
        a.commit({"w": _w()}, snapshot="s0")
        proxy.rule = lambda meth, path, headers: ("lose" if "/manifests/s1.json" in path and
                                                  (meth == "PUT" or reads_too) else None)
        if reads_too:
            with pytest.raises(StoreUnavailableError, match="cannot tell whether snapshot s1 was published"):
                a.commit({"w": _w(1)}, snapshot="s1")
        else:
            a.commit({"w": _w(1)}, snapshot="s1")
        proxy.rule = None
    assert proxy.applied
    with gpupas.open_archive(url, storage_options=opts) as a:
        assert a.snapshots() == ["s0", "s1"]
        assert a.restore("s1")["w"].tobytes() == _w(1).tobytes()


@pytest.mark.parametrize("reads_too", [False, True])
def test_a_version_record_whose_every_answer_is_lost_keeps_its_snapshots(
        proxied: tuple[FaultProxy, str, dict[str, Any]], reads_too: bool) -> None:
    """A version record's PUT (a new version; a snapshot added) lands but every answer is lost: the commit said
    nothing was stored and discarded its snapshot, which the published record names, so the version could not
    be restored. Now the record is read back (ours: the commit succeeded), and where it cannot be read either the
    snapshot is kept and the error says it cannot tell."""
    from gpupas.errors import StoreUnavailableError

    proxy, url, opts = proxied
    opts |= {"config_kwargs": {"retries": {"max_attempts": 1}}}

    def lose() -> None:
        proxy.rule = lambda meth, path, headers: ("lose" if "/versions/1.json" in path and
                                                  (meth == "PUT" or reads_too) else None)

    with gpupas.create_repository(url, storage_options=opts) as r:
        lose()
        if reads_too:
            with pytest.raises(StoreUnavailableError, match="cannot tell whether version 1 was published"):
                r.commit("v", {"w": _w()})
        else:
            r.commit("v", {"w": _w()})
            lose()
            r.add_snapshot(1, {"w": _w(1)})
        proxy.rule = None
    assert proxy.applied
    with gpupas.open_repository(url, storage_options=opts) as r:
        snaps = [s["id"] for s in r.version(1).snapshots]
        assert sorted(r.archive.snapshots()) == sorted(snaps) and len(snaps) == (1 if reads_too else 2)
        assert r.restore(1, snaps[-1])["w"].tobytes() == _w(0 if reads_too else 1).tobytes()


def test_a_server_without_conditional_writes_is_named(proxied: tuple[FaultProxy, str, dict[str, Any]]) -> None:
    """An S3-compatible server that does not implement conditional PUTs (If-None-Match, If-Match: 501
    NotImplemented, as S3 itself answered before 2024 and some servers still do) cannot hold an archive that is
    written. The commit said "cannot reach ...: check that it is online and give its credentials ... run the
    command again", which no credentials or retry fix; now it says the server lacks conditional writes, and
    nothing is left visible: the snapshot before stays, readable."""
    from gpupas.errors import StoreUnavailableError

    proxy, url, opts = proxied
    with gpupas.create_archive(url, storage_options=opts) as a:
        a.commit({"w": _w()}, snapshot="s0")
        a.add_tier("cold", url + "-cold", storage_options=opts)
        proxy.rule = lambda meth, path, headers: ((501, "NotImplemented") if meth == "PUT" and (
            headers.get("If-None-Match") or headers.get("If-Match")) else None)
        for write in (lambda: a.commit({"w": _w(1)}, snapshot="s1"),
                      lambda: a.tier("s0", planes_from=2, to="cold")):
            with pytest.raises(gpupas.GpupasError, match=r"does not support conditional writes") as got:
                write()
            assert not isinstance(got.value, StoreUnavailableError), got.value
            assert "run the command again" not in str(got.value)
        proxy.rule = None
    assert proxy.applied
    with gpupas.open_archive(url, storage_options=opts, tier_options={"cold": CREDENTIALS}) as a:
        assert a.snapshots() == ["s0"] and a.restore("s0")["w"].tobytes() == _w().tobytes()
        assert [s.tier for s in a.manifest("s0").streams] == [None]
