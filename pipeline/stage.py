"""The stage contract: what a stage declares and the one function it implements.

A stage knows nothing about Ray, storage, resuming or retries. It receives the rows still
``ok`` (in key order) and the media it asked for, and returns rows with new columns and
statuses, plus any media it wants stored. The runner passes rejected rows through untouched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from facecap.pipeline.source import Source
from facecap.pipeline.status import OK, rejected
from facecap.pipeline.storage import Storage, StorageOptions

if TYPE_CHECKING:
    from facecap.pipeline.tasks import TaskJob


class StageConfig(BaseModel):
    """Base of every stage's config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class Resources:
    """What one worker of the stage needs.

    ``actor=True`` runs the stage in a pool of long-lived workers so ``setup()`` (model
    loading) happens once per worker; otherwise shards run as Ray tasks (the stage is still
    set up once per worker process and reused across shards).
    """

    cpus: float = 1.0
    gpus: float = 0.0
    batch_size: int = 256
    actor: bool = False


@dataclass(frozen=True)
class StageSpec:
    """What a stage needs and makes under one config: the one answer runner, workers and executors use.

    ``reads``: media name -> the column holding its key; ``writes``: media name -> tar extension
    (``image`` stored as ``.jpg``, say); ``global_passes``: summarize, plan and apply instead of one
    pass per shard.
    """

    resources: Resources
    reads: dict[str, str] = field(default_factory=dict)
    writes: dict[str, str] = field(default_factory=dict)
    global_passes: bool = False
    # Its engine starts processes of its own (vLLM): the auto executor runs it on Ray actors, not
    # in the process pool's workers.
    own_processes: bool = False


@dataclass
class Batch:
    """The ``ok`` rows of one slice of a shard, and the media the stage reads for them."""

    rows: pd.DataFrame
    # media[ext][media key] -> bytes, for each ext in Stage.reads_media.
    media: dict[str, dict[str, bytes]] = field(default_factory=dict)
    # Global stages only, in the last pass: this shard's plan rows for ``rows``, same order.
    plan: pd.DataFrame | None = None

    def media_of(self, ext: str, media_key: str) -> bytes:
        return self.media[ext][media_key]


@dataclass
class Output:
    """What a stage returns for a batch.

    ``rows`` keeps ``key``, ``status`` and ``error`` for every row it emits (a stage may emit
    several rows per input row, e.g. one per face) plus its ``produces`` columns; ``media`` maps
    output row keys to ``{ext: bytes}`` members for this stage's tar.
    """

    rows: pd.DataFrame
    media: dict[str, dict[str, bytes]] = field(default_factory=dict)


class Summaries(ABC):
    """Read access to a global stage's per-shard summaries (pass 1 output) on the driver."""

    @property
    @abstractmethod
    def shards(self) -> list[int]:
        """Shard indices, ascending; every shard of the parent is there."""

    @abstractmethod
    def read(self, shard: int, columns: list[str] | None = None) -> pa.Table:
        """One shard's summary rows (``key`` always included)."""

    def read_all(self, columns: list[str] | None = None) -> pa.Table:
        """All shards' summary rows with a ``shard`` column: only ask for compact columns."""
        tables = []
        for shard in self.shards:
            table = self.read(shard, columns)
            tables.append(table.append_column("shard", pa.array([shard] * table.num_rows, pa.int32())))
        if not tables:
            return pa.table({"key": pa.array([], pa.string())})
        # A shard with no rows to summarize has fewer columns: fill them with nulls.
        return pa.concat_tables(tables, promote_options="permissive")

    def count_rows(self) -> int:
        """About how many rows were summarized (rows pass 1 failed on may count): enough to choose
        between planning on the driver and fanning the plan out."""
        return sum(self.read(shard, ["key"]).num_rows for shard in self.shards)

    @property
    def scratch(self) -> Storage | None:
        """A folder on the run's storage, reachable from every worker, for a plan's intermediate
        files (the stage removes what it wrote); None when there is none (then tasks run here)."""
        return None

    def run_tasks(self, job: TaskJob, payloads: Iterable[tuple[int, Any]]) -> dict[int, Any]:
        """Run ``job`` over ``(number, payload)`` items where the run's shards run (the executor's
        workers), so a plan can fan out; each number's result comes back. Here: in this process.

        A Summaries is picklable, so a payload may carry it for tasks to read shards; the copy on a
        worker reads only, it runs no tasks of its own."""
        from facecap.pipeline.executors import LocalExecutor
        from facecap.pipeline.tasks import run_tasks

        return run_tasks(LocalExecutor(), job, payloads)


class Stage(ABC):
    """Base class. Subclasses set the class attributes and implement ``process``."""

    name: ClassVar[str]
    # Position in the default chain (`facecap run` without a recipe, `facecap stats` of a run folder).
    order: ClassVar[int] = 100
    config_model: ClassVar[type[StageConfig]] = StageConfig
    # Columns this stage needs from its parent dataset.
    consumes: ClassVar[tuple[str, ...]] = ()
    # Columns it adds (or overwrites), with types, so every shard has the same schema.
    produces: ClassVar[dict[str, pa.DataType]] = {}
    # Media it reads: media name -> column whose value is the media key for that row. The media
    # comes from whichever ancestor dataset (or img2dataset folder) stored it.
    reads_media: ClassVar[dict[str, str]] = {}
    # Media it writes into its own tar shards (a name is also the tar extension unless
    # ``spec`` says otherwise, e.g. "image" stored as ".jpg").
    writes_media: ClassVar[tuple[str, ...]] = ()
    resources: ClassVar[Resources] = Resources()
    # Rows with the same value of this column are never split across batches (all faces of one
    # image, say). Rows arrive in key order, so face rows of an image are already adjacent.
    batch_by: ClassVar[str | None] = None
    # `facecap run` skips the stage when its parent already holds all these media (an
    # img2dataset folder brings its images, so there is nothing to download).
    skip_if_parent_has: ClassVar[tuple[str, ...]] = ()
    # A source stage makes a dataset from outside input instead of reading a parent dataset.
    source: ClassVar[bool] = False
    # What a report should know of the columns it produces, summarized per shard by the worker
    # (pipeline/summary.py measures; their value functions must be module-level, i.e. picklable).
    summaries: ClassVar[tuple[Any, ...]] = ()
    help: ClassVar[str] = ""

    def __init__(self, config: StageConfig):
        self.config = config

    @classmethod
    def preflight(cls, config: StageConfig) -> list[str] | None:
        """Driver-side checks before any shard runs (a model file that is missing, say): raise a
        FacecapError with one clear line instead of failing every shard on the workers. May return
        notes for the user (a default the stage adapted to this machine), shown with the result."""

    @classmethod
    def open_source(cls, config: StageConfig, storage: StorageOptions) -> Source:
        """A source stage's outside input under this config (only source stages implement it)."""
        raise TypeError(f"stage {cls.name} reads a parent dataset, not outside input")

    @classmethod
    def spec(cls, config: StageConfig) -> StageSpec:
        """What the stage needs and makes under ``config``: by default its class attributes.

        A stage whose resources or media depend on its config (a GPU share, the crops it stores,
        a VLM captioner that reads a crop) overrides this one method.
        """
        return StageSpec(
            resources=cls.resources,
            reads=dict(cls.reads_media),
            writes={name: name for name in cls.writes_media},
        )

    @classmethod
    def retryable(cls, status: str) -> bool:
        """Whether a row this stage rejected may succeed on a later try (timeouts, 5xx).

        ``--retry-failed`` redoes exactly these rows in finished shards.
        """
        return False

    def setup(self) -> None:
        """Load models; called once per worker before the first batch."""

    def close(self) -> None:
        """Release what setup holds beyond this process (an engine's child processes, GPU memory);
        called when the worker is done with the stage (a Ray actor before it is stopped)."""

    def prepare_in_order(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Optional pass over every shard in input order, on the driver, before dispatch.

        Runs for shards already done too, so state that depends on all earlier rows (the
        first occurrence of a URL wins) is the same on a resumed run as on a fresh one.
        """
        return rows

    @abstractmethod
    def process(self, batch: Batch) -> Output | Iterator[Output]:
        """Turn a batch of ``ok`` rows into output rows (with statuses) and media.

        A stage may instead yield several ``Output`` pieces as rows finish (in any order), so a
        slow row never holds back the rest; such a stage handles its own row errors, and an
        exception from it fails the shard (which the runner retries).
        """

    # Helpers for subclasses -------------------------------------------------------------
    def reject(self, reason: str) -> str:
        return rejected(self.name, reason)

    @staticmethod
    def ok() -> str:
        return OK


class GlobalStage(Stage):
    """A stage whose decisions need the whole dataset: duplicates across shards, a top-k rule.

    It runs in three passes, each resumable: ``summarize`` on the workers (per shard, reading
    media, writing compact per-row facts), ``plan`` on the driver (reads only the summary columns
    it asks for, decides, writes one plan table per shard), then ``process`` on the workers with
    ``batch.plan`` (no media is read and ``setup`` is not called in that pass). A subclass's
    ``spec`` may turn the passes off under some configs (quality without ranking rules).
    """

    @classmethod
    def spec(cls, config: StageConfig) -> StageSpec:
        return replace(super().spec(config), global_passes=True)

    @abstractmethod
    def summarize(self, batch: Batch) -> pd.DataFrame:
        """Pass 1: per-row facts for ``plan``: a frame with ``key`` and compact columns."""

    @classmethod
    @abstractmethod
    def plan(cls, config: StageConfig, summaries: Summaries) -> Iterator[tuple[int, pd.DataFrame]]:
        """Pass 2, on the driver: yield ``(shard, frame with key + plan columns)`` for each shard.

        Keep memory to compact columns: ``summaries.read_all(columns)`` loads only those. A plan
        too large for one process fans out with ``summaries.run_tasks`` on the run's executor.
        """
