"""What runs on a worker for one shard: read, process the ``ok`` rows, write, mark done.

Nothing here knows about Ray; the executors call ``process_shard`` in a Ray task, a Ray
actor or the current process.
"""

from __future__ import annotations

import functools
import inspect
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facecap.pipeline.dataset import (
    BASE_COLUMNS,
    Dataset,
    MediaRef,
    ShardStats,
    SpooledTar,
    TarShardReader,
    config_hash,
    shard_name,
)
from facecap.pipeline.redact import redact_text
from facecap.pipeline.stage import Batch, Output, Resources, Stage, StageConfig, StageSpec
from facecap.pipeline.status import OK, rejected
from facecap.pipeline.storage import Storage, StorageOptions, join
from facecap.pipeline.summary import shard_summary, summary_frame
from facecap.pipeline.threads import apply_thread_budget

T = TypeVar("T")

MAX_ERROR_CHARS = 500
SUMMARY_DIR, PLAN_DIR = "_summary", "_plan"


@dataclass
class StageJob:
    """Everything a worker needs to run one stage over one shard (picklable)."""

    stage_cls: type[Stage]
    config: StageConfig
    output: str
    parent: str | None = None
    storage: StorageOptions = field(default_factory=StorageOptions)
    # Where each media this stage reads lives (from the parent's manifest).
    media: dict[str, MediaRef] = field(default_factory=dict)
    # Redo only retryable rows of finished shards (``--retry-failed``).
    revisit: bool = False
    # Global stages: "summarize" is pass 1 (writes OUTPUT/_summary); "process" is the usual pass.
    phase: str = "process"
    # What every registered stage asks reports to know about a shard's rows (pipeline/summary.py).
    measures: tuple = ()

    @property
    def name(self) -> str:
        return self.stage_cls.name

    @functools.cached_property
    def spec(self) -> StageSpec:
        """Resources, media read and written, global or not: asked of the stage once per job."""
        return self.stage_cls.spec(self.config)

    @property
    def resources(self) -> Resources:
        return self.spec.resources

    @property
    def config_hash(self) -> str:
        return config_hash({"stage": self.name, "config": self.config.model_dump(mode="json")})

    # What an executor calls (pipeline/tasks.py's Job) ---------------------------------------
    @property
    def modules(self) -> tuple[str, ...]:
        return (self.stage_cls.__module__,)

    def warm(self) -> None:
        stage_for(self)

    def run(self, shard: int, source: pa.Table | None, attempt: int, node: str | None = None) -> ShardStats:
        return process_shard(self, shard, source, attempt, node)


_STAGE_CACHE: dict[tuple[type[Stage], str, bool], Stage] = {}


def stage_key(job: StageJob) -> tuple[type[Stage], str, bool]:
    """What identifies a set-up stage in a worker: its class, its config, and whether it loads models.

    The last pass of a global stage only applies its plan, so it loads no models.
    """
    return job.stage_cls, job.config_hash, job.phase == "process" and job.spec.global_passes


def stage_for(job: StageJob, companions: frozenset = frozenset()) -> Stage:
    """The set-up stage for this job, built once per worker process and reused across shards.

    A worker keeps one stage (and its models) in memory, or the stages of one fused task
    (``companions``: their ``stage_key``s), which run one after another on every shard.
    """
    cache_key = stage_key(job)
    applies_plan = cache_key[2]
    stage = _STAGE_CACHE.get(cache_key)
    if stage is None:
        close_stages(keep=companions)
        stage = job.stage_cls(job.config)
        if not applies_plan:
            apply_thread_budget()  # before setup: the models it loads size their pools by it
            stage.setup()
        _STAGE_CACHE[cache_key] = stage
    return stage


def close_stages(keep: frozenset = frozenset()) -> None:
    """Close and forget this worker's set-up stages, except those whose ``stage_key`` is in ``keep``."""
    leaving = [key for key in _STAGE_CACHE if key not in keep]
    for key in leaving:
        _STAGE_CACHE.pop(key).close()


def summary_uri(output: str) -> str:
    """Where a global stage's pass 1 writes its per-shard summaries (a dataset-shaped folder)."""
    return join(output, SUMMARY_DIR)


def plan_uri(output: str) -> str:
    return join(output, PLAN_DIR)


def output_schema(input_schema: pa.Schema, stage_cls: type[Stage]) -> pa.Schema:
    """Parent columns (minus the driver's private ``_`` columns), then the stage's new ones."""
    fields = {name: pa.field(name, dtype) for name, dtype in BASE_COLUMNS.items()}
    for f in input_schema:
        if not f.name.startswith("_"):
            fields.setdefault(f.name, f)
    for name, dtype in stage_cls.produces.items():
        fields[name] = pa.field(name, dtype)
    return pa.schema(list(fields.values()))


# Media a shard task holds in memory for the next stage of a fused task: dataset folder -> key ->
# {tar member extension: bytes}, i.e. what that stage's tar holds for the shard.
MemoryMedia = dict[str, dict[str, dict[str, bytes]]]

# Past this many bytes of media a stage made for one shard, the next fused stage reads the
# committed tar instead (the bytes are in the tar spool already; twice a big shard is too much).
MEMORY_MEDIA_BUDGET = 512 << 20


@dataclass
class ShardResult:
    """A committed shard, and what a fused task hands to its next stage without storage."""

    stats: ShardStats
    table: pa.Table
    # This stage's media for the shard by key and member extension; None when not kept.
    media: dict[str, dict[str, bytes]] | None = None


def process_shard(
    job: StageJob,
    shard: int,
    source_table: pa.Table | None = None,
    attempt: int = 1,
    node: str | None = None,
) -> ShardStats:
    """Run the stage over one shard and commit it (Parquet, tar, stats, then the done marker).

    With ``job.revisit`` and a finished shard, only the rows the stage calls retryable are
    redone; every other row and its stored media is kept as it was.
    """
    if job.phase == "summarize":
        return summarize_shard(job, shard, attempt, node)
    return run_shard(job, shard, source_table, attempt, node).stats


def run_shard(
    job: StageJob,
    shard: int,
    source_table: pa.Table | None = None,
    attempt: int = 1,
    node: str | None = None,
    *,
    memory_media: MemoryMedia | None = None,
    keep_media: bool = False,
    companions: frozenset = frozenset(),
) -> ShardResult:
    """``process_shard``'s one pass, returning the committed table too: a fused task passes it (and,
    with ``keep_media``, this stage's media) to its next stage instead of reading them back.

    ``memory_media`` holds media that earlier stages of the fused task made for this shard; media
    not there is read from its tar as usual.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    timings: Counter[str] = Counter()
    out = Dataset.at(job.output, job.storage)
    revisit = job.revisit and source_table is None and out.is_done(shard, "none")
    table = source_table
    if table is None:
        table = out.read_shard(shard) if revisit else Dataset.at(job.parent, job.storage).read_shard(shard)
    timings["read"] += time.perf_counter() - started

    schema = output_schema(table.schema, job.stage_cls)
    todo_table, kept = _split(job, table, schema, revisit)
    stage = stage_for(job, companions) if todo_table.num_rows else None
    pieces: list[pa.Table] = [kept]
    extensions = job.spec.writes
    spool = SpooledTar() if extensions else None
    held = _HeldMedia() if keep_media and extensions and not revisit else None
    plan = _ShardPlan.load(job, shard) if job.spec.global_passes and todo_table.num_rows else None
    try:
        if revisit and spool is not None:
            _carry_media(job, shard, kept, spool)
        for batch, missing in _batches(job, todo_table, shard, timings, plan, memory_media):
            if len(missing):
                pieces.append(_from_pandas(missing, schema))
            t0 = time.perf_counter()
            for result in _outputs(stage, batch):
                if len(result.rows):
                    pieces.append(_from_pandas(result.rows, schema))
                if spool is not None:
                    for key, media in result.media.items():
                        members = {extensions[name]: data for name, data in media.items()}
                        spool.add(key, members)
                        if held is not None:
                            held.add(key, members)
            timings["process"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        tar_digest = None
        if spool is not None:
            with out.storage.open_write(f"{shard_name(shard)}.tar") as stream:
                tar_digest = spool.write_sorted(stream)
    finally:
        if spool is not None:
            spool.close()

    result_table = pa.concat_tables(pieces).sort_by("key")
    stats = ShardStats(
        shard=shard,
        rows_in=table.num_rows,
        rows_out=result_table.num_rows,
        by_status=dict(Counter(result_table.column("status").to_pylist())),
        seconds=0.0,
        attempts=attempt,
        node=node or socket.gethostname(),
        summary=shard_summary(summary_frame(result_table, job.measures), job.measures),
    )
    timings["write"] += time.perf_counter() - t0
    stats.seconds = round(time.perf_counter() - started, 4)
    stats.cpu_seconds = round(time.process_time() - cpu_started, 4)
    stats.timings = {k: round(v, 4) for k, v in timings.items()}
    out.commit_shard(shard, result_table, tar_digest, stats)
    return ShardResult(stats, result_table, held.members if held is not None else None)


class _HeldMedia:
    """A stage's media for one shard kept in memory for the next fused stage, up to a budget."""

    def __init__(self, budget: int = MEMORY_MEDIA_BUDGET):
        self.members: dict[str, dict[str, bytes]] | None = {}
        self._left = budget

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self.members is None:
            return
        self._left -= sum(len(data) for data in members.values())
        if self._left < 0:
            self.members = None  # too big: the next stage reads the committed tar
            return
        self.members.setdefault(key, {}).update(members)


class _MemoryTar:
    """``TarShardReader``'s lookups over media held in memory (a fused task's earlier stage)."""

    error: str | None = None

    def __init__(self, members: dict[str, dict[str, bytes]]):
        self._members = members

    def __enter__(self) -> _MemoryTar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def get(self, key: str, exts: Iterable[str] | None = None) -> dict[str, bytes] | None:
        members = self._members.get(key)
        if members is None:
            return None
        return dict(members) if exts is None else {ext: members[ext] for ext in exts if ext in members}


def _batches(
    job: StageJob,
    table: pa.Table,
    shard: int,
    timings: Counter[str],
    plan: _ShardPlan | None = None,
    memory_media: MemoryMedia | None = None,
) -> Iterator[tuple[Batch, pd.DataFrame]]:
    """The stage's batches over ``table`` with what they need attached: their media (or, in a global
    stage's last pass, their plan rows), and apart the rows whose media or decision is missing.

    The one loop of both the per-shard pass and a global stage's summary pass.
    """
    if not table.num_rows:
        return
    with ExitStack() as stack:
        readers = (
            {} if plan else {n: stack.enter_context(_media_reader(job, n, shard, memory_media)) for n in job.spec.reads}
        )
        for start, stop in batch_bounds(table, job.stage_cls.batch_by, job.resources.batch_size):
            rows = table.slice(start, stop - start).to_pandas()
            t0 = time.perf_counter()
            attached = plan.attach(job.name, rows) if plan else _attach_media(job, rows, readers)
            timings["read_media"] += time.perf_counter() - t0
            yield attached


def batch_bounds(table: pa.Table, group_column: str | None, batch_size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges of about ``batch_size`` rows that never split a group."""
    size = max(1, batch_size)
    if group_column is None or group_column not in table.column_names:
        for start in range(0, table.num_rows, size):
            yield start, min(start + size, table.num_rows)
        return
    groups = table.column(group_column).to_pylist()
    start = 0
    while start < len(groups):
        stop = min(start + size, len(groups))
        while stop < len(groups) and groups[stop] == groups[stop - 1]:
            stop += 1
        yield start, stop
        start = stop


def summarize_shard(job: StageJob, shard: int, attempt: int = 1, node: str | None = None) -> ShardStats:
    """Pass 1 of a global stage: per-row facts of the shard's ``ok`` rows into OUTPUT/_summary.

    A row whose media is missing or whose summary raises is recorded with ``_status`` and
    ``_error`` instead, so the last pass can give it that status; the shard still completes.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    table = Dataset.at(job.parent, job.storage).read_shard(shard)
    todo = table.filter(pc.equal(table.column("status"), OK).fill_null(False))
    frames: list[pd.DataFrame] = []
    stage = stage_for(job) if todo.num_rows else None
    for batch, missing in _batches(job, todo, shard, Counter()):
        if len(missing):
            frames.append(_summary_failures(missing, "missing_media", list(missing["error"])))
        if len(batch.rows):
            frames.extend(_summarize_isolated(stage, batch))
    summary = _summary_table(frames)
    statuses = summary.column("_status").to_pylist()
    stats = ShardStats(
        shard=shard,
        rows_in=todo.num_rows,
        rows_out=summary.num_rows,
        by_status=dict(Counter(status or OK for status in statuses)),
        seconds=round(time.perf_counter() - started, 4),
        attempts=attempt,
        node=node or socket.gethostname(),
        cpu_seconds=round(time.process_time() - cpu_started, 4),
    )
    Dataset.at(summary_uri(job.output), job.storage).commit_shard(shard, summary, None, stats)
    return stats


def _summarize_isolated(stage: Stage, batch: Batch) -> list[pd.DataFrame]:
    """Summarize a batch; when it raises, find the rows at fault (like ``run_isolated``).

    Unlike the per-shard pass, a lone row that fails is recorded, not raised: pass 1 must finish
    the shard so that the last pass can give that row its status. The frames are concatenated in
    Arrow, so one failed row does not turn ints into floats.
    """
    return _isolated(
        lambda part: _checked_summary(stage.summarize(part)),
        batch,
        lambda rows, error: _summary_failures(rows, "error", [_describe(error)]),
        lone_row_raises=False,
    )


def _checked_summary(frame: pd.DataFrame) -> pd.DataFrame:
    if "key" not in frame.columns:
        raise ValueError("summarize() must return a frame with a 'key' column")
    return frame


def _summary_failures(rows: pd.DataFrame, reason: str, errors: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"key": list(rows["key"]), "_status": reason, "_error": errors})


def _summary_table(frames: list[pd.DataFrame]) -> pa.Table:
    tables = [pa.Table.from_pandas(f, preserve_index=False) for f in frames if len(f)]
    if not tables:
        tables = [pa.table({"key": pa.array([], pa.string())})]
    table = pa.concat_tables(tables, promote_options="permissive")
    table = table.set_column(0, "key", table.column("key").cast(pa.string()))
    for name in ("_status", "_error"):
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    return table.sort_by("key")


@dataclass
class _ShardPlan:
    """The driver's decisions for one shard (pass 2), and the rows pass 1 could not summarize."""

    rows: pd.DataFrame  # indexed by key
    failures: dict[str, tuple[str, str]]  # key -> (reason, error)

    @classmethod
    def load(cls, job: StageJob, shard: int) -> _ShardPlan:
        storage = Storage(plan_uri(job.output), job.storage)
        name = f"{shard_name(shard)}.parquet"
        if not storage.exists(name):
            raise FileNotFoundError(f"no plan for shard {shard} in {storage.root}: the plan pass did not finish")
        with storage.open_read(name) as f:
            rows = pq.read_table(f).to_pandas().drop_duplicates("key").set_index("key")
        summary = Dataset.at(summary_uri(job.output), job.storage).read_shard(shard, ["key", "_status", "_error"])
        columns = (summary.column(c).to_pylist() for c in ("key", "_status", "_error"))
        failures = {key: (status, error or "") for key, status, error in zip(*columns, strict=True) if status}
        return cls(rows=rows, failures=failures)

    def attach(self, stage: str, rows: pd.DataFrame) -> tuple[Batch, pd.DataFrame]:
        """The batch with its plan rows; rows pass 1 failed on (or the plan lacks) are rejected."""
        failed: list[int] = []
        reasons: list[str] = []
        errors: list[str] = []
        for position, key in enumerate(rows["key"]):
            if key in self.failures:
                reason, error = self.failures[key]
            elif key not in self.rows.index:
                reason, error = "error", f"the plan has no decision for row {key}"
            else:
                continue
            failed.append(position)
            reasons.append(reason)
            errors.append(error)
        rejected_rows = rows.iloc[failed].copy()
        rejected_rows["status"] = [rejected(stage, reason) for reason in reasons]
        rejected_rows["error"] = errors
        keep = rows.drop(rows.index[failed]).reset_index(drop=True)
        plan = self.rows.loc[list(keep["key"])].reset_index()
        return Batch(rows=keep, plan=plan), rejected_rows


def _split(job: StageJob, table: pa.Table, schema: pa.Schema, revisit: bool) -> tuple[pa.Table, pa.Table]:
    """(rows for the stage, rows kept as they are) of a fresh or a revisited shard."""
    if not revisit:
        mask = pc.equal(table.column("status"), OK).fill_null(False)
        return table.filter(mask), _conform(table.filter(pc.invert(mask)), schema)
    statuses = [s for s in set(table.column("status").to_pylist()) if s and job.stage_cls.retryable(s)]
    mask = pc.is_in(table.column("status"), value_set=pa.array(statuses, pa.string()))
    todo = table.filter(mask).drop_columns([c for c in job.stage_cls.produces if c in table.column_names])
    todo = todo.set_column(todo.schema.get_field_index("status"), "status", pa.array([OK] * todo.num_rows))
    todo = todo.set_column(todo.schema.get_field_index("error"), "error", pa.nulls(todo.num_rows, pa.string()))
    return todo, _conform(table.filter(pc.invert(mask)), schema)


def _carry_media(job: StageJob, shard: int, kept: pa.Table, spool: SpooledTar) -> None:
    """Copy the stored members of rows a revisit keeps, byte for byte, into the new tar."""
    keep = set(kept.column("key").to_pylist())
    with TarShardReader(Storage(job.output, job.storage), f"{shard_name(shard)}.tar") as old:
        for key in old.stored_keys():
            if key in keep:
                spool.add(key, old.get(key) or {})


def _outputs(stage: Stage | None, batch: Batch) -> Iterator[Output]:
    if stage is None or not len(batch.rows):
        return
    if inspect.isgeneratorfunction(type(stage).process):
        yield from stage.process(batch)
    else:
        yield run_isolated(stage, batch)


def run_isolated(stage: Stage, batch: Batch) -> Output:
    """Run a batch; if it raises, find the rows that make it fail and reject only those.

    When every row fails alone too, the fault is not in the rows (a broken model, no memory),
    so the error is raised and the runner retries or fails the shard.
    """
    outputs = _isolated(
        stage.process,
        batch,
        lambda rows, error: Output(rows=_rejected_rows(rows, stage.name, "error", _describe(error))),
        lone_row_raises=True,
    )
    if len(outputs) == 1:
        return outputs[0]
    return Output(
        rows=pd.concat([o.rows for o in outputs], ignore_index=True),
        media={k: v for o in outputs for k, v in o.media.items()},
    )


def _isolated(
    call: Callable[[Batch], T],
    batch: Batch,
    row_failed: Callable[[pd.DataFrame, Exception], T],
    lone_row_raises: bool,
) -> list[T]:
    """``call(batch)``; when it raises, ``call`` each row alone and turn the failing ones into
    ``row_failed(rows, error)``. When every row fails alone the fault is not in the rows, and the
    batch's error is raised."""
    try:
        return [call(batch)]
    except Exception as batch_error:
        if len(batch.rows) == 1:
            if lone_row_raises:
                raise
            return [row_failed(batch.rows, batch_error)]
        results, failures = [], 0
        for i in range(len(batch.rows)):
            single = Batch(rows=batch.rows.iloc[i : i + 1], media=batch.media)
            try:
                results.append(call(single))
            except Exception as row_error:
                failures += 1
                results.append(row_failed(single.rows, row_error))
        if failures == len(batch.rows):
            raise batch_error
        return results


def _attach_media(job: StageJob, rows: pd.DataFrame, readers: dict[str, TarShardReader]) -> tuple[Batch, pd.DataFrame]:
    """Fetch each row's media; rows whose media is missing are rejected, not passed to the stage."""
    if not readers:
        return Batch(rows=rows), rows.iloc[:0]
    media: dict[str, dict[str, bytes]] = {name: {} for name in readers}
    missing_reason: dict[int, str] = {}
    for name, reader in readers.items():
        ext = job.media[name].member_ext(name)
        key_column = job.spec.reads[name]
        for position, media_key in enumerate(rows[key_column]):
            found = reader.get(media_key, [ext])
            if found and ext in found:
                media[name][media_key] = found[ext]
            else:
                why = f"no {name} for key {media_key}" + (f" ({reader.error})" if reader.error else "")
                missing_reason.setdefault(position, why)
    if not missing_reason:
        return Batch(rows=rows, media=media), rows.iloc[:0]
    bad = sorted(missing_reason)
    keep = [i for i in range(len(rows)) if i not in missing_reason]
    missing = _rejected_rows(rows.iloc[bad], job.name, "missing_media", [missing_reason[i] for i in bad])
    return Batch(rows=rows.iloc[keep].reset_index(drop=True), media=media), missing


def _media_reader(
    job: StageJob, name: str, shard: int, memory_media: MemoryMedia | None = None
) -> TarShardReader | _MemoryTar:
    ref = job.media.get(name)
    if ref is None:
        raise FileNotFoundError(f"no dataset upstream of {job.output} holds '{name}' media")
    if memory_media and ref.tars is None and ref.root in memory_media:
        return _MemoryTar(memory_media[ref.root])
    tar = ref.tar_for(shard)
    return TarShardReader(Storage(ref.root, job.storage), tar or f"{shard_name(shard)}.tar")


def _rejected_rows(rows: pd.DataFrame, stage: str, reason: str, error: str | list[str]) -> pd.DataFrame:
    out = rows.copy()
    out["status"] = rejected(stage, reason)
    out["error"] = error
    return out


def _describe(error: BaseException) -> str:
    text = redact_text(f"{type(error).__name__}: {error}".replace("\n", " "))  # before the cut, which could split a URL
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
