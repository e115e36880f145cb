"""Run one stage over a dataset's shards: plan, resume, dispatch, retry, record.

The shard is the unit of work, of resume and of retry. A shard counts as done only when its
done marker exists and its files still match it; everything else is (re)done. A shard that
keeps failing is recorded in ``_failed/`` with its error while the others complete.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facecap.pipeline.config import RunnerConfig
from facecap.pipeline.dataset import Dataset, Manifest, MediaRef, ShardStats, config_hash, shard_name
from facecap.pipeline.errors import DatasetError
from facecap.pipeline.executors import Executor
from facecap.pipeline.progress import Quiet, StageProgress
from facecap.pipeline.registry import report_measures
from facecap.pipeline.source import Source
from facecap.pipeline.stage import Stage, Summaries
from facecap.pipeline.storage import Storage, join, refuse_overlap
from facecap.pipeline.tasks import Task, TaskJob, dispatch, run_tasks
from facecap.pipeline.worker import PLAN_DIR, SUMMARY_DIR, StageJob, _from_pandas, plan_uri, summary_uri


@dataclass
class StageResult:
    stage: str
    output: str
    shards: int = 0
    processed: int = 0
    skipped: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    nothing_to_do: bool = False
    # What the stage's preflight wants the user to know (a default it adapted to this machine).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class _Run:
    """One pass of a stage over its shards: what runs, where, and what it has done so far."""

    job: StageJob
    executor: Executor
    runner: RunnerConfig
    out: Dataset
    result: StageResult
    progress: StageProgress


@dataclass
class OpenedStage:
    """A stage's output folder checked against the job and its manifest written: ready for shards."""

    job: StageJob  # with the media it reads and the report's measures filled in
    out: Dataset
    manifest: Manifest
    result: StageResult
    parent: tuple[Dataset, Manifest] | None
    started: float


def run_stage(
    job: StageJob,
    executor: Executor,
    runner: RunnerConfig | None = None,
    progress: StageProgress | None = None,
    source: Source | None = None,
    overwrite: bool = False,
    recipe: dict | None = None,
) -> StageResult:
    runner = runner or RunnerConfig()
    progress = progress or Quiet()
    opened = open_stage(job, runner, source, overwrite, recipe)
    if opened.result.nothing_to_do:
        return opened.result
    job, out, result, parent = opened.job, opened.out, opened.result, opened.parent
    run = _Run(job, executor, runner, out, result, progress)
    with progress:
        progress.set_total(opened.manifest.num_shards)
        if source:
            _dispatch(run, _source_work(run, source))
        # A global stage whose pass 1 left shards failed decides nothing: those are recorded as failed.
        elif not job.spec.global_passes or _global_passes(run, parent):
            _dispatch(run, _parent_work(run, parent))
        progress.set_total(result.shards)
    return close_stage(opened)


def close_stage(opened: OpenedStage) -> StageResult:
    """Record in the manifest how many shards there are and whether all of them are done."""
    manifest, result = opened.manifest, opened.result
    manifest.num_shards = result.shards
    manifest.complete = not result.failed
    opened.out.write_manifest(manifest)
    result.seconds = time.perf_counter() - opened.started
    return result


def open_stage(
    job: StageJob,
    runner: RunnerConfig,
    source: Source | None = None,
    overwrite: bool = False,
    recipe: dict | None = None,
) -> OpenedStage:
    """Driver-side checks and the manifest, before any shard runs; ``result.nothing_to_do`` when
    every shard is already done (the manifest is then left as it is)."""
    started = time.perf_counter()
    notes = job.stage_cls.preflight(job.config) or []
    out = Dataset.at(job.output, job.storage)
    parent = _check_parent(job) if not job.stage_cls.source else None
    if job.stage_cls.source and source is None:
        raise ValueError(f"stage {job.name} reads outside input: pass a Source")
    refuse_overlap(out.uri, _inputs_of(parent, source))
    job = replace(job, measures=report_measures())
    if parent is not None:
        job = replace(job, media={ext: parent[1].media[ext] for ext in job.spec.reads})
    identity = config_hash(
        {
            "job": job.config_hash,
            "parent": job.parent,
            "input": source.fingerprint if source else None,
        }
    )
    result = StageResult(stage=job.name, output=out.uri, notes=notes)
    existing = out.manifest()
    if existing is not None and existing.stage != job.name:
        # --overwrite replaces this stage's own earlier output, never another command's.
        raise DatasetError(
            f"{out.uri} holds a '{existing.stage}' dataset, not a '{job.name}' one; --overwrite replaces only "
            f"'{job.name}' output: choose another output folder"
        )
    if existing is not None and existing.config_hash != identity:
        if not overwrite:
            raise DatasetError(
                f"{out.uri} already holds a '{existing.stage}' dataset made from other settings or input "
                f"(config hash {existing.config_hash}, now {identity}); "
                "pass --overwrite to replace it or choose another output folder"
            )
        _clear(out)
        existing = None
    if (
        not job.revisit
        and existing is not None
        and existing.complete
        and existing.num_shards is not None
        and all(out.is_done(s, runner.verify) for s in range(existing.num_shards))
    ):
        result.shards = result.skipped = existing.num_shards
        result.nothing_to_do = True
        return OpenedStage(job, out, existing, result, parent, started)

    media = dict(parent[1].media) if parent else dict(source.media if source else {})
    for name, ext in job.spec.writes.items():
        media[name] = MediaRef(root=out.uri, ext=None if ext == name else ext)
    manifest = Manifest(
        stage=job.name,
        config=job.config.model_dump(mode="json"),
        config_hash=identity,
        parent=job.parent,
        media=media,
        num_shards=parent[1].num_shards if parent else None,
        recipe=recipe,
    )
    out.write_manifest(manifest)
    if not out.storage.remote:
        out.storage.remove_temporaries()
    return OpenedStage(job, out, manifest, result, parent, started)


def _global_passes(run: _Run, parent: tuple[Dataset, Manifest]) -> bool:
    """Passes 1 and 2 of a global stage; False when some shard could not be summarized.

    Pass 1 resumes like any stage (per-shard done markers under ``_summary``). The plan is
    made again only when the summaries changed since the last plan, and a new plan
    invalidates the shards the last pass finished with the old one.
    """
    job, out, result, runner, progress = run.job, run.out, run.result, run.runner, run.progress
    summaries = Dataset.at(summary_uri(out.uri), job.storage)
    summary_result = StageResult(stage=job.name, output=summaries.uri)
    progress.phase(f"{job.name} 1/3 summarize")
    first = replace(run, job=replace(job, phase="summarize", revisit=False), out=summaries, result=summary_result)
    _dispatch(first, _parent_work(first, parent))
    if summary_result.failed:
        for shard, error in summary_result.failed.items():
            result.failed[shard] = out.mark_failed(shard, f"summarize: {error}", attempts=runner.max_retries + 1)
        result.shards = summary_result.shards
        return False
    num_shards = parent[1].num_shards or 0
    fingerprint = config_hash([summaries.done_marker(s) for s in range(num_shards)])
    plans = Storage(plan_uri(out.uri), job.storage)
    if _plan_fingerprint(plans) != fingerprint:
        progress.phase(f"{job.name} 2/3 plan")
        scratch = Storage(join(out.uri, PLAN_SCRATCH_DIR), job.storage)
        plan_summaries = _DatasetSummaries(summaries, num_shards, run.executor, scratch, runner.max_retries)
        _write_plan(job, plan_summaries, plans, num_shards)
        for shard in range(num_shards):
            out.clear_shard(shard)
        plans.write_bytes(PLAN_MARKER, json.dumps({"summaries": fingerprint}).encode())
    progress.phase(f"{job.name} 3/3 apply")
    return True


PLAN_MARKER = "_complete.json"
# Where a global stage's plan tasks leave intermediate files (dedup's partitions), under the output.
PLAN_SCRATCH_DIR = "_plan_scratch"


def _plan_fingerprint(plans: Storage) -> str | None:
    if not plans.exists(PLAN_MARKER):
        return None
    try:
        return json.loads(plans.read_bytes(PLAN_MARKER)).get("summaries")
    except ValueError:
        return None


def _write_plan(job: StageJob, summaries: Summaries, plans: Storage, num_shards: int) -> None:
    if plans.exists(PLAN_MARKER):
        plans.delete(PLAN_MARKER)
    written: set[int] = set()
    for shard, frame in job.stage_cls.plan(job.config, summaries):
        if not 0 <= shard < num_shards:
            raise ValueError(f"stage {job.name}'s plan names shard {shard}, which does not exist")
        if "key" not in frame.columns:
            raise ValueError(f"stage {job.name}'s plan for shard {shard} has no 'key' column")
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer, compression="zstd")
        plans.write_bytes(f"{shard_name(shard)}.parquet", buffer.getvalue())
        written.add(shard)
    for shard in set(range(num_shards)) - written:  # a shard with nothing to decide
        buffer = io.BytesIO()
        pq.write_table(pa.table({"key": pa.array([], pa.string())}), buffer)
        plans.write_bytes(f"{shard_name(shard)}.parquet", buffer.getvalue())


class _DatasetSummaries(Summaries):
    def __init__(
        self,
        dataset: Dataset,
        num_shards: int,
        executor: Executor | None = None,
        scratch: Storage | None = None,
        max_retries: int = 2,
    ):
        self._dataset = dataset
        self._num_shards = num_shards
        self._executor = executor
        self._scratch = scratch
        self._max_retries = max_retries

    def __reduce__(self):
        # The executor stays on the driver: a copy on a worker reads shards, it runs no tasks.
        return (_DatasetSummaries, (self._dataset, self._num_shards, None, self._scratch))

    @property
    def scratch(self) -> Storage | None:
        return self._scratch

    def count_rows(self) -> int:
        """From the Parquet footers, without reading a column."""
        total = 0
        for shard in self.shards:
            with self._dataset.storage.open_read(self._dataset.parquet_name(shard)) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total

    def run_tasks(self, job: TaskJob, payloads: Iterable[tuple[int, Any]]) -> dict[int, Any]:
        """On the run's executor (dispatch starts and stops it for these tasks alone)."""
        if self._executor is None:
            return super().run_tasks(job, payloads)
        return run_tasks(self._executor, job, payloads, self._max_retries, where=self._dataset.uri)

    @property
    def shards(self) -> list[int]:
        return list(range(self._num_shards))

    def read(self, shard: int, columns: list[str] | None = None) -> pa.Table:
        """Only the rows pass 1 summarized (not the failures), and only the columns that exist."""
        with self._dataset.storage.open_read(self._dataset.parquet_name(shard)) as f:
            present = pq.read_schema(f).names
        wanted = None if columns is None else ["key", *[c for c in columns if c in present and c != "key"]]
        table = self._dataset.read_shard(shard, None if wanted is None else [*wanted, "_status"])
        table = table.filter(pc.is_null(table.column("_status")))
        private = [c for c in table.column_names if c in ("_status", "_error")]
        return table.drop_columns(private)


def _inputs_of(parent: tuple[Dataset, Manifest] | None, source: Source | None) -> list[str]:
    """Everything the stage reads: the parent dataset and the tars it references, or the outside input."""
    if parent is not None:
        dataset, manifest = parent
        return [dataset.uri, *(ref.root for ref in manifest.media.values())]
    if source is not None:
        return [*source.roots, *source.files, *(ref.root for ref in source.media.values())]
    return []


def _check_parent(job: StageJob) -> tuple[Dataset, Manifest]:
    if not job.parent:
        raise DatasetError(f"stage {job.name} needs an input dataset")
    parent = Dataset.at(job.parent, job.storage)
    manifest = parent.require_manifest()
    if manifest.num_shards is None:
        raise DatasetError(f"{parent.uri}: its '{manifest.stage}' run did not finish; run it again first")
    missing_media = [ext for ext in job.spec.reads if ext not in manifest.media]
    if missing_media:
        raise DatasetError(
            f"stage {job.name} needs '{missing_media[0]}' media, but no stage up to {parent.uri} "
            f"('{manifest.stage}') stored any"
        )
    done = parent.done_shards()
    if done and job.stage_cls.consumes:
        with parent.storage.open_read(parent.parquet_name(done[0])) as f:
            names = set(pq.read_schema(f).names)
        absent = [c for c in job.stage_cls.consumes if c not in names]
        if absent:
            raise DatasetError(
                f"stage {job.name} needs column(s) {', '.join(absent)}, which {parent.uri} "
                f"('{manifest.stage}') does not have"
            )
    return parent, manifest


def _parent_work(run: _Run, parent: tuple[Dataset, Manifest]) -> Iterator[Task]:
    dataset, manifest = parent
    out, runner, result, progress = run.out, run.runner, run.result, run.progress
    stage_cls, revisit = run.job.stage_cls, run.job.revisit
    for shard in range(manifest.num_shards or 0):
        result.shards += 1
        if out.is_done(shard, runner.verify):
            if revisit and _has_retryable_rows(out, shard, stage_cls):
                yield Task(shard, None)  # the old shard stays valid until the redo commits
                continue
            result.skipped += 1
            progress.advance(0, skipped=True)
            continue
        if not dataset.is_done(shard, "none"):
            error = f"parent shard {shard} of {dataset.uri} is not done (it failed or was never run)"
            result.failed[shard] = out.mark_failed(shard, error, attempts=0)
            progress.advance(0, failed=True)
            continue
        out.clear_shard(shard)
        yield Task(shard, None)


def _has_retryable_rows(out: Dataset, shard: int, stage_cls: type[Stage]) -> bool:
    stats = out.shard_stat(shard)
    return stats is None or any(stage_cls.retryable(status) for status in stats.by_status)


def _source_work(run: _Run, source: Source) -> Iterator[Task]:
    job, out, runner, result, progress = run.job, run.out, run.runner, run.result, run.progress
    driver_stage = job.stage_cls(job.config)  # only for prepare_in_order: no models loaded here
    for piece in source.shards():
        result.shards += 1
        if piece.table is None:
            result.failed[piece.index] = out.mark_failed(piece.index, piece.error or "unreadable input", attempts=0)
            progress.advance(0, failed=True)
            continue
        prepared = driver_stage.prepare_in_order(piece.table.to_pandas())
        if out.is_done(piece.index, runner.verify):
            result.skipped += 1
            progress.advance(0, skipped=True)
            continue
        out.clear_shard(piece.index)
        yield Task(piece.index, _prepared_table(prepared, piece.table.schema))


def _prepared_table(frame, schema: pa.Schema) -> pa.Table:
    """Back to Arrow with the input's exact types, so every shard keeps one schema."""
    fields = list(schema)
    known = set(schema.names)
    for name in frame.columns:
        if name not in known:
            fields.append(pa.field(name, pa.array(frame[name].iloc[:0], from_pandas=True).type))
    return _from_pandas(frame, pa.schema(fields))


def _dispatch(run: _Run, work: Iterator[Task]) -> None:
    out, result, progress = run.out, run.result, run.progress

    def done(task: Task, stats: ShardStats) -> None:
        result.processed += 1
        progress.advance(stats.rows_out)

    def failed(task: Task, error: str) -> None:
        result.failed[task.number] = out.mark_failed(task.number, error or "unknown error", task.attempt)
        progress.advance(0, failed=True)

    dispatch(run.executor, run.job, work, run.runner.max_retries, done, failed, where=out.uri)


# The files a stage writes at the top of its folder: only these are deleted by --overwrite.
OWN_FILE = re.compile(r"part-\d{5,}\.(parquet|tar)")


def _clear(out: Dataset) -> None:
    for name in out.storage.list():
        if OWN_FILE.fullmatch(name) or name == "_manifest.json":
            out.storage.delete(name)
    folders = ["_done", "_failed", "_stats", PLAN_DIR, PLAN_SCRATCH_DIR]
    folders += [SUMMARY_DIR, *(f"{SUMMARY_DIR}/{sub}" for sub in ("_done", "_failed", "_stats"))]
    for folder in folders:
        for name in out.storage.list(folder):
            if name.endswith((".parquet", ".json")):
                out.storage.delete(name)
