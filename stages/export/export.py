"""Export a finished dataset for trainers: WebDataset shards with a wids index, or FaceCaption
v2-compatible Parquet.

Only ``ok`` rows are exported. WebDataset samples are ``KEY.jpg`` (the chosen crop), ``KEY.txt``
(the chosen caption) and ``KEY.json`` (every metadata column: box, landmarks, attributes, quality,
provenance, source URL, licence where known). Rows are shuffled globally with a seed: the seeded
NumPy permutation of each split, cut into shards of ``shard_samples`` in that order (about
``shard_bytes`` when set), computed and written on the workers (stages/export/shuffle.py); within a
tar members are sorted by key, so each sample's files are contiguous. An
optional validation split is taken by a stable hash of the key, or of the identity cluster so no
identity is in both splits. With an opt-out list (``opt_out``, docs/dedup.md) the faces of the
people on it are left out: each ok row's aligned 112 crop is embedded and matched, so a dataset
made before a person opted out exports without them.

The passes run on an executor (the process pool, Ray, or this process): a task per input shard
to count, per split to permute, per input shard to scatter and per bucket to write, each
resumable; the driver holds a few numbers per shard and bucket, never the rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from facecap.pipeline.dataset import Dataset, Manifest, config_hash
from facecap.pipeline.errors import FacecapError
from facecap.pipeline.executors import Executor, LocalExecutor
from facecap.pipeline.progress import Quiet, StageProgress
from facecap.pipeline.storage import Storage, StorageOptions, refuse_overlap
from facecap.pipeline.tasks import TaskJob, run_tasks
from facecap.stages.export.shuffle import (
    POSITION,
    SCATTER_DIR,
    BucketWork,
    ScatterWork,
    ShufflePlan,
    bucket_span,
    count_shard,
    permute_split,
    recorded_schema,
    scatter_shard,
    shards_for,
    write_bucket,
)
from facecap.stages.export.trainers import dataset_card, write_energon_meta

MAX_SHARD_SAMPLES = 1_000_000
# Part of every export's identity: an export made with an earlier order is not resumed with this
# one (v1 and v2 dealt by a seeded hash of the key; v3 deals the seeded permutation).
SHUFFLE = "seeded-permutation-v3"


@dataclass
class ExportSettings:
    format: Literal["webdataset", "parquet"] = "webdataset"
    crop: Literal["square", "aligned", "box", "aligned112"] = "square"
    caption: Literal["first", "short"] = "first"
    shard_samples: int = 10_000
    shard_bytes: int | None = None
    seed: int = 0
    val_fraction: float = 0.0
    split_by: Literal["key", "identity"] = "key"
    prefix: str = ""

    def check(self) -> None:
        if not 1 <= self.shard_samples <= MAX_SHARD_SAMPLES:
            raise FacecapError(f"export: shard size {self.shard_samples} must be 1..{MAX_SHARD_SAMPLES}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise FacecapError("export: the validation fraction must be in [0, 1)")
        if self.shard_bytes is not None and self.shard_bytes < 1:
            raise FacecapError("export: the shard byte target must be positive")


@dataclass
class ExportResult:
    output: str
    samples: dict[str, int] = field(default_factory=dict)
    shards: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    skipped_existing: int = 0
    opted_out: int = 0


def export(
    source: str,
    output: str,
    settings: ExportSettings,
    options: StorageOptions | None = None,
    opt_out: str | None = None,
    executor: Executor | None = None,
    progress: StageProgress | None = None,
    max_retries: int = 2,
) -> ExportResult:
    """Export ``source`` into ``output``. ``executor``: where the tasks run (default: this process)."""
    settings.check()
    options = options or StorageOptions.from_env()
    progress = progress or Quiet()
    dataset = Dataset.at(source, options)
    manifest = dataset.require_manifest()
    if not manifest.complete:
        raise FacecapError(f"{source}: its '{manifest.stage}' run did not finish; run it again before exporting")
    # Writing into the dataset (or a folder holding it) would replace its manifest and shards.
    refuse_overlap(output, [dataset.uri, *(ref.root for ref in manifest.media.values())])
    inputs = dataset.done_shards()
    if not inputs:
        raise FacecapError(f"{dataset.uri}: no finished shards to export")
    crop = _crop_ref(manifest, settings) if settings.format == "webdataset" else None
    if opt_out:
        _check_opt_out(manifest, opt_out)
    out = Storage(output, options)
    basis = {"source": dataset.uri, "source_config": manifest.config_hash, "settings": asdict(settings)}
    basis["shuffle"] = SHUFFLE
    if opt_out:  # another list (or more people on it) is another export
        basis["opt_out_sha256"] = hashlib.sha256(Path(opt_out).read_bytes()).hexdigest()
    identity = config_hash(basis)
    previous = out.read_json("_manifest.json")
    if previous and previous.get("config_hash") != identity:
        raise FacecapError(f"{output} holds an export made from other settings or input; choose another folder")
    if previous and previous.get("complete"):
        shards = previous["shards"]
        return ExportResult(
            output=out.root,
            samples=previous["samples"],
            shards=shards,
            skipped_existing=sum(len(listed) for listed in shards.values()),
            opted_out=previous.get("opted_out", 0),
        )
    if not out.remote:
        out.remove_temporaries()
    plan = ShufflePlan(
        source=dataset.uri,
        output=out.root,
        storage=options,
        settings=settings,
        identity=identity,
        crop=crop,
        opt_out=opt_out,
        aligned112=manifest.media.get("aligned112"),
    )
    executor = executor or LocalExecutor()
    result = ExportResult(output=out.root)
    with progress:
        counted = _count(plan, inputs, executor, progress, max_retries)
        plan = _permute(plan, counted, executor, max_retries)
        scattered = _scatter(plan, inputs, counted, executor, progress, result, max_retries)
        _write(plan, inputs, scattered.totals, executor, progress, result, max_retries)
    _finish(out, dataset, manifest, settings, identity, scattered.schema, result)
    _remove_scatter(out, plan)
    return result


def _remove_scatter(out: Storage, plan: ShufflePlan) -> None:
    """The passes' own temporaries (a copy of every sample), once the manifest says it is done."""
    folders = [f"{SCATTER_DIR}/{split}" for split in plan.buckets]
    folders += [f"{SCATTER_DIR}/{name}" for name in ("_count", "_order", "_done", "_written")]
    for folder in folders:
        for name in out.list(folder):
            out.delete(name)
        out.remove_empty_folder(folder)
    out.remove_empty_folder(SCATTER_DIR)


def _crop_ref(manifest: Manifest, settings: ExportSettings):
    ref = manifest.media.get(settings.crop)
    if ref is None:
        stored = ", ".join(sorted(n for n in manifest.media if n != "image")) or "none"
        raise FacecapError(
            f"export --crop {settings.crop}: the dataset stores no '{settings.crop}' crops (stored: {stored}); "
            "choose one of those or rerun detect with it in detect.crops"
        )
    return ref


def _check_opt_out(manifest: Manifest, opt_out: str) -> None:
    """The list, its model and the crops it needs, checked here: one line before anything is written."""
    from facecap.stages.shared.identity import FaceEmbedder, OptOutList

    listing = OptOutList.load(opt_out)
    if not listing.people:
        return
    if "aligned112" not in manifest.media:
        raise FacecapError("export --opt-out-embeddings embeds each face's aligned112 crop; this dataset has none")
    embedder = FaceEmbedder(listing.model)
    listing.check_model(embedder.model, embedder.sha256, "this machine's model file")


class _Counted:
    """What the count records add up to: each input shard's place in every split, the rows the
    opt-out list leaves out of it, and each split's size."""

    def __init__(self, splits: list[str]):
        self.totals = dict.fromkeys(splits, 0)
        self.by_shard: dict[int, dict[str, Any]] = {}
        self.refused: list[str] = []

    def add(self, shard: int, record: dict[str, Any]) -> None:
        if "refused" in record:
            self.refused.append(record["refused"])
        else:
            self.by_shard[shard] = record

    def work(self, plan: ShufflePlan, inputs: list[int]) -> dict[int, ScatterWork]:
        """Each input shard's scatter task, in input order: its rows follow the shards before it."""
        offsets = dict.fromkeys(self.totals, 0)
        work = {}
        for shard in inputs:
            record = self.by_shard[shard]
            work[shard] = ScatterWork(plan, dict(offsets), tuple(record["excluded"]))
            for split in offsets:
                offsets[split] += record["splits"][split]
        return work


def _count(plan: ShufflePlan, inputs, executor, progress, max_retries) -> _Counted:
    """Pass 1, one task per input shard not counted yet."""
    counted = _Counted(["train", "val"] if plan.settings.val_fraction > 0 else ["train"])
    progress.phase("export 1/3 count")
    progress.set_total(len(inputs))

    def add(shard: int, record: dict[str, Any]) -> None:
        progress.advance(0)
        counted.add(shard, record)

    out = Storage(plan.output, plan.storage)
    todo = []
    for shard in inputs:  # a rerun reads what finished shards recorded
        record = plan.recorded(out, plan.count_record(shard))
        if record is None:
            todo.append(shard)
        else:
            add(shard, record)
    run_tasks(
        executor, TaskJob("export count", count_shard), ((s, plan) for s in todo), max_retries, add, where=plan.output
    )
    if counted.refused:
        raise FacecapError(counted.refused[0])
    for record in counted.by_shard.values():
        for split in counted.totals:
            counted.totals[split] += record["splits"][split]
    return counted


def _permute(plan: ShufflePlan, counted: _Counted, executor, max_retries) -> ShufflePlan:
    """Pass 2: each split's permutation, written by a task (its n positions never reach the driver);
    returns the plan with each split's buckets."""
    spans = {split: bucket_span(n, plan.settings.shard_samples) for split, n in counted.totals.items()}
    buckets = {split: max(1, math.ceil(n / spans[split])) for split, n in counted.totals.items()}
    plan = replace(plan, spans=spans, buckets=buckets)
    out = Storage(plan.output, plan.storage)
    todo = [
        (number, (plan, split, n))
        for number, (split, n) in enumerate(counted.totals.items())
        if n and not _permuted(out, plan, split, n)
    ]
    run_tasks(executor, TaskJob("export permute", permute_split), todo, max_retries, lambda *_: None, where=plan.output)
    return plan


def _permuted(out: Storage, plan: ShufflePlan, split: str, n: int) -> bool:
    """A permutation file written by this export before: named by its identity (seed and settings),
    and written whole, so its size tells."""
    return out.exists(plan.order_name(split)) and out.size(plan.order_name(split)) == POSITION.itemsize * n


class _Scattered:
    """What the scatter records add up to on the driver: per split and bucket, the samples and their
    tar bytes; and the JSON schema over every input shard (None once two have no common one)."""

    def __init__(self, buckets: dict[str, int]):
        self.totals = {
            split: {"count": np.zeros(b, np.int64), "bytes": np.zeros(b, np.int64)} for split, b in buckets.items()
        }
        self.schema: pa.Schema | None = None
        self.refused: list[str] = []
        self.opted_out = 0
        self._records = 0

    def add(self, record: dict[str, Any]) -> None:
        if "refused" in record:
            self.refused.append(record["refused"])
            return
        self.opted_out += record["opted_out"]
        for split, counted in record["splits"].items():
            self.totals[split]["count"] += np.asarray(counted["count"], np.int64)
            self.totals[split]["bytes"] += np.asarray(counted["bytes"], np.int64)
        schema = recorded_schema(record)
        if self._records == 0:
            self.schema = schema
        elif self.schema is not None and schema is not None:
            try:
                self.schema = pa.unify_schemas([self.schema, schema], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # a JSON field with values of several types
                self.schema = None
        else:
            self.schema = None
        self._records += 1


def _scatter(plan, inputs, counted, executor, progress, result, max_retries) -> _Scattered:
    """Pass 3, one task per input shard not scattered yet."""
    scattered = _Scattered(plan.buckets)

    def add(shard: int, record: dict[str, Any]) -> None:
        progress.advance(0)
        scattered.add(record)

    progress.phase("export 2/3 scatter")
    progress.set_total(len(inputs))
    out = Storage(plan.output, plan.storage)
    work = counted.work(plan, inputs)
    todo = []
    for shard in inputs:  # a rerun reads what finished shards recorded instead of scattering them again
        record = plan.recorded(out, plan.scatter_record(shard))
        if record is None:
            todo.append(shard)
        else:
            add(shard, record)
    job = TaskJob("export scatter", scatter_shard)
    run_tasks(executor, job, ((s, work[s]) for s in todo), max_retries, add, where=plan.output)
    if scattered.refused:
        raise FacecapError(scattered.refused[0])
    result.opted_out = scattered.opted_out
    return scattered


def _write(plan, inputs, totals, executor, progress, result, max_retries) -> None:
    """Pass 4: every bucket's shards, numbered in bucket order."""
    work: list[BucketWork] = []
    for split in plan.buckets:
        first = 0
        for bucket, (count, tar_bytes) in enumerate(zip(totals[split]["count"], totals[split]["bytes"], strict=True)):
            shards = shards_for(int(count), int(tar_bytes), plan.settings)
            if shards:
                work.append(BucketWork(plan, split, bucket, first, shards, tuple(inputs)))
            first += shards
    listed: dict[tuple[str, int], list[dict[str, Any]]] = {}

    def add(number: int, record: dict[str, Any]) -> None:
        progress.advance(sum(s["nsamples"] for s in record["shards"]))
        listed[(work[number].split, work[number].bucket)] = record["shards"]

    progress.phase("export 3/3 write")
    progress.set_total(len(work))
    out = Storage(plan.output, plan.storage)
    todo = []
    for number, item in enumerate(work):
        record = plan.recorded(out, plan.bucket_record(item.split, item.bucket))
        if record is None:
            todo.append((number, item))
        else:
            add(number, record)
            result.skipped_existing += len(record["shards"])
    job = TaskJob("export write", write_bucket)
    run_tasks(executor, job, todo, max_retries, add, where=plan.output)
    for split in plan.buckets:
        shards = [s for item in work if item.split == split for s in listed[(split, item.bucket)]]
        result.shards[split] = shards
        result.samples[split] = int(sum(s["nsamples"] for s in shards))


def _finish(out, dataset, manifest, settings, identity, schema, result) -> None:
    """What is assembled from the buckets' results: indexes, trainer metadata, the manifest."""
    name = manifest.recipe.get("name", "facecap") if manifest.recipe else "facecap"
    if settings.format == "webdataset":
        for split, shards in result.shards.items():
            index = {
                "__kind__": "wids-shard-index-v1",
                "wids_version": 1,
                "name": f"{name}-{split}",
                "shardlist": shards,
            }
            out.write_bytes(f"{settings.prefix}{split}.json", json.dumps(index, indent=1).encode())
        write_energon_meta(out, result.shards)
        out.write_bytes("README.md", dataset_card(name, list(result.shards), schema, settings.prefix).encode())
    record = {
        "kind": "facecap-export",
        "format": settings.format,
        "source": dataset.uri,
        "source_stage": manifest.stage,
        "settings": asdict(settings),
        "config_hash": identity,
        "samples": result.samples,
        "shards": result.shards,
        "opted_out": result.opted_out,
        "complete": True,
        "time": time.time(),
    }
    out.write_bytes("_manifest.json", json.dumps(record, indent=1).encode())
