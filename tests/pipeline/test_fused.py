"""Fused execution: consecutive per-shard stages in one task per shard give what running them one by
one gives, pass rows and media in memory, skip stages already done and retry a shard that fails."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import media_hashes, read_all, run
from toystages import MakeMedia, ReadBoth, SplitConfig, SplitFaces

from facecap.pipeline import worker
from facecap.pipeline.config import RunnerConfig
from facecap.pipeline.dataset import Dataset
from facecap.pipeline.executors import LocalExecutor, ProcessExecutor
from facecap.pipeline.fused import FusedJob, can_follow, run_fused, why_not_fused
from facecap.pipeline.shard_cache import cache_counts, cached, shard_cache_scope
from facecap.pipeline.stage import Resources, StageSpec
from facecap.pipeline.storage import Storage
from facecap.pipeline.worker import StageJob

CHAIN = ("makemedia", "splitfaces", "readboth")


def chain_jobs(parent, out, split: SplitConfig | None = None) -> list[StageJob]:
    jobs, previous = [], str(parent)
    for cls, config in ((MakeMedia, None), (SplitFaces, split), (ReadBoth, None)):
        output = str(out / cls.name)
        jobs.append(StageJob(cls, config or cls.config_model(), output=output, parent=previous))
        previous = output
    return jobs


def unfused(parent, out) -> None:
    previous = parent
    for cls in (MakeMedia, SplitFaces, ReadBoth):
        assert run(cls, previous, out / cls.name).ok
        previous = out / cls.name


def contents(out) -> dict:
    """Every stage's rows (sorted, all columns) and tar members: what must not depend on fusion."""
    return {
        name: {"rows": read_all(out / name).sort_by("key").to_pylist(), "media": media_hashes(out / name)}
        for name in CHAIN
    }


def stats_of(out, stage: str, shard: int) -> dict:
    return json.loads((out / stage / "_stats" / f"part-{shard:05d}.json").read_text())


@pytest.mark.parametrize("executor", [LocalExecutor, lambda: ProcessExecutor(workers=2)], ids=["local", "processes"])
def test_a_fused_run_gives_the_rows_statuses_and_media_of_an_unfused_run(ingested, tmp_path, executor):
    unfused(ingested, tmp_path / "one-by-one")
    results = run_fused(chain_jobs(ingested, tmp_path / "fused"), executor())
    assert [r.stage for r in results] == list(CHAIN)
    assert all(r.ok and r.processed == 5 and r.shards == 5 for r in results)
    expected = contents(tmp_path / "one-by-one")
    assert contents(tmp_path / "fused") == expected
    assert any(row["status"] == "makemedia:ends_in_7" for row in expected["readboth"]["rows"])
    for name in CHAIN:  # each stage keeps its own folder: manifest, done markers, stats
        summary = Dataset(Storage(str(tmp_path / "fused" / name))).summary()
        assert summary["complete"] and summary["shards"] == {"total": 5, "done": 5, "failed": 0}
        assert stats_of(tmp_path / "fused", name, 3)["rows_out"] == len(
            [r for r in expected[name]["rows"] if r["key"].startswith("000000003")]
        )


def test_a_fused_task_reads_only_the_first_parent_from_storage(ingested, tmp_path, monkeypatch):
    """Later stages get the table and the media their fused predecessors made, not a reread."""
    parquet_reads, tar_opens = [], []
    read_shard = Dataset.read_shard

    def counting_read(self, shard, columns=None):
        parquet_reads.append(self.uri)
        return read_shard(self, shard, columns)

    class CountingTar(worker.TarShardReader):
        def __init__(self, storage, name):
            tar_opens.append(storage.root)
            super().__init__(storage, name)

    monkeypatch.setattr(Dataset, "read_shard", counting_read)
    monkeypatch.setattr(worker, "TarShardReader", CountingTar)
    run_fused(chain_jobs(ingested, tmp_path / "fused"), LocalExecutor())
    assert set(parquet_reads) == {str(ingested)} and len(parquet_reads) == 5
    assert tar_opens == []

    parquet_reads.clear()
    unfused(ingested, tmp_path / "one-by-one")  # the same counters see the unfused rereads
    assert {str(tmp_path / "one-by-one" / n) for n in CHAIN[:2]} <= set(parquet_reads)
    assert len(tar_opens) == 3 * 5  # splitfaces reads jpg; readboth reads jpg and crop.jpg


def test_a_shard_failing_inside_the_fused_task_is_retried_and_earlier_stages_stay_done(ingested, tmp_path):
    marker = tmp_path / "crash-once"
    marker.write_text("on")
    out = tmp_path / "fused"
    results = run_fused(chain_jobs(ingested, out, SplitConfig(crash_once_marker=str(marker))), LocalExecutor())
    assert all(r.ok for r in results) and not marker.exists()
    # Shard 0's task failed in splitfaces (its setup), after makemedia had committed shard 0.
    assert stats_of(out, "makemedia", 0)["attempts"] == 1
    assert stats_of(out, "splitfaces", 0)["attempts"] == 2
    assert stats_of(out, "readboth", 0)["attempts"] == 2
    unfused(ingested, tmp_path / "one-by-one")
    assert contents(out) == contents(tmp_path / "one-by-one")


def test_a_shard_that_keeps_failing_is_recorded_in_its_stage_and_a_rerun_resumes(ingested, tmp_path):
    marker = tmp_path / "crash-once"
    marker.write_text("on")
    out = tmp_path / "fused"
    jobs = chain_jobs(ingested, out, SplitConfig(crash_once_marker=str(marker)))
    results = run_fused(jobs, LocalExecutor(), runner=RunnerConfig(max_retries=0))
    make, split, both = results
    assert make.ok and make.processed == 5
    assert set(split.failed) == {0} and "splitfaces" in split.failed[0] and "simulated fault" in split.failed[0]
    assert set(both.failed) == {0} and "splitfaces failed" in both.failed[0]
    assert (out / "splitfaces" / "_failed" / "part-00000.json").exists()
    assert not Dataset(Storage(str(out / "readboth"))).require_manifest().complete

    again = run_fused(jobs, LocalExecutor())  # the marker is gone: shard 0 now succeeds
    assert [r.processed for r in again] == [0, 1, 1]
    assert [r.skipped for r in again] == [5, 4, 4]
    unfused(ingested, tmp_path / "one-by-one")
    assert contents(out) == contents(tmp_path / "one-by-one")


def test_a_stage_done_for_a_shard_is_skipped_inside_the_task_and_the_next_reads_its_output(ingested, tmp_path):
    out = tmp_path / "fused"
    jobs = chain_jobs(ingested, out)
    run_fused(jobs, LocalExecutor())
    expected = contents(out)
    for name in CHAIN[1:]:
        (out / name / "_done" / "part-00002.json").unlink()
    again = run_fused(jobs, LocalExecutor())
    assert [r.processed for r in again] == [0, 1, 1]
    assert stats_of(out, "makemedia", 2)["attempts"] == 1
    assert contents(out) == expected
    assert [r.nothing_to_do for r in run_fused(jobs, LocalExecutor())] == [True, True, True]


def test_fused_job_asks_for_what_its_most_demanding_stage_needs(ingested, tmp_path):
    fused = FusedJob(chain_jobs(ingested, tmp_path))
    assert fused.name == "makemedia+splitfaces+readboth"
    assert fused.resources.actor and fused.resources.cpus == 1 and fused.resources.batch_size == 256
    assert "toystages" in fused.modules


def test_which_stages_may_be_fused():
    cpu, gpu = StageSpec(Resources()), StageSpec(Resources(gpus=0.5))
    assert why_not_fused(cpu, source=False) is None
    assert "source" in why_not_fused(cpu, source=True)
    assert "global" in why_not_fused(StageSpec(Resources(), global_passes=True), source=False)
    assert "processes" in why_not_fused(StageSpec(Resources(), own_processes=True), source=False)
    assert can_follow(cpu, cpu) and can_follow(gpu, gpu)
    assert not can_follow(cpu, gpu) and not can_follow(gpu, cpu)


def test_the_shard_cache_computes_once_per_task_and_shares_read_only_values():
    data = b"\xff\xd8 some jpeg bytes"
    calls = []

    def decode() -> np.ndarray:
        calls.append(1)
        return np.zeros((4, 4, 3), np.uint8)

    outside = cached("bgr", data, decode)
    assert outside.flags.writeable and len(calls) == 1  # no task scope: plain call
    with shard_cache_scope():
        first = cached("bgr", data, decode)
        again = cached("bgr", bytes(bytearray(data)), decode)  # equal bytes read again from a tar
        other_kind = cached("bgr/2", data, decode)
        assert first is again and other_kind is not first and len(calls) == 3
        assert cache_counts() == (1, 2)
        with pytest.raises(ValueError):
            first[0, 0, 0] = 1  # shared with later stages: read-only
    cached("bgr", data, decode)
    assert len(calls) == 4  # the scope ended: nothing is kept
    with shard_cache_scope(budget_bytes=10):
        cached("bgr", data, decode)
        cached("bgr", data, decode)
    assert len(calls) == 6  # over the budget: computed, never kept
