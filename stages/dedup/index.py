"""Grouping at scale without all-pairs comparison: union-find, multi-index hashing, LSH.

- Near-duplicate 64-bit hashes within Hamming radius r: split the hash into r + 1 bands; two hashes
  within r differ in at most r bands, so they agree exactly on at least one (pigeonhole). Sort by
  each band, compare only hashes that share it, verify the full distance. Work is about
  n log n plus the candidates of each bucket.
- Embeddings above a cosine threshold: random-hyperplane LSH (several tables of a few bits), the
  candidates that share a bucket in any table verified with the exact cosine.

Both return pairs (i, j) of row positions; ``UnionFind`` turns pairs into clusters.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

MAX_PAIRS_PER_STEP = 4_000_000  # candidate pairs generated at once: bounds memory (about 100 MB)
VERIFY_SLICE = 200_000  # embedding pairs compared at once (2 x 200k x 128 floats: 200 MB)


class UnionFind:
    def __init__(self, size: int):
        self.parent = np.arange(size, dtype=np.int64)

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return int(root)

    def union_pairs(self, pairs: np.ndarray) -> None:
        for a, b in pairs:
            ra, rb = self.find(int(a)), self.find(int(b))
            if ra != rb:
                self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], np.int64)


def equal_pairs(values: np.ndarray) -> np.ndarray:
    """Pairs (first, other) of positions with equal values: each member joined to its group's first."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1
    if not len(same):
        return np.empty((0, 2), np.int64)
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    group_start = starts[np.searchsorted(starts, same, side="right") - 1]
    return np.stack([order[group_start], order[same]], axis=1)


def _bands(radius: int) -> list[tuple[int, int]]:
    """(shift, width) of radius + 1 bands covering the 64 bits."""
    count = radius + 1
    widths = [64 // count + (1 if i < 64 % count else 0) for i in range(count)]
    shifts, start = [], 0
    for width in widths:
        shifts.append((start, width))
        start += width
    return shifts


def band_keys(hashes: np.ndarray, bands: int) -> Iterator[tuple[int, np.ndarray]]:
    """(band number, each hash's value in that band) for the ``bands`` bands of ``hamming_pairs``:
    the one definition that the driver's and the partitioned plan share."""
    unsigned = np.asarray(hashes, np.int64).view(np.uint64)
    for band, (shift, width) in enumerate(_bands(bands - 1)):
        yield band, ((unsigned >> np.uint64(64 - shift - width)) & np.uint64((1 << width) - 1)).view(np.int64)


def bucket_pairs(keys: np.ndarray) -> Iterator[np.ndarray]:
    """All pairs of positions sharing a key, in chunks of at most MAX_PAIRS_PER_STEP."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    sizes = np.diff(np.concatenate([starts, [len(keys)]]))
    chunk: list[np.ndarray] = []
    pending = 0
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):
        members = order[start : start + size]
        first, second = np.triu_indices(size, k=1)
        chunk.append(np.stack([members[first], members[second]], axis=1))
        pending += len(first)
        if pending >= MAX_PAIRS_PER_STEP:
            yield np.concatenate(chunk)
            chunk, pending = [], 0
    if chunk:
        yield np.concatenate(chunk)


def hamming_pairs(hashes: np.ndarray, radius: int, bands: int | None = None) -> np.ndarray:
    """Pairs of positions whose 64-bit hashes differ in at most ``radius`` bits.

    With ``radius + 1`` bands (the default) every such pair is found. Fewer, wider bands find a
    pair only when one band has none of its differing bits (most pairs well inside the radius),
    for far fewer candidates: the cost of a large radius without comparing nearly all pairs."""
    hashes = np.asarray(hashes, np.int64)
    unsigned = hashes.view(np.uint64)
    found = []
    for _, keys in band_keys(hashes, bands or radius + 1):
        for pairs in bucket_pairs(keys):
            distance = np.bitwise_count(np.bitwise_xor(unsigned[pairs[:, 0]], unsigned[pairs[:, 1]]))
            found.append(pairs[distance <= radius])
    if not found:
        return np.empty((0, 2), np.int64)
    return np.unique(np.sort(np.concatenate(found), axis=1), axis=0)


def lsh_bits(n: int) -> int:
    """Bits per table so that a bucket holds about 16 rows: candidates grow with n, not n^2."""
    return int(min(20, max(6, round(np.log2(max(n, 2) / 16)))))


def cosine_pairs(
    vectors: np.ndarray, threshold: float, tables: int = 8, bits: int | None = None, seed: int = 0
) -> np.ndarray:
    """Pairs of positions whose unit vectors have cosine >= threshold (random-hyperplane LSH).

    A pair at cosine c shares a b-bit bucket in one table with probability (1 - acos(c)/pi)^b;
    over T tables it is found with 1 - (1 - that)^T. Bits default to ``lsh_bits(n)``; recall at
    several sizes is measured in bench/bench_dedup.py.
    """
    bits = bits if bits is not None else lsh_bits(len(vectors))
    vectors = np.asarray(vectors, np.float32)
    if len(vectors) < 2:
        return np.empty((0, 2), np.int64)
    rng = np.random.default_rng(seed)
    found = []
    weights = 1 << np.arange(bits, dtype=np.int64)
    for _ in range(tables):
        planes = rng.standard_normal((vectors.shape[1], bits)).astype(np.float32)
        keys = ((vectors @ planes) > 0).astype(np.int64) @ weights
        for pairs in bucket_pairs(keys):
            # Verify in slices: gathering both vectors of 4M pairs at once would take 4 GB.
            for start in range(0, len(pairs), VERIFY_SLICE):
                part = pairs[start : start + VERIFY_SLICE]
                similarity = np.einsum("ij,ij->i", vectors[part[:, 0]], vectors[part[:, 1]])
                found.append(part[similarity >= threshold])
    if not found:
        return np.empty((0, 2), np.int64)
    return np.unique(np.sort(np.concatenate(found), axis=1), axis=0)


def connected_components(pairs: np.ndarray, size: int) -> np.ndarray:
    """Each of ``size`` items' component label: the smallest item linked to it through ``pairs``.

    Vectorised label propagation with pointer jumping (a few passes over the pairs), the same
    components as ``UnionFind`` without a Python loop per pair."""
    labels = np.arange(size, dtype=np.int64)
    if not len(pairs):
        return labels
    first, second = pairs[:, 0], pairs[:, 1]
    while True:
        lowest = np.minimum(labels[first], labels[second])
        updated = labels.copy()
        np.minimum.at(updated, first, lowest)
        np.minimum.at(updated, second, lowest)
        np.minimum.at(updated, labels, updated)  # a root takes the lowest label of any member
        while True:  # pointer jumping: every item straight to its label's label
            jumped = updated[updated]
            if np.array_equal(jumped, updated):
                break
            updated = jumped
        if np.array_equal(updated, labels):
            return labels
        labels = updated
