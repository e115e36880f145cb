"""The CPU policy: workers x threads = the machine's CPUs, on the process pool and the local Ray."""

from __future__ import annotations

import pandas as pd
import pytest
from helpers import read_all, run
from toystages import Meet, MeetConfig, WideMeet

from facecap.pipeline.config import RayConfig
from facecap.pipeline.cpu_policy import WorkerPlan, plan_workers
from facecap.pipeline.executors import ProcessExecutor, RayExecutor, make_executor
from facecap.pipeline.worker import StageJob


@pytest.mark.parametrize(
    ("cpus", "per_worker", "reserve", "gpus", "gpus_per_worker", "expected"),
    [
        (2, 1, 0, 0, 0, WorkerPlan(workers=2, threads=1)),  # a 2-core laptop: both cores work
        (2, 1, 1, 0, 0, WorkerPlan(workers=1, threads=1)),  # a core kept for the driver
        (16, 1, 0, 0, 0, WorkerPlan(workers=16, threads=1)),
        (8, 2, 0, 0, 0, WorkerPlan(workers=4, threads=2)),
        (8, 3, 0, 0, 0, WorkerPlan(workers=2, threads=4)),  # the leftover cores go to the workers' threads
        (16, 1, 0, 1, 1, WorkerPlan(workers=1, threads=16)),  # one GPU: one worker, every core for its CPU side
        (16, 1, 0, 4, 1, WorkerPlan(workers=4, threads=4)),
        (16, 0, 0, 2, 0.5, WorkerPlan(workers=4, threads=4)),  # GPU-only workers: the GPUs bound them
        (2, 4, 0, 0, 0, WorkerPlan(workers=1, threads=4)),  # asks for more than there is: still one worker
        (2, 1, 3, 0, 0, WorkerPlan(workers=1, threads=1)),  # a reserve of every core still leaves one
        (3, 0, 0, 0, 0, WorkerPlan(workers=3, threads=1)),
    ],
)
def test_plan_fills_the_machine(cpus, per_worker, reserve, gpus, gpus_per_worker, expected):
    plan = plan_workers(cpus, per_worker, reserve, gpus, gpus_per_worker)
    assert plan == expected
    if reserve == 0 and gpus == 0 and per_worker <= cpus:
        assert plan.workers * plan.threads == cpus


def _job(stage_cls, tmp_path, ingested) -> StageJob:
    return StageJob(
        stage_cls=stage_cls, config=MeetConfig(meeting_folder=str(tmp_path)), output="x", parent=str(ingested)
    )


def _processed(folder) -> pd.DataFrame:
    """The rows the stage processed (the invalid URLs' rows pass through untouched)."""
    rows = read_all(folder).to_pandas()
    return rows[rows.status == "ok"]


def test_process_pool_follows_the_plan(ingested, tmp_path):
    executor = ProcessExecutor(4)
    executor.start(_job(WideMeet, tmp_path, ingested))
    assert executor.plan == WorkerPlan(workers=2, threads=2)
    executor.stop()
    kept = make_executor("processes", RayConfig(num_cpus=2, reserve_cpus=1))
    kept.start(_job(Meet, tmp_path, ingested))
    assert kept.plan == WorkerPlan(workers=1, threads=1)
    kept.stop()
    # runner.workers names the pool's CPUs as given: no reserve is taken from them.
    named = make_executor("processes", RayConfig(reserve_cpus=1), workers=2)
    named.start(_job(Meet, tmp_path, ingested))
    assert named.plan == WorkerPlan(workers=2, threads=1)
    named.stop()


def _run_meeting(stage_cls, workers, ingested, tmp_path, executor):
    """Run a toy stage whose workers wait for ``workers`` of them at once; the rows they wrote."""
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    config = MeetConfig(meeting_folder=str(meeting), workers=workers)
    assert run(stage_cls, ingested, tmp_path / "out", config, executor).ok
    return _processed(tmp_path / "out")


@pytest.mark.parametrize(("stage_cls", "workers", "threads"), [(Meet, 2, 1), (WideMeet, 2, 2)])
def test_process_pool_workers_run_at_once_with_their_thread_budget(ingested, tmp_path, stage_cls, workers, threads):
    rows = _run_meeting(stage_cls, workers, ingested, tmp_path, ProcessExecutor(2 * threads))
    assert rows.worker_pid.nunique() == workers
    assert set(rows.workers_met) == {workers}
    assert set(rows.omp_threads) == {threads}
    assert set(rows.opencv_threads) == {threads}  # OpenCV ignores OMP_NUM_THREADS: the worker held it


def test_a_model_stage_gets_every_cpu_of_a_local_ray(ray_local, ingested, tmp_path):
    """On the session's 2-CPU local Ray, where the driver only waits, a model stage runs two actors
    at once (the old reserve of one CPU ran one), each with one thread."""
    executor = RayExecutor(RayConfig(num_cpus=2))
    rows = _run_meeting(Meet, 2, ingested, tmp_path, executor)
    assert executor.plan == WorkerPlan(workers=2, threads=1)
    assert rows.worker_pid.nunique() == 2
    assert set(rows.workers_met) == {2}
    assert set(rows.omp_threads) == {1}
    assert set(rows.opencv_threads) == {1}


def test_a_wide_actor_on_a_local_ray_gets_the_threads_it_asked_for(ray_local, ingested, tmp_path):
    executor = RayExecutor(RayConfig(num_cpus=2))
    rows = _run_meeting(WideMeet, 1, ingested, tmp_path, executor)
    assert executor.plan == WorkerPlan(workers=1, threads=2)
    assert set(rows.omp_threads) == {2}
    assert set(rows.opencv_threads) == {2}
