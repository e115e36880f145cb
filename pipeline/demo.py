"""``make demo``: every stage built so far, offline, on a small corpus served from 127.0.0.1.

The corpus is a URL list pointing at a local HTTP server, with the kinds of bad rows real
lists have (invalid URLs, repeats, opted-out domains). Nothing leaves this machine.
"""

from __future__ import annotations

import csv
import shutil
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pipeline.cli import app

REPO = Path(__file__).resolve().parent.parent
OUT = Path("demo-out")


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None


def serve(folder: Path) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def build_corpus(folder: Path, base_url: str) -> tuple[Path, Path]:
    """A URL list with good rows and every kind of row ingest must reject, plus an opt-out list."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(f"{base_url}/images/photo_{i:03d}.jpg", f"a photo of person {i}") for i in range(40)]
    rows += [
        ("", "empty URL"),
        ("ftp://127.0.0.1/photo.jpg", "not http"),
        ("http:///no-host.jpg", "no host"),
        ("http://127.0.0.1:99999/bad-port.jpg", "bad port"),
        (f"{base_url}/images/photo_001.jpg", "a repeat of an earlier URL"),
        (f"{base_url}/images/photo_002.jpg", "another repeat"),
        ("http://opted-out.example/photo.jpg", "a domain that opted out"),
        ("http://cdn.opted-out.example/photo.jpg", "its subdomain"),
    ]
    urls = folder / "urls.csv"
    with urls.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        writer.writerows(rows)
    opt_out = folder / "opt_out.txt"
    opt_out.write_text("# domains whose owners opted out of AI training\nopted-out.example\n")
    return urls, opt_out


def main() -> int:
    work = OUT / "work"
    shutil.rmtree(work, ignore_errors=True)
    corpus = OUT / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    server = serve(corpus.resolve())
    base_url = f"http://127.0.0.1:{server.server_address[1]}"
    urls, opt_out = build_corpus(corpus, base_url)
    print(f"demo corpus: {urls} ({sum(1 for _ in urls.open()) - 1} rows), served at {base_url}")
    args = [
        "run",
        "--config", str(REPO / "configs" / "demo.yaml"),
        "--input", str(urls),
        "--output", str(work),
        "--set", f"ingest.opt_out=[{opt_out.resolve()}]",
    ]  # fmt: skip
    try:
        app(args, standalone_mode=False)
        app(["stats", str(work)], standalone_mode=False)
    finally:
        server.shutdown()
    print(f"\ndatasets: {work.resolve()}/<stage>/  (Parquet shards, _manifest.json, _stats/, _done/)")
    print(f"funnel as JSON: facecap stats {work} --json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
