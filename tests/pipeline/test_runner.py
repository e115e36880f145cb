"""The runner: pass-through, media between stages, row isolation, retries, resume, verification."""

from __future__ import annotations

import json
import tarfile
from collections import Counter

import pytest
from helpers import ray_executor, read_all, run
from toystages import MakeConfig, MakeMedia, ReadBoth, Sleepy, SleepyConfig, SplitFaces

from facecap.pipeline.config import RunnerConfig
from facecap.pipeline.dataset import Dataset
from facecap.pipeline.errors import DatasetError
from facecap.pipeline.storage import Storage


def test_rejected_rows_pass_through_untouched_and_funnel_adds_up(ingested, tmp_path):
    result = run(MakeMedia, ingested, tmp_path / "make")
    assert result.ok
    before = read_all(ingested).to_pandas().set_index("key")
    after = read_all(tmp_path / "make").to_pandas().set_index("key")
    assert list(after.index) == sorted(before.index)
    rejected_before = before[before.status != "ok"]
    assert (after.loc[rejected_before.index, "status"] == rejected_before.status).all()
    assert after.loc[rejected_before.index, "payload_len"].isna().all()
    counts = Counter(after.status)
    assert counts["ingest:invalid_url"] == 5
    assert counts["makemedia:ends_in_7"] == sum(
        1 for k in rejected_before.index.union(before.index) if k.endswith("7") and before.status[k] == "ok"
    )
    summary = Dataset(Storage(str(tmp_path / "make"))).summary()
    assert summary["rows"] == 45 == sum(summary["by_status"].values())


def test_tar_members_are_sorted_contiguous_and_match_rows(ingested, tmp_path):
    run(MakeMedia, ingested, tmp_path / "make")
    rows = read_all(tmp_path / "make").to_pandas()
    ok_keys = sorted(rows[rows.status == "ok"].key)
    names = []
    for shard in range(5):
        with tarfile.open(tmp_path / "make" / f"part-{shard:05d}.tar") as tar:
            names += tar.getnames()
    assert names == sorted(names)
    assert [n.split(".", 1)[0] for n in names[::2]] == ok_keys
    with tarfile.open(tmp_path / "make" / "part-00000.tar") as tar:
        assert all(m.mtime == 0 for m in tar.getmembers())


def test_media_flows_to_later_stages_and_rows_can_multiply(ingested, tmp_path, ray_local):
    run(MakeMedia, ingested, tmp_path / "make")
    result = run(SplitFaces, tmp_path / "make", tmp_path / "faces", executor=ray_executor())
    assert result.ok
    faces = read_all(tmp_path / "faces").to_pandas()
    made = read_all(tmp_path / "make").to_pandas()
    assert (faces.status == "ok").sum() == 2 * (made.status == "ok").sum()
    assert (faces.status != "ok").sum() == (made.status != "ok").sum()
    result = run(ReadBoth, tmp_path / "faces", tmp_path / "both", executor=ray_executor())
    both = read_all(tmp_path / "both").to_pandas()
    ok = both[both.status == "ok"]
    assert len(ok) == (faces.status == "ok").sum()
    assert ok.ratio.between(0.45, 0.5).all()
    manifest = Dataset(Storage(str(tmp_path / "both"))).require_manifest()
    assert set(manifest.media) == {"jpg", "json", "crop.jpg"}


def test_a_poisoned_row_is_rejected_alone(ingested, tmp_path):
    result = run(MakeMedia, ingested, tmp_path / "make", config=MakeConfig(fail_key="0000000011"))
    assert result.ok
    rows = read_all(tmp_path / "make").to_pandas().set_index("key")
    assert rows.loc["0000000011", "status"] == "makemedia:error"
    assert "poisoned row" in rows.loc["0000000011", "error"]
    assert rows.loc["0000000010", "status"] == "ok"


def test_failing_shards_are_retried_then_recorded_and_rerun_resumes(ingested, tmp_path, ray_local):
    marker = tmp_path / "crash"
    marker.write_text("on")
    config = MakeConfig(crash_marker=str(marker))
    result = run(
        MakeMedia,
        ingested,
        tmp_path / "make",
        config=config,
        executor=ray_executor(),
        runner=RunnerConfig(max_retries=1),
    )
    assert set(result.failed) == {0, 1, 2, 3, 4}
    assert "simulated worker fault" in result.failed[0]
    dataset = Dataset(Storage(str(tmp_path / "make")))
    failed = dataset.failed_shards()
    assert failed[0]["attempts"] == 2
    summary = dataset.summary()
    assert summary["shards"] == {"total": 5, "done": 0, "failed": 5}
    assert not summary["complete"]
    marker.unlink()
    result = run(MakeMedia, ingested, tmp_path / "make", config=config, executor=ray_executor())
    assert result.ok and result.processed == 5
    assert dataset.failed_shards() == {}
    assert dataset.summary()["complete"]


def test_rerun_skips_done_shards_and_redoes_damaged_ones(ingested, tmp_path):
    run(MakeMedia, ingested, tmp_path / "make")
    again = run(MakeMedia, ingested, tmp_path / "make")
    assert again.nothing_to_do
    original = (tmp_path / "make" / "part-00002.parquet").read_bytes()
    tar_bytes = (tmp_path / "make" / "part-00003.tar").read_bytes()
    (tmp_path / "make" / "part-00002.parquet").write_bytes(original[: len(original) // 2])
    (tmp_path / "make" / "part-00003.tar").write_bytes(tar_bytes[:1000])
    result = run(MakeMedia, ingested, tmp_path / "make")
    assert result.processed == 2 and result.skipped == 3
    assert (tmp_path / "make" / "part-00002.parquet").read_bytes() == original
    assert (tmp_path / "make" / "part-00003.tar").read_bytes() == tar_bytes


def test_sha256_verification_catches_same_size_corruption(ingested, tmp_path):
    run(MakeMedia, ingested, tmp_path / "make")
    path = tmp_path / "make" / "part-00001.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF
    path.write_bytes(bytes(data))
    assert run(MakeMedia, ingested, tmp_path / "make").nothing_to_do  # size check cannot see it
    result = run(MakeMedia, ingested, tmp_path / "make", runner=RunnerConfig(verify="sha256"))
    assert result.processed == 1


def test_other_settings_refuse_to_mix_into_an_existing_output(ingested, tmp_path):
    run(MakeMedia, ingested, tmp_path / "make")
    with pytest.raises(DatasetError, match="--overwrite"):
        run(MakeMedia, ingested, tmp_path / "make", config=MakeConfig(fail_key="x"))
    result = run(MakeMedia, ingested, tmp_path / "make", config=MakeConfig(fail_key="x"), overwrite=True)
    assert result.processed == 5


def test_missing_parent_media_and_columns_are_clear_errors(ingested, tmp_path):
    with pytest.raises(DatasetError, match="needs 'jpg' media"):
        run(SplitFaces, ingested, tmp_path / "faces")
    with pytest.raises(DatasetError, match="not a facecap dataset"):
        run(MakeMedia, tmp_path / "nowhere", tmp_path / "x")


def test_missing_media_rows_get_their_own_status(ingested, tmp_path):
    run(MakeMedia, ingested, tmp_path / "make")
    tar_path = tmp_path / "make" / "part-00000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    dropped = members[0][0].name.split(".")[0]
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members[2:]:
            import io

            tar.addfile(member, io.BytesIO(data))
    result = run(SplitFaces, tmp_path / "make", tmp_path / "faces")
    assert result.ok
    faces = read_all(tmp_path / "faces").to_pandas().set_index("key")
    assert faces.loc[dropped, "status"] == "splitfaces:missing_media"
    assert "no jpg for key" in faces.loc[dropped, "error"]


def test_stats_files_record_timings_and_attempts(ingested, tmp_path):
    run(MakeMedia, ingested, tmp_path / "make")
    stats = json.loads((tmp_path / "make" / "_stats" / "part-00000.json").read_text())
    assert stats["rows_in"] == stats["rows_out"] == 10
    assert stats["attempts"] == 1 and "process" in stats["timings"]


def test_stats_keep_cpu_seconds_apart_from_wall_seconds(ingested, tmp_path):
    """A shard that waits (here: sleeps) spends wall seconds but little CPU; the stats show both, and
    stats written before CPU seconds were kept still load (None)."""
    (tmp_path / "pids").mkdir()
    config = SleepyConfig(pid_folder=str(tmp_path / "pids"), seconds=0.6)
    assert run(Sleepy, ingested, tmp_path / "sleepy", config=config).ok
    dataset = Dataset(Storage(str(tmp_path / "sleepy")))
    for stats in dataset.shard_stats().values():
        assert stats.seconds >= 0.6
        assert stats.cpu_seconds is not None and 0 <= stats.cpu_seconds < stats.seconds / 2
    path = tmp_path / "sleepy" / "_stats" / "part-00000.json"
    older = json.loads(path.read_text())
    del older["cpu_seconds"]
    path.write_text(json.dumps(older))
    assert dataset.shard_stat(0).cpu_seconds is None
    cpu = dataset.summary()["shard_cpu_seconds"]  # `facecap stats --json`: the shards that kept them
    assert cpu == round(sum(s.cpu_seconds for s in dataset.shard_stats().values() if s.cpu_seconds is not None), 3)
