"""Synthetic facecap datasets of N rows, written directly in facecap's own format (for bench_scale.py).

``write_dataset(folder, rows)`` writes what a finished ``dedup`` stage leaves behind, through the
framework's own writers (``Dataset.commit_shard``, ``SpooledTar``, ``Manifest``), so the format is
exactly what the stages write:

- ``part-NNNNN.parquet``: one row per sample with the schema the worker gives a dedup output (the
  base columns, ingest's ``url``/``alt_text``, then every registered stage's ``produces`` in
  pipeline order), sorted by key. Keys follow the stages' rules (image ``0000001234``, face
  ``0000001234_f0``). Statuses are a mix like a real run's: download and detect rejections
  (image rows, no face columns), quality and tag rejections, ``dedup:exact`` and
  ``dedup:near_duplicate`` rows pointing at the kept face (``duplicate_of``), and ok faces; the
  columns of the stages after the one that rejected a row are null, as the runner leaves them.
- ``part-NNNNN.tar``: a ``KEY.square.jpg`` member (a real 32x32 JPEG, one of a few variants) for
  every face that passed detect, as detect stores its square crops.
- ``_stats/part-NNNNN.json``: counts by status and the per-shard ``summary`` the worker writes
  (``shard_summary(summary_frame(table, measures), measures)`` with every registered stage's
  ``report_measures()``), then ``_done`` markers and a complete ``_manifest.json``.
- ``_summary/``: dedup's pass-1 output (its per-row fingerprints: image, bytes, pixel and URL
  hashes, image and face pHash, survivor score) for every row that reached dedup, with the planted
  duplicates: each ``dedup:*`` row's image is a copy of an earlier kept image in any shard
  (``exact``: same bytes; ``near_duplicate``: its pHash with 1-3 bits flipped). The fingerprints
  are written here rather than computed by the dedup stage's pass 1 (which decodes every image
  and crop on the workers): that is what lets N reach millions on this machine, and the step
  being measured is the decision (pass 2) on the driver.

Everything about an image (its kind, number of faces, statuses, hashes) is a hash of its index, so
shards are generated independently (in parallel) and a copy's original is known without reading it.
"""

from __future__ import annotations

import functools
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facecap.pipeline.dataset import (
    BASE_COLUMNS,
    Dataset,
    Manifest,
    MediaRef,
    ShardStats,
    SpooledTar,
    config_hash,
    shard_name,
)
from facecap.pipeline.registry import discover, report_measures
from facecap.pipeline.storage import Storage
from facecap.pipeline.summary import shard_summary, summary_frame
from facecap.pipeline.worker import summary_uri

# The stored crops: 32x32 (about 1.5 KB) by default; SCALE_CROP_SIDE=320 gives FaceCaption-like
# crops of about 40 KB (bench_export.py), with the noise that makes a JPEG that large.
CROP_SIDE = int(os.environ.get("SCALE_CROP_SIDE", "32"))
CROP_NOISE = 2.0 if CROP_SIDE <= 64 else 30.0
CROP_VARIANTS = 8
FACE_EXT = "square.jpg"
MASK64 = (1 << 64) - 1

# What an image becomes (shares of images): rejected before detect, no face, or 1-3 faces.
IMAGE_KINDS = (("download:http_404", 0.05), ("download:truncated_image", 0.01), ("detect:no_face", 0.10))
IMAGE_ERRORS = {
    "download:http_404": "HTTP 404",
    "download:truncated_image": "the JPEG ends before its end-of-image marker",
}
FACE_COUNTS = (1, 1, 1, 1, 2, 2, 3)  # faces of a face image, drawn uniformly
# What a face becomes (shares of faces of an original image): rejected by quality or tag, or ok.
FACE_STATUSES = (
    ("quality:min_face_side", 0.10, "q_face_side >= 128 is false"),
    ("quality:sharpness", 0.04, "q_sharpness >= 20 is false"),
    ("tag:too_few_attributes", 0.04, "0 attributes above 0.85 (need 1)"),
)
EXACT_COPIES = 0.01  # shares of face images that are copies of an earlier image
NEAR_COPIES = 0.04
# SCALE_EMBEDDINGS=1: dedup's summaries carry a 128-d float16 embedding a face (else none), for the
# embedding and identity kinds: a copy's is its original's (a resized copy's moved a little), and
# PERSON_SHARE of the faces are one of SCALE_PEOPLE people (cosine about 0.65 to each other).
EMBEDDINGS = os.environ.get("SCALE_EMBEDDINGS") == "1"
EMBEDDING_DIM = 128
PEOPLE = int(os.environ.get("SCALE_PEOPLE", "20000"))
PERSON_SHARE = 0.3
STAGE_ORDER = ("download", "detect", "quality", "tag", "caption", "dedup")

WORDS = (
    "young",
    "old",
    "middle-aged",
    "smiling",
    "serious",
    "woman",
    "man",
    "person",
    "girl",
    "boy",
    "beard",
    "glasses",
    "hat",
    "wavy",
    "straight",
    "dark",
    "blond",
    "short",
    "long",
    "hair",
    "looks",
    "faces",
    "camera",
    "left",
    "right",
    "light",
    "studio",
    "outdoor",
    "portrait",
    "close-up",
)


@dataclass(frozen=True)
class Plan:
    """Which images and faces a shard holds (every field one entry per row)."""

    image: np.ndarray  # image index
    face: np.ndarray  # face index, -1 for an image row
    status: np.ndarray  # object array of statuses
    original: np.ndarray  # for a dedup copy, the image index it copies; else -1


def _mix(values: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of (values + salt): a fixed pseudo-random 64-bit value per index."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64((salt * 0x9E3779B97F4A7C15) & MASK64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _unit(values: np.ndarray, salt: int) -> np.ndarray:
    return (_mix(values, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def image_kind(images: np.ndarray, seed: int) -> np.ndarray:
    """Per image: the status of an image rejected before it has faces, or '' for a face image."""
    u = _unit(images, seed + 1)
    kinds = np.full(len(images), "", dtype=object)
    edge = 0.0
    for status, share in IMAGE_KINDS:
        kinds[(u >= edge) & (u < edge + share)] = status
        edge += share
    return kinds


def copy_kind(images: np.ndarray, seed: int) -> np.ndarray:
    """Per face image: 'dedup:exact', 'dedup:near_duplicate' (a planted copy) or ''."""
    u = _unit(images, seed + 2)
    kinds = np.full(len(images), "", dtype=object)
    kinds[u < EXACT_COPIES] = "dedup:exact"
    kinds[(u >= EXACT_COPIES) & (u < EXACT_COPIES + NEAR_COPIES)] = "dedup:near_duplicate"
    kinds[images < 1000] = ""  # the first images have nothing before them to copy
    return kinds


def face_count(images: np.ndarray, seed: int) -> np.ndarray:
    counts = np.array(FACE_COUNTS)[(_mix(images, seed + 3) % np.uint64(len(FACE_COUNTS))).astype(np.int64)]
    counts[copy_kind(images, seed) != ""] = 1  # a copy is of one face
    return counts


def face_status(images: np.ndarray, faces: np.ndarray, seed: int) -> np.ndarray:
    u = _unit(images * np.uint64(8) + faces.astype(np.uint64), seed + 4)
    statuses = np.full(len(images), "ok", dtype=object)
    edge = 0.0
    for status, share, _ in FACE_STATUSES:
        statuses[(u >= edge) & (u < edge + share)] = status
        edge += share
    return statuses


def original_of(images: np.ndarray, shard_rows: int, seed: int) -> np.ndarray:
    """The image a copy copies: an earlier face image (any shard) whose first face is kept, and no copy.

    Only the first quarter of a shard's image indices is drawn from: a shard of ``shard_rows`` rows
    holds at least a third of that many images, whatever their faces."""
    found = np.full(len(images), -1, np.int64)
    todo = np.arange(len(images))
    for attempt in range(64):
        if not len(todo):
            break
        drawn = (_mix(images[todo], seed + 100 + attempt) % images[todo].astype(np.uint64)).astype(np.int64)
        candidate = drawn // shard_rows * shard_rows + drawn % shard_rows % max(1, shard_rows // 4)
        ok = (
            (candidate < images[todo].astype(np.int64))
            & (image_kind(candidate, seed) == "")
            & (copy_kind(candidate, seed) == "")
            & (face_status(candidate.astype(np.uint64), np.zeros(len(candidate), np.int64), seed) == "ok")
        )
        found[todo[ok]] = candidate[ok]
        todo = todo[~ok]
    if len(todo):
        raise RuntimeError("no original found for some copies")
    return found


def plan_shard(shard: int, rows: int, shard_rows: int, seed: int) -> Plan:
    """The rows of shard ``shard``: its images are indices shard * shard_rows onwards, cut at ``rows``."""
    first = shard * shard_rows
    images = np.arange(first, first + rows, dtype=np.uint64)  # at most one row an image is needed
    kinds = image_kind(images, seed)
    counts = np.where(kinds == "", face_count(images, seed), 1)
    ends = np.cumsum(counts)
    last = int(np.searchsorted(ends, rows))  # the image whose rows reach ``rows``
    images, kinds, counts = images[: last + 1], kinds[: last + 1], counts[: last + 1].copy()
    counts[-1] -= int(ends[last]) - rows
    row_image = np.repeat(images, counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    row_face = np.arange(len(row_image)) - starts
    row_kind = np.repeat(kinds, counts)
    is_face = row_kind == ""
    row_face = np.where(is_face, row_face, -1)
    status = np.where(is_face, face_status(row_image, np.maximum(row_face, 0), seed), row_kind).astype(object)
    copies = np.repeat(copy_kind(images, seed), counts)
    status[is_face & (copies != "")] = copies[is_face & (copies != "")]
    original = np.full(len(row_image), -1, np.int64)
    copy_rows = np.flatnonzero(is_face & (copies != ""))
    if len(copy_rows):
        original[copy_rows] = original_of(row_image[copy_rows], shard_rows, seed)
    return Plan(row_image.astype(np.int64), row_face.astype(np.int64), status, original)


def image_hashes(images: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """An image's fingerprints as pass 1 computes them (int64, as stored): pHash, bytes, pixels, URL."""
    images = images.astype(np.uint64)
    return {
        "phash": _mix(images, seed + 10).view(np.int64),
        "bytes_hash": _mix(images, seed + 11).view(np.int64),
        "pixel_hash": _mix(images, seed + 12).view(np.int64),
        "url_hash": _mix(images, seed + 13).view(np.int64),
    }


def copy_hashes(plan: Plan, seed: int) -> dict[str, np.ndarray]:
    """The fingerprints of every row's image, planted copies made from their originals'."""
    hashes = image_hashes(plan.image, seed)
    copies = np.flatnonzero(plan.original >= 0)
    if not len(copies):
        return hashes
    source = image_hashes(plan.original[copies], seed)
    exact = plan.status[copies] == "dedup:exact"
    for name in ("phash", "bytes_hash", "pixel_hash"):
        hashes[name][copies[exact]] = source[name][exact]
    near = copies[~exact]
    if len(near):  # 1-3 distinct bits of the original's pHash flipped
        flips = np.zeros(len(near), np.uint64)
        want = 1 + (_mix(plan.image[near].astype(np.uint64), seed + 20) % np.uint64(3)).astype(np.int64)
        for step in range(3):
            bit = _mix(plan.image[near].astype(np.uint64), seed + 21 + step) % np.uint64(64)
            flips |= np.where(step < want, np.uint64(1) << bit, np.uint64(0))
        hashes["phash"][near] = (source["phash"][~exact].view(np.uint64) ^ flips).view(np.int64)
    return hashes


def crop_hashes(plan: Plan, hashes: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """Each row's face-crop pHash. A first face's is as near its original's as the image pHashes are
    (a copy's crop moves with it): the image pHash XOR a mask drawn from the original image, so
    that it shares no bits with the image pHash by construction (a real aligned crop's pHash does
    not: with equal bits the face kind's second key would add nothing to its first). Other faces
    get unrelated hashes."""
    source = np.where(plan.original >= 0, plan.original, plan.image).astype(np.uint64)
    first_face = hashes["phash"].view(np.uint64) ^ _mix(source, seed + 31)
    other = _mix(plan.image * 8 + plan.face, seed + 30)
    return np.where(plan.face == 0, first_face, other).view(np.int64)


def _normals(ids: np.ndarray, salt: int) -> np.ndarray:
    """EMBEDDING_DIM standard normals for each id, a fixed function of it (Box-Muller on splitmix)."""
    cells = ids.astype(np.uint64)[:, None] * np.uint64(EMBEDDING_DIM) + np.arange(EMBEDDING_DIM, dtype=np.uint64)
    first = np.maximum(_unit(cells, salt), 1e-300)
    second = _unit(cells, salt + 1)
    return np.sqrt(-2.0 * np.log(first)) * np.cos(2.0 * np.pi * second)


def face_embeddings(plan: Plan, rows: np.ndarray, seed: int) -> pa.Array:
    """The float16 embedding of each of ``rows`` as pass 1 stores it (EMBEDDINGS), else nulls."""
    if not EMBEDDINGS:
        return pa.nulls(len(rows), pa.binary())
    copied = plan.original[rows] >= 0
    # A copy shows its original's first face (copies have one face).
    image = np.where(copied, plan.original[rows], plan.image[rows]).astype(np.uint64)
    face = np.where(copied, 0, plan.face[rows]).astype(np.uint64)
    ids = image * np.uint64(8) + face
    vectors = _normals(ids, seed + 40)
    person = np.flatnonzero(_unit(ids, seed + 41) < PERSON_SHARE)
    if len(person):
        centre = _normals(_mix(ids[person], seed + 42) % np.uint64(PEOPLE), seed + 43)
        centre /= np.linalg.norm(centre, axis=1, keepdims=True)
        vectors[person] = centre + 0.065 * vectors[person]  # about 0.8 to the centre
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    resized = np.flatnonzero(copied & (plan.status[rows] == "dedup:near_duplicate"))
    if len(resized):  # cosine about 0.97 to the original's
        moved = vectors[resized] + 0.02 * _normals(plan.image[rows][resized], seed + 44)
        vectors[resized] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
    values = vectors.astype(np.float16)
    return pa.array([v.tobytes() for v in values], pa.binary())


def _crops() -> list[bytes]:
    import cv2

    rng = np.random.default_rng(7)
    crops = []
    for _ in range(CROP_VARIANTS):
        y, x = np.mgrid[0:CROP_SIDE, 0:CROP_SIDE]
        base = rng.integers(60, 200, 3)
        pixels = np.stack([base[c] + 30 * np.sin((x + y * (c + 1)) / 5.0) for c in range(3)], axis=-1)
        pixels += rng.normal(0, CROP_NOISE, pixels.shape)
        _, data = cv2.imencode(".jpg", np.clip(pixels, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 75])
        crops.append(data.tobytes())
    return crops


@functools.cache
def _measures() -> tuple:
    discover("facecap.stages")
    return report_measures()


@functools.cache
def _stage_columns() -> dict[str, dict[str, pa.DataType]]:
    stages = discover("facecap.stages")
    return {name: dict(stages[name].produces) for name in STAGE_ORDER}


def schema() -> pa.Schema:
    """A dedup output's columns: base, ingest's, then each stage's ``produces`` in pipeline order."""
    fields = dict(BASE_COLUMNS)
    fields.update({"url": pa.string(), "alt_text": pa.string(), "source_file": pa.string(), "source_row": pa.int64()})
    for columns in _stage_columns().values():
        fields.update(columns)
    return pa.schema([pa.field(name, dtype) for name, dtype in fields.items()])


def _reached(status: np.ndarray) -> dict[str, np.ndarray]:
    """Per stage, which rows have its columns filled: rows not rejected by an earlier stage."""
    stage_of = np.array([s.split(":", 1)[0] if s != "ok" else "ok" for s in status], dtype=object)
    position = {name: i for i, name in enumerate(STAGE_ORDER)}
    rejected_at = np.array([position.get(s, len(STAGE_ORDER)) for s in stage_of])
    return {name: rejected_at >= i for i, name in enumerate(STAGE_ORDER)}


def _generic(dtype: pa.DataType, n: int, rng: np.random.Generator) -> pa.Array:
    """A plausible value of a column no override covers."""
    if pa.types.is_floating(dtype):
        return pa.array(rng.random(n).astype(np.float32), dtype)
    if pa.types.is_integer(dtype):
        return pa.array(rng.integers(0, 100, n), dtype)
    if pa.types.is_boolean(dtype):
        return pa.array(rng.random(n) < 0.5, dtype)
    if pa.types.is_string(dtype):
        return pa.array(np.array(["alpha", "beta", "gamma", "delta"], dtype=object)[rng.integers(0, 4, n)], dtype)
    if pa.types.is_list(dtype):
        return pa.array([[] for _ in range(n)], dtype)
    return pa.nulls(n, dtype)


def _captions(n: int, rng: np.random.Generator) -> list[list[str]]:
    words = np.array(WORDS, dtype=object)
    out = []
    counts = rng.integers(1, 4, n)
    lengths = rng.integers(6, 16, (n, 3))
    picks = rng.integers(0, len(words), (n, 3, 16))
    for i in range(n):
        out.append([" ".join(words[picks[i, c, : lengths[i, c]]]).capitalize() + "." for c in range(counts[i])])
    return out


def shard_table(plan: Plan, hashes: dict[str, np.ndarray], seed: int, shard: int) -> pa.Table:
    n = len(plan.image)
    rng = np.random.default_rng([seed, shard])
    target = schema()
    images = plan.image
    image_keys = np.array([f"{i:010d}" for i in images], dtype=object)
    is_face = plan.face >= 0
    keys = np.where(is_face, [f"{k}_f{f}" for k, f in zip(image_keys, plan.face, strict=True)], image_keys)
    errors = np.full(n, None, dtype=object)
    for status, message in IMAGE_ERRORS.items():
        errors[plan.status == status] = message
    for status, _, message in FACE_STATUSES:
        errors[plan.status == status] = message
    duplicate_of = np.full(n, None, dtype=object)
    copies = np.flatnonzero(plan.original >= 0)
    duplicate_of[copies] = [f"{o:010d}_f0" for o in plan.original[copies]]
    for i in copies:
        errors[i] = f"{plan.status[i].split(':', 1)[1].replace('_', ' ')} of {duplicate_of[i]}"
    side = rng.lognormal(5.0, 0.5, n).clip(40, 2000)
    width = (rng.lognormal(6.7, 0.4, n)).clip(200, 4000).astype(np.int32)
    columns: dict[str, object] = {
        "key": keys,
        "status": plan.status,
        "error": errors,
        "url": [f"https://img{i % 97}.example.com/photos/{i}.jpg" for i in images],
        "alt_text": [f"{WORDS[i % len(WORDS)]} {WORDS[(i // 7) % len(WORDS)]} photo" for i in images],
        "source_file": np.full(n, "laion_face_part_00000.parquet", dtype=object),
        "source_row": images,
        "http_status": np.full(n, 200, np.int32),
        "mime": np.full(n, "image/jpeg", dtype=object),
        "original_width": width,
        "original_height": (width * rng.uniform(0.6, 1.4, n)).astype(np.int32),
        "image_key": np.where(is_face, image_keys, None),
        "face_index": np.where(is_face, plan.face, 0).astype(np.int16),
        "box": [[float(x), float(y), float(x + s), float(y + s)] for x, y, s in zip(side, side, side, strict=True)],
        "landmarks": [list(rng.random(10).astype(float) * 100) for _ in range(n)],
        "det_score": rng.uniform(0.85, 1.0, n),
        "face_width": side,
        "face_height": side * 1.2,
        "detector": np.full(n, "yunet", dtype=object),
        "detector_model": np.full(n, "yunet-int8", dtype=object),
        "q_face_side": side,
        "q_sharpness": rng.lognormal(5.0, 1.0, n),
        "q_brisque": rng.normal(30, 10, n),
        "q_yaw": rng.normal(0, 20, n),
        "quality_failed": [[] for _ in range(n)],
        "age": rng.uniform(5, 80, n).round(),
        "gender": np.array(["male", "female"], dtype=object)[rng.integers(0, 2, n)],
        "skin_monk": rng.integers(1, 11, n).astype(np.int8),
        "caption": _captions(n, rng),
        "caption_short": ["A close-up of a person." for _ in range(n)],
        "caption_provenance": np.full(n, json.dumps({"captioner": "template", "engine": "grammar"}), dtype=object),
        "phash": hashes["phash"],
        "pixel_sha256": [f"{int(v) & MASK64:016x}" for v in hashes["pixel_hash"]],
        "duplicate_of": duplicate_of,
        "identity_cluster": np.arange(n, dtype=np.int64) + shard * 10_000_000,
        "identity_cluster_size": np.ones(n, np.int32),
    }
    reached = _reached(plan.status)
    owner = {name: stage for stage, cols in _stage_columns().items() for name in cols}
    arrays = []
    for field in target:
        if field.name in columns:
            array = pa.array(columns[field.name], field.type, from_pandas=True)
        elif field.name.startswith("attr_") and pa.types.is_floating(field.type):
            array = pa.array(rng.beta(0.5, 0.5, n).astype(np.float32), field.type)
        else:
            array = _generic(field.type, n, rng)
        stage = owner.get(field.name)
        keep = reached[stage] & is_face if stage in ("detect", "quality", "tag", "caption", "dedup") else None
        if stage == "download":
            keep = reached["detect"]  # rows rejected by download have no download columns either
        if keep is not None and not keep.all():
            array = pc.if_else(pa.array(keep), array, pa.nulls(n, field.type))
        arrays.append(array)
    return pa.table(arrays, schema=target)


def summary_table(plan: Plan, hashes: dict[str, np.ndarray], table: pa.Table, seed: int) -> pa.Table:
    """Dedup's pass-1 rows for the rows that reached dedup (ok then): its fingerprints and score."""
    reached = np.flatnonzero((plan.status == "ok") | np.char.startswith(plan.status.astype(str), "dedup:"))
    frame = table.select(["key", "image_key", "face_index", "face_width", "face_height", "det_score", "q_brisque"])
    frame = frame.take(pa.array(reached)).to_pandas()
    score = frame["face_width"] + frame["face_height"] + 100.0 * frame["det_score"] - frame["q_brisque"]
    face_phash = crop_hashes(plan, hashes, seed)[reached]
    out = pd.DataFrame(
        {
            "key": frame["key"],
            "image_key": frame["image_key"],
            "face_index": frame["face_index"].astype(np.int64),
            **{name: hashes[name][reached] for name in ("bytes_hash", "pixel_hash", "url_hash", "phash")},
            "face_phash": face_phash,
            "score": score.astype(np.float64),
        }
    )
    summary = pa.Table.from_pandas(out, preserve_index=False)
    embeddings = face_embeddings(plan, reached, seed)
    summary = summary.add_column(summary.schema.get_field_index("score"), "embedding", embeddings)
    summary = summary.append_column("_status", pa.nulls(len(out), pa.string()))
    return summary.append_column("_error", pa.nulls(len(out), pa.string()))


def write_shard(folder: str, shard: int, rows: int, shard_rows: int, seed: int) -> dict:
    measures = _measures()
    plan = plan_shard(shard, rows, shard_rows, seed)
    hashes = copy_hashes(plan, seed)
    table = shard_table(plan, hashes, seed, shard)
    dataset = Dataset.at(folder)
    crops = _crops()
    spool = SpooledTar()
    try:
        passed_detect = _reached(plan.status)["quality"] & (plan.face >= 0)
        keys = table.column("key").to_pylist()
        for i in np.flatnonzero(passed_detect):
            spool.add(keys[i], {FACE_EXT: crops[int(plan.image[i]) % CROP_VARIANTS]})
        with dataset.storage.open_write(f"{shard_name(shard)}.tar") as stream:
            digest = spool.write_sorted(stream)
    finally:
        spool.close()
    by_status = dict(pd.Series(plan.status).value_counts().items())
    stats = ShardStats(
        shard=shard,
        rows_in=table.num_rows,
        rows_out=table.num_rows,
        by_status={str(k): int(v) for k, v in by_status.items()},
        seconds=0.0,
        node="synthetic",
        summary=shard_summary(summary_frame(table, measures), measures),
    )
    dataset.commit_shard(shard, table, digest, stats)
    summary = summary_table(plan, hashes, table, seed)
    summary_stats = ShardStats(
        shard, summary.num_rows, summary.num_rows, {"ok": summary.num_rows}, 0.0, node="synthetic"
    )
    Dataset.at(summary_uri(dataset.uri)).commit_shard(shard, summary, None, summary_stats)
    return {
        "rows": table.num_rows,
        "ok": by_status.get("ok", 0),
        "copies": int((plan.original >= 0).sum()),
        "tar_bytes": digest.size,
    }


def _write_shards(write, uri: str, sizes: list[int], shard_rows: int, seed: int, workers: int):
    """Each shard's counts from ``write``; one worker writes in this process (a test's process has
    threads, and a child forked from it could hang on a lock one of them held)."""
    if workers <= 1:
        for shard, size in enumerate(sizes):
            yield write(uri, shard, size, shard_rows, seed)
        return
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(write, uri, s, size, shard_rows, seed) for s, size in enumerate(sizes)]
        for future in futures:
            yield future.result()


def write_summary_shard(folder: str, shard: int, rows: int, shard_rows: int, seed: int) -> dict:
    """Only what dedup's plan reads: the shard's pass-1 summary, and its planted pairs under ``_truth``.

    The same rows, fingerprints and planted copies as ``write_shard`` (the same plan and hashes);
    the survivor score is drawn here from the same distributions instead of the written columns."""
    plan = plan_shard(shard, rows, shard_rows, seed)
    hashes = copy_hashes(plan, seed)
    reached = np.flatnonzero((plan.status == "ok") | np.char.startswith(plan.status.astype(str), "dedup:"))
    rng = np.random.default_rng([seed, shard, 1])
    image_keys = np.array([f"{i:010d}" for i in plan.image[reached]], dtype=object)
    keys = np.array([f"{k}_f{f}" for k, f in zip(image_keys, plan.face[reached], strict=True)], dtype=object)
    side = rng.lognormal(5.0, 0.5, len(reached)).clip(40, 2000)
    score = side + 1.2 * side + 100.0 * rng.uniform(0.85, 1.0, len(reached)) - rng.normal(30, 10, len(reached))
    face_phash = crop_hashes(plan, hashes, seed)[reached]
    summary = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "image_key": pa.array(image_keys, pa.string()),
            "face_index": plan.face[reached].astype(np.int64),
            **{name: hashes[name][reached] for name in ("bytes_hash", "pixel_hash", "url_hash", "phash")},
            "face_phash": face_phash,
            "embedding": face_embeddings(plan, reached, seed),
            "score": score.astype(np.float64),
            "_status": pa.nulls(len(reached), pa.string()),
            "_error": pa.nulls(len(reached), pa.string()),
        }
    )
    stats = ShardStats(shard, summary.num_rows, summary.num_rows, {"ok": summary.num_rows}, 0.0, node="synthetic")
    Dataset.at(summary_uri(folder)).commit_shard(shard, summary, None, stats)
    copies = np.flatnonzero(plan.original >= 0)
    truth = pa.table(
        {
            "key": [f"{i:010d}_f{f}" for i, f in zip(plan.image[copies], plan.face[copies], strict=True)],
            "duplicate_of": [f"{o:010d}_f0" for o in plan.original[copies]],
        }
    )
    Storage(folder).write_bytes(f"_truth/{shard_name(shard)}.parquet", _parquet_bytes(truth))
    return {"rows": summary.num_rows, "ok": 0, "copies": len(copies), "tar_bytes": 0}


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def write_summaries(folder: str, rows: int, shard_rows: int = 10_000, seed: int = 0, workers: int = 2) -> dict:
    """Only dedup's input (``write_summary_shard`` per shard): a tenth of the disk and time of a dataset."""
    os.makedirs(folder, exist_ok=False)
    shards = -(-rows // shard_rows)
    sizes = [min(shard_rows, rows - s * shard_rows) for s in range(shards)]
    totals = {"rows": 0, "ok": 0, "copies": 0, "tar_bytes": 0}
    for counts in _write_shards(write_summary_shard, folder, sizes, shard_rows, seed, workers):
        for name, value in counts.items():
            totals[name] += value
    return {**totals, "shards": shards}


def write_dataset(folder: str, rows: int, shard_rows: int = 10_000, seed: int = 0, workers: int = 2) -> dict:
    """Write a finished dedup dataset of ``rows`` rows into ``folder`` (which must not exist yet)."""
    from facecap.stages.dedup.stage import DedupConfig

    os.makedirs(folder, exist_ok=False)
    dataset = Dataset.at(folder)
    shards = -(-rows // shard_rows)
    sizes = [min(shard_rows, rows - s * shard_rows) for s in range(shards)]
    config = DedupConfig().model_dump(mode="json")
    manifest = Manifest(
        stage="dedup",
        config=config,
        config_hash=config_hash({"synthetic": True, "rows": rows, "shard_rows": shard_rows, "seed": seed}),
        media={"square": MediaRef(root=dataset.uri, ext=FACE_EXT)},
        num_shards=shards,
        recipe={"name": "scale-synthetic", "rows": rows, "shard_rows": shard_rows, "seed": seed},
    )
    dataset.write_manifest(manifest)
    totals = {"rows": 0, "ok": 0, "copies": 0, "tar_bytes": 0}
    for counts in _write_shards(write_shard, dataset.uri, sizes, shard_rows, seed, workers):
        for name, value in counts.items():
            totals[name] += value
    manifest.complete = True
    dataset.write_manifest(manifest)
    return {**totals, "shards": shards}
