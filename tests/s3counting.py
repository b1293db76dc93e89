"""An S3-compatible server on 127.0.0.1 that counts the requests each bucket gets.

moto's S3 app served by werkzeug in a thread of the test process, behind a WSGI middleware that
records every request (method, bucket, key, Range header) before moto answers it: what the server
saw, independent of any client-side counter. Import the fixture into a test module (``from
s3counting import counting_s3``).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
pytest.importorskip("boto3")

CREDENTIALS = {"key": "test", "secret": "test"}
REGION = "us-east-1"


class CountingS3:
    """The server's address, and the requests it has seen (thread-safe)."""

    def __init__(self) -> None:
        self.endpoint = ""
        self.log: list[tuple[str, str, str, str | None]] = []  # (method, bucket, key, range)
        self._lock = threading.Lock()

    def middleware(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        def counted(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "").lstrip("/")
            bucket, _, key = path.partition("/")
            with self._lock:
                self.log.append((environ.get("REQUEST_METHOD", ""), bucket, key, environ.get("HTTP_RANGE")))
            return app(environ, start_response)

        return counted

    def requests(self, bucket: str) -> list[tuple[str, str, str, str | None]]:
        with self._lock:
            return [r for r in self.log if r[1] == bucket]

    def count(self, bucket: str) -> int:
        return len(self.requests(bucket))

    def reset(self) -> None:
        with self._lock:
            self.log.clear()

    def bucket(self) -> str:
        """A new, empty bucket; its name."""
        import boto3

        name = f"t-{uuid.uuid4().hex[:16]}"
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=CREDENTIALS["key"],
                     aws_secret_access_key=CREDENTIALS["secret"], region_name=REGION).create_bucket(Bucket=name)
        return name

    def options(self, secrets: bool = True) -> dict[str, Any]:
        """fsspec/s3fs storage options for this server (``secrets``: with the credentials)."""
        base = {"endpoint_url": self.endpoint, "client_kwargs": {"region_name": REGION}}
        return base | (CREDENTIALS if secrets else {})


@pytest.fixture(scope="module")
def counting_s3() -> Iterator[CountingS3]:
    """A request-counting moto S3 server on a free port of 127.0.0.1 (stopped after the module)."""
    from moto.moto_server import werkzeug_app
    from werkzeug.serving import make_server

    server = CountingS3()
    app = werkzeug_app.DomainDispatcherApplication(werkzeug_app.create_backend_app)
    # newer moto releases ship a handler keeping underscored S3 metadata headers; older ones serve
    # with werkzeug's (the tests set no such header), so take it only where it exists.
    handler = getattr(werkzeug_app, "MotoRequestHandler", None)
    httpd = make_server("127.0.0.1", 0, server.middleware(app), threaded=True, request_handler=handler)
    server.endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        thread.join(timeout=10)
