"""Fused execution: consecutive per-shard stages of ``facecap run`` in one task per shard.

Unfused, every stage reads its parent's Parquet and tars back from storage and decodes the images
again. A fused task runs the stages one after another on the same shard in one worker: each
stage's committed table (and the media it stored) goes to the next stage in memory, and the
per-task cache (``pipeline/shard_cache.py``) lets the stages' decode helpers decode the same bytes
once. Each stage still commits its own shard (Parquet, tar, stats, done marker) into its own
folder before the next one starts, so resume, ``--from/--to``, recaption and per-stage stats see
exactly what an unfused run leaves; a stage whose shard is already done is skipped inside the task
and the next one reads its committed output. A task that fails in stage k is retried; the stages
it already committed for that shard stay done.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from facecap.pipeline.config import RunnerConfig
from facecap.pipeline.dataset import Dataset, ShardStats
from facecap.pipeline.executors import Executor
from facecap.pipeline.progress import Quiet, StageProgress
from facecap.pipeline.runner import OpenedStage, StageResult, close_stage, open_stage
from facecap.pipeline.shard_cache import shard_cache_scope
from facecap.pipeline.stage import Resources, StageSpec
from facecap.pipeline.tasks import Task, dispatch
from facecap.pipeline.worker import MemoryMedia, StageJob, run_shard, stage_for, stage_key


def why_not_fused(spec: StageSpec, source: bool, revisit: bool = False) -> str | None:
    """Why a stage runs on its own rather than in a fused task, or None when it may be fused."""
    if source:
        return "a source stage: the driver reads its input in order"
    if spec.global_passes:
        return "a global stage: it decides over the whole dataset"
    if spec.own_processes:
        return "its engine starts processes of its own"
    if revisit:
        return "--retry-failed reopens finished shards"
    return None


def can_follow(previous: StageSpec, spec: StageSpec) -> bool:
    """Whether a stage may run in the same task as the one before it: both on CPUs, or both asking
    for the same GPU share (a GPU stage in a CPU task would hold its GPU while the CPU stages run)."""
    return previous.resources.gpus == spec.resources.gpus


@dataclass
class FusedShardStats:
    """What a fused task did to one shard: each stage's stats, or None where it was already done."""

    shard: int
    stages: dict[str, ShardStats | None] = field(default_factory=dict)

    @property
    def rows_out(self) -> int:
        last = [stats for stats in self.stages.values() if stats is not None]
        return last[-1].rows_out if last else 0


@dataclass
class FusedJob:
    """Consecutive per-shard stages run in one task per shard (picklable, like ``StageJob``).

    ``jobs[0]`` reads its parent from storage; each later job's parent is the previous job's output.
    """

    jobs: list[StageJob]
    verify: str = "size"

    @property
    def name(self) -> str:
        return "+".join(job.name for job in self.jobs)

    @functools.cached_property
    def resources(self) -> Resources:
        """One worker runs every stage in turn: it needs the most any of them asks for."""
        each = [job.resources for job in self.jobs]
        return Resources(
            cpus=max(r.cpus for r in each),
            gpus=max(r.gpus for r in each),
            batch_size=max(r.batch_size for r in each),
            actor=any(r.actor for r in each),
        )

    @property
    def modules(self) -> tuple[str, ...]:
        modules = ["facecap.pipeline.fused"]
        for job in self.jobs:
            modules += [m for m in job.modules if m not in modules]
        return tuple(modules)

    @functools.cached_property
    def _stage_keys(self) -> frozenset:
        return frozenset(stage_key(job) for job in self.jobs)

    def warm(self) -> None:
        """Set every stage up before the first shard: the worker keeps them all."""
        for job in self.jobs:
            stage_for(job, self._stage_keys)

    def run(self, shard: int, source: pa.Table | None, attempt: int, node: str | None = None) -> FusedShardStats:
        node = node or socket.gethostname()
        done = FusedShardStats(shard)
        table: pa.Table | None = None  # None: the next stage reads its parent from storage
        memory_media: MemoryMedia = {}
        with shard_cache_scope():
            for position, job in enumerate(self.jobs):
                if Dataset.at(job.output, job.storage).is_done(shard, self.verify):
                    done.stages[job.name] = None
                    table = None
                    continue
                try:
                    result = run_shard(
                        job,
                        shard,
                        table,
                        attempt,
                        node,
                        memory_media=memory_media,
                        keep_media=position < len(self.jobs) - 1,
                        companions=self._stage_keys,
                    )
                except Exception as error:
                    # The runner sees one error per task: say which stage it came from.
                    raise FusedStageError(f"{job.name}: {type(error).__name__}: {error}") from error
                done.stages[job.name] = result.stats
                table = result.table
                if result.media is not None:
                    memory_media[job.output] = result.media
        return done


class FusedStageError(RuntimeError):
    """A fused task failed in one of its stages (named first in the message)."""


@dataclass
class _Item:
    shard: int
    todo: list[bool]  # by stage: not done when the shard was submitted


def run_fused(
    jobs: list[StageJob],
    executor: Executor,
    runner: RunnerConfig | None = None,
    progress: StageProgress | None = None,
    overwrite: bool = False,
    recipe: dict | None = None,
) -> list[StageResult]:
    """Run consecutive per-shard stages fused: one task per shard, one result per stage.

    Every stage's folder is checked and its manifest written first, as ``run_stage`` does; then each
    shard that some stage has not finished goes to the executor as one task.
    """
    runner = runner or RunnerConfig()
    progress = progress or Quiet()
    opened = [open_stage(job, runner, None, overwrite, recipe) for job in jobs]
    if all(stage.result.nothing_to_do for stage in opened):
        return [stage.result for stage in opened]
    parent, parent_manifest = opened[0].parent
    fused = FusedJob([stage.job for stage in opened], verify=runner.verify)
    with progress:
        progress.set_total(parent_manifest.num_shards)
        work = _work(opened, parent, parent_manifest.num_shards or 0, runner, progress)
        _dispatch(fused, opened, executor, runner, progress, work)
    return [close_stage(stage) if not stage.result.nothing_to_do else stage.result for stage in opened]


def _work(
    opened: list[OpenedStage], parent: Dataset, num_shards: int, runner: RunnerConfig, progress: StageProgress
) -> Iterator[_Item]:
    # A stage with nothing to do has counted its shards already (open_stage).
    counting = [stage.result for stage in opened if not stage.result.nothing_to_do]
    for shard in range(num_shards):
        done = [stage.out.is_done(shard, runner.verify) for stage in opened]
        for result in counting:
            result.shards += 1
        for stage, stage_done in zip(opened, done, strict=True):
            if stage_done and not stage.result.nothing_to_do:
                stage.result.skipped += 1
        if all(done):
            progress.advance(0, skipped=True)
            continue
        if not done[0] and not parent.is_done(shard, "none"):
            error = f"parent shard {shard} of {parent.uri} is not done (it failed or was never run)"
            _fail(opened, done, shard, error, attempts=0)
            progress.advance(0, failed=True)
            continue
        for stage, stage_done in zip(opened, done, strict=True):
            if not stage_done:
                stage.out.clear_shard(shard)
        yield _Item(shard, todo=[not stage_done for stage_done in done])


def _fail(opened: list[OpenedStage], done: list[bool], shard: int, error: str, attempts: int) -> None:
    """Record the shard as failed in the first stage that did not finish it, and in every later one
    (their parent shard is missing), as an unfused run would."""
    first = True
    for stage, stage_done in zip(opened, done, strict=True):
        if stage_done:
            continue
        if first:
            stage.result.failed[shard] = stage.out.mark_failed(shard, error, attempts)
            failed_in = stage.job.name
            first = False
        else:
            why = f"not run: {failed_in} failed on shard {shard} (parent shard not done)"
            stage.result.failed[shard] = stage.out.mark_failed(shard, why, attempts=0)


def _dispatch(
    fused: FusedJob,
    opened: list[OpenedStage],
    executor: Executor,
    runner: RunnerConfig,
    progress: StageProgress,
    work: Iterator[_Item],
) -> None:
    todo: dict[int, list[bool]] = {}

    def tasks() -> Iterator[Task]:
        for item in work:
            todo[item.shard] = item.todo
            yield Task(item.shard)

    def count_committed(task: Task) -> list[bool]:
        """Stages committed by any attempt count as processed (an earlier attempt may have committed
        some before it failed); they stay done."""
        done = [stage.out.is_done(task.number, "none") for stage in opened]
        for stage, was_todo, stage_done in zip(opened, todo.pop(task.number), done, strict=True):
            if was_todo and stage_done:
                stage.result.processed += 1
        return done

    def finished(task: Task, stats: FusedShardStats) -> None:
        count_committed(task)
        progress.advance(stats.rows_out)

    def failed(task: Task, error: str) -> None:
        # The first stage that did not commit the shard is the one at fault.
        _fail(opened, count_committed(task), task.number, error or "unknown error", task.attempt)
        progress.advance(0, failed=True)

    dispatch(executor, fused, tasks(), runner.max_retries, finished, failed, where=opened[0].out.uri)
