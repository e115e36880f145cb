"""The partitioned dedup plan (tasks on the executor) gives the driver's plan's decisions.

Summaries are written as pass 1 leaves them (a Parquet per shard with ``_status``), with planted
duplicates of every default kind across shards: exact (same bytes, same pixels only, same URL
only), near (pHash 1-4 bits apart, chained), face (image pHash 5-12 bits apart and face crop
within 8), multi-face images, equal scores, a chain through two kinds, opted-out faces and
images of a held-out eval set. Both plans run on the same summaries and must agree on every row.

For the vector kinds the summaries' embeddings are rewritten as faces of people (128-d, like SFace's):
identity groups (one of 300 faces), same-face copies (cosine about 0.97, crop pHash a few bits off)
and look-alikes whose crops differ (not duplicates).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import facecap.stages.dedup.stage as dedup_stage
from facecap.pipeline.dataset import Dataset
from facecap.pipeline.executors import LocalExecutor, ProcessExecutor
from facecap.pipeline.runner import _DatasetSummaries
from facecap.pipeline.storage import Storage
from facecap.stages.dedup import partitioned as partitioned_plan
from facecap.stages.dedup.index import cosine_pairs, identity_lsh_bits
from facecap.stages.dedup.stage import DedupConfig, DedupStage
from facecap.stages.shared.identity import OptOutList

SHARDS = 5
IMAGES_PER_SHARD = 260
DIM = 128  # SFace's width: two random faces are far apart (cosine 0 +- 0.09)
PEOPLE = (300, 40, 12, 6, 3)  # faces per planted identity
SAME_FACE_COPIES = 60
LOOK_ALIKES = 20


def _flip(value: int, bits: list[int]) -> int:
    value &= (1 << 64) - 1
    for bit in bits:
        value ^= 1 << bit
    return value - (1 << 64) if value >= 1 << 63 else value


def _random64(rng: np.random.Generator) -> int:
    return int(rng.integers(-(2**63), 2**63 - 1, dtype=np.int64))


def _write_summaries(folder, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Summary shards with planted duplicates; returns the eval pHashes and opted-out vectors."""
    rng = np.random.default_rng(seed)
    images = []  # per image: dict of its fingerprints and face count
    for index in range(SHARDS * IMAGES_PER_SHARD):
        image = {
            "key": f"{index:08d}",
            "bytes_hash": _random64(rng),
            "pixel_hash": _random64(rng),
            "url_hash": _random64(rng),
            "phash": _random64(rng),
            "faces": int(rng.choice([1, 1, 2, 3])),
            "face_phash": [_random64(rng) for _ in range(3)],
        }
        if index > 50:
            original = images[int(rng.integers(0, index))]
            draw = rng.random()
            if draw < 0.04:  # the same file
                for name in ("bytes_hash", "pixel_hash", "phash"):
                    image[name] = original[name]
            elif draw < 0.07:  # re-encoded: same pixels, other bytes
                image["pixel_hash"], image["phash"] = original["pixel_hash"], original["phash"]
            elif draw < 0.09:  # the same URL
                image["url_hash"] = original["url_hash"]
            elif draw < 0.17:  # resized: pHash 1-4 bits off (copies of copies make chains)
                bits = rng.choice(64, size=int(rng.integers(1, 5)), replace=False).tolist()
                image["phash"] = _flip(original["phash"], bits)
            elif draw < 0.25:  # cropped: image pHash 5-12 bits off in 3 of 6 bands, face crops close
                bits = rng.choice(32, size=int(rng.integers(5, 13)), replace=False).tolist()
                image["phash"] = _flip(original["phash"], bits)
                crops = original["face_phash"]
                image["face_phash"] = [_flip(h, rng.choice(64, 3, replace=False).tolist()) for h in crops]
            if draw < 0.25:
                image["faces"] = int(rng.choice([1, 2, 3]))  # a copy may show fewer or more faces
        images.append(image)
    eval_hashes = np.array([_flip(images[i]["phash"], [3]) for i in (10, 600, 1100)], np.int64)
    vectors = rng.standard_normal((SHARDS * IMAGES_PER_SHARD * 3, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    row = 0
    for shard in range(SHARDS):
        rows = []
        for image in images[shard * IMAGES_PER_SHARD : (shard + 1) * IMAGES_PER_SHARD]:
            for face in range(image["faces"]):
                rows.append(
                    {
                        "key": f"{image['key']}_f{face}",
                        "image_key": image["key"],
                        "face_index": face,
                        **{n: image[n] for n in ("bytes_hash", "pixel_hash", "url_hash", "phash")},
                        "face_phash": image["face_phash"][face],
                        "embedding": vectors[row].astype(np.float16).tobytes(),
                        # Few distinct scores: ties are decided by position, the same way on both paths.
                        "score": float(rng.integers(0, 4)),
                        "_status": None,
                    }
                )
                row += 1
        table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
        table = table.set_column(table.schema.get_field_index("_status"), "_status", pa.nulls(len(rows), pa.string()))
        pq.write_table(table, folder / f"part-{shard:05d}.parquet")
    opted_out = vectors[[5, 400, 900]] + 0.05 * rng.standard_normal((3, 16)).astype(np.float32)
    return eval_hashes, opted_out / np.linalg.norm(opted_out, axis=1, keepdims=True)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def _plant_faces(folder, seed: int) -> tuple[np.ndarray, set[str]]:
    """Rewrites the summaries' embeddings as faces of people, and some crop pHashes; returns the
    vectors of three opted-out people (one of them the largest identity) and the keys of the
    same-face copies and their originals."""
    rng = np.random.default_rng(seed + 100)
    paths = sorted(folder.glob("part-*.parquet"))
    tables = [pq.read_table(path) for path in paths]
    keys = np.concatenate([t.column("key").to_numpy(zero_copy_only=False) for t in tables])
    total = len(keys)
    same_face: set[str] = set()
    vectors = _unit(rng.standard_normal((total, DIM)))
    crops = np.concatenate([t.column("face_phash").to_numpy() for t in tables]).astype(np.int64)
    order = rng.permutation(total)
    start = 0
    for size in PEOPLE:  # a face of a person at cosine about 0.8 to the centre, 0.65 to the others
        members = order[start : start + size]
        centre = _unit(rng.standard_normal(DIM))
        vectors[members] = _unit(centre + 0.065 * rng.standard_normal((size, DIM)))
        start += size
    for _ in range(SAME_FACE_COPIES):  # copies of copies make chains
        original, copy = rng.choice(total, 2, replace=False)
        vectors[copy] = _unit(vectors[original] + 0.02 * rng.standard_normal(DIM))
        bits = rng.choice(64, size=int(rng.integers(0, 9)), replace=False).tolist()
        crops[copy] = _flip(int(crops[original]), bits)
        same_face |= {keys[original], keys[copy]}
    for _ in range(LOOK_ALIKES):  # as close in embedding, but their crops differ: two photos, kept
        original, other = rng.choice(total, 2, replace=False)
        vectors[other] = _unit(vectors[original] + 0.02 * rng.standard_normal(DIM))
    start = 0
    for path, table in zip(paths, tables, strict=True):
        end = start + table.num_rows
        embeddings = pa.array([v.astype(np.float16).tobytes() for v in vectors[start:end]], pa.binary())
        table = table.set_column(table.schema.get_field_index("embedding"), "embedding", embeddings)
        table = table.set_column(table.schema.get_field_index("face_phash"), "face_phash", pa.array(crops[start:end]))
        pq.write_table(table, path)
        start = end
    opted_out = vectors[[order[0], 400, 900]] + 0.02 * rng.standard_normal((3, DIM))
    return _unit(opted_out).astype(np.float32), same_face


def _people(opted_out: np.ndarray) -> OptOutList:
    people = OptOutList(model="test", model_sha256="0")
    people.add("alice", [opted_out[0]])
    people.add("bob", [opted_out[1], opted_out[2]])
    return people


def _plan(config: DedupConfig, summaries) -> pd.DataFrame:
    """Every shard's plan rows as the runner stores them (through Arrow), with their shard."""
    parts = [
        pd.DataFrame(pa.Table.from_pandas(frame, preserve_index=False).to_pylist()).assign(shard=shard)
        for shard, frame in DedupStage.plan(config, summaries)
    ]
    return pd.concat(parts).sort_values("key").reset_index(drop=True).astype(object)


def _both_plans(tmp_path, monkeypatch, kinds, cap, identities, eval_hashes, opted_out):
    """The plan of the summaries under ``tmp_path/summary`` on the driver and partitioned over a
    process pool (and both configs), with the opted-out people and eval hashes given."""
    people = _people(opted_out)
    monkeypatch.setattr(dedup_stage, "_eval_hashes", lambda against: eval_hashes if identities else eval_hashes[:0])
    monkeypatch.setattr(dedup_stage, "_identities", lambda config: {"opted_out_identity": people} if identities else {})
    options = {"opt_out_embeddings": "list.json", "identity_match_cosine": 0.9} if identities else {}
    single = DedupConfig(kinds=kinds, identity_cap=cap, partitioned_from_rows=10**9, **options)
    spread = single.model_copy(update={"partitioned_from_rows": 0, "partition_rows": 1_000})
    dataset = Dataset.at(str(tmp_path / "summary"))
    on_driver = _plan(single, _DatasetSummaries(dataset, SHARDS, LocalExecutor()))
    scratch = Storage(str(tmp_path / "scratch"))
    partitioned = _plan(spread, _DatasetSummaries(dataset, SHARDS, ProcessExecutor(2), scratch))
    return on_driver, partitioned, single, spread


@pytest.mark.parametrize(
    "kinds, identities",
    [(["exact"], False), (["exact", "near"], False), (["exact", "near", "face"], True)],
)
def test_partitioned_plan_decides_as_the_driver_does(tmp_path, monkeypatch, kinds, identities):
    folder = tmp_path / "summary"
    folder.mkdir()
    eval_hashes, opted_out = _write_summaries(folder, seed=len(kinds))
    on_driver, partitioned, _, spread = _both_plans(
        tmp_path, monkeypatch, kinds, None, identities, eval_hashes, opted_out
    )
    dataset = Dataset.at(str(folder))

    pd.testing.assert_frame_equal(partitioned, on_driver)
    counts = on_driver["decision"].value_counts()
    assert counts.get("exact", 0) >= 40
    if "near" in kinds:
        assert counts.get("near_duplicate", 0) >= 60
    if "face" in kinds:  # the cropped copies: only the face kind finds them
        near_only = _plan(spread.model_copy(update={"kinds": ["exact", "near"]}), _DatasetSummaries(dataset, SHARDS))
        assert counts["near_duplicate"] - (near_only["decision"] == "near_duplicate").sum() >= 30
    if identities:
        assert counts["opted_out_identity"] >= 3 and counts["eval_overlap"] >= 3
    else:  # every duplicate names a kept row (a chain ending at an opted-out face stays as it was, on both)
        kept = set(on_driver.loc[on_driver["decision"] == "", "key"])
        assert set(on_driver.loc[on_driver["decision"] != "", "duplicate_of"]) <= kept
    assert not list((tmp_path / "scratch").glob("*"))  # the partitioned plan's scratch is gone


def test_small_summaries_plan_on_the_driver(tmp_path, monkeypatch):
    folder = tmp_path / "summary"
    folder.mkdir()
    _write_summaries(folder, seed=0)
    calls = []
    monkeypatch.setattr(dedup_stage, "plan_partitioned", lambda *args: calls.append(args) or iter(()))
    summaries = _DatasetSummaries(Dataset.at(str(folder)), SHARDS)
    assert len(_plan(DedupConfig(), summaries)) == summaries.count_rows() and not calls
    list(DedupStage.plan(DedupConfig(partitioned_from_rows=100), summaries))
    assert len(calls) == 1
    list(DedupStage.plan(DedupConfig(kinds=["exact", "embedding", "identity"], partitioned_from_rows=100), summaries))
    assert len(calls) == 2  # the vector kinds too


@pytest.mark.parametrize(
    "kinds, cap, identities",
    [(["exact", "near", "face", "embedding", "identity"], 5, True), (["embedding", "identity"], None, False)],
)
def test_partitioned_plan_decides_vector_kinds_as_the_driver_does(tmp_path, monkeypatch, kinds, cap, identities):
    folder = tmp_path / "summary"
    folder.mkdir()
    eval_hashes, _ = _write_summaries(folder, seed=7)
    opted_out, same_face = _plant_faces(folder, seed=7)
    on_driver, partitioned, single, _ = _both_plans(
        tmp_path, monkeypatch, kinds, cap, identities, eval_hashes, opted_out
    )
    dataset = Dataset.at(str(folder))

    pd.testing.assert_frame_equal(partitioned, on_driver)
    assert partitioned_plan.LAST_RUN["group vectors"]["tasks"] > partitioned_plan.GROUP_WINDOW  # forests merged twice
    # The planted people are clusters of their own (LSH misses a few of the largest one's faces).
    sizes = on_driver.groupby("identity_cluster")["identity_cluster_size"].first()
    assert sizes.max() >= 0.9 * PEOPLE[0] and (sizes >= PEOPLE[-1]).sum() >= len(PEOPLE)
    assert (on_driver["identity_cluster_size"] == 1).sum() > len(on_driver) / 2
    counts = on_driver["decision"].value_counts()
    other_kinds = single.model_copy(update={"kinds": [k for k in kinds if k != "embedding"]})
    without_embedding = _plan(other_kinds, _DatasetSummaries(dataset, SHARDS))
    near = on_driver["decision"] == "near_duplicate"
    found_by_embedding = set(on_driver.loc[near & (without_embedding["decision"] != "near_duplicate"), "key"])
    # The copies (chains of them included), never a look-alike: their crops are far apart.
    assert len(found_by_embedding) >= 30 and found_by_embedding <= same_face
    if cap:
        assert counts["identity_cap"] >= 0.7 * PEOPLE[0]  # the largest cluster but its best and other duplicates
        capped = on_driver[on_driver["decision"] == "identity_cap"]
        kept = on_driver[on_driver["decision"] == ""]
        assert set(capped["duplicate_of"]) <= set(kept["key"])
        assert kept.groupby("identity_cluster").size().max() == cap
    if identities:
        assert counts["opted_out_identity"] >= 3
    assert not list((tmp_path / "scratch").glob("*"))


def test_the_driver_merges_identity_forests_not_pairs(tmp_path):
    """Each partition returns a spanning forest of its identity pairs, and the driver holds one."""
    folder = tmp_path / "summary"
    folder.mkdir()
    _write_summaries(folder, seed=3)
    _plant_faces(folder, seed=3)
    config = DedupConfig(kinds=["identity"], partitioned_from_rows=0, partition_rows=1_000)
    summaries = _DatasetSummaries(Dataset.at(str(folder)), SHARDS)
    plan = _plan(config, summaries)
    vectors = dedup_stage._vectors(summaries.read_all(["embedding"]).column("embedding"))
    pairs = cosine_pairs(vectors, config.identity_cosine, config.lsh_tables, bits=identity_lsh_bits(len(vectors)))
    clustered = plan[plan["identity_cluster_size"] > 1]
    received = partitioned_plan.LAST_RUN["group vectors"]["identity_edges_received"]
    held = partitioned_plan.LAST_RUN["decide"]["identity_edges"]
    # The largest cluster's pairs grow as its faces squared; the partitions' forests as its faces
    # (each face is in a bucket of every table, each bucket's forest has an edge per face but one).
    assert received <= config.lsh_tables * len(clustered) < len(pairs)
    assert held == len(clustered) - clustered["identity_cluster"].nunique()  # one forest: k - 1 edges a cluster


def test_first_positions_finds_each_wanted_value_where_it_first_occurs():
    values = np.array([7, 3, 9, 3, 7, 11, 9])
    wanted = np.array([3, 9, 11])
    assert partitioned_plan._first_positions(values, wanted).tolist() == [1, 2, 5]
