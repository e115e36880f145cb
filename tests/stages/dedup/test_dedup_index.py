"""Dedup building blocks: exact groups, the banded Hamming index against brute force, LSH recall,
and the perceptual hash's robustness on a real photo."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facecap.stages.dedup.hashing import hamming, normalised_url, phash, pixel_digest
from facecap.stages.dedup.index import UnionFind, cosine_pairs, equal_pairs, hamming_pairs


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
