"""Dedup's plan fanned out over the run's executor, for datasets too large for one process.

The driver's plan (``stage.decide``) holds the fingerprints of every face, and with the embedding
or identity kind every face's embedding. This one holds only what duplicates and identity clusters
involve: it gives the same decisions, ``duplicate_of``, ``identity_cluster`` and
``identity_cluster_size`` (tests compare both) in these steps, each but the decide step a
``TaskJob`` on the run's executor (``Summaries.run_tasks``):

1. **scatter**, a task per summary shard: the per-row work that needs no other row (opt-out and
   eval identities, eval overlap) and, for each grouping, the shard's records (a hash value or a
   pHash band, and the image or face it belongs to) split into partitions by a hash of that value,
   one Parquet file per shard with a row group per partition, on the run's storage (scratch);
   with the embedding or identity kind, a second task per shard (once the number of faces, which
   sets the LSH bits, is known) writes a record per face and LSH table: the face's bucket in that
   table (the hyperplanes of ``index.cosine_pairs``), which decides the partition, the face, its
   float16 embedding as stored and, for the embedding kind, its crop pHash, image and score;
2. **group**, a task per partition: reads its row group of every shard, so every record sharing a
   value is in one task, and returns the verified candidate pairs (equal hashes; image pHashes within
   ``phash_radius``; for the face kind, faces whose crop and image pHashes are both near) with the
   scores of the images and faces in them. A vector partition holds whole (table, bucket) groups, so
   its candidates are those ``cosine_pairs`` compares: the embedding kind returns the pairs with
   cosine >= ``face_cosine`` and crops within ``face_phash_radius``; the identity kind (a bucket of
   one celebrity may hold k^2 pairs of k faces) reduces its pairs with cosine >= ``identity_cosine``
   to a spanning forest as they come and returns that, at most k - 1 edges a component;
3. **decide**, on the driver: connected components over those pairs, the survivor of each by score
   (ties: the earlier row), the kinds in their order of precedence, as ``decide`` does; the
   partitions' identity forests are merged a window of partitions at a time (a distributed
   connected components), so the driver holds one forest: an edge per clustered face but one;
4. **look up**, a task per shard holding a row a decision names: the keys and face indices of the
   images and faces the decisions involve, and the scores of faces in clusters over ``identity_cap``;
5. **write**, a task per shard: the shard's plan rows, returned to the runner, which stores them.

Rows are named by ``shard << 32 | position`` in their summary shard, which orders them as the
driver's plan orders its rows, and an image by its first row; an image's faces are in one shard (detect
writes them together). An identity cluster is numbered by its smallest row's position among all rows
(the root ``UnionFind`` gives on the driver); a face in no identity pair is a cluster of its own.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from facecap.pipeline.dataset import shard_name
from facecap.pipeline.stage import Resources, Summaries
from facecap.pipeline.storage import Storage
from facecap.pipeline.tasks import TaskJob
from facecap.stages.dedup.hashing import hamming
from facecap.stages.dedup.index import (
    MAX_PAIRS_PER_STEP,
    band_keys,
    band_layout,
    close_faces,
    connected_components,
    equal_pairs,
    hamming_pairs,
    identity_lsh_bits,
    lsh_bits,
    lsh_keys,
    lsh_planes,
    outside_band,
    similar_in_buckets,
    star_forest,
    sub_keyed_pairs,
    unique_pairs,
)
from facecap.stages.shared.identity import OptOutList, match

ROW_BITS = 32  # a row id is shard << ROW_BITS | its position in the shard's summary
COMPACT = ["image_key", "face_index", "bytes_hash", "pixel_hash", "url_hash", "phash", "face_phash", "score"]
EXACT_COLUMNS = ("bytes_hash", "pixel_hash", "url_hash")  # grouping codes 0, 1, 2, in precedence order
NEAR_CODE = len(EXACT_COLUMNS)  # the near kind's pHash band b has grouping code NEAR_CODE + b
WRITE_WINDOW = 64  # plan shards written per round: what the driver holds of them at once
GROUP_WINDOW = 64  # vector partitions grouped per round: the identity forests held at once
# Kinds the partitioned plan decides: all of them.
PARTITIONED_KINDS = frozenset({"exact", "near", "face", "embedding", "identity"})
VECTOR_KINDS = ("embedding", "identity")  # grouped by LSH bucket; each is also its scratch family
SCRATCH_FAMILIES = ("image", "face", *VECTOR_KINDS)


@dataclass(frozen=True)
class PlanContext:
    """What every task of one partitioned plan needs (pickled into each payload)."""

    summaries: Summaries
    scratch: Storage
    partitions: int
    config: Any  # DedupConfig (not imported: stage.py imports this module)
    face_bands: int
    eval_hashes: np.ndarray
    identities: dict[str, OptOutList]


@dataclass(frozen=True)
class VectorKind:
    """One vector kind's LSH: the tables, bits and threshold of the driver's ``cosine_pairs`` call."""

    name: str  # "embedding" or "identity"
    threshold: float
    tables: int
    bits: int


def vector_kinds(config: Any, rows: int) -> list[VectorKind]:
    """The vector kinds that run, with the bits ``decide`` gives them for ``rows`` faces."""
    kinds = []
    if "embedding" in config.kinds:
        kinds.append(VectorKind("embedding", config.face_cosine, config.lsh_tables, lsh_bits(rows)))
    if "identity" in config.kinds:
        kinds.append(VectorKind("identity", config.identity_cosine, config.lsh_tables, identity_lsh_bits(rows)))
    return kinds


def plan_partitioned(
    config: Any,
    summaries: Summaries,
    rows: int,
    face_bands: int,
    eval_hashes: np.ndarray,
    identities: dict[str, OptOutList],
) -> Iterator[tuple[int, pd.DataFrame]]:
    """``(shard, plan frame)`` for each shard with summarized rows: the same frames as the driver's plan."""
    with tempfile.TemporaryDirectory(prefix="facecap-dedup-") as temporary:
        # Without a scratch folder on the run's storage the tasks run in this process (Summaries' default).
        scratch = summaries.scratch or Storage(temporary)
        partitions = max(1, math.ceil(rows / config.partition_rows))
        context = PlanContext(summaries, scratch, partitions, config, face_bands, eval_hashes, identities)
        try:
            yield from _plan(context)
        finally:
            for shard in summaries.shards:
                for family in SCRATCH_FAMILIES:
                    scratch.delete(_scratch_name(family, shard))


# What the last partitioned plan in this process did, step by step: wall seconds, and per task the
# seconds and records (bench/bench_scale.py reports them; the figures for a cluster come from these).
LAST_RUN: dict[str, dict[str, float]] = {}


def _step(name: str, started: float, results: dict[int, Any] | None = None) -> None:
    figures = {"seconds": time.perf_counter() - started, "tasks": len(results or {})}
    tasks = [r for r in (results or {}).values() if isinstance(r, dict) and "task_seconds" in r]
    if tasks:
        figures["task_seconds_max"] = max(r["task_seconds"] for r in tasks)
        figures["task_seconds_sum"] = sum(r["task_seconds"] for r in tasks)
        figures["task_records_max"] = max(r["records"] for r in tasks)
        figures["task_records_sum"] = sum(r["records"] for r in tasks)
    LAST_RUN[name] = figures


def _plan(context: PlanContext) -> Iterator[tuple[int, pd.DataFrame]]:
    summaries = context.summaries
    LAST_RUN.clear()
    started = time.perf_counter()
    scattered = summaries.run_tasks(_job("dedup scatter", scatter_shard), ((s, context) for s in summaries.shards))
    _step("scatter", started, scattered)
    kinds, vector_sources = _scatter_vectors(context, scattered)
    # Each partition reads its row group of every shard's files: where it is, per shard.
    sources: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for shard in summaries.shards:
        image_groups = {p: i for i, p in enumerate(scattered[shard]["image_parts"])}
        face_groups = {p: i for i, p in enumerate(scattered[shard]["face_parts"])}
        for partition in set(image_groups) | set(face_groups):
            sources[partition].append((shard, image_groups.get(partition, -1), face_groups.get(partition, -1)))
    started = time.perf_counter()
    grouped = summaries.run_tasks(
        _job("dedup group", group_partition), ((p, (context, sources[p])) for p in sorted(sources))
    )
    _step("group", started, grouped)
    offsets = np.cumsum([0] + [scattered[s]["rows"] for s in summaries.shards])
    decisions = _Decisions(context.config, scattered, dict(zip(summaries.shards, offsets[:-1].tolist(), strict=True)))
    grouped_vectors = _group_vectors(context, kinds, vector_sources, decisions)
    started = time.perf_counter()
    decisions.images(list(grouped.values()))
    decisions.faces(list(grouped.values()))
    decisions.embeddings(grouped_vectors)
    decisions.identities()
    requests = decisions.requests()
    _step("decide", started)
    started = time.perf_counter()
    found = summaries.run_tasks(
        _job("dedup look up", look_up_shard), ((s, (context, *requests[s])) for s in sorted(requests))
    )
    marked = decisions.rows(found)
    clusters = decisions.clusters()
    _step("look up", started, found)
    LAST_RUN["decide"]["pairs"] = float(decisions.pairs)
    LAST_RUN["decide"]["identity_edges"] = float(len(decisions.forest))
    LAST_RUN["decide"]["decided_rows"] = float(sum(len(m["position"]) for m in marked.values()))
    started = time.perf_counter()
    todo = [(s, int(offsets[i])) for i, s in enumerate(summaries.shards) if scattered[s]["rows"]]
    for start in range(0, len(todo), WRITE_WINDOW):
        window = todo[start : start + WRITE_WINDOW]
        payloads = ((s, (context, offset, marked.get(s), clusters.get(s))) for s, offset in window)
        written = summaries.run_tasks(_job("dedup write plan", write_shard), payloads)
        for shard, _ in window:
            yield shard, written[shard]
    _step("write", started)


def _scatter_vectors(context: PlanContext, scattered: dict[int, dict]) -> tuple[list[VectorKind], dict]:
    """The vector kinds' records scattered; the kinds, and where each partition's records are."""
    shards = context.summaries.shards
    # The LSH bits follow the number of faces, known exactly only now (the count before may include
    # rows pass 1 failed on): the vectors are scattered in a step of their own.
    rows = sum(scattered[s]["rows"] for s in shards)
    kinds = vector_kinds(context.config, rows)
    if not kinds:
        return [], {}
    started = time.perf_counter()
    # A record per face and table, each with its 256-byte embedding: partitions of about
    # ``partition_rows`` records, so that a task holds about as much as one of the others.
    partitions = max(1, math.ceil(rows * sum(k.tables for k in kinds) / context.config.partition_rows))
    payloads = ((s, (context, kinds, partitions)) for s in shards if scattered[s]["rows"])
    scattered_vectors = context.summaries.run_tasks(_job("dedup scatter vectors", scatter_vectors), payloads)
    _step("scatter vectors", started, scattered_vectors)
    return kinds, _sources({s: r["parts"] for s, r in scattered_vectors.items()})


def _group_vectors(
    context: PlanContext, kinds: list[VectorKind], sources: dict[int, dict], decisions: _Decisions
) -> list[dict]:
    """The vector partitions' results, a window of partitions at a time: each window's identity
    forests are merged into the driver's at once, so it holds one forest (an edge per clustered face
    at most) and a window's, not every partition's (a face is in a bucket of every table)."""
    if not sources:
        return []
    started = time.perf_counter()
    results: dict[int, dict] = {}
    partitions = sorted(sources)
    for start in range(0, len(partitions), GROUP_WINDOW):
        window = partitions[start : start + GROUP_WINDOW]
        payloads = ((p, (context, kinds, sources[p])) for p in window)
        grouped = context.summaries.run_tasks(_job("dedup group vectors", group_vectors), payloads)
        decisions.add_identity_edges([g.pop("identity_edges") for g in grouped.values()])
        results.update(grouped)
    _step("group vectors", started, results)
    if "group vectors" in LAST_RUN:
        LAST_RUN["group vectors"]["identity_edges_received"] = float(decisions.identity_edges_received)
    return list(results.values())


def _sources(parts: dict[int, dict[str, list[int]]]) -> dict[int, dict[str, list[tuple[int, int]]]]:
    """Partition -> family -> (shard, row group) of each shard file holding some of it, from each
    shard's partitions per family in file order."""
    sources: dict[int, dict[str, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    for shard in sorted(parts):
        for family, partitions in parts[shard].items():
            for group, partition in enumerate(partitions):
                sources[partition][family].append((shard, group))
    return {p: dict(families) for p, families in sources.items()}


def _job(name: str, function) -> TaskJob:
    return TaskJob(name=name, function=function, resources=Resources(cpus=1))


def _scratch_name(family: str, shard: int) -> str:
    return f"{family}-{shard_name(shard)}.arrow"


def _mix(values: np.ndarray, salt: np.ndarray | int) -> np.ndarray:
    """splitmix64 of value + salt: spreads hash bands (which may be few bits) over partitions."""
    with np.errstate(over="ignore"):
        z = np.asarray(values, np.int64).view(np.uint64) + np.asarray(salt, np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


# -- 1. scatter ---------------------------------------------------------------------------------
def scatter_shard(shard: int, context: PlanContext) -> dict:
    """The shard's per-row decisions that need no other row, and its records split by partition."""
    started = time.perf_counter()
    config = context.config
    wants_vectors = bool(context.identities)
    table = context.summaries.read(shard, COMPACT + (["embedding"] if wants_vectors else []))
    count = table.num_rows
    result: dict[str, Any] = {"rows": count, "image_parts": [], "face_parts": [], "marks": {}, "records": 0}
    result["task_seconds"] = 0.0
    if not count:
        return result
    row_ids = _row_ids(shard, count)
    codes, _ = pd.factorize(table.column("image_key").to_numpy(zero_copy_only=False))
    first = np.unique(codes, return_index=True)[1]  # each image's first row (codes follow first appearance)
    image_of_row = row_ids[first[codes]]
    scores = table.column("score").to_numpy().astype(np.float64)
    image_scores = np.full(len(first), -np.inf)
    np.maximum.at(image_scores, codes, scores)
    phashes = table.column("phash").to_numpy().astype(np.int64)

    # Per-row work on the worker: opted-out and eval identities, then held-out eval images.
    decision = np.full(count, "", dtype=object)
    marks: dict[int, tuple[str, str | None, float]] = {}
    if wants_vectors:
        from facecap.stages.dedup.stage import _vectors  # the stage's decoding of the float16 column

        vectors = _vectors(table.column("embedding"))
        for kind, people in context.identities.items():
            person, cosine = match(vectors, people, config.identity_match_cosine)
            for hit in np.flatnonzero((person >= 0) & (decision == "")):
                decision[hit] = kind
                marks[int(hit)] = (kind, people.names[person[hit]], float(cosine[hit]))
    if len(context.eval_hashes):
        combined = np.concatenate([phashes[first], context.eval_hashes])
        pairs = hamming_pairs(combined, config.phash_radius)
        hits = np.unique(pairs[(pairs[:, 0] < len(first)) & (pairs[:, 1] >= len(first))][:, 0])
        for row in np.flatnonzero(np.isin(codes, hits) & (decision == "")):
            marks[int(row)] = ("eval_overlap", None, float("nan"))
    result["marks"] = marks

    kinds = set(config.kinds)
    pieces = []
    if "exact" in kinds:
        for code, column in enumerate(EXACT_COLUMNS):
            values = table.column(column).to_numpy().astype(np.int64)[first]
            pieces.append((np.full(len(first), code, np.int8), values))
    if "near" in kinds:
        for band, values in band_keys(phashes[first], config.phash_radius + 1):
            pieces.append((np.full(len(first), NEAR_CODE + band, np.int8), values))
    if pieces:
        image_table = pa.table(
            {
                "grouping": np.concatenate([p[0] for p in pieces]),
                "value": np.concatenate([p[1] for p in pieces]),
                "image": np.tile(row_ids[first], len(pieces)),
                "score": np.tile(image_scores, len(pieces)),
                "phash": np.tile(phashes[first], len(pieces)),
            }
        )
        result["image_parts"] = _write_partitioned(context, "image", shard, image_table)
        result["records"] += image_table.num_rows
    if "face" in kinds:
        bands = list(band_keys(phashes, context.face_bands))
        face_table = pa.table(
            {
                "grouping": np.repeat(np.arange(len(bands), dtype=np.int8), count),
                "value": np.concatenate([values for _, values in bands]),
                "row": np.tile(row_ids, len(bands)),
                "image": np.tile(image_of_row, len(bands)),
                "score": np.tile(scores, len(bands)),
                "phash": np.tile(phashes, len(bands)),
                "face_phash": np.tile(table.column("face_phash").to_numpy().astype(np.int64), len(bands)),
            }
        )
        result["face_parts"] = _write_partitioned(context, "face", shard, face_table)
        result["records"] += face_table.num_rows
    result["task_seconds"] = time.perf_counter() - started
    return result


def _write_partitioned(
    context: PlanContext, family: str, shard: int, table: pa.Table, partitions: int | None = None
) -> list[int]:
    """One file, a row group per partition in ascending order; returns the partitions, in file order."""
    grouping = table.column("grouping").to_numpy()
    count = np.uint64(partitions or context.partitions)
    partition = _mix(table.column("value").to_numpy(), grouping.astype(np.uint64)) % count
    order = np.argsort(partition, kind="stable")
    table, partition = table.take(order), partition[order]
    present, starts = np.unique(partition, return_index=True)
    ends = [*starts[1:], len(partition)]
    if not table.num_rows:
        return []
    records = table.combine_chunks().to_batches()[0]
    # Arrow IPC, not Parquet: each group task reads one batch from every shard's file, so opening a
    # file and reading a batch must cost next to nothing (a Parquet footer and a row group per
    # (shard, partition) grew as shards x partitions); lz4 keeps the files small at little CPU.
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as writer:
        for start, end in zip(starts, ends, strict=True):
            writer.write_batch(records.slice(int(start), int(end - start)))
    context.scratch.write_bytes(_scratch_name(family, shard), sink.getvalue().to_pybytes())
    return [int(p) for p in present]


def scatter_vectors(shard: int, payload: tuple[PlanContext, list[VectorKind], int]) -> dict:
    """The shard's LSH records of each vector kind: per table, the face's bucket (its partition),
    the face and its embedding as stored, and what the embedding kind verifies and ranks with."""
    from facecap.stages.dedup.stage import _vectors  # the stage's decoding of the float16 column

    started = time.perf_counter()
    context, kinds, partitions = payload
    table = context.summaries.read(shard, ["image_key", "face_phash", "score", "embedding"])
    count = table.num_rows
    result: dict[str, Any] = {"parts": {}, "records": 0, "task_seconds": 0.0}
    if not count:
        return result
    row_ids = _row_ids(shard, count)
    vectors = _vectors(table.column("embedding"))
    for kind in kinds:
        planes = lsh_planes(vectors.shape[1], kind.tables, kind.bits)
        every_table = np.tile(np.arange(count), kind.tables)
        columns: dict[str, Any] = {
            "grouping": np.repeat(np.arange(kind.tables, dtype=np.int8), count),
            "value": np.concatenate([lsh_keys(vectors, p) for p in planes]),
            "row": row_ids[every_table],
            "embedding": table.column("embedding").take(every_table),
        }
        if kind.name == "embedding":
            columns["image"] = _image_rows(table, row_ids)[every_table]
            columns["score"] = table.column("score").to_numpy().astype(np.float64)[every_table]
            columns["face_phash"] = table.column("face_phash").to_numpy().astype(np.int64)[every_table]
        records = pa.table(columns)
        result["parts"][kind.name] = _write_partitioned(context, kind.name, shard, records, partitions)
        result["records"] += records.num_rows
    result["task_seconds"] = time.perf_counter() - started
    return result


def _row_ids(shard: int, count: int) -> np.ndarray:
    return (np.int64(shard) << np.int64(ROW_BITS)) | np.arange(count, dtype=np.int64)


def _image_rows(table: pa.Table, row_ids: np.ndarray) -> np.ndarray:
    """Each row's image, named by the image's first row (an image's faces are in one shard)."""
    codes, _ = pd.factorize(table.column("image_key").to_numpy(zero_copy_only=False))
    first = np.unique(codes, return_index=True)[1]  # codes follow first appearance
    return row_ids[first[codes]]


# -- 2. group -------------------------------------------------------------------------------------
def group_partition(partition: int, payload: tuple[PlanContext, list[tuple[int, int, int]]]) -> dict:
    """Verified candidate pairs of one partition, by grouping, with the scores of their members."""
    started = time.perf_counter()
    context, sources = payload
    config = context.config
    images = _read_groups(context, "image", [(s, i) for s, i, _ in sources if i >= 0])
    faces = _read_groups(context, "face", [(s, f) for s, _, f in sources if f >= 0])
    result: dict[str, Any] = {"image_pairs": {}, "image_scores": None, "face_pairs": None, "face_rows": None}
    result["records"] = sum(len(part["value"]) for part in (images, faces) if part is not None)
    if images is not None:
        grouping = images["grouping"]
        for code, column in enumerate(EXACT_COLUMNS):
            chosen = np.flatnonzero(grouping == code)
            result["image_pairs"][column] = images["image"][chosen[equal_pairs(images["value"][chosen])]]
        near = []
        bands = config.phash_radius + 1
        for code in np.unique(grouping[grouping >= NEAR_CODE]):
            chosen = np.flatnonzero(grouping == code)
            # Keyed again on the bits outside the band, as ``hamming_pairs`` does on the driver.
            rest, rest_bits = outside_band(images["phash"][chosen], int(code) - NEAR_CODE, bands)
            for pairs in sub_keyed_pairs(images["value"][chosen], 64 - rest_bits, rest, rest_bits, config.phash_radius):
                pairs = chosen[pairs]
                close = hamming(images["phash"][pairs[:, 0]], images["phash"][pairs[:, 1]]) <= config.phash_radius
                near.append(images["image"][pairs[close]])
        result["image_pairs"]["near"] = unique_pairs(near)
        members = np.unique(np.concatenate([p.ravel() for p in result["image_pairs"].values()]))
        result["image_scores"] = (members, images["score"][_first_positions(images["image"], members)])
    if faces is not None:
        found = []
        for code in np.unique(faces["grouping"]):
            chosen = np.flatnonzero(faces["grouping"] == code)
            band_bits = band_layout(context.face_bands)[int(code)][1]
            crops, image_hashes = faces["face_phash"][chosen], faces["phash"][chosen]
            # Keyed again on the crop pHash, as ``face_candidates`` does on the driver.
            for pairs in sub_keyed_pairs(faces["value"][chosen], band_bits, crops, 64, config.face_crop_radius):
                close = close_faces(
                    pairs,
                    image_hashes,
                    crops,
                    faces["image"][chosen],
                    config.face_crop_image_radius,
                    config.face_crop_radius,
                )
                found.append(faces["row"][chosen[pairs[close]]])
        result["face_pairs"] = unique_pairs(found)
        members = np.unique(result["face_pairs"].ravel())
        where = _first_positions(faces["row"], members)
        result["face_rows"] = (members, faces["image"][where], faces["score"][where])
    result["task_seconds"] = time.perf_counter() - started
    return result


def _first_positions(values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Where each of ``wanted`` (distinct, sorted, each somewhere in ``values``) first occurs in
    ``values``: found among the few records holding one, not by indexing a partition's millions."""
    holding = np.flatnonzero(np.isin(values, wanted))
    found, first = np.unique(values[holding], return_index=True)
    return holding[first[np.searchsorted(found, wanted)]]


def group_vectors(partition: int, payload: tuple[PlanContext, list[VectorKind], dict]) -> dict:
    """One partition's verified pairs of the embedding kind, with their members' images and scores,
    and a spanning forest of the identity kind's verified pairs."""
    started = time.perf_counter()
    context, kinds, sources = payload
    result: dict[str, Any] = {"embedding_pairs": None, "embedding_rows": None, "identity_edges": None, "records": 0}
    for kind in kinds:
        if kind.name not in sources:
            continue
        records = _read_table(context, kind.name, sources[kind.name])
        result["records"] += records.num_rows
        if kind.name == "embedding":
            result["embedding_pairs"], result["embedding_rows"] = _same_faces(records, kind, context.config)
        else:
            result["identity_edges"] = _identity_forest(records, kind)
    result["task_seconds"] = time.perf_counter() - started
    return result


def _candidates(records: pa.Table, kind: VectorKind) -> Iterator[np.ndarray]:
    """Pairs of record positions in one (table, bucket) whose cosine passes, in chunks: every
    record of a bucket is in this partition, so these are the pairs ``cosine_pairs`` verifies."""
    from facecap.stages.dedup.stage import _vectors

    tables = records.column("grouping").to_numpy().astype(np.int64)
    keys = (tables << np.int64(kind.bits)) | records.column("value").to_numpy()
    yield from similar_in_buckets(keys, _vectors(records.column("embedding")), kind.threshold)


def _same_faces(records: pa.Table, kind: VectorKind, config: Any) -> tuple[np.ndarray, tuple]:
    """The embedding kind: pairs whose crops' pHashes are near too, and (rows, images, scores) of
    their members."""
    rows = records.column("row").to_numpy()
    crops = records.column("face_phash").to_numpy()
    found = []
    for pairs in _candidates(records, kind):
        close = hamming(crops[pairs[:, 0]], crops[pairs[:, 1]]) <= config.face_phash_radius
        found.append(rows[pairs[close]])
    pairs = unique_pairs(found)
    members, where = np.unique(rows, return_index=True)
    where = where[np.searchsorted(members, np.unique(pairs))]
    images, scores = records.column("image").to_numpy(), records.column("score").to_numpy()
    return pairs, (rows[where], images[where], scores[where])


def _identity_forest(records: pa.Table, kind: VectorKind) -> np.ndarray:
    """A spanning forest of the identity pairs: a bucket of k faces of one person may hold k^2
    pairs, a forest k - 1 edges, and the components (what the driver needs) are the same."""
    rows = records.column("row").to_numpy()
    forest = np.empty((0, 2), np.int64)
    pending: list[np.ndarray] = []
    waiting = 0
    for pairs in _candidates(records, kind):
        pending.append(rows[pairs])
        waiting += len(pairs)
        if waiting >= MAX_PAIRS_PER_STEP:  # reduced as they come: the pairs are never all held
            forest, pending, waiting = star_forest(np.concatenate([forest, *pending])), [], 0
    return star_forest(np.concatenate([forest, *pending]))


def _read_table(context: PlanContext, family: str, groups: list[tuple[int, int]]) -> pa.Table:
    tables = []
    for shard, group in groups:
        with context.scratch.open_read(_scratch_name(family, shard)) as f:
            tables.append(pa.Table.from_batches([pa.ipc.open_file(f).get_batch(group)]))
    return pa.concat_tables(tables, promote_options="permissive")  # an embedding column may be all null


def _read_groups(context: PlanContext, family: str, groups: list[tuple[int, int]]) -> dict[str, np.ndarray] | None:
    if not groups:
        return None
    table = _read_table(context, family, groups)
    return {name: table.column(name).to_numpy() for name in table.column_names}


# -- 3. decide (driver) ----------------------------------------------------------------------------
class _Decisions:
    """The driver's part: small, it holds only rows and images that duplicates involve, and the
    faces of identity clusters (a forest: an edge per face beyond each cluster's first)."""

    def __init__(self, config: Any, scattered: dict[int, dict], offsets: dict[int, int]):
        self.config = config
        self.offsets = offsets  # shard -> its first row's position among all rows (the driver's order)
        # row id -> (decision, row it duplicates or None, identity match, its cosine)
        self.marks: dict[int, tuple[str, int | None, str | None, float]] = {}
        for shard, result in scattered.items():
            for position, (kind, name, cosine) in result["marks"].items():
                self.marks[(shard << ROW_BITS) | position] = (kind, None, name, cosine)
        self.image_duplicates: dict[int, tuple[str, int]] = {}  # image -> (kind, survivor image)
        self.row_duplicates: dict[int, int] = {}  # row -> survivor row (kinds face and embedding)
        self.cluster_rows = np.empty(0, np.int64)  # rows in identity clusters of two or more, ascending
        self.cluster_roots = np.empty(0, np.int64)  # ... each one's cluster: its smallest row
        self.cluster_sizes = np.empty(0, np.int32)
        self.pairs = 0  # candidate pairs that passed verification, all groupings: what the driver holds
        self.forest = np.empty((0, 2), np.int64)  # the identity kind's spanning forest, partitions merged
        self.identity_edges_received = 0  # forest edges the partitions returned, all together

    def images(self, grouped: list[dict]) -> None:
        """Each grouping on its own, in precedence order; an image takes the first it loses in."""
        groupings = [("exact", c) for c in EXACT_COLUMNS if "exact" in self.config.kinds]
        groupings += [("near_duplicate", "near")] if "near" in self.config.kinds else []
        ids, scores = _merged_scores([g["image_scores"] for g in grouped if g["image_scores"] is not None])
        for kind, name in groupings:
            pairs = unique_pairs([g["image_pairs"][name] for g in grouped if g["image_scores"] is not None])
            self.pairs += len(pairs)
            for member, survivor in _survivors(pairs, ids, scores).items():
                self.image_duplicates.setdefault(member, (kind, survivor))

    def faces(self, grouped: list[dict]) -> None:
        """The face kind over faces no earlier kind decided, as ``_mark_row_groups``."""
        found = [g for g in grouped if g["face_rows"] is not None]
        self._row_groups([g["face_pairs"] for g in found], [g["face_rows"] for g in found])

    def embeddings(self, grouped: list[dict]) -> None:
        """The embedding kind over faces no earlier kind (the face kind included) decided."""
        found = [g for g in grouped if g["embedding_rows"] is not None]
        self._row_groups([g["embedding_pairs"] for g in found], [g["embedding_rows"] for g in found])

    def _row_groups(self, pieces: list[np.ndarray], members: list[tuple]) -> None:
        """Components over the pairs; the live faces of each but its best point at the best."""
        if not members:
            return
        pairs = unique_pairs(pieces)
        self.pairs += len(pairs)
        rows = np.concatenate([m[0] for m in members])
        images = np.concatenate([m[1] for m in members])
        scores = np.concatenate([m[2] for m in members])
        rows, first = np.unique(rows, return_index=True)
        images, scores = images[first], scores[first]
        decided = np.array(
            [
                r in self.marks or r in self.row_duplicates or i in self.image_duplicates
                for r, i in zip(rows.tolist(), images.tolist(), strict=True)
            ]
        )
        labels = connected_components(np.searchsorted(rows, pairs), len(rows))
        groups = pd.DataFrame({"label": labels, "row": rows, "score": scores})[~decided]
        groups = groups[groups.groupby("label")["label"].transform("size") > 1]
        ranked = groups.sort_values(["label", "score", "row"], ascending=[True, False, True])
        survivors = ranked.groupby("label")["row"].transform("first")
        for row, survivor in zip(ranked["row"], survivors, strict=True):
            if row != survivor:
                self.row_duplicates[int(row)] = int(survivor)

    def add_identity_edges(self, forests: list[np.ndarray | None]) -> None:
        """Partitions' forests merged into one: a face's clusters in several partitions (one per LSH
        table) are joined here, a distributed connected components."""
        forests = [f for f in forests if f is not None and len(f)]
        if forests:
            self.identity_edges_received += sum(len(f) for f in forests)
            self.forest = star_forest(np.concatenate([self.forest, *forests]))

    def identities(self) -> None:
        """Identity clusters: the components of the merged forest, each face's cluster and size."""
        if not len(self.forest):
            return
        self.cluster_rows = np.unique(self.forest)
        labels = connected_components(np.searchsorted(self.cluster_rows, self.forest), len(self.cluster_rows))
        self.cluster_roots = self.cluster_rows[labels]  # the smallest row: UnionFind's root on the driver
        self.cluster_sizes = np.bincount(labels)[labels].astype(np.int32)

    def _over_cap(self) -> np.ndarray:
        """Which clustered rows are in clusters larger than the cap: the cap ranks their faces by
        score (looked up per shard); a smaller cluster keeps every face."""
        cap = self.config.identity_cap
        return self.cluster_sizes > cap if cap else np.zeros(len(self.cluster_rows), bool)

    def requests(self) -> dict[int, tuple[list[int], list[int], list[int]]]:
        """Per shard: the images whose faces (and face indices) the decisions need, single rows
        (their keys), and rows whose scores the identity cap needs (and their keys)."""
        images: dict[int, set[int]] = defaultdict(set)
        rows: dict[int, set[int]] = defaultdict(set)
        scored: dict[int, list[int]] = defaultdict(list)
        for member, (_, survivor) in self.image_duplicates.items():
            for image in (member, survivor):
                images[image >> ROW_BITS].add(image & ((1 << ROW_BITS) - 1))
        for survivor in self.row_duplicates.values():
            rows[survivor >> ROW_BITS].add(survivor & ((1 << ROW_BITS) - 1))
        for row in self.cluster_rows[self._over_cap()].tolist():
            scored[row >> ROW_BITS].append(row & ((1 << ROW_BITS) - 1))
        shards = set(images) | set(rows) | set(scored)
        return {s: (sorted(images[s]), sorted(rows[s]), scored[s]) for s in shards}

    def rows(self, found: dict[int, dict]) -> dict[int, dict[str, list]]:
        """Every decided row's decision, the key it duplicates, its identity match: per shard."""
        faces_of: dict[int, list[tuple[int, int]]] = {}  # image -> [(face_index, row)]
        keys: dict[int, str] = {}
        scores: dict[int, float] = {}
        for shard, result in found.items():
            base = shard << ROW_BITS
            for image, faces in result["images"].items():
                faces_of[base | image] = [(index, base | position) for index, position, _ in faces]
                keys.update((base | position, key) for _, position, key in faces)
            keys.update((base | position, key) for position, key in result["rows"].items())
            scores.update((base | position, score) for position, score in result["scores"].items())
        decided = dict(self.marks)
        for image, (kind, survivor) in sorted(self.image_duplicates.items()):
            survivor_faces = faces_of[survivor]
            by_index = dict(survivor_faces)  # of faces sharing an index the last, as ``decide`` has it
            for index, row in faces_of[image]:
                if row not in decided:
                    decided[row] = (kind, by_index.get(index, survivor_faces[0][1]), None, float("nan"))
        for row, survivor in self.row_duplicates.items():
            decided[row] = ("near_duplicate", survivor, None, float("nan"))
        # Chains are followed before the cap, as ``decide`` does: a capped face keeps its duplicates.
        final = {row: (kind, _followed(row, decided), name, cosine) for row, (kind, _, name, cosine) in decided.items()}
        final.update(self._capped(decided, scores))
        marked: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for row, (kind, target, name, cosine) in sorted(final.items()):
            shard = marked[row >> ROW_BITS]
            shard["position"].append(row & ((1 << ROW_BITS) - 1))
            shard["decision"].append(kind)
            shard["duplicate_of"].append(keys[target] if target is not None else None)
            shard["identity_match"].append(name)
            shard["identity_match_cosine"].append(cosine)
        return {s: dict(v) for s, v in marked.items()}

    def _capped(self, decided: dict[int, tuple], scores: dict[int, float]) -> dict[int, tuple]:
        """``_cap_identities``: in each cluster over the cap, its undecided faces beyond the cap
        best-scored (ties: the earlier row) point at the best."""
        capped = self._over_cap()
        if not capped.any():
            return {}
        members = pd.DataFrame({"cluster": self.cluster_roots[capped], "row": self.cluster_rows[capped]})
        members = members[~members["row"].isin(list(decided))]
        members = members.assign(score=members["row"].map(scores))
        ranked = members.sort_values(["cluster", "score", "row"], ascending=[True, False, True])
        best = ranked.groupby("cluster")["row"].transform("first")
        over = (ranked.groupby("cluster").cumcount() >= self.config.identity_cap).to_numpy()
        rows, targets = ranked["row"].to_numpy()[over], best.to_numpy()[over]
        return {int(r): ("identity_cap", int(t), None, float("nan")) for r, t in zip(rows, targets, strict=True)}

    def clusters(self) -> dict[int, dict[str, np.ndarray]]:
        """Per shard: the positions of its faces in identity clusters, their cluster (the smallest
        row's position among all rows, as the driver's plan numbers them) and its size."""
        shards = self.cluster_rows >> ROW_BITS
        positions = self.cluster_rows & ((1 << ROW_BITS) - 1)
        numbers = np.array(sorted(self.offsets), np.int64)
        offsets = np.array([self.offsets[s] for s in numbers.tolist()], np.int64)
        roots = offsets[np.searchsorted(numbers, self.cluster_roots >> ROW_BITS)]
        roots += self.cluster_roots & ((1 << ROW_BITS) - 1)
        found = {}
        for shard in np.unique(shards).tolist():
            chosen = shards == shard
            found[shard] = {
                "position": positions[chosen],
                "identity_cluster": roots[chosen],
                "identity_cluster_size": self.cluster_sizes[chosen],
            }
        return found


def _followed(row: int, decided: dict[int, tuple]) -> int | None:
    """``_follow_chains`` for one row: past duplicates to a kept row (kept as it was when the chain
    ends at a row without a target, as there)."""
    start = target = decided[row][1]
    steps = 0
    while target is not None and target in decided and steps < len(decided):
        target, steps = decided[target][1], steps + 1
    return target if target is not None else start


def _merged_scores(pieces: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not pieces:
        return np.empty(0, np.int64), np.empty(0)
    ids = np.concatenate([p[0] for p in pieces])
    scores = np.concatenate([p[1] for p in pieces])
    ids, first = np.unique(ids, return_index=True)
    return ids, scores[first]


def _survivors(pairs: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> dict[int, int]:
    """Member -> survivor for each non-survivor of the components over ``pairs`` (highest score,
    then the earliest id), as ``_mark_image_groups`` chooses."""
    if not len(pairs):
        return {}
    members = np.unique(pairs)
    labels = connected_components(np.searchsorted(members, pairs), len(members))
    score = scores[np.searchsorted(ids, members)]
    ranked = pd.DataFrame({"label": labels, "id": members, "score": score})
    ranked = ranked.sort_values(["label", "score", "id"], ascending=[True, False, True])
    survivors = ranked.groupby("label")["id"].transform("first")
    return {int(m): int(s) for m, s in zip(ranked["id"], survivors, strict=True) if m != s}


# -- 4. look up --------------------------------------------------------------------------------------
def look_up_shard(shard: int, payload: tuple[PlanContext, list[int], list[int], list[int]]) -> dict:
    """The faces (face index, position, key) of the images that start at ``images``; keys of ``rows``;
    scores and keys of ``scored`` (faces the identity cap ranks)."""
    context, images, rows, scored = payload
    table = context.summaries.read(shard, ["image_key", "face_index"] + (["score"] if scored else []))
    keys = table.column("key").to_numpy(zero_copy_only=False)
    codes, _ = pd.factorize(table.column("image_key").to_numpy(zero_copy_only=False))
    face_index = table.column("face_index").to_numpy()
    positions_of = pd.Series(np.arange(len(codes))).groupby(codes).indices
    found: dict[int, list[tuple[int, int, str]]] = {}
    for image in images:
        found[image] = [(int(face_index[p]), int(p), str(keys[p])) for p in positions_of[codes[image]]]
    scores = table.column("score").to_numpy().astype(np.float64) if scored else np.empty(0)
    return {
        "images": found,
        "rows": {int(p): str(keys[p]) for p in [*rows, *scored]},
        "scores": {int(p): float(scores[p]) for p in scored},
    }


# -- 5. write ------------------------------------------------------------------------------------------
def write_shard(
    shard: int, payload: tuple[PlanContext, int, dict[str, list] | None, dict[str, np.ndarray] | None]
) -> pd.DataFrame:
    """The shard's plan rows, in the columns and types of the driver's plan."""
    context, offset, marked, clusters = payload
    table = context.summaries.read(shard, ["phash", "pixel_hash"])
    count = table.num_rows
    decision = np.full(count, "", dtype=object)
    duplicate_of = np.full(count, None, dtype=object)
    matched = np.full(count, None, dtype=object)
    matched_cosine = np.full(count, np.nan, np.float32)
    if marked:
        where = np.asarray(marked["position"], np.int64)
        decision[where] = marked["decision"]
        duplicate_of[where] = marked["duplicate_of"]
        matched[where] = marked["identity_match"]
        matched_cosine[where] = marked["identity_match_cosine"]
    # A face in no identity pair is a cluster of its own, numbered by its position, as on the driver.
    cluster = np.arange(offset, offset + count, dtype=np.int64)
    sizes = np.ones(count, np.int32)
    if clusters:
        cluster[clusters["position"]] = clusters["identity_cluster"]
        sizes[clusters["position"]] = clusters["identity_cluster_size"]
    pixel = table.column("pixel_hash").to_numpy()
    return pd.DataFrame(
        {
            "key": table.column("key").to_numpy(zero_copy_only=False),
            "phash": table.column("phash").to_numpy(),
            "pixel_sha256": [f"{int(v) & ((1 << 64) - 1):016x}" for v in pixel],
            "decision": decision,
            "duplicate_of": duplicate_of,
            "identity_cluster": cluster,
            "identity_cluster_size": sizes,
            "identity_match": matched,
            "identity_match_cosine": matched_cosine,
        }
    )
