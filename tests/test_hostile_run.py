"""A hostile corpus through `facecap run`: every row ends with one clear status and every funnel adds up.

The URL lists are as bad as real ones get (broken CSV lines, Windows-1252 and invalid bytes, a
megabyte caption, JSON of the wrong shape and type, numbers as URLs, a file without the URL
column, gzip), the server answers with errors, bombs and lies, and an img2dataset folder has a
broken shard. The run must finish, and each stage's rows must account for its parent's rows.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import insightface
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from facecap.cli import app
from facecap.corpus_server import CorpusServer
from facecap.pipeline.dataset import Dataset
from facecap.pipeline.storage import Storage

REPO = Path(__file__).resolve().parent.parent
GROUP = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
PORTRAITS = ["deepface/img1.jpg", "deepface/img10.jpg", "face_recognition/obama.jpg"]


def recipe(tmp_path: Path) -> Path:
    """The demo recipe (every built stage, embedded models), run in-process for speed."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["ingest"]["shard_size"] = 8
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def url_lists(folder: Path, server: CorpusServer, photos: list[Path]) -> None:
    folder.mkdir()
    good = [server.url(f"/files/{p.name}") for p in photos]
    truncated = server.add("/truncated.jpg", GROUP.read_bytes()[:5000], headers={"Content-Type": "image/jpeg"})
    html = server.add("/page.jpg", b"<html>not an image</html>", headers={"Content-Type": "image/jpeg"})
    csv_lines = [
        b"url,caption",
        f"{good[0]},a group photo".encode(),
        f'{good[1]},"caf\xe9 au lait"'.encode("cp1252"),  # not UTF-8
        f"{good[2]},{'x' * 1_000_000}".encode(),  # a megabyte caption
        f"{good[3]},too,many,fields".encode(),
        b'"http://a.example/unterminated.jpg,"no closing quote',
        f"{truncated},truncated".encode(),
        f"{html},html served as a jpeg".encode(),
        f"{server.url('/status/404')},dead".encode(),
        f"{server.url('/gzip-bomb')},bomb".encode(),
        f"{server.url('/redirect-loop')},loop".encode(),
        b"http://a.example/\x00nul.jpg,control byte",
        b"\xff\xfe\xfa,invalid bytes as a URL",
        b",empty",
    ]
    (folder / "a.csv").write_bytes(b"\n".join(csv_lines) + b"\n")
    jsonl = [
        json.dumps({"url": good[4 % len(good)], "caption": {"nested": ["not", "text"]}}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"url": 12345, "caption": "a number as URL"}),
        json.dumps({"url": None}),
        json.dumps({"caption": "no url field"}),
    ]
    (folder / "b.jsonl").write_text("\n".join(jsonl) + "\n")
    pq.write_table(
        pa.table({"url": pa.array([1, 2, None], pa.int64()), "caption": ["a", "b", "c"]}), folder / "c.parquet"
    )
    (folder / "d.csv").write_text("URL,TEXT\nhttp://b.example/1.jpg,x\nhttp://b.example/2.jpg,y\n")
    (folder / "e.txt.gz").write_bytes(gzip.compress(f"{good[0]}\n\n   \nnot a url\n{good[0]}\n".encode()))


def assert_every_funnel_adds_up(work: Path, stages: list[str], input_rows: int) -> dict[str, Counter]:
    """Each stage accounts for every row of its parent: passed through, rejected, or split into faces."""
    funnels: dict[str, Counter] = {}
    parent_rows: list[dict] | None = None
    for stage in stages:
        dataset = Dataset(Storage(str(work / stage)))
        summary = dataset.summary()
        assert summary["complete"], f"{stage} did not complete: {summary}"
        rows = [r for i in dataset.shard_indices() for r in dataset.read_shard(i, ["key", "status"]).to_pylist()]
        assert all(isinstance(r["status"], str) and r["status"] for r in rows), stage
        assert len({r["key"] for r in rows}) == len(rows), f"{stage}: duplicate keys"
        funnels[stage] = Counter(r["status"] for r in rows)
        assert summary["rows"] == len(rows) == sum(summary["by_status"].values())
        if parent_rows is None:
            assert len(rows) == input_rows
        else:
            keys = {r["key"] for r in rows}
            for parent in parent_rows:
                # A parent row survives under its key, or became face rows KEY_fN.
                assert parent["key"] in keys or any(k.startswith(parent["key"] + "_f") for k in keys), (
                    f"{stage} lost row {parent['key']} ({parent['status']})"
                )
            rejected_before = {r["key"]: r["status"] for r in parent_rows if r["status"] != "ok"}
            now = {r["key"]: r["status"] for r in rows}
            assert all(now[k] == s for k, s in rejected_before.items()), f"{stage} changed a rejected row"
        parent_rows = rows
    return funnels


@pytest.mark.slow
def test_hostile_url_lists_and_server_through_the_whole_pipeline(tmp_path, face_photos):
    photos = [GROUP] + [face_photos / name for name in PORTRAITS]
    served = tmp_path / "served"
    served.mkdir()
    for photo in photos:
        shutil.copyfile(photo, served / photo.name)
    work = tmp_path / "work"
    with CorpusServer(served) as server:
        url_lists(tmp_path / "lists", server, photos)
        result = CliRunner().invoke(
            app,
            ["run", "-c", str(recipe(tmp_path)), "-i", str(tmp_path / "lists"), "-o", str(work), "--executor", "local"],
        )
    assert result.exit_code == 0, result.output
    stages = yaml.safe_load((tmp_path / "hostile.yaml").read_text())["stages"]
    input_rows = 13 + 6 + 3 + 2 + 3  # data lines of a.csv, b.jsonl, c.parquet, d.csv, and non-blank e.txt.gz
    funnels = assert_every_funnel_adds_up(work, stages, input_rows)
    ingest = funnels["ingest"]
    assert ingest["ingest:malformed_row"] >= 2 + 2 + 1  # d.csv's rows, bad JSON and a list, field counts
    assert ingest["ingest:invalid_url"] >= 5
    assert ingest["ingest:duplicate_url"] >= 2
    download = funnels["download"]
    for reason in ("http_404", "not_an_image", "truncated_image", "too_large", "too_many_redirects"):
        assert download[f"download:{reason}"] >= 1, reason
    assert download["ok"] == 3  # photos 0-2 (photo 3's line has too many fields; the JSONL row repeats 0)
    rows = Dataset(Storage(str(work / "ingest"))).read_shard(0).to_pylist()
    assert any(r["alt_text"] == "café au lait" for r in rows)


def broken_img2dataset(folder: Path, photos: list[Path]) -> None:
    """Two img2dataset shards; the second's tar is cut off mid-member."""
    folder.mkdir()
    for shard, chunk in enumerate((photos[:2], photos[2:])):
        stem = f"{shard:05d}"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for i, photo in enumerate(chunk):
                data = photo.read_bytes()
                info = tarfile.TarInfo(f"{shard:05d}{i:04d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        data = buffer.getvalue()
        (folder / f"{stem}.tar").write_bytes(data if shard == 0 else data[: len(data) // 3])
        keys = [f"{shard:05d}{i:04d}" for i in range(len(chunk))]
        table = pa.table(
            {
                "key": keys,
                "url": [f"http://faces.example/{p.name}" for p in chunk],
                "caption": [p.stem for p in chunk],
                "status": ["success"] * len(chunk),
                "error_message": pa.nulls(len(chunk), pa.string()),
                "width": pa.array([None] * len(chunk), pa.int32()),
                "height": pa.array([None] * len(chunk), pa.int32()),
            }
        )
        pq.write_table(table, folder / f"{stem}.parquet")


@pytest.mark.slow
def test_an_img2dataset_folder_with_a_broken_shard_finishes_with_every_row_explained(tmp_path, face_photos):
    photos = [face_photos / name for name in PORTRAITS] + [GROUP]
    broken_img2dataset(tmp_path / "i2d", photos)
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    stages = [s for s in config["stages"] if s != "download"]
    work = tmp_path / "work"
    result = CliRunner().invoke(
        app,
        ["run", "-c", str(recipe(tmp_path)), "-i", str(tmp_path / "i2d"), "-o", str(work), "--executor", "local"],
    )
    assert result.exit_code == 0, result.output
    funnels = assert_every_funnel_adds_up(work, stages, len(photos))
    detect = funnels["detect"]
    # Images past the cut are missing from the tar: their rows say so instead of vanishing.
    assert detect["detect:missing_media"] >= 1
    assert sum(n for s, n in detect.items() if s == "ok") >= 1
