"""Export's passes on the workers: a seeded global shuffle without the rows on the driver.

The order is the one a single process deals: ``numpy.random.default_rng(seed).permutation`` of
each split's exportable rows (input shards in order, rows in shard order), cut into shards of
``shard_samples`` in that order (so an export equals the single-process export facecap made before
these passes, for the same seed and shard size).

1. **count** (one task per input shard): its exportable rows per split (ok, safe keys, not opted
   out; opted-out faces are found here, once). The driver adds the counts up: each shard's rows
   then have known places (offsets) in their split.
2. **permute** (one task per split): the seeded permutation of the split's n rows, written as each
   row's output position (8 bytes a row) for the scatter tasks to read their slices of.
3. **scatter** (one task per input shard): its rows rendered as trainers will read them (caption,
   JSON and where the crop lies; or FaceCaption-v2 rows), each dealt into the bucket holding its
   output position (a bucket is a run of whole output shards, about five): one Arrow IPC file per
   split whose record batch ``k`` holds bucket ``k``, so a bucket task reads just its batch of
   each file. The task's done record gives each bucket's sample count and tar bytes.
4. **write** (one task per bucket): its samples from every scatter file, in output order, cut into
   its shards (``shard_samples`` each; with ``shard_bytes``, by their measured bytes), written with
   their tar index and done markers, each crop read from its input tar (or from S3 via a local
   spool file) and written once.

The driver only sums per-shard and per-bucket counts and numbers the shards, so its memory does
not grow with the dataset. Same source, seed and settings: the same bytes, on any executor,
wherever the crops are stored.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facecap.pipeline.dataset import Dataset, MediaRef, TarShardReader, TarWriter, shard_name
from facecap.pipeline.errors import FacecapError
from facecap.pipeline.status import OK
from facecap.pipeline.storage import Storage, StorageOptions
from facecap.stages.export.rows import TAR_BLOCK, facecaption_table, metadata_json, samples_json, split_of
from facecap.stages.shared.trainers import metadata_schema, tar_index, tar_index_name

SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
SCATTER_DIR = "_scatter"
# A write task's samples: five output shards at the default size (it holds their captions and
# JSON, or their rows for Parquet; crops are read from where they lie, or spooled to local disk).
# Each input shard writes a record batch per bucket, with its own metadata (about 9 KB for a
# Parquet export's 134 columns): with a bucket per output shard, a Parquet export's scatter files
# at 7M rows were 14 GB, more than half of it metadata.
BUCKET_SAMPLES = 50_000
POSITION = np.dtype("<i8")  # an output position in the permutation files
# The scatter files hold each sample's JSON (every column: about 3 KB) and caption: lz4 halves them
# at no measurable cost (10M samples: 15.8 GB against about 30 GB). Crops are never in them unless
# carried from S3, and JPEG bytes pass through lz4 nearly untouched.
SCATTER_COMPRESSION = "lz4"
# However large the export, so the batches (input shards x buckets) grow linearly, not as N^2;
# beyond this, buckets hold more shards each.
MAX_BUCKETS = 256
CROP_LOCATION = ("_shard", "_crop_offset", "_crop_size")  # where a sample's crop lies
SPOOLED = -1  # as its "shard": in the write task's spool file (crops carried from S3)


@dataclass(frozen=True)
class ShufflePlan:
    """What every task of one export needs (picklable; the same object for all of them)."""

    source: str
    output: str
    storage: StorageOptions
    settings: Any  # ExportSettings
    identity: str  # the export's config hash: records of another export in the folder are not used
    crop: MediaRef | None  # where the exported crop lives (WebDataset)
    opt_out: str | None = None
    aligned112: MediaRef | None = None
    buckets: dict[str, int] = field(default_factory=dict)  # split -> number of buckets (after counting)
    spans: dict[str, int] = field(default_factory=dict)  # split -> output positions a bucket holds

    def count_record(self, shard: int) -> str:
        return f"{SCATTER_DIR}/_count/{shard_name(shard)}.json"

    def order_name(self, split: str) -> str:
        # Named by the export's identity: another seed's permutation of as many rows is another file.
        return f"{SCATTER_DIR}/_order/{split}-{self.identity[:16]}.bin"

    def scatter_name(self, split: str, shard: int) -> str:
        return f"{SCATTER_DIR}/{split}/{shard_name(shard)}.arrow"

    def scatter_record(self, shard: int) -> str:
        return f"{SCATTER_DIR}/_done/{shard_name(shard)}.json"

    def bucket_record(self, split: str, bucket: int) -> str:
        return f"{SCATTER_DIR}/_written/{split}-{bucket:06d}.json"

    def recorded(self, out: Storage, name: str) -> dict[str, Any] | None:
        """A pass's record if this export wrote it (another version's or settings' is done again)."""
        record = out.read_json(name)
        return record if record is not None and record.get("identity") == self.identity else None


def bucket_span(samples: int, shard_samples: int) -> int:
    """Output positions a bucket holds: whole shards, about ``BUCKET_SAMPLES`` samples, and wider
    when that would make more than ``MAX_BUCKETS`` buckets."""
    span = max(1, BUCKET_SAMPLES // shard_samples) * shard_samples
    if samples > span * MAX_BUCKETS:
        span = -(-samples // (MAX_BUCKETS * shard_samples)) * shard_samples
    return span


# -- pass 1: count ------------------------------------------------------------------------------
def count_shard(shard: int, plan: ShufflePlan) -> dict[str, Any]:
    """One input shard's exportable rows per split, and which ok rows the opt-out list leaves out.

    A row the export must refuse (an unsafe key, a face whose consent cannot be checked) or a split
    it cannot make comes back as ``refused``: the same input would fail every retry, so the driver
    reports it instead of retrying."""
    out = Storage(plan.output, plan.storage)
    by_identity = plan.settings.val_fraction > 0 and plan.settings.split_by == "identity"
    # Only the columns the split needs (all of them by identity: ``split_of`` names a missing one).
    rows = _ok_rows(Dataset.at(plan.source, plan.storage), shard, None if by_identity else ["key", "status"])
    keys = rows.column("key").to_pylist()
    try:
        bad = next((k for k in keys if not SAFE_KEY.match(k)), None)
        if bad is not None:
            raise FacecapError(f"unsafe sample key {bad!r}: keys must be letters, digits, '_' or '-'")
        opted_out = _opted_out(plan, shard, keys) if plan.opt_out else np.zeros(len(keys), bool)
        splits = split_of(rows.filter(pa.array(~opted_out)), plan.settings)
    except FacecapError as refusal:
        return {"refused": str(refusal)}
    record = {
        "identity": plan.identity,
        "splits": {name: int((splits == name).sum()) for name in ("train", "val")},
        "excluded": np.flatnonzero(opted_out).tolist(),
    }
    out.write_bytes(plan.count_record(shard), json.dumps(record).encode())
    return record


# -- pass 2: permute ----------------------------------------------------------------------------
def permute_split(number: int, payload: tuple[ShufflePlan, str, int]) -> dict[str, Any]:
    """The output position of each of a split's ``n`` rows: the seeded permutation, inverted."""
    plan, split, n = payload
    out = Storage(plan.output, plan.storage)
    dealt = np.random.default_rng(plan.settings.seed).permutation(n)  # output position -> row
    position = np.empty(n, POSITION)
    position[dealt] = np.arange(n, dtype=POSITION)
    out.write_bytes(plan.order_name(split), position.tobytes())
    return {"split": split, "rows": n}


def _positions(out: Storage, plan: ShufflePlan, split: str, first: int, count: int) -> np.ndarray:
    """Output positions of the split's rows ``first`` .. ``first + count - 1``."""
    if not count:
        return np.zeros(0, np.int64)
    with out.open_read(plan.order_name(split)) as f:
        f.seek(first * POSITION.itemsize)
        data = f.read(count * POSITION.itemsize)
    if len(data) != count * POSITION.itemsize:
        raise FacecapError(f"{out.uri(plan.order_name(split))} is shorter than its split; export again")
    return np.frombuffer(data, POSITION).astype(np.int64)


# -- pass 3: scatter ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ScatterWork:
    plan: ShufflePlan
    offsets: dict[str, int]  # split -> the place of this shard's first row in its split
    excluded: tuple[int, ...]  # its ok rows the opt-out list leaves out (positions among them)


def scatter_shard(shard: int, work: ScatterWork) -> dict[str, Any]:
    """Deal one input shard's exportable rows into buckets; returns (and records) per-bucket counts
    and bytes. A missing crop comes back as ``refused`` (see ``count_shard``)."""
    plan = work.plan
    out = Storage(plan.output, plan.storage)
    rows = _ok_rows(Dataset.at(plan.source, plan.storage), shard)
    try:
        if work.excluded:
            kept = np.ones(rows.num_rows, bool)
            kept[list(work.excluded)] = False
            rows = rows.filter(pa.array(kept))
        rows, positions, buckets, bounds = _in_bucket_order(out, rows, work)
        pieces, schema = _rendered(plan, shard, rows, positions)
    except FacecapError as refusal:
        return {"refused": str(refusal)}
    record: dict[str, Any] = {"identity": plan.identity, "opted_out": len(work.excluded), "splits": {}}
    if schema is not None:
        record["schema"] = base64.b64encode(schema.serialize().to_pybytes()).decode()
    for split, (start, stop) in bounds.items():
        name = plan.scatter_name(split, shard)
        part = pieces.slice(start, stop - start)
        record["splits"][split] = _write_scatter(out, name, part, buckets[start:stop], plan.buckets[split])
    out.write_bytes(plan.scatter_record(shard), json.dumps(record).encode())
    return record


def _in_bucket_order(
    out: Storage, rows: pa.Table, work: ScatterWork
) -> tuple[pa.Table, np.ndarray, np.ndarray, dict[str, tuple[int, int]]]:
    """The rows ordered by split, then bucket (so each bucket's samples are written as one slice,
    never gathered by a copy of the images), their output positions and buckets, and each split's
    row range."""
    plan = work.plan
    splits = split_of(rows, plan.settings)
    names = list(plan.buckets)
    split_number = np.array([names.index(s) for s in splits], np.int64)
    positions = np.zeros(rows.num_rows, np.int64)
    bucket = np.zeros(rows.num_rows, np.int64)
    for number, name in enumerate(names):
        mine = np.flatnonzero(split_number == number)
        positions[mine] = _positions(out, plan, name, work.offsets.get(name, 0), len(mine))
        bucket[mine] = positions[mine] // plan.spans[name]
    arranged = np.lexsort((bucket, split_number))
    sizes = np.bincount(split_number, minlength=len(names))
    bounds = {name: (int(end - size), int(end)) for name, end, size in zip(names, np.cumsum(sizes), sizes, strict=True)}
    return rows.take(pa.array(arranged)), positions[arranged], bucket[arranged], bounds


def _ok_rows(dataset: Dataset, shard: int, columns: list[str] | None = None) -> pa.Table:
    table = dataset.read_shard(shard, columns)
    return table.filter(pc.equal(table.column("status"), OK).fill_null(False))


def _rendered(
    plan: ShufflePlan, shard: int, rows: pa.Table, positions: np.ndarray
) -> tuple[pa.Table, pa.Schema | None]:
    """The samples as they will be written, with their output position and size in a tar; for
    WebDataset also the Arrow schema of their JSON (the dataset card's features).

    A local crop is not copied: the sample records where it lies in its input tar (``_shard``,
    ``_crop_offset``, ``_crop_size``) and the write pass reads it from there, so the image bytes are
    written once. A remote one (S3) is carried in ``jpg``, as one range request a sample would be slow.
    """
    settings = plan.settings
    keys = rows.column("key").to_pylist()
    order = pa.array(positions, pa.int64())
    if settings.format == "parquet":
        table = rows.append_column("_order", order)
        return table.append_column("_bytes", pa.array(np.zeros(rows.num_rows, np.int64))), None
    member = plan.crop.member_ext(settings.crop)
    tar = plan.crop.tar_for(shard) or f"{shard_name(shard)}.tar"
    crops = Storage(plan.crop.root, plan.storage)
    texts, dicts = samples_json(rows, settings)
    metas = [metadata_json(meta) for meta in dicts]
    images, offsets, sizes = [], [], []
    with TarShardReader(crops, tar) as reader:
        for key in keys:
            where = reader.location(key, member)
            if where is None:
                raise FacecapError(f"{key}: its {settings.crop} crop is missing from shard {shard}")
            offsets.append(where[0])
            sizes.append(where[1])
            if crops.remote:
                images.append(reader.get(key, [member])[member])
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "jpg": pa.array(images, pa.large_binary()) if crops.remote else pa.nulls(len(keys), pa.large_binary()),
            "_shard": pa.array(np.full(len(keys), shard, np.int64)),
            "_crop_offset": pa.array(offsets, pa.int64()),
            "_crop_size": pa.array(sizes, pa.int64()),
            "txt": pa.array(texts, pa.large_binary()),
            "json": pa.array(metas, pa.large_binary()),
            "_order": order,
            "_bytes": pa.array(_tar_bytes(sizes, map(len, texts), map(len, metas)), pa.int64()),
        }
    )
    return table, _schema_or_none(dicts)


def _tar_bytes(*member_sizes: Iterable[int]) -> np.ndarray:
    """Each sample's bytes in a tar, from its members' sizes: a header each, the data padded to whole blocks."""
    lengths = np.array([list(sizes) for sizes in member_sizes], np.int64).reshape(len(member_sizes), -1)
    return (TAR_BLOCK + -(-lengths // TAR_BLOCK) * TAR_BLOCK).sum(axis=0)


def _schema_or_none(dicts: list[dict[str, Any]]) -> pa.Schema | None:
    try:
        return metadata_schema(dicts)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a field with values of several types: no common schema
        return None


def _write_scatter(out: Storage, name: str, pieces: pa.Table, bucket: np.ndarray, buckets: int) -> dict[str, list[int]]:
    """Record batch ``k`` of the file holds bucket ``k`` (empty batches included, so no index is
    needed); ``pieces`` are in bucket order already, so each batch is a slice, not a copy."""
    counts = np.bincount(bucket, minlength=buckets)
    tar_bytes = np.bincount(bucket, weights=pieces.column("_bytes").to_numpy(), minlength=buckets)
    starts = np.concatenate([[0], np.cumsum(counts)])
    whole = pa.RecordBatch.from_arrays([c.combine_chunks() for c in pieces.columns], schema=pieces.schema)
    options = pa.ipc.IpcWriteOptions(compression=SCATTER_COMPRESSION)
    with out.open_write(name) as stream, pa.ipc.new_file(stream, pieces.schema, options=options) as writer:
        for k in range(buckets):
            writer.write_batch(whole.slice(int(starts[k]), int(counts[k])))
    return {"count": counts.tolist(), "bytes": tar_bytes.astype(np.int64).tolist()}


_EMBEDDERS: dict[str, Any] = {}


def _opted_out(plan: ShufflePlan, shard: int, keys: list[str]) -> np.ndarray:
    """Which rows are faces of people on the opt-out list: their aligned 112 crops, embedded and matched."""
    from facecap.stages.shared.identity import IDENTITY_COSINE, FaceEmbedder, OptOutList, match
    from facecap.stages.shared.images import decode_bgr

    listing = OptOutList.load(plan.opt_out)
    if not listing.people or not keys:
        return np.zeros(len(keys), bool)
    embedder = _EMBEDDERS.get(listing.model)
    if embedder is None:  # once per worker process, not per shard
        embedder = _EMBEDDERS[listing.model] = FaceEmbedder(listing.model)
    listing.check_model(embedder.model, embedder.sha256, "this machine's model file")
    ref = plan.aligned112
    member = ref.member_ext("aligned112")
    vectors = np.zeros((len(keys), listing.vectors.shape[1]), np.float32)
    with TarShardReader(Storage(ref.root, plan.storage), ref.tar_for(shard) or f"{shard_name(shard)}.tar") as reader:
        for position, key in enumerate(keys):
            crop = decode_bgr((reader.get(key, [member]) or {}).get(member))
            if crop is None:
                raise FacecapError(f"{key}: its aligned112 crop is missing, so its consent cannot be checked")
            vectors[position] = embedder.embed(crop)
    person, _ = match(vectors, listing, IDENTITY_COSINE)
    return person >= 0


# -- pass 2: write ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BucketWork:
    plan: ShufflePlan
    split: str
    bucket: int
    first: int  # number of its first output shard
    shards: int  # how many output shards it writes
    inputs: tuple[int, ...]  # input shards that scattered


def write_bucket(number: int, work: BucketWork) -> dict[str, Any]:
    """One bucket's output shards; returns (and records) their names and counts."""
    plan, settings = work.plan, work.plan.settings
    out = Storage(plan.output, plan.storage)
    with tempfile.TemporaryFile(prefix="facecap-crops-") as spool:
        samples = _gather(out, work, spool)
        # Output order decides which shard a sample goes to (a tar is then sorted by key, a Parquet
        # file keeps this order).
        ranked = pc.sort_indices(samples, sort_keys=[("_order", "ascending")]).to_numpy()
        parts = _cut(samples.column("_bytes").to_numpy()[ranked], work.shards, settings)
        written = []
        if settings.format == "webdataset":
            members = {c: samples.column(c).to_pylist() for c in ("key", "txt", "json", *CROP_LOCATION)}
            with _CropFiles(plan.crop, plan.storage, spool) as crops:
                for offset, (start, stop) in enumerate(parts):
                    name = f"{settings.prefix}{work.split}-{work.first + offset:06d}.tar"
                    written.append(_write_tar(out, name, members, ranked[start:stop], crops))
        else:
            for offset, (start, stop) in enumerate(parts):
                name = f"{settings.prefix}{work.split}-{work.first + offset:06d}.parquet"
                written.append(_write_parquet(out, name, samples.take(pa.array(ranked[start:stop]))))
    record: dict[str, Any] = {"identity": plan.identity, "shards": written}
    out.write_bytes(plan.bucket_record(work.split, work.bucket), json.dumps(record).encode())
    return record


class _CropFiles:
    """Crops read where they lie: in the input tars (a bucket draws from every input shard, so the
    files are opened as needed and a few hundred kept open), or in this task's spool file."""

    def __init__(self, ref: MediaRef, options: StorageOptions, spool: BinaryIO, keep_open: int = 256):
        self._ref = ref
        self._storage = Storage(ref.root, options)
        self._spool = spool
        self._keep_open = keep_open
        self._open: OrderedDict[int, int] = OrderedDict()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        if shard == SPOOLED:
            return os.pread(self._spool.fileno(), size, offset)
        descriptor = self._open.pop(shard, None)
        if descriptor is None:
            if len(self._open) >= self._keep_open:
                os.close(self._open.popitem(last=False)[1])
            tar = self._ref.tar_for(shard) or f"{shard_name(shard)}.tar"
            descriptor = os.open(self._storage.local_path(tar), os.O_RDONLY)
        self._open[shard] = descriptor
        data = os.pread(descriptor, size, offset)
        if len(data) != size:
            raise FacecapError(f"{self._storage.uri(tar)} is shorter than when the export began; export again")
        return data

    def __enter__(self) -> _CropFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for descriptor in self._open.values():
            os.close(descriptor)
        self._open.clear()


def _gather(out: Storage, work: BucketWork, spool: BinaryIO) -> pa.Table:
    """The bucket's samples from every scatter file (in input order), crops carried in them moved
    to ``spool``, so a write task holds its bucket's captions and JSON but never its crops."""
    pieces = []
    for shard in work.inputs:
        with out.open_read(work.plan.scatter_name(work.split, shard)) as f:
            batch = pa.ipc.open_file(f).get_batch(work.bucket)
        if batch.num_rows:
            table = pa.Table.from_batches([batch])
            if "jpg" in table.column_names:
                table = _spooled(table, spool)
            pieces.append(table)
    spool.flush()
    return pa.concat_tables(pieces, promote_options="permissive")


def _spooled(table: pa.Table, spool: BinaryIO) -> pa.Table:
    """Carried crops (from S3, or in a scatter file of an earlier facecap, which carried every crop
    and no location) appended to ``spool``; their rows then point there."""
    crops = table.column("jpg").to_pylist()
    if all(crop is None for crop in crops):
        return table.drop_columns(["jpg"])
    if "_shard" not in table.column_names:
        table = table.append_column("_shard", pa.nulls(table.num_rows, pa.int64()))
        table = table.append_column("_crop_offset", pa.nulls(table.num_rows, pa.int64()))
        table = table.append_column("_crop_size", pa.nulls(table.num_rows, pa.int64()))
    location = {c: table.column(c).to_pylist() for c in CROP_LOCATION}
    for row, crop in enumerate(crops):
        if crop is not None:
            location["_shard"][row] = SPOOLED
            location["_crop_offset"][row] = spool.seek(0, os.SEEK_END)
            location["_crop_size"][row] = spool.write(crop)
    table = table.drop_columns(["jpg", *CROP_LOCATION])
    for column in CROP_LOCATION:
        table = table.append_column(column, pa.array(location[column], pa.int64()))
    return table


def _cut(sizes: np.ndarray, parts: int, settings) -> list[tuple[int, int]]:
    """``parts`` consecutive ranges. By count: whole shards of ``shard_samples`` and the rest, as a
    single process dealing the permutation cuts them (a bucket starts at a shard boundary). By
    bytes when a byte target is set: each about the same size, never over ``shard_samples``."""
    n = len(sizes)
    if not settings.shard_bytes:
        bounds = [*range(0, n, settings.shard_samples), n]
        return list(itertools.pairwise(bounds))
    if parts > 1:
        filled = np.cumsum(sizes)
        cuts = np.searchsorted(filled, filled[-1] * np.arange(1, parts) / parts, side="right")
        bounds = np.concatenate([[0], cuts, [n]])
        if np.all(np.diff(bounds) >= 1) and np.all(np.diff(bounds) <= settings.shard_samples):
            return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def shards_for(count: int, tar_bytes: int, settings) -> int:
    """Output shards a bucket of ``count`` samples (``tar_bytes`` in a tar) is cut into."""
    if count == 0:
        return 0
    by_count = math.ceil(count / settings.shard_samples)
    by_bytes = math.ceil(tar_bytes / settings.shard_bytes) if settings.shard_bytes else 1
    return min(count, max(by_count, by_bytes))


def _write_tar(
    out: Storage, name: str, members: dict[str, list], chosen: np.ndarray, crops: _CropFiles
) -> dict[str, Any]:
    """One output tar, its samples sorted by key (each sample's members together), with its index."""
    keys = members["key"]
    with out.open_write(name) as stream:
        tar = TarWriter(stream)
        for i in sorted(chosen.tolist(), key=keys.__getitem__):
            image = crops.read(members["_shard"][i], members["_crop_offset"][i], members["_crop_size"][i])
            tar.add(keys[i], (("jpg", image), ("json", members["json"][i]), ("txt", members["txt"][i])))
        size = tar.finish()
    out.write_bytes(tar_index_name(name), tar_index(tar.sample_offsets))
    out.write_bytes(f"_done/{name}.json", json.dumps({"size": size, "nsamples": len(chosen)}).encode())
    return {"url": name, "nsamples": len(chosen)}


def _write_parquet(out: Storage, name: str, part: pa.Table) -> dict[str, Any]:
    table = facecaption_table(part.drop_columns(["_order", "_bytes"]))
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    out.write_bytes(name, buffer.getvalue())
    out.write_bytes(f"_done/{name}.json", json.dumps({"size": buffer.tell(), "nsamples": table.num_rows}).encode())
    return {"url": name, "nsamples": table.num_rows}


def recorded_schema(record: dict[str, Any]) -> pa.Schema | None:
    """The JSON schema an input shard's scatter recorded (None: none, or no common one)."""
    encoded = record.get("schema")
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded))) if encoded else None
