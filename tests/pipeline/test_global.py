"""Global stages: summarize on workers, plan on the driver, apply on workers; each pass resumes."""

from __future__ import annotations

import os
from collections import Counter

import pytest
from helpers import ingest, ray_executor, read_all, run, write_url_csv
from toystages import KeepLongest, MakeMedia, TopConfig

from facecap.pipeline.config import RunnerConfig
from facecap.pipeline.dataset import Dataset
from facecap.pipeline.executors import ProcessExecutor
from facecap.pipeline.storage import Storage


@pytest.fixture
def made(tmp_path):
    csv = write_url_csv(tmp_path / "urls.csv", 45, broken_every=9)
    assert ingest(csv, tmp_path / "ingest", shard_size=10).ok
    assert run(MakeMedia, tmp_path / "ingest", tmp_path / "make").ok
    return tmp_path / "make"


def expected_top(made, keep: int) -> list[str]:
    rows = read_all(made).to_pandas()
    ok = rows[rows.status == "ok"].copy()
    ok["length"] = ok["payload_len"]
    return list(ok.sort_values(["length", "key"], ascending=[False, True]).key[:keep])


def test_a_global_rule_sees_every_shard_and_the_funnel_adds_up(made, tmp_path):
    result = run(KeepLongest, made, tmp_path / "top", config=TopConfig(keep=7))
    assert result.ok and result.shards == 5
    rows = read_all(tmp_path / "top").to_pandas()
    assert sorted(rows[rows.status == "ok"].key) == sorted(expected_top(made, 7))
    before = Counter(read_all(made).column("status").to_pylist())
    after = Counter(rows.status)
    assert after["keeplongest:not_top"] == before["ok"] - 7
    assert sum(after.values()) == sum(before.values()) == 45
    summarized = read_all(tmp_path / "top" / "_summary")
    assert summarized.num_rows == before["ok"] and summarized.column("_status").null_count == before["ok"]


def test_a_plan_fans_out_as_tasks_on_the_run_executor(made, tmp_path):
    result = run(
        KeepLongest, made, tmp_path / "top", config=TopConfig(keep=7, fan_out=True), executor=ProcessExecutor(2)
    )
    assert result.ok
    rows = read_all(tmp_path / "top").to_pandas()
    assert sorted(rows[rows.status == "ok"].key) == sorted(expected_top(made, 7))
    # Each shard's task ran in a worker process and reached the plan's scratch folder on the run's storage.
    pids = [int(p.read_text()) for p in sorted((tmp_path / "top" / "_plan_scratch").glob("task-*.pid"))]
    assert len(pids) == 5 and os.getpid() not in pids


def test_a_row_that_cannot_be_summarized_is_rejected_alone(made, tmp_path):
    bad = sorted(read_all(made).to_pandas().query("status == 'ok'").key)[3]
    result = run(KeepLongest, made, tmp_path / "top", config=TopConfig(keep=100, bad_key=bad))
    assert result.ok
    rows = read_all(tmp_path / "top").to_pandas().set_index("key")
    assert rows.loc[bad, "status"] == "keeplongest:error"
    assert "cannot summarize" in rows.loc[bad, "error"]
    assert (rows.drop(bad).status.isin(["ok", "ingest:invalid_url", "makemedia:ends_in_7"])).all()


def test_a_failed_summary_shard_decides_nothing_until_a_rerun(made, tmp_path):
    marker = tmp_path / "poison"
    marker.write_text("x")
    config = TopConfig(keep=7, poison_marker=str(marker))
    first = run(KeepLongest, made, tmp_path / "top", config=config, runner=RunnerConfig(max_retries=1))
    assert set(first.failed) == {2} and "summarize: RuntimeError" in first.failed[2]
    out = Dataset(Storage(str(tmp_path / "top")))
    assert out.done_shards() == []  # no row is decided on a partial view
    assert "summarize" in out.failed_shards()[2]["error"]
    marker.unlink()
    second = run(KeepLongest, made, tmp_path / "top", config=config)
    assert second.ok and second.shards == 5
    rows = read_all(tmp_path / "top").to_pandas()
    assert sorted(rows[rows.status == "ok"].key) == sorted(expected_top(made, 7))
    summaries = Dataset(Storage(str(tmp_path / "top" / "_summary")))
    assert [summaries.shard_stat(s).attempts for s in range(5)] == [1, 1, 1, 1, 1]  # only shard 2 was redone


def test_the_plan_is_kept_while_the_summaries_stand(made, tmp_path):
    top = tmp_path / "top"
    assert run(KeepLongest, made, top, config=TopConfig(keep=7)).ok
    plan_file = top / "_plan" / "part-00001.parquet"
    planned_at = plan_file.stat().st_mtime_ns
    (top / "_done" / "part-00003.json").unlink()  # one applied shard lost
    again = run(KeepLongest, made, top, config=TopConfig(keep=7))
    assert again.ok and again.processed == 1 and again.skipped == 4
    assert plan_file.stat().st_mtime_ns == planned_at
    # A finished output does not need its summaries; an unfinished one with a summary lost
    # summarizes that shard again, plans again and applies the new plan everywhere.
    (top / "_summary" / "_done" / "part-00000.json").unlink()
    assert run(KeepLongest, made, top, config=TopConfig(keep=7)).nothing_to_do
    (top / "_done" / "part-00004.json").unlink()
    third = run(KeepLongest, made, top, config=TopConfig(keep=7))
    assert third.ok and third.processed == 5
    assert run(KeepLongest, made, top, config=TopConfig(keep=7)).nothing_to_do
    rows = read_all(top).to_pandas()
    assert sorted(rows[rows.status == "ok"].key) == sorted(expected_top(made, 7))


def test_apply_pass_loads_no_models(made, tmp_path):
    KeepLongest.setups = 0
    assert run(KeepLongest, made, tmp_path / "top").ok
    assert KeepLongest.setups == 1  # once for the summarize pass (one local worker), none to apply


def test_overwrite_clears_summaries_and_plan(made, tmp_path):
    top = tmp_path / "top"
    assert run(KeepLongest, made, top, config=TopConfig(keep=7)).ok
    assert run(KeepLongest, made, top, config=TopConfig(keep=3), overwrite=True).ok
    rows = read_all(top).to_pandas()
    assert sorted(rows[rows.status == "ok"].key) == sorted(expected_top(made, 3))


@pytest.mark.slow
def test_a_global_stage_runs_on_ray(made, tmp_path, ray_local):
    result = run(KeepLongest, made, tmp_path / "top", config=TopConfig(keep=5), executor=ray_executor())
    assert result.ok
    rows = read_all(tmp_path / "top").to_pandas()
    assert sorted(rows[rows.status == "ok"].key) == sorted(expected_top(made, 5))
