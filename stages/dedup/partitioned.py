"""Dedup's plan fanned out over the run's executor, for datasets too large for one process.

The driver's plan (``stage.decide``) holds the fingerprints of every face. This one holds only
what duplicates involve, which are rare: it gives the same decisions (tests compare both) in five
steps, each but the third a ``TaskJob`` on the run's executor (``Summaries.run_tasks``):

1. **scatter**, a task per summary shard: the per-row work that needs no other row (opt-out and
   eval identities, eval overlap) and, for each grouping, the shard's records (a hash value or a
   pHash band, and the image or face it belongs to) split into partitions by a hash of that value,
   one Parquet file per shard with a row group per partition, on the run's storage (scratch);
2. **group**, a task per partition: reads its row group of every shard, so every record sharing a
   value is in one task, and returns the verified candidate pairs (equal hashes; image pHashes within
   ``phash_radius``; for the face kind, faces whose crop and image pHashes are both near) with the
   scores of the images and faces in them;
3. **decide**, on the driver: connected components over those pairs, the survivor of each by score
   (ties: the earlier row), the kinds in their order of precedence, as ``decide`` does;
4. **look up**, a task per shard holding a row a decision names: the keys and face indices of the
   images and faces the decisions involve;
5. **write**, a task per shard: the shard's plan rows, returned to the runner, which stores them.

Rows are named by ``shard << 32 | position`` in their summary shard, which orders them as the
driver's plan orders its rows, and an image by its first row; an image's faces are in one shard (detect
writes them together). The embedding and identity kinds stay on the driver (``DedupStage.plan``).
"""

from __future__ import annotations

import io
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
import pyarrow.parquet as pq

from facecap.pipeline.dataset import shard_name
from facecap.pipeline.stage import Resources, Summaries
from facecap.pipeline.storage import Storage
from facecap.pipeline.tasks import TaskJob
from facecap.stages.dedup.hashing import hamming
from facecap.stages.dedup.index import (
    band_keys,
    band_layout,
    close_faces,
    connected_components,
    equal_pairs,
    hamming_pairs,
    outside_band,
    sub_keyed_pairs,
    unique_pairs,
)
from facecap.stages.shared.identity import OptOutList, match

ROW_BITS = 32  # a row id is shard << ROW_BITS | its position in the shard's summary
COMPACT = ["image_key", "face_index", "bytes_hash", "pixel_hash", "url_hash", "phash", "face_phash", "score"]
EXACT_COLUMNS = ("bytes_hash", "pixel_hash", "url_hash")  # grouping codes 0, 1, 2, in precedence order
NEAR_CODE = len(EXACT_COLUMNS)  # the near kind's pHash band b has grouping code NEAR_CODE + b
WRITE_WINDOW = 64  # plan shards written per round: what the driver holds of them at once
# Kinds the partitioned plan decides; embedding and identity compare vectors across the whole set.
PARTITIONED_KINDS = frozenset({"exact", "near", "face"})


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
                for family in ("image", "face"):
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
    started = time.perf_counter()
    decisions = _Decisions(context.config, scattered)
    decisions.images(list(grouped.values()))
    decisions.faces(list(grouped.values()))
    requests = decisions.requests()
    _step("decide", started)
    started = time.perf_counter()
    found = summaries.run_tasks(
        _job("dedup look up", look_up_shard), ((s, (context, *requests[s])) for s in sorted(requests))
    )
    marked = decisions.rows(found)
    _step("look up", started, found)
    LAST_RUN["decide"]["pairs"] = float(decisions.pairs)
    LAST_RUN["decide"]["decided_rows"] = float(sum(len(m["position"]) for m in marked.values()))
    started = time.perf_counter()
    offsets = np.cumsum([0] + [scattered[s]["rows"] for s in summaries.shards])
    todo = [(s, int(offsets[i])) for i, s in enumerate(summaries.shards) if scattered[s]["rows"]]
    for start in range(0, len(todo), WRITE_WINDOW):
        window = todo[start : start + WRITE_WINDOW]
        payloads = ((s, (context, offset, marked.get(s))) for s, offset in window)
        written = summaries.run_tasks(_job("dedup write plan", write_shard), payloads)
        for shard, _ in window:
            yield shard, written[shard]
    _step("write", started)


def _job(name: str, function) -> TaskJob:
    return TaskJob(name=name, function=function, resources=Resources(cpus=1))


def _scratch_name(family: str, shard: int) -> str:
    return f"{family}-{shard_name(shard)}.parquet"


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
    row_ids = (np.int64(shard) << np.int64(ROW_BITS)) | np.arange(count, dtype=np.int64)
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


def _write_partitioned(context: PlanContext, family: str, shard: int, table: pa.Table) -> list[int]:
    """One file, a row group per partition in ascending order; returns the partitions, in file order."""
    grouping = table.column("grouping").to_numpy()
    partition = _mix(table.column("value").to_numpy(), grouping.astype(np.uint64)) % np.uint64(context.partitions)
    order = np.argsort(partition, kind="stable")
    table, partition = table.take(order), partition[order]
    present, starts = np.unique(partition, return_index=True)
    ends = [*starts[1:], len(partition)]
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, table.schema, compression="zstd") as writer:
        for start, end in zip(starts, ends, strict=True):
            writer.write_table(table.slice(int(start), int(end - start)), row_group_size=int(end - start))
    context.scratch.write_bytes(_scratch_name(family, shard), buffer.getvalue())
    return [int(p) for p in present]


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
        lookup = pd.Series(images["score"], index=images["image"])
        lookup = lookup[~lookup.index.duplicated()]
        result["image_scores"] = (members, lookup.reindex(members).to_numpy())
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
        where = pd.Series(np.arange(len(faces["row"])), index=faces["row"])
        where = where[~where.index.duplicated()].reindex(members).to_numpy()
        result["face_rows"] = (members, faces["image"][where], faces["score"][where])
    result["task_seconds"] = time.perf_counter() - started
    return result


def _read_groups(context: PlanContext, family: str, groups: list[tuple[int, int]]) -> dict[str, np.ndarray] | None:
    tables = []
    for shard, group in groups:
        with context.scratch.open_read(_scratch_name(family, shard)) as f:
            tables.append(pq.ParquetFile(f).read_row_group(group))
    if not tables:
        return None
    table = pa.concat_tables(tables)
    return {name: table.column(name).to_numpy() for name in table.column_names}


# -- 3. decide (driver) ----------------------------------------------------------------------------
class _Decisions:
    """The driver's part: small, it holds only rows and images that duplicates involve."""

    def __init__(self, config: Any, scattered: dict[int, dict]):
        self.config = config
        # row id -> (decision, row it duplicates or None, identity match, its cosine)
        self.marks: dict[int, tuple[str, int | None, str | None, float]] = {}
        for shard, result in scattered.items():
            for position, (kind, name, cosine) in result["marks"].items():
                self.marks[(shard << ROW_BITS) | position] = (kind, None, name, cosine)
        self.image_duplicates: dict[int, tuple[str, int]] = {}  # image -> (kind, survivor image)
        self.face_duplicates: dict[int, int] = {}  # row -> survivor row (kind face)
        self.pairs = 0  # candidate pairs that passed verification, all groupings: what the driver holds

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
        if not found:
            return
        pairs = unique_pairs([g["face_pairs"] for g in found])
        self.pairs += len(pairs)
        rows = np.concatenate([g["face_rows"][0] for g in found])
        images = np.concatenate([g["face_rows"][1] for g in found])
        scores = np.concatenate([g["face_rows"][2] for g in found])
        rows, first = np.unique(rows, return_index=True)
        images, scores = images[first], scores[first]
        decided = np.array([r in self.marks or i in self.image_duplicates for r, i in zip(rows, images, strict=True)])
        labels = connected_components(np.searchsorted(rows, pairs), len(rows))
        groups = pd.DataFrame({"label": labels, "row": rows, "score": scores})[~decided]
        groups = groups[groups.groupby("label")["label"].transform("size") > 1]
        ranked = groups.sort_values(["label", "score", "row"], ascending=[True, False, True])
        survivors = ranked.groupby("label")["row"].transform("first")
        for row, survivor in zip(ranked["row"], survivors, strict=True):
            if row != survivor:
                self.face_duplicates[int(row)] = int(survivor)

    def requests(self) -> dict[int, tuple[list[int], list[int]]]:
        """Per shard: the images whose faces (and face indices) the decisions need, and single rows."""
        images: dict[int, set[int]] = defaultdict(set)
        rows: dict[int, set[int]] = defaultdict(set)
        for member, (_, survivor) in self.image_duplicates.items():
            for image in (member, survivor):
                images[image >> ROW_BITS].add(image & ((1 << ROW_BITS) - 1))
        for survivor in self.face_duplicates.values():
            rows[survivor >> ROW_BITS].add(survivor & ((1 << ROW_BITS) - 1))
        return {s: (sorted(images[s]), sorted(rows[s])) for s in set(images) | set(rows)}

    def rows(self, found: dict[int, dict]) -> dict[int, dict[str, list]]:
        """Every decided row's decision, the key it duplicates, its identity match: per shard."""
        faces_of: dict[int, list[tuple[int, int]]] = {}  # image -> [(face_index, row)]
        keys: dict[int, str] = {}
        for shard, result in found.items():
            base = shard << ROW_BITS
            for image, faces in result["images"].items():
                faces_of[base | image] = [(index, base | position) for index, position, _ in faces]
                keys.update((base | position, key) for _, position, key in faces)
            keys.update((base | position, key) for position, key in result["rows"].items())
        decided = dict(self.marks)
        for image, (kind, survivor) in sorted(self.image_duplicates.items()):
            survivor_faces = faces_of[survivor]
            by_index = dict(survivor_faces)  # of faces sharing an index the last, as ``decide`` has it
            for index, row in faces_of[image]:
                if row not in decided:
                    decided[row] = (kind, by_index.get(index, survivor_faces[0][1]), None, float("nan"))
        for row, survivor in self.face_duplicates.items():
            decided[row] = ("near_duplicate", survivor, None, float("nan"))
        marked: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for row, (kind, target, name, cosine) in sorted(decided.items()):
            target = _followed(row, decided)
            shard = marked[row >> ROW_BITS]
            shard["position"].append(row & ((1 << ROW_BITS) - 1))
            shard["decision"].append(kind)
            shard["duplicate_of"].append(keys[target] if target is not None else None)
            shard["identity_match"].append(name)
            shard["identity_match_cosine"].append(cosine)
        return {s: dict(v) for s, v in marked.items()}


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
def look_up_shard(shard: int, payload: tuple[PlanContext, list[int], list[int]]) -> dict:
    """The faces (face index, position, key) of the images that start at ``images``; keys of ``rows``."""
    context, images, rows = payload
    table = context.summaries.read(shard, ["image_key", "face_index"])
    keys = table.column("key").to_numpy(zero_copy_only=False)
    codes, _ = pd.factorize(table.column("image_key").to_numpy(zero_copy_only=False))
    face_index = table.column("face_index").to_numpy()
    positions_of = pd.Series(np.arange(len(codes))).groupby(codes).indices
    found: dict[int, list[tuple[int, int, str]]] = {}
    for image in images:
        found[image] = [(int(face_index[p]), int(p), str(keys[p])) for p in positions_of[codes[image]]]
    return {"images": found, "rows": {int(p): str(keys[p]) for p in rows}}


# -- 5. write ------------------------------------------------------------------------------------------
def write_shard(shard: int, payload: tuple[PlanContext, int, dict[str, list] | None]) -> pd.DataFrame:
    """The shard's plan rows, in the columns and types of the driver's plan."""
    context, offset, marked = payload
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
    pixel = table.column("pixel_hash").to_numpy()
    return pd.DataFrame(
        {
            "key": table.column("key").to_numpy(zero_copy_only=False),
            "phash": table.column("phash").to_numpy(),
            "pixel_sha256": [f"{int(v) & ((1 << 64) - 1):016x}" for v in pixel],
            "decision": decision,
            "duplicate_of": duplicate_of,
            "identity_cluster": np.arange(offset, offset + count, dtype=np.int64),
            "identity_cluster_size": np.ones(count, np.int32),
            "identity_match": matched,
            "identity_match_cosine": matched_cosine,
        }
    )
