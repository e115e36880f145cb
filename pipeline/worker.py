"""What runs on a worker for one shard: read, process the ``ok`` rows, write, mark done.

Nothing here knows about Ray; the executors call ``process_shard`` in a Ray task, a Ray
actor or the current process.
"""

from __future__ import annotations

import socket
import tarfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.dataset import (
    BASE_COLUMNS,
    Dataset,
    HashingWriter,
    MediaRef,
    ShardStats,
    TarShardReader,
    config_hash,
    shard_name,
    write_tar_members,
)
from pipeline.stage import Batch, Output, Stage, StageConfig
from pipeline.status import OK, rejected
from pipeline.storage import Storage, StorageOptions

MAX_ERROR_CHARS = 500


@dataclass
class StageJob:
    """Everything a worker needs to run one stage over one shard (picklable)."""

    stage_cls: type[Stage]
    config: StageConfig
    output: str
    parent: str | None = None
    storage: StorageOptions = field(default_factory=StorageOptions)
    # Where each media extension this stage reads lives (from the parent's manifest).
    media: dict[str, MediaRef] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.stage_cls.name

    @property
    def config_hash(self) -> str:
        return config_hash({"stage": self.name, "config": self.config.model_dump(mode="json")})


_STAGE_CACHE: dict[tuple[type[Stage], str], Stage] = {}


def stage_for(job: StageJob) -> Stage:
    """The set-up stage for this job, built once per worker process and reused across shards."""
    cache_key = (job.stage_cls, job.config_hash)
    stage = _STAGE_CACHE.get(cache_key)
    if stage is None:
        _STAGE_CACHE.clear()  # one stage (and its models) in memory per worker
        stage = job.stage_cls(job.config)
        stage.setup()
        _STAGE_CACHE[cache_key] = stage
    return stage


def output_schema(input_schema: pa.Schema, stage_cls: type[Stage]) -> pa.Schema:
    """Parent columns (minus the driver's private ``_`` columns), then the stage's new ones."""
    fields = {name: pa.field(name, dtype) for name, dtype in BASE_COLUMNS.items()}
    for f in input_schema:
        if not f.name.startswith("_"):
            fields.setdefault(f.name, f)
    for name, dtype in stage_cls.produces.items():
        fields[name] = pa.field(name, dtype)
    return pa.schema(list(fields.values()))


def process_shard(
    job: StageJob,
    shard: int,
    source_table: pa.Table | None = None,
    attempt: int = 1,
    node: str | None = None,
) -> ShardStats:
    started = time.perf_counter()
    timings: Counter[str] = Counter()
    out = Dataset(Storage(job.output, job.storage))
    table = source_table
    if table is None:
        table = Dataset(Storage(job.parent, job.storage)).read_shard(shard)
    timings["read"] += time.perf_counter() - started

    schema = output_schema(table.schema, job.stage_cls)
    is_ok = pc.equal(table.column("status"), OK).fill_null(False)
    passed_through = table.filter(pc.invert(is_ok))
    todo = table.filter(is_ok)
    stage = stage_for(job) if todo.num_rows else None

    pieces: list[pa.Table] = [_conform(passed_through, schema)]
    tar_digest = None
    with ExitStack() as stack:
        readers = {
            ext: stack.enter_context(_media_reader(job, ext, shard))
            for ext in job.stage_cls.reads_media
            if todo.num_rows
        }
        tar = None
        if job.stage_cls.writes_media:
            stream = stack.enter_context(out.storage.open_write(f"{shard_name(shard)}.tar"))
            hashing = HashingWriter(stream)
            tar = stack.enter_context(tarfile.open(fileobj=hashing, mode="w|", format=tarfile.USTAR_FORMAT))
        batch_size = max(1, job.stage_cls.resources.batch_size)
        for start in range(0, todo.num_rows, batch_size):
            rows = todo.slice(start, batch_size).to_pandas()
            t0 = time.perf_counter()
            batch, missing = _attach_media(job, rows, readers)
            timings["read_media"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            result = run_isolated(stage, batch) if len(batch.rows) else Output(rows=batch.rows.iloc[:0])
            timings["process"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            frames = [f for f in (result.rows, missing) if len(f)]
            if frames:
                pieces.append(_from_pandas(pd.concat(frames, ignore_index=True), schema))
            if tar is not None:
                for key in sorted(result.media):
                    write_tar_members(tar, key, result.media[key])
            timings["write"] += time.perf_counter() - t0
        if tar is not None:
            tar.close()
            tar_digest = hashing.digest()

    t0 = time.perf_counter()
    result_table = pa.concat_tables(pieces).sort_by("key")
    by_status = Counter(result_table.column("status").to_pylist())
    stats = ShardStats(
        shard=shard,
        rows_in=table.num_rows,
        rows_out=result_table.num_rows,
        by_status=dict(by_status),
        seconds=0.0,
        attempts=attempt,
        node=node or socket.gethostname(),
    )
    timings["write"] += time.perf_counter() - t0
    stats.seconds = round(time.perf_counter() - started, 4)
    stats.timings = {k: round(v, 4) for k, v in timings.items()}
    out.commit_shard(shard, result_table, tar_digest, stats)
    return stats


def run_isolated(stage: Stage, batch: Batch) -> Output:
    """Run a batch; if it raises, find the rows that make it fail and reject only those.

    When every row fails alone too, the fault is not in the rows (a broken model, no memory),
    so the error is raised and the runner retries or fails the shard.
    """
    try:
        return stage.process(batch)
    except Exception as batch_error:
        if len(batch.rows) == 1:
            raise
        outputs, failures = [], 0
        for i in range(len(batch.rows)):
            single = Batch(rows=batch.rows.iloc[i : i + 1], media=batch.media)
            try:
                outputs.append(stage.process(single))
            except Exception as row_error:
                failures += 1
                outputs.append(Output(rows=_rejected_rows(single.rows, stage.name, "error", _describe(row_error))))
        if failures == len(batch.rows):
            raise batch_error
        return Output(
            rows=pd.concat([o.rows for o in outputs], ignore_index=True),
            media={k: v for o in outputs for k, v in o.media.items()},
        )


def _attach_media(job: StageJob, rows: pd.DataFrame, readers: dict[str, TarShardReader]) -> tuple[Batch, pd.DataFrame]:
    """Fetch each row's media; rows whose media is missing are rejected, not passed to the stage."""
    if not readers:
        return Batch(rows=rows), rows.iloc[:0]
    media: dict[str, dict[str, bytes]] = {ext: {} for ext in readers}
    missing_reason: dict[int, str] = {}
    for ext, reader in readers.items():
        key_column = job.stage_cls.reads_media[ext]
        for position, media_key in enumerate(rows[key_column]):
            found = reader.get(media_key, [ext])
            if found and ext in found:
                media[ext][media_key] = found[ext]
            else:
                why = f"no {ext} for key {media_key}" + (f" ({reader.error})" if reader.error else "")
                missing_reason.setdefault(position, why)
    if not missing_reason:
        return Batch(rows=rows, media=media), rows.iloc[:0]
    bad = sorted(missing_reason)
    keep = [i for i in range(len(rows)) if i not in missing_reason]
    missing = _rejected_rows(rows.iloc[bad], job.name, "missing_media", [missing_reason[i] for i in bad])
    return Batch(rows=rows.iloc[keep].reset_index(drop=True), media=media), missing


def _media_reader(job: StageJob, ext: str, shard: int) -> TarShardReader:
    ref = job.media.get(ext)
    if ref is None:
        raise FileNotFoundError(f"no dataset upstream of {job.output} holds '{ext}' media")
    name = ref.tar_for(shard)
    return TarShardReader(Storage(ref.root, job.storage), name or f"{shard_name(shard)}.tar")


def _rejected_rows(rows: pd.DataFrame, stage: str, reason: str, error: str | list[str]) -> pd.DataFrame:
    out = rows.copy()
    out["status"] = rejected(stage, reason)
    out["error"] = error
    return out


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text[:MAX_ERROR_CHARS]


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = []
    for f in schema:
        if f.name in table.column_names:
            column = table.column(f.name)
            columns.append(column if column.type == f.type else column.cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _from_pandas(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    arrays = []
    for f in schema:
        if f.name in frame.columns:
            arrays.append(pa.array(frame[f.name], type=f.type, from_pandas=True))
        else:
            arrays.append(pa.nulls(len(frame), f.type))
    return pa.Table.from_arrays(arrays, schema=schema)
