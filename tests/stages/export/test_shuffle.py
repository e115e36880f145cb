"""Export's two passes on the workers (stages/export/shuffle.py): the same bytes on every executor,
every ok row exactly once, shards within their limits, resumable, nothing of its own left behind."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tarfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import read_all

from facecap.pipeline.dataset import TarShardReader
from facecap.pipeline.errors import FacecapError
from facecap.pipeline.executors import LocalExecutor, ProcessExecutor, RayExecutor
from facecap.pipeline.storage import Storage
from facecap.stages.export import shuffle
from facecap.stages.export.export import ExportSettings, export
from facecap.stages.export.rows import split_of
from facecap.stages.export.shuffle import bucket_span

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "bench"))
import scale_data  # noqa: E402  (bench/: synthetic datasets in facecap's own format)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A finished dedup dataset of 3,000 rows in 6 shards (about 2,170 ok faces with real JPEG crops)."""
    folder = tmp_path_factory.mktemp("synthetic") / "dedup"
    scale_data.write_dataset(str(folder), rows=3000, shard_rows=500, workers=1)
    table = read_all(folder)
    return folder, table.filter(pc.equal(table.column("status"), "ok"))


def _files(folder: Path) -> dict[str, str]:
    """Every file's digest, the manifest's timestamp aside."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "_manifest.json":
            record = json.loads(data)
            record.pop("time")
            data = json.dumps(record, sort_keys=True).encode()
        digests[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return digests


SETTINGS = {"shard_samples": 200, "seed": 5, "val_fraction": 0.1}


@pytest.mark.parametrize("format", ["webdataset", "parquet"])
def test_the_process_pool_writes_the_bytes_one_process_writes(synthetic, tmp_path, format):
    folder, _ = synthetic
    settings = ExportSettings(format=format, **SETTINGS)
    export(str(folder), str(tmp_path / "one"), settings, executor=LocalExecutor())
    export(str(folder), str(tmp_path / "pool"), settings, executor=ProcessExecutor(2))
    assert _files(tmp_path / "one") == _files(tmp_path / "pool")
    assert not (tmp_path / "pool" / "_scatter").exists()  # its own temporaries, removed when done


def test_every_ok_row_is_exported_once_in_shards_within_the_limit(synthetic, tmp_path):
    folder, ok = synthetic
    result = export(str(folder), str(tmp_path / "out"), ExportSettings(**SETTINGS), executor=ProcessExecutor(2))
    keys, sources = [], []
    for split in ("train", "val"):
        index = json.loads((tmp_path / "out" / f"{split}.json").read_text())
        assert [s["url"] for s in index["shardlist"]] == [
            f"{split}-{n:06d}.tar" for n in range(len(index["shardlist"]))
        ]
        for shard in index["shardlist"]:
            with tarfile.open(tmp_path / "out" / shard["url"]) as tar:
                names = tar.getnames()
            samples = sorted({n.split(".", 1)[0] for n in names})
            assert names == sorted(names) and len(samples) == shard["nsamples"] <= SETTINGS["shard_samples"]
            keys += samples
            sources.append({int(k[:10]) // 500 for k in samples})  # input shard of each sample's image
    assert sorted(keys) == sorted(ok.column("key").to_pylist())
    assert sum(result.samples.values()) == ok.num_rows and 0.05 < result.samples["val"] / ok.num_rows < 0.15
    # A global shuffle: each output shard draws from (nearly) every input shard, not a few neighbours.
    assert np.mean([len(s) for s in sources]) >= 5


def test_another_seed_deals_other_shards_and_one_seed_is_stable(synthetic, tmp_path):
    folder, _ = synthetic
    first = export(str(folder), str(tmp_path / "a"), ExportSettings(format="parquet", shard_samples=300, seed=1))
    other = export(str(folder), str(tmp_path / "b"), ExportSettings(format="parquet", shard_samples=300, seed=2))
    ids = {
        name: pq.read_table(tmp_path / name / result.shards["train"][0]["url"]).column("_id").to_pylist()
        for name, result in (("a", first), ("b", other))
    }
    assert set(ids["a"]) != set(ids["b"]) and len(set(ids["a"]) & set(ids["b"])) < len(ids["a"]) / 2
    assert ids["a"] != sorted(ids["a"])  # rows in shuffled order, not key order


def test_an_interrupted_export_resumes_to_the_same_bytes(synthetic, tmp_path, monkeypatch):
    folder, _ = synthetic
    monkeypatch.setattr(shuffle, "BUCKET_SAMPLES", 400)  # two shards a bucket: several buckets at this size
    settings = ExportSettings(**SETTINGS)
    export(str(folder), str(tmp_path / "clean"), settings)

    class InterruptedInTheWritePass(LocalExecutor):
        written = 0

        def submit(self, shard, source, attempt):
            if self._job.name == "export write":
                InterruptedInTheWritePass.written += 1
                if InterruptedInTheWritePass.written > 4:
                    raise KeyboardInterrupt
            return super().submit(shard, source, attempt)

    with pytest.raises(KeyboardInterrupt):
        export(str(folder), str(tmp_path / "resumed"), settings, executor=InterruptedInTheWritePass())
    assert not (tmp_path / "resumed" / "_manifest.json").exists()
    records = list((tmp_path / "resumed" / "_scatter" / "_written").iterdir())
    assert len(records) == 4
    shards_before = sum(len(json.loads(r.read_text())["shards"]) for r in records)

    class Counting(LocalExecutor):
        runs: ClassVar[dict[str, int]] = {}

        def submit(self, shard, source, attempt):
            Counting.runs[self._job.name] = Counting.runs.get(self._job.name, 0) + 1
            return super().submit(shard, source, attempt)

    again = export(str(folder), str(tmp_path / "resumed"), settings, executor=Counting())
    assert _files(tmp_path / "clean") == _files(tmp_path / "resumed")
    samples = json.loads((tmp_path / "clean" / "_manifest.json").read_text())["samples"]
    buckets = sum(-(-n // 400) for n in samples.values())  # a bucket: two shards of 200
    assert buckets >= 6 and shards_before >= 4
    assert {"export count", "export permute", "export scatter"}.isdisjoint(Counting.runs)
    assert again.skipped_existing == shards_before
    assert Counting.runs["export write"] == buckets - 4  # only the other buckets were written


def test_a_bucket_writes_several_shards_each_within_the_limit(synthetic, tmp_path):
    folder, ok = synthetic
    settings = ExportSettings(shard_samples=100, seed=1)  # 500 shards' worth a bucket: one bucket here
    result = export(str(folder), str(tmp_path / "out"), settings)
    sizes = [s["nsamples"] for s in result.shards["train"]]
    assert len(sizes) == -(-ok.num_rows // 100) and set(sizes[:-1]) == {100} and 0 < sizes[-1] <= 100


def _single_process_shards(ok: pa.Table, settings: ExportSettings) -> dict[str, list[list[str]]]:
    """What facecap's single-process export (before the passes on the workers) dealt: per split,
    the seeded permutation of its rows (input shards in order), cut into shards of shard_samples."""
    keys = np.array(ok.column("key").to_pylist(), dtype=object)
    splits = split_of(ok, settings)
    dealt = {}
    for split in ("train", "val"):
        positions = np.flatnonzero(splits == split)
        order = np.random.default_rng(settings.seed).permutation(positions)
        step = settings.shard_samples
        dealt[split] = [keys[order[start : start + step]].tolist() for start in range(0, len(order), step)]
    return dealt


@pytest.mark.parametrize("format, split_by", [("webdataset", "key"), ("parquet", "key"), ("parquet", "identity")])
def test_the_export_deals_the_shards_the_single_process_export_dealt(
    synthetic, tmp_path, monkeypatch, format, split_by
):
    """Same seed and shard size: every shard holds the samples the single-process export put in it
    (in its order for Parquet; sorted by key in a tar), whatever the buckets and executor."""
    folder, ok = synthetic
    monkeypatch.setattr(shuffle, "BUCKET_SAMPLES", 400)  # several buckets of two shards
    settings = ExportSettings(format=format, split_by=split_by, **SETTINGS)
    result = export(str(folder), str(tmp_path / "out"), settings, executor=ProcessExecutor(2))
    expected = _single_process_shards(ok, settings)
    for split, shards in expected.items():
        assert [s["nsamples"] for s in result.shards[split]] == [len(keys) for keys in shards]
        for listed, keys in zip(result.shards[split], shards, strict=True):
            path = tmp_path / "out" / listed["url"]
            if format == "parquet":
                assert pq.read_table(path).column("_id").to_pylist() == keys
            else:
                with tarfile.open(path) as tar:
                    assert [n.removesuffix(".jpg") for n in tar.getnames() if n.endswith(".jpg")] == sorted(keys)


class StopsAfterTheScatter(LocalExecutor):
    def submit(self, shard, source, attempt):
        if self._job.name == "export write":
            raise KeyboardInterrupt
        return super().submit(shard, source, attempt)


def _scattered(folder: Path, settings: ExportSettings, out: Path) -> list[Path]:
    with pytest.raises(KeyboardInterrupt):
        export(str(folder), str(out), settings, executor=StopsAfterTheScatter())
    return sorted((out / "_scatter" / "train").glob("*.arrow"))


def test_an_unfinished_export_with_another_seed_is_redone_not_mixed_in(synthetic, tmp_path):
    """Its count, permutation and scatter records are another export's: a permutation of as many
    rows with another seed must not be taken for this one's."""
    folder, _ = synthetic
    settings = ExportSettings(**{**SETTINGS, "seed": 6})
    export(str(folder), str(tmp_path / "clean"), settings)
    _scattered(folder, ExportSettings(**SETTINGS), tmp_path / "reused")  # seed 5, stopped before writing
    export(str(folder), str(tmp_path / "reused"), settings)
    assert _files(tmp_path / "clean") == _files(tmp_path / "reused")


def test_local_crops_stay_in_their_tars_until_the_write_pass_reads_them(synthetic, tmp_path):
    folder, _ = synthetic
    settings = ExportSettings(**SETTINGS)
    export(str(folder), str(tmp_path / "clean"), settings)
    files = _scattered(folder, settings, tmp_path / "resumed")
    scattered = pa.concat_tables(pa.ipc.open_file(pa.py_buffer(f.read_bytes())).read_all() for f in files)
    assert scattered.column("jpg").null_count == scattered.num_rows  # no image bytes copied
    with TarShardReader(Storage(str(folder)), "part-00002.tar") as reader:
        row = scattered.filter(pc.equal(scattered.column("_shard"), 2)).slice(0, 1).to_pylist()[0]
        stored = reader.get(row["key"], ["square.jpg"])["square.jpg"]
        assert (row["_crop_offset"], row["_crop_size"]) == reader.location(row["key"], "square.jpg")
    export(str(folder), str(tmp_path / "resumed"), settings)
    exported = []
    for path in sorted((tmp_path / "resumed").glob("*.tar")):
        with tarfile.open(path) as tar:
            if f"{row['key']}.jpg" in tar.getnames():
                exported.append(tar.extractfile(f"{row['key']}.jpg").read())
    assert exported == [stored]
    assert _files(tmp_path / "clean") == _files(tmp_path / "resumed")


def test_an_input_tar_cut_short_after_the_scatter_stops_the_export_with_one_line(synthetic, tmp_path):
    folder, _ = synthetic
    copy = tmp_path / "source"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "_manifest.json").read_text())
    manifest["media"]["square"]["root"] = str(copy)
    (copy / "_manifest.json").write_text(json.dumps(manifest))
    _scattered(copy, ExportSettings(**SETTINGS), tmp_path / "out")
    with open(copy / "part-00003.tar", "r+b") as tar:  # (our own copy of the input)
        tar.truncate(4096)
    with pytest.raises(FacecapError, match=r"part-00003\.tar is shorter than when the export began"):
        export(str(copy), str(tmp_path / "out"), ExportSettings(**SETTINGS), max_retries=0)


def test_scatter_files_of_an_earlier_version_with_the_crops_in_them_still_resume(synthetic, tmp_path):
    folder, _ = synthetic
    settings = ExportSettings(**SETTINGS)
    export(str(folder), str(tmp_path / "clean"), settings)
    for path in _scattered(folder, settings, tmp_path / "resumed"):  # rewritten as the earlier version wrote them
        batches = _batches(pa.py_buffer(path.read_bytes()))  # (a memory map would break when rewritten)
        earlier = [_with_crops(folder, batch) for batch in batches]
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, earlier[0].schema) as writer:
            for batch in earlier:
                writer.write_batch(batch)
    export(str(folder), str(tmp_path / "resumed"), settings)
    assert _files(tmp_path / "clean") == _files(tmp_path / "resumed")


def _batches(source) -> list[pa.RecordBatch]:
    reader = pa.ipc.open_file(source)
    return [reader.get_batch(k) for k in range(reader.num_record_batches)]


def _with_crops(folder: Path, batch: pa.RecordBatch) -> pa.RecordBatch:
    crops = []
    for row in batch.to_pylist():
        with open(folder / f"part-{row['_shard']:05d}.tar", "rb") as tar:
            tar.seek(row["_crop_offset"])
            crops.append(tar.read(row["_crop_size"]))
    table = pa.Table.from_batches([batch], batch.schema).drop_columns(["jpg", "_shard", "_crop_offset", "_crop_size"])
    table = table.add_column(1, "jpg", pa.array(crops, pa.large_binary()))
    return table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], table.schema)


def test_a_split_by_identity_without_clusters_stops_the_export_with_one_line(synthetic, tmp_path):
    folder, _ = synthetic
    copy = tmp_path / "source"
    shutil.copytree(folder, copy)
    for part in copy.glob("part-*.parquet"):  # (our own copy of the input)
        pq.write_table(pq.read_table(part).drop_columns(["identity_cluster"]), part)
    settings = ExportSettings(split_by="identity", **SETTINGS)
    with pytest.raises(FacecapError, match="needs identity clusters: run dedup with kind 'identity'"):
        export(str(copy), str(tmp_path / "out"), settings, max_retries=0)


def test_a_bucket_is_whole_shards_and_there_are_at_most_max_buckets():
    assert bucket_span(1, 10_000) == 50_000 and bucket_span(1_000_000, 10_000) == 50_000  # five shards
    assert bucket_span(50, 100_000) == 100_000 and bucket_span(3, 1) == 50_000
    # Beyond 256 buckets of five shards, more shards a bucket: the scatter's batches grow as N, not N^2.
    span = bucket_span(100_000_000, 10_000)
    assert span % 10_000 == 0 and -(-100_000_000 // span) <= shuffle.MAX_BUCKETS


@pytest.mark.slow
def test_on_ray_the_export_is_the_same(synthetic, tmp_path, ray_local):
    folder, _ = synthetic
    settings = ExportSettings(**SETTINGS)
    export(str(folder), str(tmp_path / "one"), settings)
    export(str(folder), str(tmp_path / "ray"), settings, executor=RayExecutor())
    assert _files(tmp_path / "one") == _files(tmp_path / "ray")


@pytest.mark.slow
def test_an_export_to_s3_holds_the_same_objects_and_leaves_no_scatter_behind(synthetic, tmp_path, s3_server):
    import boto3

    folder, _ = synthetic
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="exports")
    settings = ExportSettings(**SETTINGS)
    export(str(folder), str(tmp_path / "local"), settings)
    export(str(folder), "s3://exports/wds", settings)
    listed = client.list_objects_v2(Bucket="exports", Prefix="wds/")["Contents"]
    # (pyarrow marks a folder whose last subfolder it deleted with an empty "wds/" object.)
    remote = {item["Key"].removeprefix("wds/"): item["Key"] for item in listed if item["Key"] != "wds/"}
    local = _files(tmp_path / "local")
    assert sorted(remote) == sorted(local)  # no _scatter objects left
    for name in ("train-000000.tar", "val.json", "train-000003.tar.idx"):
        body = client.get_object(Bucket="exports", Key=remote[name])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == local[name]


@pytest.mark.slow
def test_crops_on_s3_are_carried_through_the_scatter_and_export_the_same_bytes(synthetic, tmp_path, s3_server):
    import boto3

    folder, _ = synthetic
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="datasets")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), "datasets", f"dedup/{path.relative_to(folder)}")
    manifest = json.loads((folder / "_manifest.json").read_text())
    manifest["media"]["square"]["root"] = "s3://datasets/dedup"
    client.put_object(Bucket="datasets", Key="dedup/_manifest.json", Body=json.dumps(manifest).encode())
    settings = ExportSettings(**SETTINGS)
    export(str(folder), str(tmp_path / "local"), settings)
    files = _scattered("s3://datasets/dedup", settings, tmp_path / "remote")
    scattered = pa.ipc.open_file(pa.py_buffer(files[0].read_bytes())).read_all()
    assert scattered.num_rows and scattered.column("jpg").null_count == 0  # the crops themselves
    export("s3://datasets/dedup", str(tmp_path / "remote"), settings)
    local, remote = _files(tmp_path / "local"), _files(tmp_path / "remote")
    assert {k: v for k, v in local.items() if k != "_manifest.json"} == {
        k: v for k, v in remote.items() if k != "_manifest.json"
    }
