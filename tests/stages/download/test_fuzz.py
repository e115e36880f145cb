"""Fuzzing the download stage: a few thousand mutated JPEG, PNG, GIF, WebP and ICO files (and
some mangled HTTP answers) served on loopback. Every row must end with exactly one status,
nothing may crash (no ``download:error``), every stored image must decode and carry no metadata,
and the worker's memory must stay bounded. A file stored as it came may keep the seeds' hidden
bytes only where a mutation spliced them into its compressed pixel data. ``FUZZ_CASES``
(default 3000) and ``FUZZ_SEED`` set the run; ``make fuzz`` runs a larger one."""

from __future__ import annotations

import io
import os
import random
import tarfile
from collections import Counter
from pathlib import Path

import hostile
import numpy as np
import pytest
from helpers import ingest, peak_rss_growth_while, read_all, run
from PIL import Image

from facecap.corpus_server import CorpusServer
from facecap.stages.download.fetch import HttpSettings, SafetySettings
from facecap.stages.download.stage import DownloadConfig, DownloadImageSettings, DownloadStage
from facecap.stages.shared.images import decode_bgr

CASES = int(os.environ.get("FUZZ_CASES", "3000"))
SEED = int(os.environ.get("FUZZ_SEED", "22"))
EXTREMES = [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x01\x00", b"\x80\x00\x00\x00"]


def seeds() -> dict[str, bytes]:
    """Small valid files of every kind, some of them already carrying hidden metadata."""
    photo = hostile.noise(48, 40)
    icon = io.BytesIO()
    hostile.gradient(64, 64).save(icon, "ICO", sizes=[(16, 16), (32, 32), (64, 64)])
    lossy = io.BytesIO()
    photo.save(lossy, "WEBP", quality=80)
    return {
        "jpeg": hostile.jpeg(photo),
        "progressive": hostile.progressive_with_metadata_between_scans(),
        "exif_jpeg": hostile.upright_with_gps(),
        "png": hostile.png_with_chunk(b"tEXt", image=photo),
        "palette": hostile.palette_with_transparency(),
        "gif": hostile.animated_gif(),
        "webp_lossless": hostile.webp_with(hostile.webp_chunk(b"EXIF", hostile.gps_exif())),
        "webp_lossy": lossy.getvalue(),
        "ico": icon.getvalue(),
        "ico_bomb": hostile.ico([(16, 16, hostile.png_of_zeros(3000, 3000))]),
        "tiff": hostile.tiff([(40, 30, 0), (20, 10, 0)]),
    }


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    """One to three random edits: flipped bytes, extreme 32-bit values, insertions, deletions,
    a truncation, a duplicated or spliced range, a trailer."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        edit = rng.randrange(8)
        at = rng.randrange(len(out) or 1)
        if edit == 0:
            for _ in range(rng.randint(1, 8)):
                if out:
                    out[rng.randrange(len(out))] = rng.randrange(256)
        elif edit == 1:
            out[at : at + 4] = rng.choice(EXTREMES)
        elif edit == 2:
            out[at:at] = rng.randbytes(rng.randint(1, 64))
        elif edit == 3:
            del out[at : at + rng.randint(1, 256)]
        elif edit == 4:
            del out[rng.randint(min(len(out), 8), len(out)) :]
        elif edit == 5:
            length = rng.randint(1, 512)
            out[at:at] = out[rng.randrange(len(out) or 1) :][:length]
        elif edit == 6:
            other = rng.choice(pool)
            cut = rng.randrange(len(other))
            out[at:] = other[cut:]
        else:
            out += rng.choice([hostile.SECRET, hostile.jpeg(hostile.gradient(16, 16)), b"<html>" + hostile.SECRET])
    return bytes(out)


def mangled_answer(rng: random.Random, body: bytes) -> tuple[int, dict[str, str]]:
    """A status and headers that do not match the body: claimed encodings, odd codes."""
    status = rng.choice([200, 200, 200, 203, 204, 206, 301, 302, 404, 410, 418, 500])
    headers = {"Content-Type": rng.choice(["image/jpeg", "text/html", "application/octet-stream", "image/x-icon"])}
    if rng.random() < 0.5:
        headers["Content-Encoding"] = rng.choice(["gzip", "deflate", "br", "gzip, gzip", "identity"])
    if rng.random() < 0.2:
        headers["X-Robots-Tag"] = rng.choice(["noai", "none", "facecap: noimageai", "googlebot: noindex"])
    return status, headers


def build_corpus(server: CorpusServer, count: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    originals = seeds()
    pool = list(originals.values())
    names = sorted(originals)
    served: dict[str, bytes] = {}
    for i in range(count):
        # Every tenth file is an unmutated seed: the funnel has clean images too.
        body = mutate(originals[names[i % len(names)]], rng, pool) if i % 10 else pool[i // 10 % len(pool)]
        path = f"/fuzz/{i}"
        if rng.random() < 0.05:
            status, headers = mangled_answer(rng, body)
            server.add(path, body, status=status, headers=headers)
        else:
            server.add(path, body, headers={"Content-Type": "image/jpeg"})
        served[server.url(path)] = body
    return served


def fuzz_config(fmt: str) -> DownloadConfig:
    return DownloadConfig(
        concurrency=32,
        http=HttpSettings(total_timeout=10, read_timeout=5, retries=0, max_redirects=1),
        safety=SafetySettings(allow_private_networks=True),
        # The shape limits off: small and odd-shaped mutants must reach the decoder too.
        image=DownloadImageSettings(output_format=fmt, max_pixels=4_000_000, min_image_size=0, max_aspect_ratio=None),
    )


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_mutated_images_each_end_with_one_status_and_nothing_leaks(tmp_path: Path, fmt: str):
    server = CorpusServer().start()
    try:
        cases = max(CASES // 3, 50)
        served = build_corpus(server, cases, SEED + ord(fmt[0]))
        csv = tmp_path / "urls.csv"
        csv.write_text("url\n" + "\n".join(served) + "\n")
        assert ingest(csv, tmp_path / "ingest", shard_size=5000).ok
        peak = peak_rss_growth_while(
            lambda: run(DownloadStage, tmp_path / "ingest", tmp_path / "dl", config=fuzz_config(fmt))
        )
    finally:
        server.stop()
    rows = read_all(tmp_path / "dl").to_pandas()
    assert len(rows) == cases and rows.key.is_unique and set(rows.url) == set(served)
    statuses = Counter(rows.status)
    assert rows.status.notna().all()
    assert all(s == "ok" or s.startswith(("download:", "ingest:")) for s in statuses), statuses
    assert statuses["download:error"] == 0, rows[rows.status == "download:error"].error.tolist()[:5]
    assert statuses["ok"] > cases // 10, statuses  # the mutations leave many images readable
    stored = _stored_images(tmp_path / "dl")
    assert set(stored) == set(rows.key[rows.status == "ok"])
    originals = dict(zip(rows.key, rows.url.map(served), strict=True))
    kept = set(rows.key[(rows.status == "ok") & (rows.reencoded == False)])  # noqa: E712
    assert kept, "no file was stored without a re-encode"
    for key, data in stored.items():
        pixels = decode_bgr(data)
        assert pixels is not None, key
        if key in kept:  # the original's own pixels, minus everything else
            assert np.array_equal(pixels, decode_bgr(originals[key])), key
            assert not leaks(data, fmt), (key, leaks(data, fmt))
        else:  # an encoder wrote it from decoded pixels: none of the hidden bytes can be there
            assert hostile.SECRET not in data and b"Exif" not in data and b"<html" not in data, key
        assert Image.open(io.BytesIO(data)).format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    assert peak < 700, f"worker memory grew by {peak:.0f} MB"


HIDDEN = (hostile.SECRET, b"Exif", b"<html")


def leaks(data: bytes, fmt: str) -> list[tuple[bytes, int]]:
    """Hidden bytes of the seeds found outside the compressed pixel data of a kept file. Inside
    it they are pixels to a decoder (a mutation can splice them there) and only a re-encode,
    ``keep_original_bytes: false``, removes them."""
    spans = pixel_data(data, fmt)
    found = []
    for needle in HIDDEN:
        at = data.find(needle)
        while at >= 0:
            if not any(start <= at and at + len(needle) <= end for start, end in spans):
                found.append((needle, at))
            at = data.find(needle, at + 1)
    return found


def pixel_data(data: bytes, fmt: str) -> list[tuple[int, int]]:
    """Where the compressed pixels lie: a JPEG's entropy-coded scans, a PNG's IDAT payloads, a
    WebP's bitstream chunks (walked here independently of the code under test)."""
    spans = []
    if fmt == "jpg":
        position = 2
        while position + 4 <= len(data) and data[position] == 0xFF:
            marker = data[position + 1]
            if marker == 0xD9:
                break
            end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
            if marker == 0xDA:
                scan = end
                while end < len(data) and not (
                    data[end] == 0xFF and end + 1 < len(data) and data[end + 1] not in (0x00, 0xFF, *range(0xD0, 0xD8))
                ):
                    end += 1
                spans.append((scan, end))
            position = end
        return spans
    position = 8 if fmt == "png" else 12
    while position + 8 <= len(data):
        if fmt == "png":
            length, kind = int.from_bytes(data[position : position + 4], "big"), data[position + 4 : position + 8]
            following, pixels = position + 12 + length, kind == b"IDAT"
        else:
            kind, length = data[position : position + 4], int.from_bytes(data[position + 4 : position + 8], "little")
            following, pixels = position + 8 + length + (length & 1), kind in (b"VP8 ", b"VP8L", b"ALPH")
        if pixels:
            spans.append((position + 8, position + 8 + length))
        position = following
    return spans


def _stored_images(folder: Path) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for path in sorted(folder.glob("part-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.rpartition(".")
                if ext != "json":
                    found[key] = tar.extractfile(member).read()
    return found
