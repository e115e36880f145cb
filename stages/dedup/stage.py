"""Dedup: exact, perceptual, embedding and identity duplicates across the whole dataset.

A global stage (docs/architecture.md): every shard is fingerprinted on the workers (pass 1: a
digest of the stored image bytes, a digest of the decoded pixels, the normalised URL, a
64-bit pHash of the image and of the face crop, an SFace embedding of the aligned face, and a
survivor score); the fingerprints of all rows are grouped (pass 2: on the driver, ``decide``, or
from ``partitioned_from_rows`` faces on fanned out over the workers, ``partitioned.py``, whatever
the kinds) and every shard then gets its decisions (pass 3). Kinds, in order of precedence:

- ``opted_out_identity``: the face is a person who opted out (``opt_out_faces``: their photos;
  ``opt_out_embeddings``: the list file of ``facecap optout``); the person's name goes to
  ``identity_match``, never a photo.
- ``eval_identity``: the face is of an identity present in an evaluation set (``against_identities``).
- ``eval_overlap``: the image is a near-duplicate of an image in ``against`` (held-out eval data).
- ``exact``: same bytes, same decoded pixels, or same normalised URL as an image kept elsewhere.
- ``near_duplicate``: image pHashes within ``phash_radius`` bits (resized, re-encoded, lightly
  cropped copies); or (kind ``face``, no model) aligned face crops within ``face_crop_radius`` pHash
  bits whose images are within ``face_crop_image_radius`` (a copy cropped by a few percent); or the
  same face re-cropped: face embeddings with cosine >= ``face_cosine`` whose face crops' pHashes
  are within ``face_phash_radius`` (two photos of one person differ there).
- ``identity_cap``: more than ``identity_cap`` faces of one identity cluster (cosine >=
  ``identity_cosine``); the best-scored are kept.

Exact and perceptual kinds group images: every face of a duplicate image is a duplicate of the
face with the same index in the survivor image (or of its first face). Within a group the row
with the highest score survives; the others say which key they duplicate in ``duplicate_of``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

from facecap.pipeline.errors import ConfigError
from facecap.pipeline.models import ModelMissing
from facecap.pipeline.registry import register
from facecap.pipeline.stage import Batch, GlobalStage, Output, Resources, StageConfig, Summaries
from facecap.stages.dedup.hashing import FaceEmbedder, digest64, normalised_url, phash, pixel_digest
from facecap.stages.dedup.index import (
    UnionFind,
    close_faces,
    cosine_pairs,
    equal_pairs,
    face_candidates,
    hamming_pairs,
    identity_lsh_bits,
    unique_pairs,
)
from facecap.stages.dedup.partitioned import PARTITIONED_KINDS, plan_partitioned
from facecap.stages.shared.identity import (
    DEFAULT_EMBEDDING_MODEL,
    IDENTITY_COSINE,
    OptOutList,
    embedding_model,
    match,
    reference_people,
)
from facecap.stages.shared.images import decode_bgr

Kind = Literal["exact", "near", "face", "embedding", "identity"]
PRECEDENCE = ("opted_out_identity", "eval_identity", "eval_overlap", "exact", "near_duplicate", "identity_cap")
IDENTITY_OPTIONS = ("opt_out_faces", "opt_out_embeddings", "against_identities")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DedupConfig(StageConfig):
    kinds: list[Kind] = Field(
        # The embedding and identity kinds need MobileFaceNet (FACECAP_MODELS); recipes turn them on.
        default_factory=lambda: ["exact", "near", "face"],
        description="which dedup kinds run: exact, near, face, embedding, identity",
    )
    phash_radius: int = Field(4, ge=0, le=12, description="images within this many pHash bits are near-duplicates")
    # The face kind (no model): a cropped or re-encoded copy moves the detector's landmarks, so the
    # aligned crop's pHash drifts more than the image's; both must agree. Measured in docs/dedup.md.
    face_crop_radius: int = Field(8, ge=0, le=20, description="face kind: aligned-crop pHashes within this many bits")
    face_crop_image_radius: int = Field(
        12, ge=0, le=20, description="face kind: ... and their images' pHashes within this many bits"
    )
    face_cosine: float = Field(0.9, ge=0, le=1, description="same face crop: embeddings at least this similar ...")
    face_phash_radius: int = Field(10, ge=0, le=32, description="... and face-crop pHashes within this many bits")
    identity_cosine: float = Field(0.5, ge=0, le=1, description="faces of one identity (SFace cosine)")
    identity_cap: int | None = Field(None, ge=1, description="keep at most this many faces per identity cluster")
    against: str | None = Field(
        None, description="folder of held-out eval images (or a facecap dataset) to decontaminate against"
    )
    opt_out_faces: str | None = Field(
        None, description="photos of people who opted out: a subfolder per person, or one photo per file"
    )
    opt_out_embeddings: str | None = Field(
        None, description="an opt-out list file (facecap optout add): people kept as embeddings only"
    )
    against_identities: str | None = Field(
        None, description="folder of eval images: faces of any identity in them are marked dedup:eval_identity"
    )
    identity_match_cosine: float = Field(
        IDENTITY_COSINE, ge=0, le=1, description="opt-out and eval identities: cosine to any of a person's photos"
    )
    embedding_model: str = Field(
        DEFAULT_EMBEDDING_MODEL,
        description="face-embedding model: a registry name, or an ArcFace-class .onnx (a path or in FACECAP_MODELS)",
    )
    score: dict[str, float] = Field(
        default_factory=lambda: {"face_width": 1.0, "face_height": 1.0, "det_score": 100.0, "q_brisque": -1.0},
        description="survivor score: weighted sum of these columns (missing ones count 0)",
    )
    lsh_tables: int = Field(16, ge=1, le=64, description="LSH tables for embedding search (more: better recall)")
    # The driver's plan holds every face's fingerprints (about 0.8 GB a million faces measured);
    # the partitioned one holds only what duplicates and identity clusters involve. docs/dedup.md
    # "Scale and memory".
    partitioned_from_rows: int = Field(
        2_000_000,
        ge=0,
        description="plan across the workers from this many summarized faces on (any kinds); below it on the driver",
    )
    partition_rows: int = Field(
        500_000,
        ge=1_000,
        description="partitioned plan: summarized faces per grouping partition (one task each); "
        "embedding and identity: LSH records (a face per table) per partition",
    )


@register
class DedupStage(GlobalStage):
    name = "dedup"
    order = 70
    help = "Remove exact, perceptual, same-face and over-represented-identity duplicates; decontaminate eval sets."
    config_model = DedupConfig
    consumes = ("image_key",)
    produces: ClassVar[dict[str, pa.DataType]] = {
        "phash": pa.int64(),
        "pixel_sha256": pa.string(),
        "duplicate_of": pa.string(),
        "identity_cluster": pa.int64(),
        "identity_cluster_size": pa.int32(),
        "identity_match": pa.string(),
        "identity_match_cosine": pa.float32(),
    }
    reads_media: ClassVar[dict[str, str]] = {"image": "image_key", "aligned112": "key"}
    batch_by = "image_key"
    resources = Resources(cpus=1, batch_size=64, actor=True)

    def __init__(self, config: DedupConfig):
        super().__init__(config)
        self.config: DedupConfig = config
        self.embedder: FaceEmbedder | None = None

    @classmethod
    def preflight(cls, config: DedupConfig) -> None:
        if {"embedding", "identity"} & set(config.kinds):
            embedding_model(config.embedding_model)
        if _identity_options(config):
            _identities(config)  # the model, every photo and the list file: refused here, before any shard
        if config.against and not Path(config.against).exists():
            raise ConfigError(f"dedup.against {config.against}: no such folder")
        if config.identity_cap and "identity" not in config.kinds:
            raise ConfigError("dedup.identity_cap needs 'identity' in dedup.kinds")

    def setup(self) -> None:
        if _wants_vectors(self.config):
            self.embedder = FaceEmbedder(self.config.embedding_model)

    # -- pass 1 -------------------------------------------------------------------------------
    def summarize(self, batch: Batch) -> pd.DataFrame:
        rows = batch.rows.reset_index(drop=True)
        images: dict[str, tuple[int, int]] = {}
        out: dict[str, list[Any]] = {name: [] for name in _SUMMARY}
        for row in rows.to_dict("records"):
            image_key = row["image_key"]
            if image_key not in images:
                data = batch.media_of("image", image_key)
                pixels = decode_bgr(data)
                if pixels is None:
                    raise ValueError(f"image {image_key} does not decode")
                images[image_key] = (digest64(data), pixel_digest(pixels), phash(pixels))
            crop = decode_bgr(batch.media_of("aligned112", row["key"]))
            if crop is None:
                raise ValueError(f"face crop {row['key']} does not decode")
            bytes_hash, pixel_hash, image_phash = images[image_key]
            embedding = self.embedder.embed(crop).astype(np.float16).tobytes() if self.embedder else None
            values = {
                "key": row["key"],
                "image_key": image_key,
                "face_index": int(row.get("face_index") or 0),
                "bytes_hash": bytes_hash,
                "pixel_hash": pixel_hash,
                "url_hash": digest64(normalised_url(str(row.get("url") or "")).encode()),
                "phash": image_phash,
                "face_phash": phash(crop),
                "embedding": embedding,
                "score": _score(row, self.config.score),
            }
            for name, value in values.items():
                out[name].append(value)
        return pd.DataFrame(out)

    # -- pass 2 -------------------------------------------------------------------------------
    @classmethod
    def plan(cls, config: DedupConfig, summaries: Summaries):
        rows = summaries.count_rows() if partitioned(config) else 0
        if partitioned(config) and rows >= config.partitioned_from_rows:
            yield from plan_partitioned(
                config, summaries, rows, FACE_CROP_BANDS, _eval_hashes(config.against), _identities(config)
            )
            return
        compact = ["image_key", "face_index", "bytes_hash", "pixel_hash", "url_hash", "phash", "face_phash", "score"]
        wants_vectors = _wants_vectors(config)
        table = summaries.read_all(compact + (["embedding"] if wants_vectors else []))
        if table.num_rows == 0:
            return  # no face reached this stage: nothing to decide
        frame = table.drop_columns(["embedding"]).to_pandas() if wants_vectors else table.to_pandas()
        vectors = _vectors(table.column("embedding")) if wants_vectors else None
        decisions = decide(frame, vectors, config, _eval_hashes(config.against), _identities(config))
        frame = pd.concat([frame[["key", "shard", "phash"]], decisions], axis=1)
        for shard, part in frame.groupby("shard"):
            yield int(shard), part.drop(columns=["shard"])

    # -- pass 3 -------------------------------------------------------------------------------
    def process(self, batch: Batch) -> Output:
        rows = batch.rows.copy()
        plan = batch.plan
        for column in self.produces:
            rows[column] = list(plan[column]) if column in plan.columns else None
        rows["status"] = ["ok" if not s else self.reject(s) for s in plan["decision"]]
        rows["error"] = [_reason(s, d) for s, d in zip(plan["decision"], plan["duplicate_of"], strict=True)]
        return Output(rows=rows)


_SUMMARY = (
    "key",
    "image_key",
    "face_index",
    "bytes_hash",
    "pixel_hash",
    "url_hash",
    "phash",
    "face_phash",
    "embedding",
    "score",
)


def decide(
    frame: pd.DataFrame,
    vectors: np.ndarray | None,
    config: DedupConfig,
    eval_hashes: np.ndarray,
    identities: dict[str, OptOutList] | None = None,
) -> pd.DataFrame:
    """Each row's decision ('' keeps it), the key it duplicates, its identity cluster, and the
    opted-out or eval identity it matches (``identities``: decision -> people, in precedence order)."""
    n = len(frame)
    decision = np.array([""] * n, dtype=object)
    duplicate_of = np.array([None] * n, dtype=object)
    matched = np.array([None] * n, dtype=object)
    matched_cosine = np.full(n, np.nan, np.float32)
    for kind, people in (identities or {}).items():
        if vectors is None:
            raise ValueError("identity matching needs the face embeddings")
        person, cosine = match(vectors, people, config.identity_match_cosine)
        hits = np.flatnonzero((person >= 0) & (decision == ""))
        decision[hits] = kind
        matched[hits] = [people.names[i] for i in person[hits]]
        matched_cosine[hits] = cosine[hits]
    images = frame.groupby("image_key", sort=False)
    first = images.head(1).reset_index()  # one row per image: its fingerprints
    image_rows = first["index"].to_numpy()
    if len(eval_hashes):
        combined = np.concatenate([first["phash"].to_numpy(np.int64), eval_hashes])
        pairs = hamming_pairs(combined, config.phash_radius)
        hits = pairs[(pairs[:, 0] < len(first)) & (pairs[:, 1] >= len(first))][:, 0]
        contaminated = set(first.loc[hits, "image_key"])
        mask = frame["image_key"].isin(contaminated).to_numpy() & (decision == "")
        decision[mask] = "eval_overlap"
    image_scores = frame.groupby("image_key", sort=False)["score"].max().reindex(first["image_key"]).to_numpy()
    for kind, pairs in _image_pairs(first, config):
        _mark_image_groups(frame, first, image_rows, image_scores, pairs, kind, decision, duplicate_of)
    if "face" in config.kinds:
        _mark_row_groups(frame, face_crop_pairs(frame, config), "near_duplicate", decision, duplicate_of)
    if vectors is not None and "embedding" in config.kinds:
        pairs = cosine_pairs(vectors, config.face_cosine, tables=config.lsh_tables)
        if len(pairs):
            close = (
                np.bitwise_count(
                    np.bitwise_xor(
                        frame["face_phash"].to_numpy(np.int64)[pairs[:, 0]],
                        frame["face_phash"].to_numpy(np.int64)[pairs[:, 1]],
                    ).view(np.uint64)
                )
                <= config.face_phash_radius
            )
            _mark_row_groups(frame, pairs[close], "near_duplicate", decision, duplicate_of)
    _follow_chains(frame["key"].to_numpy(), decision, duplicate_of)
    cluster = np.arange(n, dtype=np.int64)
    sizes = np.ones(n, dtype=np.int32)
    if vectors is not None and "identity" in config.kinds:
        finder = UnionFind(n)
        bits = identity_lsh_bits(n)
        finder.union_pairs(cosine_pairs(vectors, config.identity_cosine, tables=config.lsh_tables, bits=bits))
        cluster = finder.roots()
        counts = pd.Series(cluster).value_counts()
        sizes = counts.reindex(cluster).to_numpy(np.int32)
        if config.identity_cap:
            _cap_identities(frame, cluster, config.identity_cap, decision, duplicate_of)
    return pd.DataFrame(
        {
            "pixel_sha256": [f"{int(v) & ((1 << 64) - 1):016x}" for v in frame["pixel_hash"]],
            "decision": decision,
            "duplicate_of": duplicate_of,
            "identity_cluster": cluster,
            "identity_cluster_size": sizes,
            "identity_match": matched,
            "identity_match_cosine": matched_cosine,
        }
    )


# Candidates for the face kind come from 6 bands of the image pHash (a radius of 12 in full would
# need 13 narrow bands: nearly every pair of a large set); the bands find most copies (docs/dedup.md).
FACE_CROP_BANDS = 6


def face_crop_pairs(frame: pd.DataFrame, config: DedupConfig) -> np.ndarray:
    """Faces of different images whose aligned crops and whole images are both near in pHash."""
    image_hashes = frame["phash"].to_numpy(np.int64)
    face_hashes = frame["face_phash"].to_numpy(np.int64)
    images = frame["image_key"].to_numpy()
    found = []
    for pairs in face_candidates(image_hashes, face_hashes, FACE_CROP_BANDS, config.face_crop_radius):
        close = close_faces(
            pairs, image_hashes, face_hashes, images, config.face_crop_image_radius, config.face_crop_radius
        )
        found.append(pairs[close])
    return unique_pairs(found)


def _image_pairs(first: pd.DataFrame, config: DedupConfig):
    if "exact" in config.kinds:
        for column in ("bytes_hash", "pixel_hash", "url_hash"):
            yield "exact", equal_pairs(first[column].to_numpy(np.int64))
    if "near" in config.kinds:
        yield "near_duplicate", hamming_pairs(first["phash"].to_numpy(np.int64), config.phash_radius)


def _mark_image_groups(frame, first, image_rows, image_scores, pairs, kind, decision, duplicate_of) -> None:
    """Union images over the pairs; every face of a non-survivor image points at the survivor image."""
    if not len(pairs):
        return
    finder = UnionFind(len(first))
    finder.union_pairs(pairs)
    roots = finder.roots()
    groups = pd.DataFrame({"root": roots, "score": image_scores, "pos": np.arange(len(first))})
    groups = groups[groups.groupby("root")["root"].transform("size") > 1]
    if groups.empty:
        return
    best = (
        groups.sort_values(["score", "pos"], ascending=[False, True]).groupby("root").head(1).set_index("root")["pos"]
    )
    # Looked up once: a groupby's get_group per duplicate copied whole columns (quadratic at 1M rows).
    positions_of = frame.groupby("image_key", sort=False).indices
    keys, face_index = frame["key"].to_numpy(), frame["face_index"].to_numpy()
    image_keys, best_of = first["image_key"].to_numpy(), best.to_dict()
    for pos, root in zip(groups["pos"], groups["root"], strict=True):
        survivor = int(best_of[root])
        if pos == survivor:
            continue
        survivor_rows = positions_of[image_keys[survivor]]
        keys_by_index = dict(zip(face_index[survivor_rows].tolist(), keys[survivor_rows], strict=True))
        for index in positions_of[image_keys[pos]]:
            if decision[index] and PRECEDENCE.index(decision[index]) <= PRECEDENCE.index(kind):
                continue
            decision[index] = kind
            duplicate_of[index] = keys_by_index.get(int(face_index[index]), keys[survivor_rows[0]])


def _mark_row_groups(frame, pairs, kind, decision, duplicate_of) -> None:
    finder = UnionFind(len(frame))
    finder.union_pairs(pairs)
    roots = finder.roots()
    scores = frame["score"].to_numpy()
    for root in np.unique(roots[pairs.ravel()]) if len(pairs) else []:
        members = np.flatnonzero(roots == root)
        live = [m for m in members if not decision[m]]
        if len(live) < 2:
            continue
        survivor = max(live, key=lambda m: (scores[m], -m))
        for member in live:
            if member != survivor:
                decision[member] = kind
                duplicate_of[member] = frame.at[survivor, "key"]


def _follow_chains(keys: np.ndarray, decision: np.ndarray, duplicate_of: np.ndarray) -> None:
    """Point every duplicate at a kept row: a group's survivor may itself lose to another group."""
    position = {key: i for i, key in enumerate(keys)}
    for i in range(len(keys)):
        target, seen = duplicate_of[i], 0
        while target is not None and decision[position[target]] and seen < len(keys):
            target, seen = duplicate_of[position[target]], seen + 1
        if target is not None:
            duplicate_of[i] = target


def _cap_identities(frame, cluster, cap, decision, duplicate_of) -> None:
    scores = frame["score"].to_numpy()
    live = pd.DataFrame({"cluster": cluster, "score": scores, "pos": np.arange(len(frame))})
    live = live[[not d for d in decision]]
    for _, members in live.groupby("cluster"):
        if len(members) <= cap:
            continue
        ranked = members.sort_values(["score", "pos"], ascending=[False, True])
        best_key = frame.at[int(ranked["pos"].iloc[0]), "key"]
        for pos in ranked["pos"].iloc[cap:]:
            decision[pos] = "identity_cap"
            duplicate_of[pos] = best_key


def _eval_hashes(against: str | None) -> np.ndarray:
    """pHashes of every image under ``against`` (a folder of images, or a dataset's tar shards)."""
    if not against:
        return np.empty(0, np.int64)
    from facecap.pipeline.dataset import iter_tar_members

    hashes = []
    root = Path(against)
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if pixels is not None:
                hashes.append(phash(pixels))
        elif path.suffix == ".tar":
            for name, data in iter_tar_members(str(path)):
                if name.lower().endswith(IMAGE_SUFFIXES):
                    pixels = decode_bgr(data)
                    if pixels is not None:
                        hashes.append(phash(pixels))
    if not hashes:
        raise ConfigError(f"dedup.against {against}: no images found there")
    return np.array(hashes, np.int64)


def _vectors(column: pa.ChunkedArray) -> np.ndarray:
    """The float16 embeddings as float32 rows; a missing one is zeros (in no pair)."""
    array = column.combine_chunks()
    if pa.types.is_binary(array.type) and len(array) and array.null_count == 0:
        # Every embedding as wide as the others: one view of the column's bytes, without a bytes
        # object per face (a partition task decodes 500,000 of them).
        offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset : array.offset + len(array) + 1]
        widths = np.diff(offsets)
        if widths.min() == widths.max() > 0:
            data = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
            return data.view(np.float16).reshape(len(array), -1).astype(np.float32)
    values = column.to_pylist()
    width = next((len(v) for v in values if v), 256) // 2
    return np.stack(
        [np.frombuffer(v, np.float16).astype(np.float32) if v else np.zeros(width, np.float32) for v in values]
    )


def _score(row: dict, weights: dict[str, float]) -> float:
    total = 0.0
    for column, weight in weights.items():
        value = row.get(column)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            total += weight * float(value)
    return total


def _reason(decision: str, duplicate_of: str | None) -> str | None:
    if not decision:
        return None
    if decision == "eval_overlap":
        return "near-duplicate of an image in the held-out eval set (dedup.against)"
    if decision == "opted_out_identity":
        return "the face of a person who opted out (name in identity_match)"
    if decision == "eval_identity":
        return "a face of an identity in the evaluation set (dedup.against_identities)"
    return f"{decision.replace('_', ' ')} of {duplicate_of}"


def partitioned(config: DedupConfig) -> bool:
    """Whether the kinds allow the partitioned plan: every kind does. The embedding and identity
    kinds scatter each face's embedding into its LSH bucket of every table; a partition verifies its
    buckets' pairs and returns them (identity: a spanning forest of them), so the driver holds the
    faces that duplicates and identity clusters involve, never every face's embedding."""
    return set(config.kinds) <= PARTITIONED_KINDS


def _identity_options(config: DedupConfig) -> list[str]:
    return [name for name in IDENTITY_OPTIONS if getattr(config, name)]


def _wants_vectors(config: DedupConfig) -> bool:
    return bool({"embedding", "identity"} & set(config.kinds)) or bool(_identity_options(config))


# The people of one configuration, by the state of their files: preflight and plan run in one
# driver process, so the photos are detected and embedded once.
_IDENTITIES: dict[tuple, dict[str, OptOutList]] = {}


def _identities(config: DedupConfig) -> dict[str, OptOutList]:
    """Opted-out people (photos and list file together) and eval identities, as embeddings.

    One line, before any shard runs, when no embedding model is available, a folder or the list
    is missing, the list was made with another model, or an opt-out photo shows no face.
    """
    given = _identity_options(config)
    if not given:
        return {}
    flags = ", ".join("--" + name.replace("_", "-") for name in given)
    try:
        name, _, sha256 = embedding_model(config.embedding_model)
    except ModelMissing as exc:
        raise ModelMissing(f"dedup {flags} needs a face-embedding model: {exc}") from None
    key = (sha256, *(_state(getattr(config, option)) for option in IDENTITY_OPTIONS))
    if key in _IDENTITIES:
        return _IDENTITIES[key]
    embedder = FaceEmbedder(config.embedding_model)
    found: dict[str, OptOutList] = {}
    opted_out = OptOutList(model=name, model_sha256=sha256)
    if config.opt_out_embeddings:
        stored = OptOutList.load(config.opt_out_embeddings)
        stored.check_model(name, sha256, f"dedup (dedup.embedding_model {config.embedding_model})")
        opted_out.merge(stored)
    if config.opt_out_faces:
        opted_out.merge(OptOutList.from_people(reference_people(config.opt_out_faces, embedder), name, sha256))
    if config.opt_out_faces or config.opt_out_embeddings:
        found["opted_out_identity"] = opted_out
    if config.against_identities:
        people = reference_people(config.against_identities, embedder, every_face=True)
        found["eval_identity"] = OptOutList.from_people(people, name, sha256)
    _IDENTITIES[key] = found
    return found


def _state(path: str | None) -> tuple:
    """A file's or folder's names, sizes and times: what changes when photos are added or replaced."""
    if not path:
        return ()
    root = Path(path)
    if root.is_file():
        stat = root.stat()
        return ((str(root), stat.st_size, stat.st_mtime_ns),)
    if not root.is_dir():
        return (str(root),)
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file())
