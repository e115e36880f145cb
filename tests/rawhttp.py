"""A loopback server that answers each request with raw bytes, for HTTP framing edge cases.

``answers`` maps a request path to the bytes sent back (status line, headers and body exactly
as given), whether the connection is then closed, and bytes held back until the next request on
the same connection, then sent before its answer (stray bytes that arrive late). It counts
connections and keeps the request lines it saw, so tests can check keep-alive and what went on
the wire. Optional TLS.
"""

from __future__ import annotations

import socket
import ssl
import threading

NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class RawServer:
    def __init__(self, tls: ssl.SSLContext | None = None):
        self.answers: dict[str, tuple[bytes, bool, bytes]] = {}
        self.requests: list[bytes] = []
        self.connections = 0
        self.close_idle_after_one = False  # drop every kept-alive connection after one answer
        self._tls = tls
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def url(self, path: str, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def add(self, path: str, raw: bytes, close: bool = False, late: bytes = b"") -> str:
        self.answers[path] = (raw, close, late)
        return self.url(path)

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        try:
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            buffer = late = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                self.requests.append(head)
                path = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
                raw, close, held = self.answers.get(path, (NOT_FOUND, False, b""))
                conn.sendall(late + raw)
                late = held
                if close or self.close_idle_after_one:
                    return
        except (OSError, ssl.SSLError):
            return
        finally:
            conn.close()
