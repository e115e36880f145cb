"""Exported shards load in the libraries trainers use: webdataset, a PyTorch DataLoader over
workers, Hugging Face datasets and pandas; counts, keys and contents match the source."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import insightface
import numpy as np
import pandas as pd
import pytest
from helpers import read_all, run_recipe
from typer.testing import CliRunner

from facecap.cli import app
from facecap.pipeline.errors import FacecapError
from facecap.stages.export.export import ExportSettings, export

REPO = Path(__file__).resolve().parent.parent.parent
GROUP = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, face_photos):
    """The demo recipe end to end (in-process) on a group photo and two portraits."""
    photos = {"group.jpg": GROUP.read_bytes()}
    photos.update(
        {
            n.replace("/", "_"): (face_photos / n).read_bytes()
            for n in ("deepface/img1.jpg", "face_recognition/obama.jpg")
        }
    )
    # The default crops (no tight box), and every face kept by tag.
    changes = {"tag": {"min_confident": 0}, "detect": {"crops": ["square", "aligned112"]}}
    final = run_recipe(tmp_path_factory.mktemp("export"), photos, changes)
    source = read_all(final).to_pandas()
    return final, source[source.status == "ok"].set_index("key")


def test_webdataset_shards_read_back_with_webdataset_and_a_dataloader(finished, tmp_path):
    import webdataset as wds
    from torch.utils.data import DataLoader

    final, ok = finished
    out = tmp_path / "wds"
    result = CliRunner().invoke(app, ["export", str(final), str(out), "--shard-samples", "3", "--seed", "1"])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "train.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and sum(s["nsamples"] for s in index["shardlist"]) == len(ok)
    urls = [str(out / s["url"]) for s in index["shardlist"]]
    for url in urls:
        with tarfile.open(url) as tar:
            names = tar.getnames()
        assert names == sorted(names) and all("/" not in n and ".." not in n for n in names)
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert sorted(s["__key__"] for s in samples) == sorted(ok.index)
    for sample in samples:
        row = ok.loc[sample["__key__"]]
        assert sample["txt"] == row.caption[0]
        assert sample["json"]["url"] == row.url and sample["json"]["box"] == pytest.approx(list(row.box), abs=1e-3)
        assert sample["jpg"].shape[:2] == (512, 512)
    dataset = wds.WebDataset(
        urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker
    )
    loader = DataLoader(dataset.to_tuple("__key__", "txt"), batch_size=None, num_workers=2)
    assert sorted(key for key, _ in loader) == sorted(ok.index)


def test_the_shuffle_is_global_seeded_and_the_split_keeps_identities_apart(finished, tmp_path):
    final, ok = finished
    first = export(str(final), str(tmp_path / "a"), ExportSettings(shard_samples=2, seed=3, val_fraction=0.4))
    again = export(str(final), str(tmp_path / "b"), ExportSettings(shard_samples=2, seed=3, val_fraction=0.4))
    assert first.shards == again.shards
    assert sum(first.samples.values()) == len(ok)
    same = export(str(final), str(tmp_path / "a"), ExportSettings(shard_samples=2, seed=3, val_fraction=0.4))
    assert same.skipped_existing == len(first.shards["train"]) + len(first.shards.get("val", []))  # resumed
    with pytest.raises(FacecapError, match="other settings"):
        export(str(final), str(tmp_path / "a"), ExportSettings(shard_samples=5))
    with pytest.raises(FacecapError, match="stores no 'box' crops"):
        export(str(final), str(tmp_path / "c"), ExportSettings(crop="box"))


def test_parquet_export_loads_in_datasets_and_pandas(finished, tmp_path, monkeypatch):
    final, ok = finished
    out = tmp_path / "parquet"
    result = CliRunner().invoke(app, ["export", str(final), str(out), "--format", "parquet"])
    assert result.exit_code == 0, result.output
    files = sorted(str(p) for p in out.glob("train-*.parquet"))
    frame = pd.concat(pd.read_parquet(f) for f in files)
    assert list(frame.columns[:5]) == ["_id", "url", "caption", "laion_caption", "box"]
    assert sorted(frame._id) == sorted(ok.index)
    row = frame.set_index("_id").loc[ok.index[0]]
    assert json.loads(row.box) == [round(v) for v in ok.iloc[0].box] and list(row.laion_caption) == [
        ok.iloc[0].alt_text
    ]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == len(ok) and set(loaded["_id"]) == set(ok.index)
    assert isinstance(loaded[0]["caption"], list)
    os.environ.pop("HF_DATASETS_OFFLINE", None)


def test_an_opt_out_list_leaves_out_the_faces_of_people_on_it(finished, tmp_path, face_photos):
    # The dataset was made before she opted out; she opts out with another photo of hers.
    final, ok = finished
    photos = tmp_path / "optout"
    photos.mkdir()
    (photos / "angelina.jpg").write_bytes((face_photos / "deepface" / "img2.jpg").read_bytes())
    listing = tmp_path / "optout.json"
    runner = CliRunner()
    assert runner.invoke(app, ["optout", "add", str(listing), str(photos)]).exit_code == 0
    out = tmp_path / "out"
    args = ["export", str(final), str(out), "--format", "parquet", "--opt-out-embeddings", str(listing)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "export: 1 face(s) of people on the opt-out list left out" in result.output
    exported = set(pd.concat(pd.read_parquet(f) for f in sorted(out.glob("train-*.parquet")))._id)
    hers = set(ok.index[ok.url.str.endswith("deepface_img1.jpg")])
    assert len(hers) == 1 and exported == set(ok.index) - hers  # everyone else stays
    # More people on the list make another export: never mixed into this folder.
    (photos / "obama.jpg").write_bytes((face_photos / "face_recognition" / "obama.jpg").read_bytes())
    assert runner.invoke(app, ["optout", "add", str(listing), str(photos)]).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "other settings or input" in again.output


def test_without_the_lists_model_export_refuses_in_one_line_before_writing(finished, tmp_path, monkeypatch):
    from facecap.stages.shared.identity import OptOutList

    final, _ = finished
    listing = OptOutList(model="mobilefacenet", model_sha256="0" * 64)
    listing.add("someone", [np.ones(128, np.float32) / np.sqrt(128)])
    listing.save(tmp_path / "optout.json")
    out = tmp_path / "out"
    args = ["export", str(final), str(out), "--opt-out-embeddings", str(tmp_path / "optout.json")]
    mismatch = CliRunner().invoke(app, args)  # the model here is not the one the list was made with
    assert mismatch.exit_code == 2 and "made with the face-embedding model" in mismatch.output
    monkeypatch.setenv("FACECAP_MODELS", str(tmp_path / "none"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2 and "model mobilefacenet" in missing.output
    assert "\n" not in missing.output.strip() and "\n" not in mismatch.output.strip()
    assert not out.exists()


def test_a_byte_target_cuts_shards_by_the_samples_measured_sizes(finished, tmp_path):
    # It used to assume 40 KB a sample: shards of small crops came out a fraction of the target.
    final, ok = finished
    target = 200_000
    result = export(str(final), str(tmp_path / "bytes"), ExportSettings(shard_bytes=target, seed=3))
    shards = result.shards["train"]
    assert sum(s["nsamples"] for s in shards) == len(ok) and len(shards) > 1
    sizes = [(tmp_path / "bytes" / s["url"]).stat().st_size for s in shards]
    end_of_archive = 10_240  # two zero blocks, padded to a 10 KiB record
    assert all(size <= target + end_of_archive for size, s in zip(sizes, shards, strict=True) if s["nsamples"] > 1)
    assert all(size > target / 2 for size in sizes[:-1])  # filled, not cut at a guess
    same = export(str(final), str(tmp_path / "again"), ExportSettings(shard_bytes=target, seed=3))
    assert [s["nsamples"] for s in same.shards["train"]] == [s["nsamples"] for s in shards]  # deterministic
