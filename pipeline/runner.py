"""Run one stage over a dataset's shards: plan, resume, dispatch, retry, record.

The shard is the unit of work, of resume and of retry. A shard counts as done only when its
done marker exists and its files still match it; everything else is (re)done. A shard that
keeps failing is recorded in ``_failed/`` with its error while the others complete.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunnerConfig
from pipeline.dataset import Dataset, Manifest, MediaRef, config_hash
from pipeline.errors import DatasetError
from pipeline.executors import Executor, Outcome
from pipeline.progress import Quiet, StageProgress
from pipeline.sources import Source
from pipeline.stage import Stage
from pipeline.storage import Storage
from pipeline.worker import StageJob, _from_pandas


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

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class _Work:
    shard: int
    source: pa.Table | None
    attempt: int = 1


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
    started = time.perf_counter()
    job.stage_cls.preflight(job.config)
    out = Dataset(Storage(job.output, job.storage))
    parent = _check_parent(job) if not job.stage_cls.source else None
    if job.stage_cls.source and source is None:
        raise ValueError(f"stage {job.name} reads outside input: pass a Source")
    if parent is not None:
        job = replace(job, media={ext: parent[1].media[ext] for ext in job.stage_cls.reads_media})
    identity = config_hash(
        {
            "job": job.config_hash,
            "parent": job.parent,
            "input": source.fingerprint if source else None,
        }
    )
    result = StageResult(stage=job.name, output=out.uri)
    existing = out.manifest()
    if existing is not None and (existing.config_hash != identity or existing.stage != job.name):
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
        return result

    media = dict(parent[1].media) if parent else dict(source.media if source else {})
    for name, ext in job.stage_cls.media_extensions(job.config).items():
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

    with progress:
        progress.set_total(manifest.num_shards)
        if source:
            work = _source_work(job, source, out, runner, result, progress)
        else:
            work = _parent_work(parent, out, runner, result, progress, job.stage_cls, job.revisit)
        _dispatch(job, work, executor, runner, out, result, progress)
        progress.set_total(result.shards)

    manifest.num_shards = result.shards
    manifest.complete = not result.failed
    out.write_manifest(manifest)
    result.seconds = time.perf_counter() - started
    return result


def _check_parent(job: StageJob) -> tuple[Dataset, Manifest]:
    if not job.parent:
        raise DatasetError(f"stage {job.name} needs an input dataset")
    parent = Dataset(Storage(job.parent, job.storage))
    manifest = parent.require_manifest()
    if manifest.num_shards is None:
        raise DatasetError(f"{parent.uri}: its '{manifest.stage}' run did not finish; run it again first")
    missing_media = [ext for ext in job.stage_cls.reads_media if ext not in manifest.media]
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


def _parent_work(
    parent: tuple[Dataset, Manifest],
    out: Dataset,
    runner: RunnerConfig,
    result: StageResult,
    progress: StageProgress,
    stage_cls: type[Stage],
    revisit: bool,
) -> Iterator[_Work]:
    dataset, manifest = parent
    for shard in range(manifest.num_shards or 0):
        result.shards += 1
        if out.is_done(shard, runner.verify):
            if revisit and _has_retryable_rows(out, shard, stage_cls):
                yield _Work(shard, None)  # the old shard stays valid until the redo commits
                continue
            result.skipped += 1
            progress.advance(0, skipped=True)
            continue
        if not dataset.is_done(shard, "none"):
            error = f"parent shard {shard} of {dataset.uri} is not done (it failed or was never run)"
            out.mark_failed(shard, error, attempts=0)
            result.failed[shard] = error
            progress.advance(0, failed=True)
            continue
        out.clear_shard(shard)
        yield _Work(shard, None)


def _has_retryable_rows(out: Dataset, shard: int, stage_cls: type[Stage]) -> bool:
    stats = out.shard_stat(shard)
    return stats is None or any(stage_cls.retryable(status) for status in stats.by_status)


def _source_work(
    job: StageJob,
    source: Source,
    out: Dataset,
    runner: RunnerConfig,
    result: StageResult,
    progress: StageProgress,
) -> Iterator[_Work]:
    driver_stage = job.stage_cls(job.config)  # only for prepare_in_order: no models loaded here
    for piece in source.shards():
        result.shards += 1
        if piece.table is None:
            out.mark_failed(piece.index, piece.error or "unreadable input", attempts=0)
            result.failed[piece.index] = piece.error or "unreadable input"
            progress.advance(0, failed=True)
            continue
        prepared = driver_stage.prepare_in_order(piece.table.to_pandas())
        if out.is_done(piece.index, runner.verify):
            result.skipped += 1
            progress.advance(0, skipped=True)
            continue
        out.clear_shard(piece.index)
        yield _Work(piece.index, _prepared_table(prepared, piece.table.schema))


def _prepared_table(frame, schema: pa.Schema) -> pa.Table:
    """Back to Arrow with the input's exact types, so every shard keeps one schema."""
    fields = list(schema)
    known = set(schema.names)
    for name in frame.columns:
        if name not in known:
            fields.append(pa.field(name, pa.array(frame[name].iloc[:0], from_pandas=True).type))
    return _from_pandas(frame, pa.schema(fields))


def _dispatch(
    job: StageJob,
    work: Iterator[_Work],
    executor: Executor,
    runner: RunnerConfig,
    out: Dataset,
    result: StageResult,
    progress: StageProgress,
) -> None:
    capacity = executor.start(job)
    in_flight: dict[int, _Work] = {}

    def settle(outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            item = in_flight.pop(outcome.ticket)
            if outcome.stats is not None:
                result.processed += 1
                progress.advance(outcome.stats.rows_out)
            elif item.attempt <= runner.max_retries:
                item.attempt += 1
                in_flight[executor.submit(item.shard, item.source, item.attempt)] = item
            else:
                out.mark_failed(item.shard, outcome.error or "unknown error", item.attempt)
                result.failed[item.shard] = outcome.error or "unknown error"
                progress.advance(0, failed=True)

    try:
        for item in work:
            while len(in_flight) >= capacity:
                settle(executor.wait())
            in_flight[executor.submit(item.shard, item.source, item.attempt)] = item
        while in_flight:
            settle(executor.wait())
    finally:
        executor.stop()


def _clear(out: Dataset) -> None:
    for name in out.storage.list():
        if name.startswith("part-") or name == "_manifest.json":
            out.storage.delete(name)
    for folder in ("_done", "_failed", "_stats"):
        for name in out.storage.list(folder):
            out.storage.delete(name)
