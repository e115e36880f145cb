"""``make demo``: every stage built so far, offline, on a small corpus served from 127.0.0.1.

The corpus is made of photos that installed packages carry (insightface's group photo and
portraits, scikit-image's astronaut, camera man, coffee, cat, rocket, ...), served by a loopback
HTTP server together with the broken and hostile answers real URL lists lead to, plus the kinds
of bad rows the lists themselves have.
Nothing leaves this machine and nothing is downloaded from outside.
"""

from __future__ import annotations

import csv
import importlib.resources
import importlib.util
import shutil
import sys
from pathlib import Path

from facecap.cli import app
from facecap.corpus_server import CorpusServer

OUT = Path("demo-out")
PACKAGE_PHOTOS = {
    # package: files inside it (all bundled in the wheel, no download)
    "insightface": [
        "data/images/t1.jpg",  # a group photo with 6 faces
        "data/images/Tom_Hanks_54745.png",
        "data/images/mask_white.jpg",
        "data/images/mask_blue.jpg",
    ],
    "skimage": [
        "data/astronaut.png",
        "data/camera.png",
        "data/coffee.png",
        "data/chelsea.png",
        "data/rocket.jpg",
        "data/hubble_deep_field.jpg",
        "data/text.png",
        "data/horse.png",
        "data/motorcycle_left.png",
        "data/retina.jpg",
    ],
}


def package_photos() -> list[Path]:
    found = []
    for package, names in PACKAGE_PHOTOS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        found += [root / name for name in names if (root / name).is_file()]
    return found


def build_corpus(folder: Path, server: CorpusServer) -> tuple[Path, Path]:
    """A URL list with good photos, hostile answers and every kind of row ingest must reject."""
    files = folder / "files"
    files.mkdir(parents=True, exist_ok=True)
    photos = package_photos()
    if not photos:
        sys.exit("make demo: no package photos found; run `make setup` (installs scikit-image)")
    rows = []
    for photo in photos:
        shutil.copyfile(photo, files / photo.name)
        rows.append((server.url(f"/files/{photo.name}"), f"{photo.stem.replace('_', ' ')} photo"))
    data = photos[0].read_bytes()
    (files / "truncated.png").write_bytes(data[: len(data) // 3])
    server.add("/soft-404.jpg", b"<html><body>Image not found</body></html>", headers={"Content-Type": "image/jpeg"})
    server.add("/opted-out.png", data, headers={"Content-Type": "image/png", "X-Robots-Tag": "noai"})
    rows += [
        (server.url("/files/truncated.png"), "a truncated file"),
        (server.url("/files/missing.jpg"), "a dead link"),
        (server.url("/soft-404.jpg"), "an HTML page served as image/jpeg"),
        (server.url("/opted-out.png"), "a site that opts out with X-Robots-Tag: noai"),
        (server.url("/status/503"), "an overloaded server"),
        (server.url("/redirect-loop"), "a redirect loop"),
        (server.url("/gzip-bomb"), "a gzip bomb"),
        ("", "empty URL"),
        ("ftp://127.0.0.1/photo.jpg", "not http"),
        ("http://127.0.0.1:99999/bad-port.jpg", "bad port"),
        (server.url(f"/files/{photos[0].name}"), "a repeat of an earlier URL"),
        ("http://opted-out.example/photo.jpg", "a domain on the opt-out list"),
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
    corpus = OUT / "corpus"
    shutil.rmtree(OUT, ignore_errors=True)
    corpus.mkdir(parents=True)
    with CorpusServer(corpus.resolve() / "files") as server:
        urls, opt_out = build_corpus(corpus, server)
        print(f"demo corpus: {urls} ({sum(1 for _ in urls.open()) - 1} rows), served at {server.base_url}")
        args = [
            "run",
            "--config", "demo",
            "--input", str(urls),
            "--output", str(work),
            "--set", f"ingest.opt_out=[{opt_out.resolve()}]",
        ]  # fmt: skip
        app(args, standalone_mode=False)
    app(["stats", str(work)], standalone_mode=False)
    last = work / load_stages()[-1]
    app(["export", str(last), str(OUT / "export"), "--shard-samples", "100"], standalone_mode=False)
    # The second use: re-caption existing shards (here the export just written) into per-shard
    # caption sidecars. Offline there is no VLM to ask, so the grammar captions again under another
    # seed from the attributes in each sample's JSON: a new caption version beside the tars. With a
    # model server: --captioner vlm --base-url http://HOST:8000/v1 --model NAME (docs/captioning.md).
    recaption = ["recaption", str(OUT / "export"), str(OUT / "captions"), "--captioner", "template"]
    app([*recaption, "--set", "caption.seed=1"], standalone_mode=False)
    app(["report", str(work), "--out", str(OUT / "report.html")], standalone_mode=False)
    print(f"\ndatasets: {work.resolve()}/<stage>/  (Parquet shards + WebDataset tars, _manifest.json, _stats/)")
    print(f"training shards: {(OUT / 'export').resolve()}/train-*.tar, index train.json (WebDataset / wids)")
    print(f"new captions of those shards: {(OUT / 'captions').resolve()}/train-*.captions.parquet, *_facecap.json")
    print(f"report: {(OUT / 'report.html').resolve()}  (open it in a browser; no network needed)")
    print(f"funnel as JSON: facecap stats {work} --json")
    return 0


def load_stages() -> list[str]:
    import yaml

    return yaml.safe_load(importlib.resources.files("facecap.configs").joinpath("demo.yaml").read_text())["stages"]


if __name__ == "__main__":
    sys.exit(main())
