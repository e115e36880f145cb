"""The download stage end to end: a hostile loopback corpus, every row accounted for."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter

import hostile
import pytest
from helpers import ingest, peak_rss_growth_while, ray_executor, read_all, run
from PIL import Image

from facecap.corpus_server import CorpusServer
from facecap.pipeline.dataset import Dataset, TarShardReader
from facecap.pipeline.executors import ProcessExecutor
from facecap.pipeline.storage import Storage
from facecap.stages.download.fetch import HttpSettings, SafetySettings
from facecap.stages.download.stage import DownloadConfig, DownloadImageSettings, DownloadStage

PHOTOS = ["deepface/img1.jpg", "deepface/img10.jpg", "deepface/img11.jpg"]


def loopback_config(**image) -> DownloadConfig:
    return DownloadConfig(
        concurrency=8,
        http=HttpSettings(total_timeout=3, read_timeout=2, retries=1, backoff=0.05),
        safety=SafetySettings(allow_private_networks=True),
        image=DownloadImageSettings(**{"max_aspect_ratio": 10, "min_image_size": 16, **image}),
    )


@pytest.fixture
def corpus(tmp_path, face_photos):
    """Real photos plus every hostile answer; returns (server, csv path, expected status per URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    for name in PHOTOS:
        (folder / name.replace("/", "_")).write_bytes((face_photos / name).read_bytes())
    hostile.write_hostile_files(folder, (face_photos / PHOTOS[0]).read_bytes())
    server = CorpusServer(folder).start()
    server.add("/html-as-jpeg", b"<html><body>404</body></html>", headers={"Content-Type": "image/jpeg"})
    server.add("/noai", (face_photos / PHOTOS[1]).read_bytes(), headers={"X-Robots-Tag": "noai"})
    expected = {f"/files/{n.replace('/', '_')}": "ok" for n in PHOTOS}
    expected.update(
        {
            "/files/truncated.jpg": "download:truncated_image",
            "/files/page.jpg": "download:not_an_image",
            "/html-as-jpeg": "download:not_an_image",
            "/files/vector.svg": "download:unsupported_format",
            "/files/empty.jpg": "download:empty_body",
            "/files/one_pixel.png": "download:too_small",
            "/files/sliver.png": "download:aspect_ratio",
            "/files/bomb.png": "download:too_many_pixels",
            "/files/garbage.jpg": "download:not_an_image",
            "/files/cmyk.jpg": "ok",
            "/files/sixteen_bit.png": "ok",
            "/files/animated.gif": "ok",
            "/files/rotated_gps.jpg": "ok",
            "/files/upright_gps.jpg": "ok",
            "/files/palette_alpha.png": "ok",
            "/files/absent.jpg": "download:http_404",
            "/status/500": "download:http_500",
            "/status/429?retry_after=0": "download:http_429",
            "/redirect-loop": "download:too_many_redirects",
            "/slow-drip": "download:timeout",
            "/endless": "download:too_large",
            "/wrong-length": "download:bad_content_length",
            "/gzip-bomb": "download:too_large",
            "/noai": "download:opted_out_header",
            "/redirect?to=http://169.254.169.254/latest/meta-data/": "download:blocked_address",
        }
    )
    lines = ["url,caption"] + [f"{server.url(path)},caption for {path.replace(',', ' ')}" for path in expected]
    lines += ["not a url,bad", f"{server.url('/files/cmyk.jpg')},a repeat"]
    csv = tmp_path / "urls.csv"
    csv.write_text("\n".join(lines) + "\n")
    yield server, csv, {server.url(p): s for p, s in expected.items()}
    server.stop()


def test_hostile_corpus_every_row_gets_its_own_status(corpus, tmp_path):
    _server, csv, expected = corpus
    assert ingest(csv, tmp_path / "ingest", shard_size=12).ok
    peak = peak_rss_growth_while(
        lambda: run(DownloadStage, tmp_path / "ingest", tmp_path / "dl", config=loopback_config())
    )
    rows = read_all(tmp_path / "dl").to_pandas()
    assert len(rows) == len(expected) + 2  # the funnel: every input row is still here
    firsts = rows[rows.status != "ingest:duplicate_url"]
    by_url = dict(zip(firsts.url, firsts.status, strict=True))
    for url, status in expected.items():
        assert by_url[url] == status, (url, rows[rows.url == url].error.tolist())
    assert Counter(rows.status)["ingest:invalid_url"] == 1
    assert Counter(rows.status)["ingest:duplicate_url"] == 1
    failed = rows[rows.status.str.startswith("download:")]
    assert failed.error.notna().all() and (failed.error.str.len() > 3).all()
    assert peak < 600, f"worker memory grew by {peak:.0f} MB"
    summary = Dataset(Storage(str(tmp_path / "dl"))).summary()
    assert summary["rows"] == len(rows) == sum(summary["by_status"].values())


def test_stored_images_are_clean_rgb_and_match_their_rows(corpus, tmp_path):
    _server, csv, _ = corpus
    ingest(csv, tmp_path / "ingest", shard_size=100)
    run(DownloadStage, tmp_path / "ingest", tmp_path / "dl", config=loopback_config())
    rows = read_all(tmp_path / "dl").to_pandas().set_index("key")
    ok = rows[rows.status == "ok"]
    with TarShardReader(Storage(str(tmp_path / "dl")), "part-00000.tar") as tar:
        assert tar.stored_keys() == sorted(ok.index)
        for key, row in ok.iterrows():
            members = tar.get(key)
            assert set(members) == {"jpg", "json"}
            assert hashlib.sha256(members["jpg"]).hexdigest() == row.sha256
            assert len(members["jpg"]) == row.bytes
            image = Image.open(io.BytesIO(members["jpg"]))
            assert image.mode == "RGB" and image.size == (row.width, row.height)
            assert not image.getexif(), f"{row.url} kept EXIF"
            assert json.loads(members["json"])["url"] == row.url
    rotated = ok[ok.url.str.endswith("rotated_gps.jpg")].iloc[0]
    assert (rotated.width, rotated.height) == (200, 300) and rotated.reencoded
    original = ok[ok.url.str.endswith("img10.jpg")].iloc[0]
    assert not original.reencoded and original.http_status == 200 and original.mime == "image/jpeg"
    assert (ok.fetch_seconds > 0).all() and (ok.attempts == 1).all()
    with tarfile.open(tmp_path / "dl" / "part-00000.tar") as archive:
        names = archive.getnames()
    assert names == sorted(names)


def test_resize_on_download_and_webp_output(corpus, tmp_path):
    _server, csv, _ = corpus
    ingest(csv, tmp_path / "ingest", shard_size=100)
    config = loopback_config(resize_mode="keep_ratio_largest", image_size=128, output_format="webp")
    run(DownloadStage, tmp_path / "ingest", tmp_path / "dl", config=config)
    rows = read_all(tmp_path / "dl").to_pandas()
    ok = rows[rows.status == "ok"]
    assert (ok[["width", "height"]].max(axis=1) <= 128).all()
    manifest = Dataset(Storage(str(tmp_path / "dl"))).require_manifest()
    assert manifest.media["image"].ext == "webp"
    with TarShardReader(Storage(str(tmp_path / "dl")), "part-00000.tar") as tar:
        first = tar.get(ok.key.iloc[0])
    assert Image.open(io.BytesIO(first["webp"])).format == "WEBP"


def test_private_networks_are_refused_by_default(corpus, tmp_path):
    server, csv, _expected = corpus
    ingest(csv, tmp_path / "ingest", shard_size=100)
    run(DownloadStage, tmp_path / "ingest", tmp_path / "dl", config=DownloadConfig())
    rows = read_all(tmp_path / "dl").to_pandas()
    judged = rows[~rows.status.str.startswith("ingest:")]
    assert set(judged.status) == {"download:blocked_address"}
    assert server.hits.total() == 0


def test_retry_failed_redoes_only_transient_rows(tmp_path, face_photos):
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "a.jpg").write_bytes((face_photos / PHOTOS[1]).read_bytes())
    with CorpusServer(folder) as server:
        urls = [server.url("/files/a.jpg"), server.url("/flaky/a.jpg?fail=3"), server.url("/files/gone.jpg")]
        csv = tmp_path / "urls.csv"
        csv.write_text("url,caption\n" + "\n".join(f"{u},c" for u in urls) + "\n")
        ingest(csv, tmp_path / "ingest")
        config = loopback_config()
        config.http.retries = 0
        run(DownloadStage, tmp_path / "ingest", tmp_path / "dl", config=config)
        first = read_all(tmp_path / "dl").to_pandas().set_index("url")
        assert first.loc[urls[1], "status"] == "download:http_503"
        tar_before = TarShardReader(Storage(str(tmp_path / "dl")), "part-00000.tar")
        kept_member = tar_before.get(first.loc[urls[0], "key"])
        tar_before.close()
        server.hits.clear()
        server.hits["/flaky/a.jpg"] = 3  # the flaky URL now answers
        result = run(DownloadStage, tmp_path / "ingest", tmp_path / "dl", config=config, revisit=True)
        assert result.processed == 1
        assert server.hits["/files/a.jpg"] == 0 and server.hits["/files/gone.jpg"] == 0  # nothing else refetched
    second = read_all(tmp_path / "dl").to_pandas().set_index("url")
    assert second.loc[urls[1], "status"] == "ok"
    assert second.loc[urls[2], "status"] == "download:http_404"
    assert second.loc[urls[0], "sha256"] == first.loc[urls[0], "sha256"]
    with TarShardReader(Storage(str(tmp_path / "dl")), "part-00000.tar") as tar:
        assert tar.get(first.loc[urls[0], "key"]) == kept_member
        assert len(tar.stored_keys()) == 2
    assert Dataset(Storage(str(tmp_path / "dl"))).summary()["rows"] == 3


def test_the_default_image_limits_fit_a_face_corpus(tmp_path, face_photos):
    """Issue 22: without a recipe's limits, a 6000x1 sliver was stored as ok. The download section's
    defaults refuse slivers, strips and thumbnails and keep photos; a recipe can turn them off."""
    folder = tmp_path / "served"
    folder.mkdir()
    shapes = {"sliver": (6000, 1), "strip": (900, 200), "thumbnail": (63, 200), "tall": (150, 600)}
    for name, size in shapes.items():
        (folder / f"{name}.png").write_bytes(hostile.png(hostile.gradient(*size)))
    (folder / "face.jpg").write_bytes((face_photos / PHOTOS[1]).read_bytes())
    expected = {
        "sliver": "download:aspect_ratio",
        "strip": "download:aspect_ratio",  # 4.5:1
        "thumbnail": "download:too_small",
        "tall": "ok",  # 1:4 exactly
        "face": "ok",
    }
    with CorpusServer(folder) as server:
        csv = tmp_path / "urls.csv"
        names = {server.url(f"/files/{n}.{'jpg' if n == 'face' else 'png'}"): n for n in expected}
        csv.write_text("url,caption\n" + "\n".join(f"{u},c" for u in names) + "\n")
        ingest(csv, tmp_path / "ingest")
        loopback = {"safety": {"allow_private_networks": True}, "http": {"total_timeout": 3, "retries": 0}}
        run(DownloadStage, tmp_path / "ingest", tmp_path / "dl", config=DownloadConfig.model_validate(loopback))
        # A recipe that sets other image keys keeps the limits; null and 0 turn them off.
        kept = DownloadConfig.model_validate({**loopback, "image": {"resize_mode": "keep_ratio", "image_size": 700}})
        assert (kept.image.max_aspect_ratio, kept.image.min_image_size) == (4.0, 64)
        off = DownloadConfig.model_validate({**loopback, "image": {"max_aspect_ratio": None, "min_image_size": 0}})
        run(DownloadStage, tmp_path / "ingest", tmp_path / "dl_off", config=off)
    rows = read_all(tmp_path / "dl").to_pandas()
    assert {names[u]: s for u, s in zip(rows.url, rows.status, strict=True)} == expected
    assert set(read_all(tmp_path / "dl_off").to_pandas().status) == {"ok"}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["ray", "processes"])
def test_download_on_ray_and_on_a_process_pool(corpus, tmp_path, where, request):
    _server, csv, expected = corpus
    ingest(csv, tmp_path / "ingest", shard_size=8)
    if where == "ray":
        request.getfixturevalue("ray_local")
        executor = ray_executor()
    else:
        executor = ProcessExecutor(2)
    result = run(DownloadStage, tmp_path / "ingest", tmp_path / "dl", config=loopback_config(), executor=executor)
    assert result.ok and result.shards == 4
    rows = read_all(tmp_path / "dl").to_pandas()
    firsts = rows[rows.status != "ingest:duplicate_url"]
    by_url = dict(zip(firsts.url, firsts.status, strict=True))
    assert {url: by_url[url] for url in expected} == expected


@pytest.mark.slow
def test_ten_thousand_loopback_urls_with_five_percent_broken(tmp_path, face_photos, ray_local):
    folder = tmp_path / "served"
    folder.mkdir()
    photos = sorted((face_photos / "deepface").glob("img*.jpg"))[:20]
    for i, photo in enumerate(photos):
        with Image.open(photo) as image:
            image.convert("RGB").resize((96, 120)).save(folder / f"p{i}.jpg", quality=80)
    (folder / "cut.jpg").write_bytes((folder / "p0.jpg").read_bytes()[:900])
    n = 10_000
    urls, expected_broken = [], 0
    with CorpusServer(folder) as server:
        for i in range(n):
            if i % 20 == 3:
                urls.append(server.url(f"/files/missing{i}.jpg"))
                expected_broken += 1
            elif i % 40 == 11:
                urls.append(server.url(f"/files/cut.jpg?n={i}"))
                expected_broken += 1
            else:
                urls.append(server.url(f"/files/p{i % len(photos)}.jpg?n={i}"))
        csv = tmp_path / "urls.csv"
        csv.write_text("url,caption\n" + "\n".join(f"{u},photo {i}" for i, u in enumerate(urls)) + "\n")
        ingest(csv, tmp_path / "ingest", shard_size=2500)
        config = loopback_config()
        config.concurrency = 16
        config.http.per_host_concurrency = 16
        result = run(DownloadStage, tmp_path / "ingest", tmp_path / "dl", config=config, executor=ray_executor())
    assert result.ok and result.shards == 4
    summary = Dataset(Storage(str(tmp_path / "dl"))).summary()
    assert summary["rows"] == n == sum(summary["by_status"].values())
    assert summary["by_status"]["download:http_404"] == n // 20
    assert summary["by_status"]["download:truncated_image"] == expected_broken - n // 20
    assert summary["by_status"]["ok"] == n - expected_broken
    keys = set()
    for shard in range(4):
        with TarShardReader(Storage(str(tmp_path / "dl")), f"part-{shard:05d}.tar") as tar:
            keys.update(tar.stored_keys())
    assert len(keys) == n - expected_broken


def hostile_flight(server: CorpusServer, count: int = 32) -> list[str]:
    """``count`` hostile images to have in flight at once: half of them as large as max_pixels
    allows (16M pixels that compress to 20 kB), half bombs whose real size hides in a container."""
    large = hostile.png_of_zeros(4000, 4000)
    bombs = [
        hostile.ico([(0, 0, hostile.png_of_zeros(6000, 6000))]),
        hostile.tiff([(16, 16, 8192)]),
        hostile.tiff([(16, 16, 0), (6000, 6000, 0)]),
        hostile.gif_frame_beyond_screen(16, 6000, 6000),
    ]
    bodies = [large if i % 2 else bombs[i // 2 % len(bombs)] for i in range(count)]
    return [server.add(f"/flight/{i}", body) for i, body in enumerate(bodies)]


def flight_config(**image) -> DownloadConfig:
    config = loopback_config(max_pixels=16_000_000, resize_mode="keep_ratio", image_size=256, **image)
    config.concurrency = 32
    return config


@pytest.mark.slow
def test_32_hostile_images_in_flight_keep_the_worker_bounded(tmp_path):
    with CorpusServer() as server:
        urls = hostile_flight(server)
        csv = tmp_path / "urls.csv"
        csv.write_text("url\n" + "\n".join(urls) + "\n")
        ingest(csv, tmp_path / "ingest", shard_size=100)
        config = flight_config(decode_pixels_in_flight=32_000_000)
        peak = peak_rss_growth_while(lambda: run(DownloadStage, tmp_path / "ingest", tmp_path / "dl", config=config))
    statuses = Counter(read_all(tmp_path / "dl").to_pandas().status)
    assert statuses == {"ok": 16, "download:too_many_pixels": 16}, statuses
    # Two 16M-pixel decodes at a time (48 MB of BGR each, plus the decoder's buffers): about
    # 300 MB here; without the budget all sixteen at once grew it by about 1.3 GB, and on the
    # code before it (bombs decoded too) by 1.6 GB (docs/performance.md).
    assert peak < 450, f"worker memory grew by {peak:.0f} MB"
