"""The archive on a real S3-compatible server (moto's, on 127.0.0.1): the fsspec store path."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import zarr

import gpupas
from gpupas.errors import ArchiveNotFoundError, IntegrityError

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("moto server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def options(endpoint: str, request: pytest.FixtureRequest) -> dict[str, object]:
    opts = {"key": "test", "secret": "test", "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}
    import boto3

    bucket = f"b{abs(hash(request.node.name)) % 10**8}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    opts["bucket"] = bucket
    return opts


def _archive(opts: dict[str, object], create: bool = True) -> gpupas.Archive:
    o = dict(opts)
    url = f"s3://{o.pop('bucket')}/arc"
    return (gpupas.create_archive if create else gpupas.open_archive)(url, storage_options=o)


def test_commit_restore_delta_verify_on_s3(options: dict[str, object]) -> None:
    rng = np.random.default_rng(0)
    s0 = {"w": (rng.standard_normal((300, 700)) * 0.02).astype(np.float32), "n": np.arange(5)}
    s1 = {"w": (s0["w"] + rng.standard_normal((300, 700)).astype(np.float32) * 1e-6), "n": np.arange(5)}
    with _archive(options) as a:
        m0 = a.commit(s0)
        m1 = a.commit(s1, base=m0["id"])
        assert m1["stored_bytes"] < 0.7 * m0["stored_bytes"]
    with _archive(options, create=False) as fresh:
        assert fresh.snapshots() == [m0["id"], m1["id"]]
        out = fresh.restore(m1["id"])
        assert all(out[k].tobytes() == s1[k].tobytes() for k in s1)
        assert fresh.verify(m0["id"]) == 2
    # stock zarr reads the sharded planes straight from the bucket
    o = dict(options)
    root = f"s3://{o.pop('bucket')}/arc"
    stream = np.zeros(m0["length"], np.uint8)
    for kind in ("zstd", "deflate"):
        stream |= zarr.open_array(f"{root}/snapshots/{m0['data']}/{kind}", mode="r", storage_options=o)[:]
    w = stream[: s0["w"].nbytes].reshape(4, -1)  # 'w' is first; its planes, high byte first
    bits = (w[0].astype(np.uint32) << 24) | (w[1].astype(np.uint32) << 16) | (w[2].astype(np.uint32) << 8) | w[3]
    assert ((bits >> 1) | (bits << 31)).view(np.float32).tobytes() == s0["w"].tobytes()


def test_damage_and_missing_on_s3(options: dict[str, object]) -> None:
    with pytest.raises(ArchiveNotFoundError):
        _archive(options, create=False)
    with _archive(options) as a:
        m = a.commit({"w": np.ones(70000, np.float32)})
    o = dict(options)
    bucket = o.pop("bucket")
    fs = s3fs.S3FileSystem(**o)
    shard = f"{bucket}/arc/snapshots/{m['data']}/zstd/c/0"
    data = bytearray(fs.cat(shard))
    data[5] ^= 0xFF
    fs.pipe(shard, bytes(data))
    with _archive(options, create=False) as fresh, pytest.raises(IntegrityError, match=m["id"]):
        fresh.restore(m["id"])
