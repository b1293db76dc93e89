"""A real S3-compatible server for tests: moto's, on 127.0.0.1, in a subprocess.

Import the fixtures into a test module (``from s3server import s3_endpoint, s3_options``: pytest
puts tests/ on sys.path): ``s3_endpoint`` starts one server per module; ``s3_options`` makes a
fresh bucket per test and returns fsspec/s3fs storage options with the bucket's name under
``"bucket"`` (pop it, or use :func:`split`).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
pytest.importorskip("boto3")

CREDENTIALS = {"key": "test", "secret": "test"}
REGION = "us-east-1"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """The URL of a moto S3 server on a free local port (stopped after the module)."""
    with moto_server() as url:
        yield url


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on a free local port for a ``with`` block (stopped at its end); its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start (exit code {proc.poll()})")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_bucket(endpoint: str) -> str:
    """A new, empty bucket on the server at ``endpoint``; its name."""
    import boto3

    bucket = f"t-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=CREDENTIALS["key"],
                 aws_secret_access_key=CREDENTIALS["secret"], region_name=REGION).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_options(s3_endpoint: str) -> dict[str, Any]:
    """Storage options for a fresh bucket (its name under "bucket": pop it before passing them on)."""
    return {**CREDENTIALS, "endpoint_url": s3_endpoint, "client_kwargs": {"region_name": REGION},
            "bucket": make_bucket(s3_endpoint)}


def split(options: dict[str, Any], path: str = "arc") -> tuple[str, dict[str, Any]]:
    """(``s3://bucket/path``, the storage options without "bucket") for :func:`s3_options`' output."""
    opts = dict(options)
    return f"s3://{opts.pop('bucket')}/{path}", opts
