"""A small HTTP proxy in front of a test S3 server that can lose chosen responses or answer errors.

``FaultProxy(endpoint).rule`` is called with (method, path, headers) of each request and returns None
(forward it), ``"lose"`` (forward it, then close the connection without answering: the request landed but
the client never hears so), or ``(status, code)`` (answer that S3 error without forwarding).
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

Rule = Callable[[str, str, Any], "str | tuple[int, str] | None"]


class FaultProxy:
    def __init__(self, upstream: str):
        up = urlparse(upstream)
        self.rule: Rule | None = None
        self.applied: list[tuple[str, str, Any]] = []  # (method, path, action) of requests a rule acted on
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                out = b""
                while n := int(self.rfile.readline().split(b";")[0], 16):
                    out += self.rfile.read(n)
                    self.rfile.readline()
                self.rfile.readline()
                return out

            def handle_any(self) -> None:
                body = self._body()
                act = proxy.rule(self.command, self.path, self.headers) if proxy.rule else None
                if act is not None:
                    proxy.applied.append((self.command, self.path, act))
                if isinstance(act, tuple):
                    xml = f"<Error><Code>{act[1]}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(act[0])
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",
                                                                                      "content-length")}
                conn.request(self.command, self.path, body=body, headers=headers | {"Content-Length": str(len(body))})
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if act == "lose":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def lose_once(self, method: str, path_part: str, header: str) -> None:
        """Lose the response to the first ``method`` request whose path holds ``path_part`` and that has ``header``."""
        done: list[bool] = []

        def rule(meth: str, path: str, headers: Any) -> str | None:
            if meth == method and path_part in path and headers.get(header) and not done:
                done.append(True)
                return "lose"
            return None

        self.rule = rule
