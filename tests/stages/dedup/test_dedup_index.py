"""Dedup building blocks: exact groups, the banded Hamming index against brute force, LSH recall,
and the perceptual hash's robustness on a real photo."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
import pytest

from facecap.stages.dedup import index as dedup_index
from facecap.stages.dedup.hashing import hamming, normalised_url, phash, pixel_digest
from facecap.stages.dedup.index import (
    UnionFind,
    band_keys,
    bucket_pairs,
    cosine_pairs,
    equal_pairs,
    face_candidates,
    hamming_pairs,
    lsh_keys,
    lsh_planes,
    probe_plan,
    star_forest,
    sub_keyed_pairs,
    unique_pairs,
)
from facecap.stages.dedup.stage import _vectors


def test_equal_pairs_and_union_find():
    pairs = equal_pairs(np.array([5, 3, 5, 7, 3, 5]))
    assert {tuple(p) for p in pairs} == {(0, 2), (0, 5), (1, 4)}
    finder = UnionFind(6)
    finder.union_pairs(pairs)
    roots = finder.roots()
    assert roots[0] == roots[2] == roots[5] and roots[1] == roots[4] and roots[3] == 3


@pytest.mark.parametrize("radius", [0, 3, 6])
def test_banded_index_finds_exactly_the_pairs_brute_force_finds(radius):
    rng = np.random.default_rng(radius)
    base = rng.integers(-(2**63), 2**63 - 1, size=400, dtype=np.int64)
    near = base[:100].copy()
    for i in range(100):  # flip up to radius + 2 bits: some inside the radius, some outside
        for bit in rng.choice(64, size=rng.integers(0, radius + 3), replace=False):
            near[i] ^= np.int64(1) << np.int64(bit) if bit < 63 else np.int64(-(2**63))
    hashes = np.concatenate([base, near])
    found = {tuple(p) for p in hamming_pairs(hashes, radius)}
    distances = hamming(hashes[:, None], hashes[None, :])
    expected = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes)) if distances[i, j] <= radius}
    assert found == expected and len(expected) >= 20


def _flipped(hashes: np.ndarray, rng: np.random.Generator, most: int, bits: int = 64) -> np.ndarray:
    """Each hash with 0 to ``most`` of its low ``bits`` bits flipped."""
    out = hashes.copy()
    for i in range(len(out)):
        for bit in rng.choice(bits, size=rng.integers(0, most + 1), replace=False):
            out[i] ^= np.int64(1) << np.int64(bit) if bit < 63 else np.int64(-(2**63))
    return out


def test_bucket_pairs_pairs_every_run_small_and_large():
    keys = np.concatenate([np.repeat(np.arange(300), [1, 2, 3] * 100), np.full(100, 7_000)])  # one run of 100
    keys = np.random.default_rng(0).permutation(keys)
    found = unique_pairs(list(bucket_pairs(keys)))
    expected = {(i, j) for i in range(len(keys)) for j in range(i + 1, len(keys)) if keys[i] == keys[j]}
    assert {tuple(p) for p in found} == expected and len(found) == len(expected)


@pytest.mark.parametrize("probe_by", ["table", "binary search"])
@pytest.mark.parametrize("sub_bits, sub_radius, buckets", [(20, 3, 1), (20, 5, 1), (64, 4, 1), (64, 8, 1), (64, 8, 40)])
def test_sub_keyed_pairs_find_every_pair_within_the_sub_radius(sub_bits, sub_radius, buckets, probe_by, monkeypatch):
    """The second key of the index: whatever split of blocks and flips the plan picks for a bucket
    size, and whether its probes look runs up in a direct table or search for them, every pair
    sharing a first key whose sub-hashes are within the radius is a candidate."""
    if probe_by == "binary search":
        monkeypatch.setattr(dedup_index, "MAX_TABLE_BITS", 0)
    rng = np.random.default_rng(sub_radius)
    keys = rng.integers(0, buckets, size=600)
    sub = (
        rng.integers(0, 2**sub_bits - 1, size=600, dtype=np.int64)
        if sub_bits < 64
        else rng.integers(-(2**63), 2**63 - 1, size=600, dtype=np.int64)
    )
    sub[300:] = _flipped(sub[:300], rng, sub_radius + 2, sub_bits)  # some within the radius, some just outside
    keys[300:] = keys[:300]
    sharing = 600 / buckets - 1
    blocks, flips = probe_plan(sub_bits, sub_radius, sharing)
    assert blocks * (flips + 1) > sub_radius
    if sub_bits == 20:  # narrow sub-hashes in one bucket: probing with flips is the cheaper plan
        assert flips >= 1
    found = {tuple(p) for p in unique_pairs(list(sub_keyed_pairs(keys, 6, sub, sub_bits, sub_radius)))}
    distances = hamming(sub[:, None], sub[None, :])
    close = np.triu((distances <= sub_radius) & (keys[:, None] == keys[None, :]), 1)
    expected = set(zip(*np.nonzero(close), strict=True))
    assert expected <= found and len(expected) >= 100


def test_unique_pairs_orders_and_dedups_small_and_wide_positions():
    """Positions under 2^31 are packed into one integer a pair; wider ones take the row-wise path."""
    for offset in (0, 2**40):
        pieces = [np.array([[5, 2], [2, 5], [0, 9]]) + offset, np.array([[9, 0], [3, 4]]) + offset]
        expected = np.array([[0, 9], [2, 5], [3, 4]]) + offset
        assert np.array_equal(unique_pairs(pieces), expected)
    assert unique_pairs([np.empty((0, 2), np.int64)]).shape == (0, 2)


def test_probe_plan_trades_blocks_for_flips_as_buckets_grow():
    """Small buckets: many narrow exact blocks; large ones: fewer, wider blocks probed with flips."""
    assert probe_plan(64, 8, 10.0) == (9, 0)
    blocks, flips = probe_plan(64, 8, 100_000.0)
    assert flips >= 1 and blocks < 9


def test_face_candidates_hold_every_pair_sharing_an_image_band_with_close_crops():
    rng = np.random.default_rng(3)
    images = rng.integers(-(2**63), 2**63 - 1, size=500, dtype=np.int64)
    images[250:] = _flipped(images[:250], rng, 14)  # past the 6 bands' guarantee: some share none
    crops = rng.integers(-(2**63), 2**63 - 1, size=500, dtype=np.int64)
    crops[250:] = _flipped(crops[:250], rng, 10)
    found = {tuple(p) for p in unique_pairs(list(face_candidates(images, crops, 6, 8)))}
    share = np.zeros((500, 500), bool)
    for _, keys in band_keys(images, 6):
        share |= keys[:, None] == keys[None, :]
    close = np.triu(share & (hamming(crops[:, None], crops[None, :]) <= 8), 1)
    expected = set(zip(*np.nonzero(close), strict=True))
    assert expected <= found and len(expected) >= 50


def test_cosine_lsh_finds_planted_close_vectors_and_no_far_ones():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 128)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    noisy = vectors[:200] + 0.15 * rng.standard_normal((200, 128)).astype(np.float32) / np.sqrt(128)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    everything = np.concatenate([vectors, noisy])
    pairs = {tuple(p) for p in cosine_pairs(everything, 0.9, tables=16)}
    planted = {(i, 2000 + i) for i in range(200)}
    assert len(planted & pairs) / len(planted) > 0.95
    assert all(float(everything[a] @ everything[b]) >= 0.9 for a, b in pairs)


def test_lsh_buckets_of_a_slice_are_those_of_the_whole_set():
    """The partitioned plan projects each shard on its own: a face's bucket must not depend on which
    other faces are projected with it."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((5000, 128)).astype(np.float16).astype(np.float32)
    for planes in lsh_planes(128, tables=4, bits=12):
        whole = lsh_keys(vectors, planes)
        assert len(np.unique(whole)) > 1000
        for start, end in ((0, 1), (7, 1000), (1000, 4999), (4321, 5000)):
            assert np.array_equal(lsh_keys(vectors[start:end], planes), whole[start:end])


def test_embeddings_decode_from_chunks_and_slices_and_a_missing_one_is_zeros():
    vectors = np.random.default_rng(3).standard_normal((50, 16)).astype(np.float16)
    stored = [v.tobytes() for v in vectors]
    column = pa.chunked_array([pa.array(stored[:20], pa.binary()), pa.array(stored[20:], pa.binary())])
    assert np.array_equal(_vectors(column), vectors.astype(np.float32))
    assert np.array_equal(_vectors(column.slice(7, 30)), vectors[7:37].astype(np.float32))
    gaps = _vectors(pa.chunked_array([pa.array([None, *stored[1:]], pa.binary())]))
    assert np.array_equal(gaps[1:], vectors[1:].astype(np.float32)) and not gaps[0].any()


def test_star_forest_keeps_the_components_with_an_edge_per_member_but_one():
    rng = np.random.default_rng(2)
    pairs = np.concatenate(
        [rng.integers(0, 400, size=(300, 2)), np.stack(np.triu_indices(60, k=1), axis=1) + 1000]  # a clique of 60
    )
    forest = star_forest(pairs)
    finder = UnionFind(1100)
    finder.union_pairs(pairs)
    roots = finder.roots()
    involved = np.unique(pairs)
    assert len(forest) == len(involved) - len(np.unique(roots[involved]))  # 59 edges for the clique's 1,770
    rebuilt = UnionFind(1100)
    rebuilt.union_pairs(forest)
    assert np.array_equal(rebuilt.roots(), roots)


def test_phash_survives_resize_reencode_and_small_crops_but_not_another_photo(face_photos):
    image = cv2.imread(str(face_photos / "deepface" / "img1.jpg"))
    original = phash(image)
    height, width = image.shape[:2]
    variants = {
        "half size": cv2.resize(image, (width // 2, height // 2), interpolation=cv2.INTER_AREA),
        "jpeg q30": cv2.imdecode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 30])[1], cv2.IMREAD_COLOR),
        "3% crop": image[height * 3 // 100 : -height * 3 // 100, width * 3 // 100 : -width * 3 // 100],
        "brighter": cv2.convertScaleAbs(image, alpha=1.0, beta=25),
    }
    for name, variant in variants.items():
        assert hamming(original, phash(variant)) <= 6, name
    other = phash(cv2.imread(str(face_photos / "deepface" / "img2.jpg")))  # the same person, another photo
    assert hamming(original, other) > 12
    png = cv2.imdecode(cv2.imencode(".png", image)[1], cv2.IMREAD_COLOR)
    assert pixel_digest(png) == pixel_digest(image)


def test_urls_normalise():
    assert normalised_url("HTTP://Example.COM:80/a/") == normalised_url("http://example.com/a#frag")
    assert normalised_url("https://e.com:8443/x") == "https://e.com:8443/x"
