"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3-compatible server (moto).

``fail_every`` answers every Nth request with 500 InternalError (S3's retryable error),
``slow_every`` delays every Nth by ``delay`` seconds, ``deny`` answers every write with 403
AccessDenied (a permanent error). Everything else is forwarded as it came.
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from loopback import BackgroundServer

ERROR = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected</Message></Error>"


class FaultProxy(BackgroundServer):
    def __init__(self, upstream: str, fail_every: int = 0, slow_every: int = 0, delay: float = 0.2, deny: bool = False):
        target = urlsplit(upstream)
        self.fail_every, self.slow_every, self.delay, self.deny = fail_every, slow_every, delay, deny
        self.requests = self.injected = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = []
                while True:  # HTTP/1.1 chunked upload: forward it whole, with a length
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()

            def _handle(self):
                body = self._body()
                with proxy._lock:
                    proxy.requests += 1
                    number = proxy.requests
                if proxy.slow_every and number % proxy.slow_every == 0:
                    time.sleep(proxy.delay)
                if proxy.deny and self.command in ("PUT", "POST", "DELETE"):
                    return self._error(403, "AccessDenied")
                if proxy.fail_every and number % proxy.fail_every == 0:
                    with proxy._lock:
                        proxy.injected += 1
                    return self._error(500, "InternalError")
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                skip = ("connection", "transfer-encoding", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                headers["Content-Length"] = str(len(body))
                connection.request(self.command, self.path, body=body or None, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            def _error(self, status: int, code: str):
                data = ERROR.replace(b"{code}", code.encode())
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
