"""A loopback HTTP server for test corpora: real files plus every hostile answer a crawler meets.

Used by the tests, the demo and the benchmarks; it only ever binds to 127.0.0.1, and every
endless or slow response stops by itself after a bounded time or size.
"""

from __future__ import annotations

import contextlib
import functools
import struct
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

MIME_BY_SUFFIX = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
}


@dataclass
class Canned:
    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class CorpusServer:
    """``server.url("/files/a.jpg")``; ``server.add("/x", body, headers=...)`` for canned answers.

    Dynamic hostile paths: ``/status/CODE`` (``?retry_after=S``), ``/flaky/NAME?fail=N`` (fails
    N times with 503, then serves ``/files/NAME``), ``/redirect-loop``, ``/redirect?to=URL``,
    ``/slow-drip`` (one byte every 0.5 s, for at most 60 s), ``/endless`` (a body that never
    ends, stopped after 200 MB), ``/wrong-length`` (declares more bytes than it sends),
    ``/gzip-bomb`` (260 kB that inflate to 256 MB), ``/sleep/NAME?s=S`` (serves a file after S s).
    """

    def __init__(self, folder: Path | None = None, port: int = 0):
        self.folder = folder
        self.canned: dict[str, Canned] = {}
        self.hits: Counter[str] = Counter()
        self.active = 0
        self.max_active = 0  # most requests served at once (to check client-side limits)
        self._lock = threading.Lock()
        # Built before the first request can arrive: a client's read timeout must never race it.
        self._bomb = gzip_bomb()
        handler = _make_handler(self)
        self.httpd = _QuietServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def add(self, path: str, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> str:
        self.canned[path] = Canned(body, status, headers or {})
        return self.url(path)

    def start(self) -> CorpusServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> CorpusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def gzip_bomb(self) -> bytes:
        return self._bomb


@functools.cache
def gzip_bomb(megabytes: int = 256) -> bytes:
    """A gzip body of ``megabytes`` MB of zeros, ~1 kB per MB, in well under a second.

    Each MB is deflated after a full flush, which resets the compressor's history, so every
    block compresses to the same bytes: one block is compressed and repeated, not 256.
    """
    block = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate, gzip framing below
    deflated = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(megabytes):
        crc = zlib.crc32(block, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # magic, deflate, no flags, mtime 0, best, unix
    trailer = struct.pack("<II", crc, (megabytes << 20) & 0xFFFFFFFF)
    return header + deflated * megabytes + deflate.flush() + trailer


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        return None  # clients hanging up mid-answer is the point of the hostile routes


def _make_handler(server: CorpusServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return None

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            with server._lock:
                server.hits[parts.path] += 1
                hits = server.hits[parts.path]
                server.active += 1
                server.max_active = max(server.max_active, server.active)
            try:
                # The client hanging up on a hostile answer is exactly what it should do.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
                    self._route(parts.path, query, hits)
            finally:
                with server._lock:
                    server.active -= 1

        def _route(self, path: str, query: dict, hits: int) -> None:
            if path in server.canned:
                canned = server.canned[path]
                return self._send(canned.status, canned.body, canned.headers)
            if path.startswith("/files/"):
                return self._file(path.removeprefix("/files/"))
            if path.startswith("/status/"):
                headers = {"Retry-After": query["retry_after"][0]} if "retry_after" in query else {}
                return self._send(int(path.rsplit("/", 1)[1]), b"error page", headers)
            if path.startswith("/flaky/"):
                if hits <= int(query.get("fail", ["1"])[0]):
                    return self._send(503, b"try again", {"Retry-After": "0"})
                return self._file(path.removeprefix("/flaky/"))
            if path.startswith("/sleep/"):
                time.sleep(float(query.get("s", ["0.2"])[0]))
                return self._file(path.removeprefix("/sleep/"))
            if path == "/redirect-loop":
                return self._send(302, b"", {"Location": "/redirect-loop"})
            if path == "/redirect":
                return self._send(302, b"", {"Location": query["to"][0]})
            if path == "/slow-drip":
                return self._drip()
            if path == "/endless":
                return self._endless()
            if path == "/wrong-length":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b"\xff\xd8\xff\xe0" + bytes(96))
                self.close_connection = True
                return None
            if path == "/gzip-bomb":
                return self._send(200, server.gzip_bomb(), {"Content-Encoding": "gzip", "Content-Type": "image/jpeg"})
            return self._send(404, b"not found")

        def _file(self, name: str) -> None:
            if server.folder is None or ".." in name:
                return self._send(404, b"not found")
            target = server.folder / name
            if not target.is_file():
                return self._send(404, b"not found")
            mime = MIME_BY_SUFFIX.get(target.suffix.lower(), "application/octet-stream")
            return self._send(200, target.read_bytes(), {"Content-Type": mime})

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            headers = headers or {}
            for name, value in headers.items():
                self.send_header(name, value)
            if "Content-Type" not in headers:
                self.send_header("Content-Type", "text/html" if status >= 300 else "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _drip(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            stop = time.monotonic() + 60
            while time.monotonic() < stop:
                self.wfile.write(b"\x00")
                self.wfile.flush()
                time.sleep(0.5)
            self.close_connection = True

        def _endless(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            block = bytes(1 << 16)
            for _ in range(3200):  # 200 MB, then give up
                self.wfile.write(block)
            self.close_connection = True

    return Handler
