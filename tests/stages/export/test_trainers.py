"""A WebDataset export loads as it is in what trainers use: wids (its index), Hugging Face
datasets (the folder alone), Megatron-Energon (its own loader, through .nv-meta/ and .tar.idx)."""

from __future__ import annotations

import struct
import tarfile
from pathlib import Path

import insightface
import pyarrow as pa
import pytest
import yaml
from helpers import read_all, run_recipe

from facecap.stages.export.export import ExportSettings, export
from facecap.stages.export.trainers import dataset_card
from facecap.stages.shared.trainers import hf_feature, metadata_schema

GROUP = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The demo recipe on a group photo, exported as train and val WebDataset shards of 2 samples."""
    root = tmp_path_factory.mktemp("trainers")
    final = run_recipe(root, {"group.jpg": GROUP.read_bytes()}, {"tag": {"min_confident": 0}})
    rows = read_all(final).to_pandas()
    ok = rows[rows.status == "ok"].set_index("key")
    out = root / "export"
    result = export(str(final), str(out), ExportSettings(shard_samples=2, val_fraction=0.3, seed=2))
    assert result.samples.get("val") and result.samples["train"]  # both splits hold samples
    captions = {}
    for split in result.shards:
        for shard in result.shards[split]:
            with tarfile.open(out / shard["url"]) as tar:
                for member in tar:
                    if member.name.endswith(".txt"):
                        captions[member.name.removesuffix(".txt")] = tar.extractfile(member).read().decode()
    assert sorted(captions) == sorted(ok.index)
    return out, result, ok, captions


def test_the_tar_index_points_at_every_sample(exported):
    out, result, _, _ = exported
    for shard in result.shards["train"]:
        raw = (out / shard["url"].replace(".tar", ".tar.idx")).read_bytes()
        offsets = list(struct.unpack(f"<{len(raw) // 8}Q", raw))
        with tarfile.open(out / shard["url"]) as tar:
            members = tar.getmembers()
            end = tar.offset
        keys = [m.name.split(".")[0] for m in members]
        starts = [m.offset for i, m in enumerate(members) if i == 0 or keys[i - 1] != keys[i]]
        assert offsets == [*starts, end] and len(starts) == shard["nsamples"]


def test_wids_reads_the_index(exported):
    import wids

    out, result, _, captions = exported
    dataset = wids.ShardListDataset(str(out / "train.json"))
    assert len(dataset) == result.samples["train"]
    seen = {}
    for i in range(len(dataset)):
        sample = dataset[i]
        seen[sample["__key__"]] = sample[".txt"]
        assert sample[".jpg"].size == (512, 512)  # decoded by wids' default transformation (PIL)
        assert sample[".json"]["key"] == sample["__key__"] and sample[".json"]["caption_source"] == "caption"
    assert {k: captions[k] for k in seen} == seen


def test_datasets_loads_the_folder_with_the_webdataset_builder(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    out, result, ok, captions = exported
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf"))
    assert set(loaded) == {"train", "val"}
    assert {split: loaded[split].num_rows for split in loaded} == result.samples
    train = loaded["train"]
    assert {"__key__", "jpg", "txt", "json"} <= set(train.column_names)
    fields = train.features["json"]
    assert {"box", "landmarks", "caption", "caption_provenance", "url"} <= set(fields)
    for row in train:
        key = row["__key__"]
        assert row["txt"] == captions[key] and row["json"]["url"] == ok.loc[key].url
        assert row["json"]["box"] == pytest.approx(list(ok.loc[key].box), abs=1e-3)
        assert row["jpg"].size == (512, 512)
    flat = train.flatten()
    assert "json.box" in flat.column_names and "json.caption_provenance.captioner" in flat.column_names


def test_energon_loads_the_export_with_its_own_loader(exported):
    from megatron.energon import CaptioningSample, WorkerConfig, get_loader, get_train_dataset, get_val_dataset

    out, result, _, captions = exported
    config = WorkerConfig(rank=0, world_size=1, num_workers=0)
    for split in ("train", "val"):
        dataset = get_val_dataset(str(out), split_part=split, worker_config=config, batch_size=1)
        seen = {}
        for batch in get_loader(dataset):
            sample = batch[0] if isinstance(batch, list) else batch
            assert isinstance(sample, CaptioningSample) or hasattr(sample, "caption")
            key = sample.__key__[0] if isinstance(sample.__key__, list) else sample.__key__
            caption = sample.caption[0] if isinstance(sample.caption, list) else sample.caption
            image = sample.image[0] if isinstance(sample.image, list) else sample.image
            assert tuple(image.shape[-3:]) == (3, 512, 512)
            seen[key] = caption
        assert len(seen) == result.samples[split] and seen == {k: captions[k] for k in seen}
    # The training recipe of docs/export.md: shuffled, batched, endless.
    train = get_train_dataset(
        str(out), worker_config=config, batch_size=2, shuffle_buffer_size=10, max_samples_per_sequence=2
    )
    batch = next(iter(get_loader(train)))
    assert batch.image.shape[0] == 2 and all(
        captions[k] == c for k, c in zip(batch.__key__, batch.caption, strict=True)
    )


def test_features_are_unified_over_every_sample_and_written_as_the_card_declares_them():
    samples = [{"a": None, "b": [1, 2], "c": {"x": 1}}] * 3 + [{"a": "text", "b": [], "c": {"y": 0.5}, "d": True}]
    schema = metadata_schema(samples, chunk=2)  # a null in the first chunk, text in the second
    assert schema.field("a").type == pa.string() and schema.field("d").type == pa.bool_()
    assert hf_feature(pa.struct(list(schema))) == {
        "struct": [
            {"name": "a", "dtype": "string"},
            {"name": "b", "list": "int64"},
            {"name": "c", "struct": [{"name": "x", "dtype": "int64"}, {"name": "y", "dtype": "float64"}]},
            {"name": "d", "dtype": "bool"},
        ]
    }
    assert hf_feature(pa.list_(pa.struct([("k", pa.float32())]))) == {"list": [{"name": "k", "dtype": "float32"}]}
    card = yaml.safe_load(dataset_card("x", ["train", "val"], None).split("---\n")[1])
    assert "dataset_info" not in card  # no common type: the builder's own guess
    assert card["configs"][0]["data_files"] == [
        {"split": "train", "path": "train-*.tar"},
        {"split": "val", "path": "val-*.tar"},
    ]
