"""A test HTTP server on 127.0.0.1 that serves on a daemon thread for the length of a with-block."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from typing import Self


class BackgroundServer:
    """Subclasses set ``self.httpd`` (a ThreadingHTTPServer on port 0) in their ``__init__``."""

    httpd: ThreadingHTTPServer

    def __enter__(self) -> Self:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
