"""The process-pool executor: same bytes as the others, retries, a killed worker, clear refusals."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest
from helpers import media_hashes, read_all, run, run_killing_one_worker
from toystages import EnvConfig, MakeConfig, MakeMedia, ReadBoth, ReadEnv, SplitFaces, started_pids

from facecap.pipeline.config import RunnerConfig
from facecap.pipeline.dataset import Dataset
from facecap.pipeline.errors import ConfigError
from facecap.pipeline.executors import ProcessExecutor
from facecap.pipeline.stage import Resources
from facecap.pipeline.storage import Storage
from facecap.pipeline.worker import StageJob


def _same_output(left, right) -> None:
    assert read_all(left).equals(read_all(right))
    assert media_hashes(left) == media_hashes(right)


def test_a_process_pool_writes_what_one_process_writes(ingested, tmp_path):
    run(MakeMedia, ingested, tmp_path / "local")
    result = run(MakeMedia, ingested, tmp_path / "pool", executor=ProcessExecutor(2))
    assert result.ok and result.processed == 5
    _same_output(tmp_path / "local", tmp_path / "pool")
    stats = Dataset(Storage(str(tmp_path / "pool"))).shard_stats()
    assert len({s.node for s in stats.values()}) == 1  # this machine
    # Media flows on through an actor-style stage (set up once per process) and a reader of two media.
    run(SplitFaces, tmp_path / "local", tmp_path / "local-faces")
    assert run(SplitFaces, tmp_path / "pool", tmp_path / "pool-faces", executor=ProcessExecutor(2)).ok
    _same_output(tmp_path / "local-faces", tmp_path / "pool-faces")
    assert run(ReadBoth, tmp_path / "pool-faces", tmp_path / "both", executor=ProcessExecutor(2)).ok


def test_failing_shards_are_retried_then_recorded(ingested, tmp_path):
    marker = tmp_path / "crash"
    marker.write_text("on")
    config = MakeConfig(crash_marker=str(marker))
    result = run(MakeMedia, ingested, tmp_path / "make", config, ProcessExecutor(2), runner=RunnerConfig(max_retries=1))
    assert set(result.failed) == {0, 1, 2, 3, 4}
    assert "simulated worker fault" in result.failed[0]
    assert Dataset(Storage(str(tmp_path / "make"))).failed_shards()[0]["attempts"] == 2
    marker.unlink()
    assert run(MakeMedia, ingested, tmp_path / "make", config, ProcessExecutor(2)).processed == 5


def test_a_worker_killed_mid_shard_costs_a_retry_not_the_run(ingested, tmp_path):
    result = run_killing_one_worker(ingested, tmp_path / "sleepy", tmp_path, ProcessExecutor(2))
    assert result.ok and result.shards == 5
    stats = Dataset(Storage(str(tmp_path / "sleepy"))).shard_stats()
    assert max(s.attempts for s in stats.values()) == 2
    rows = read_all(tmp_path / "sleepy").to_pandas()
    assert len(rows) == 45 and rows.key.is_unique
    assert Counter(rows.status)["ok"] == Counter(read_all(ingested).column("status").to_pylist())["ok"]


def test_gpu_stages_are_refused_with_a_clear_message(ingested, tmp_path):
    gpu_stage = type("GpuMedia", (MakeMedia,), {"resources": dataclasses.replace(MakeMedia.resources, gpus=0.5)})
    job = StageJob(stage_cls=gpu_stage, config=MakeConfig(), output=str(tmp_path / "x"), parent=str(ingested))
    with pytest.raises(ConfigError, match="--executor ray"):
        ProcessExecutor(2).start(job)


def test_workers_default_to_cpus_per_worker(ingested, tmp_path):
    wide = type("WideMedia", (MakeMedia,), {"resources": Resources(cpus=2, batch_size=4)})
    job = StageJob(stage_cls=wide, config=MakeConfig(), output=str(tmp_path / "x"), parent=str(ingested))
    executor = ProcessExecutor(4, max_in_flight=3)
    assert executor.start(job) == 3
    assert executor.plan.workers == 2
    executor.stop()


def test_workers_see_the_drivers_environment_as_it_is_when_the_stage_starts(ingested, tmp_path, monkeypatch):
    # The fork server outlives a run and keeps the environment it started with; a later run (a
    # notebook, a test) that set FACECAP_MODELS or storage credentials since must still reach its workers.
    config = EnvConfig(variable="FACECAP_TEST_SETTING")
    monkeypatch.setenv("FACECAP_TEST_SETTING", "before")
    assert run(ReadEnv, ingested, tmp_path / "before", config, ProcessExecutor(2)).ok
    monkeypatch.setenv("FACECAP_TEST_SETTING", "after")
    assert run(ReadEnv, ingested, tmp_path / "after", config, ProcessExecutor(2)).ok
    monkeypatch.delenv("FACECAP_TEST_SETTING")
    assert run(ReadEnv, ingested, tmp_path / "unset", config, ProcessExecutor(2)).ok
    seen = {}
    for name in ("before", "after", "unset"):
        rows = read_all(tmp_path / name).to_pylist()
        seen[name] = {row["seen"] for row in rows if row["status"] == "ok"}
    assert seen == {"before": {"before"}, "after": {"after"}, "unset": {None}}


DRIVER = """
import sys
sys.path[:0] = {paths!r}
from helpers import run
from toystages import Sleepy, SleepyConfig
from facecap.pipeline.executors import ProcessExecutor

if __name__ == "__main__":
    config = SleepyConfig(pid_folder={pids!r}, seconds=30.0)
    run(Sleepy, {parent!r}, {output!r}, config=config, executor=ProcessExecutor(2))
"""


def test_workers_leave_with_a_driver_killed_with_sigkill(ingested, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "driver.py"
    paths = [p for p in sys.path if p]
    script.write_text(DRIVER.format(paths=paths, parent=str(ingested), output=str(tmp_path / "out"), pids=str(pids)))
    driver = subprocess.Popen([sys.executable, str(script)])
    deadline = time.time() + 60
    while len(started_pids(pids)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    workers = set(started_pids(pids))
    assert len(workers) == 2
    driver.kill()
    driver.wait()
    _gone, alive = psutil.wait_procs([psutil.Process(pid) for pid in workers], timeout=10)
    assert not alive, f"workers outlived their driver: {[p.pid for p in alive]}"
