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

import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np

from facecap.stages.dedup.hashing import hamming

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


def band_layout(bands: int) -> list[tuple[int, int]]:
    """(start, width) of ``bands`` bands covering the 64 bits, ``start`` counted from the top bit."""
    widths = [64 // bands + (1 if i < 64 % bands else 0) for i in range(bands)]
    layout, start = [], 0
    for width in widths:
        layout.append((start, width))
        start += width
    return layout


def band_keys(hashes: np.ndarray, bands: int) -> Iterator[tuple[int, np.ndarray]]:
    """(band number, each hash's value in that band) for the ``bands`` bands of ``hamming_pairs``:
    the one definition that the driver's and the partitioned plan share."""
    unsigned = np.asarray(hashes, np.int64).view(np.uint64)
    for band, (start, width) in enumerate(band_layout(bands)):
        yield band, ((unsigned >> np.uint64(64 - start - width)) & np.uint64((1 << width) - 1)).view(np.int64)


def outside_band(hashes: np.ndarray, band: int, bands: int) -> tuple[np.ndarray, int]:
    """Each hash with band ``band``'s bits taken out (the bits below it moved up), and how many bits
    remain: what two hashes sharing that band may still differ in."""
    start, width = band_layout(bands)[band]
    unsigned = np.asarray(hashes, np.int64).view(np.uint64)
    below = 64 - start - width
    low = unsigned & np.uint64((1 << below) - 1)
    high = (unsigned >> np.uint64(below + width)) if start else np.zeros_like(unsigned)
    return ((high << np.uint64(below)) | low).view(np.int64), 64 - width


def bucket_pairs(keys: np.ndarray) -> Iterator[np.ndarray]:
    """All pairs of positions sharing a key, in chunks of at most about MAX_PAIRS_PER_STEP."""
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")
    starts, sizes = _runs(keys[order])
    yield from _pairs_within_runs(order, starts, sizes)


def _runs(ordered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of each run of equal values in a sorted array."""
    if not len(ordered):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    return starts, np.diff(np.concatenate([starts, [len(ordered)]]))


SMALL_RUN = 64  # runs up to this long are paired by offset, vectorised over all of them at once


def _pairs_within_runs(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> Iterator[np.ndarray]:
    """Every pair of ``order``'s entries inside one run. Millions of runs of two or three (the
    usual bucket once keys are about log2 n bits wide) are paired without a Python loop per run:
    for each offset k, every member with k more members after it in its run."""
    yield from _in_steps(_pairs_in_small_runs(order, starts, sizes))
    yield from _in_steps(_pairs_in_large_runs(order, starts, sizes))


def _pairs_in_small_runs(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> Iterator[np.ndarray]:
    small = (sizes > 1) & (sizes <= SMALL_RUN)
    if not small.any():
        return
    run_starts, run_sizes = starts[small], sizes[small]
    position = np.repeat(run_starts, run_sizes) + _ranks(run_sizes)
    run_end = np.repeat(run_starts + run_sizes, run_sizes)
    for offset in range(1, int(run_sizes.max())):
        first = position[position + offset < run_end]
        yield np.stack([order[first], order[first + offset]], axis=1)


def _pairs_in_large_runs(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> Iterator[np.ndarray]:
    for start, size in zip(starts[sizes > SMALL_RUN], sizes[sizes > SMALL_RUN], strict=True):
        members = order[start : start + size]
        first, second = np.triu_indices(size, k=1)
        yield np.stack([members[first], members[second]], axis=1)


def _in_steps(pieces: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """The pieces concatenated into arrays of about MAX_PAIRS_PER_STEP pairs (bounded memory)."""
    chunk: list[np.ndarray] = []
    pending = 0
    for piece in pieces:
        chunk.append(piece)
        pending += len(piece)
        if pending >= MAX_PAIRS_PER_STEP:
            yield np.concatenate(chunk)
            chunk, pending = [], 0
    if chunk:
        yield np.concatenate(chunk)


def _ranks(sizes: np.ndarray) -> np.ndarray:
    """0, 1, ..., size - 1 for each size, concatenated."""
    total = int(sizes.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)


# -- multi-index candidates that grow about linearly ------------------------------------------------
# A bucket of one band value holds about n / 2^width unrelated hashes, so comparing all its pairs
# costs n^2 / 2^width: quadratic once n passes 2^width (8,192 for radius 4's 13-bit bands). Inside
# each bucket the hashes are keyed again on blocks of *other* bits: a pair within R bits on those
# bits has, split into m blocks, some block within floor(R / m) bits (pigeonhole), so looking up
# each block's value and its values with up to that many bits flipped (multi-probe) finds every
# such pair. The two keys together are 20-30 bits wide, a bucket holds O(1) unrelated hashes, and
# the number of blocks and flips is chosen from the buckets' measured size, so the work per hash
# stays nearly flat as n grows. Nothing is lost: the result is a superset of the one-level
# candidates that can pass verification.
# Relative costs, from profiles at 0.7M and 7.3M faces (2026-12-06/07): a hash's share of sorting one
# block about 45-100 ns, one probe 60 ns a hash by binary search (a pass over the block's hashes and
# a search for half of them) or 35 ns through a direct table (``_run_finder``), one candidate pair
# (expanded, gathered, verified) 70-150 ns.
SORT_COST = 1.0
QUERY_COST = 0.6
TABLE_QUERY_COST = 0.35
CANDIDATE_COST = 1.5
MAX_BLOCK_BITS = 32  # the widest block: a block value sits beside its bucket's number in one int64
MAX_TABLE_BITS = 25  # a direct table of run numbers up to 2^25 int32 entries: 128 MB


def probe_plan(
    sub_bits: int, sub_radius: int, sharing: float, max_width: int = MAX_BLOCK_BITS, key_bits: int = 0
) -> tuple[int, int]:
    """(blocks, flips) for sub-keys of ``sub_bits`` bits within ``sub_radius``: the split with the
    least estimated work per hash when each hash shares its first-level key (``key_bits`` wide)
    with ``sharing`` others.

    Any split with blocks * (flips + 1) > sub_radius finds every pair; wider blocks mean fewer
    unrelated hashes per block value but more probes (C(width, k) values within k bits)."""
    best: tuple[float, int, int] | None = None
    fewest = max(1, -(-sub_bits // max_width))
    # More blocks than sub_radius + 1 would only narrow them: with that many one is already exact.
    for blocks in range(fewest, max(fewest, min(sub_radius + 1, sub_bits)) + 1):
        flips = sub_radius // blocks
        width = -(-sub_bits // blocks)  # the widest block
        within = sum(math.comb(width, k) for k in range(flips + 1))  # block values a probe reaches
        probes = within - 1  # block values within 1..flips bits: a pass over the block each
        candidates = sharing * within / 2**width / 2
        query = TABLE_QUERY_COST if key_bits + width <= MAX_TABLE_BITS else QUERY_COST
        cost = blocks * (SORT_COST + query * probes + CANDIDATE_COST * candidates)
        if best is None or cost < best[0]:
            best = (cost, blocks, flips)
    assert best is not None  # the range above is never empty
    return best[1], best[2]


def sub_keyed_pairs(
    keys: np.ndarray, key_bits: int, sub_hashes: np.ndarray, sub_bits: int, sub_radius: int
) -> Iterator[np.ndarray]:
    """Candidate pairs of positions: every pair with equal ``keys`` (values of ``key_bits`` bits)
    whose ``sub_hashes`` (their low ``sub_bits`` bits) differ in at most ``sub_radius`` bits, and
    some others (verify them). In chunks of about MAX_PAIRS_PER_STEP pairs; a pair may come twice."""
    keys = np.asarray(keys, np.int64)
    if sub_bits <= 0 or sub_radius >= sub_bits:
        yield from bucket_pairs(keys)
        return
    ordered, order = _sorted_with_order(keys.view(np.uint64), key_bits)
    starts, sizes = _runs(ordered)
    in_shared = np.repeat(sizes > 1, sizes)  # a hash alone in its bucket pairs with nothing
    shared = order[in_shared]
    if len(shared) < 2:
        return
    # The shared buckets numbered densely: a partition holds a few of a band's values, so its keys
    # need fewer bits than the band, and the block tables below are that much smaller.
    shared_sizes = sizes[sizes > 1]
    bucket = np.repeat(np.arange(len(shared_sizes), dtype=np.uint64), shared_sizes)
    key_bits = max(1, (len(shared_sizes) - 1).bit_length())
    sharing = float((shared_sizes.astype(np.float64) ** 2).sum() / len(shared) - 1)
    blocks, flips = probe_plan(sub_bits, sub_radius, sharing, min(MAX_BLOCK_BITS, 63 - key_bits), key_bits)
    sub = np.asarray(sub_hashes, np.int64)[shared].view(np.uint64)
    base, extra = divmod(sub_bits, blocks)
    low = 0
    for block in range(blocks):
        width = base + (1 if block < extra else 0)
        block_values = (sub >> np.uint64(low)) & np.uint64((1 << width) - 1)
        low += width
        ordered, order = _sorted_with_order((bucket << np.uint64(width)) | block_values, key_bits + width)
        starts, sizes = _runs(ordered)
        for pairs in _pairs_within_runs(order, starts, sizes):
            yield shared[pairs]
        if not flips:
            continue
        find_run = _run_finder(ordered[starts], key_bits + width)
        for mask in _flip_masks(width, flips):
            top = np.uint64(1 << (int(mask).bit_length() - 1))
            # From the side whose top flipped bit is 0 only: each pair is probed once.
            asking = np.flatnonzero((ordered & top) == 0)
            found = find_run(ordered[asking] ^ mask)
            hit = found >= 0
            found = found[hit]
            for pairs in _expand(order[asking[hit]], starts[found], sizes[found], order):
                yield shared[pairs]


def _run_finder(distinct: np.ndarray, value_bits: int) -> Callable[[np.ndarray], np.ndarray]:
    """A function giving, for each wanted value, the number of its run in the sorted ``distinct``
    values, or -1 where none has it. Probes are most of the face kind's work at 10M faces: a binary
    search costs a cache miss per level over arrays of millions, so keys narrow enough to address
    directly (a band and a block: about 24 bits) are looked up in a table, one read a probe."""
    if value_bits > MAX_TABLE_BITS:

        def search(wanted: np.ndarray) -> np.ndarray:
            found = np.minimum(np.searchsorted(distinct, wanted), len(distinct) - 1)
            return np.where(distinct[found] == wanted, found, -1)

        return search
    table = np.full(1 << value_bits, -1, np.int32)
    table[distinct.astype(np.int64)] = np.arange(len(distinct), dtype=np.int32)
    return lambda wanted: table[wanted]


def _sorted_with_order(values: np.ndarray, value_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``values`` sorted and the positions they came from. When the positions fit beside the values
    in 64 bits they are packed below them and sorted together: a plain sort is about twice as fast
    as an argsort, and the sorts are most of this index's time."""
    values = np.asarray(values, np.uint64)
    position_bits = max(1, (len(values) - 1).bit_length())
    if value_bits + position_bits > 64:
        order = np.argsort(values)
        return values[order], order
    packed = np.sort((values << np.uint64(position_bits)) | np.arange(len(values), dtype=np.uint64))
    return packed >> np.uint64(position_bits), (packed & np.uint64((1 << position_bits) - 1)).astype(np.int64)


def _flip_masks(width: int, flips: int) -> Iterator[np.uint64]:
    """Every mask of 1 to ``flips`` bits within ``width`` bits."""
    for count in range(1, flips + 1):
        for bits in itertools.combinations(range(width), count):
            yield np.uint64(sum(1 << b for b in bits))


def _expand(askers: np.ndarray, starts: np.ndarray, sizes: np.ndarray, order: np.ndarray) -> Iterator[np.ndarray]:
    """Pairs (asker, each member of its matched run), in chunks of about MAX_PAIRS_PER_STEP."""
    ends = np.cumsum(sizes)
    begin = 0
    while begin < len(askers):
        stop = int(np.searchsorted(ends, (ends[begin - 1] if begin else 0) + MAX_PAIRS_PER_STEP, side="right"))
        stop = max(stop, begin + 1)
        part = slice(begin, stop)
        counts = sizes[part]
        members = np.repeat(starts[part], counts) + _ranks(counts)
        yield np.stack([np.repeat(askers[part], counts), order[members]], axis=1)
        begin = stop


def hamming_pairs(hashes: np.ndarray, radius: int, bands: int | None = None) -> np.ndarray:
    """Pairs of positions whose 64-bit hashes differ in at most ``radius`` bits.

    With ``radius + 1`` bands (the default) every such pair is found. Fewer, wider bands find a
    pair only when one band has none of its differing bits (most pairs well inside the radius),
    for far fewer candidates: the cost of a large radius without comparing nearly all pairs.
    Either way the hashes sharing a band are keyed again on the other bits (``sub_keyed_pairs``),
    which finds the same pairs with work about linear in n."""
    hashes = np.asarray(hashes, np.int64)
    unsigned = hashes.view(np.uint64)
    count = bands or radius + 1
    found = []
    for band, keys in band_keys(hashes, count):
        rest, rest_bits = outside_band(hashes, band, count)
        for pairs in sub_keyed_pairs(keys, 64 - rest_bits, rest, rest_bits, radius):
            distance = np.bitwise_count(np.bitwise_xor(unsigned[pairs[:, 0]], unsigned[pairs[:, 1]]))
            found.append(pairs[distance <= radius])
    return unique_pairs(found)


def face_candidates(
    image_hashes: np.ndarray, face_hashes: np.ndarray, bands: int, face_radius: int
) -> Iterator[np.ndarray]:
    """Candidate pairs for the face kind: faces sharing one of ``bands`` image-pHash bands, keyed
    again on their crop pHash, so that every pair sharing a band whose crops are within
    ``face_radius`` bits is among them (the driver's plan; the partitioned one keys each band's
    records the same way)."""
    for band, keys in band_keys(image_hashes, bands):
        yield from sub_keyed_pairs(keys, band_layout(bands)[band][1], face_hashes, 64, face_radius)


def close_faces(
    pairs: np.ndarray,
    image_hashes: np.ndarray,
    face_hashes: np.ndarray,
    images: np.ndarray,
    image_radius: int,
    face_radius: int,
) -> np.ndarray:
    """Which candidate face pairs the face kind keeps: images within ``image_radius`` bits, crops
    within ``face_radius``, and not two faces of one image."""
    keep = hamming(image_hashes[pairs[:, 0]], image_hashes[pairs[:, 1]]) <= image_radius
    # The image distance first: it drops nearly every candidate, so the rest is checked on few.
    near = pairs[keep]
    keep[keep] = (hamming(face_hashes[near[:, 0]], face_hashes[near[:, 1]]) <= face_radius) & (
        images[near[:, 0]] != images[near[:, 1]]
    )
    return keep


def unique_pairs(pieces: list[np.ndarray]) -> np.ndarray:
    """The distinct pairs of ``pieces``, each as (smaller, larger), sorted."""
    pieces = [p for p in pieces if len(p)]
    if not pieces:
        return np.empty((0, 2), np.int64)
    pairs = np.sort(np.concatenate(pieces), axis=1).astype(np.int64, copy=False)
    if pairs.min() < 0 or pairs.max() >= 2**31:
        return np.unique(pairs, axis=0)
    # Packed into one int64 each: a plain unique is several times faster than one over rows.
    packed = np.unique((pairs[:, 0] << 32) | pairs[:, 1])
    return np.stack([packed >> 32, packed & 0xFFFFFFFF], axis=1)


def lsh_bits(n: int) -> int:
    """Bits per table so that a bucket holds about 16 rows: candidates grow with n, not n^2."""
    return int(min(20, max(6, round(np.log2(max(n, 2) / 16)))))


def identity_lsh_bits(n: int) -> int:
    """Bits per table for the identity kind: its low threshold needs fewer bits, so that pairs of
    one identity (cosine 0.5 and up) share a bucket in some table."""
    return min(8, lsh_bits(n))


def lsh_planes(dim: int, tables: int, bits: int, seed: int = 0) -> list[np.ndarray]:
    """The random hyperplanes of each table: the one definition that the driver's plan and the
    partitioned one share, so that both put a face into the same buckets."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((dim, bits)).astype(np.float32) for _ in range(tables)]


def lsh_keys(vectors: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """Each vector's bucket in one table: a bit per hyperplane, set on its positive side."""
    # In float64: the partitioned plan projects each shard on its own, and a float32 product's last
    # bit may depend on how the matrix is blocked; a sign must not.
    projected = np.asarray(vectors, np.float64) @ planes.astype(np.float64)
    return (projected > 0).astype(np.int64) @ (1 << np.arange(planes.shape[1], dtype=np.int64))


def similar_in_buckets(keys: np.ndarray, vectors: np.ndarray, threshold: float) -> Iterator[np.ndarray]:
    """Pairs of positions sharing a key whose vectors have cosine >= threshold, in chunks."""
    for pairs in bucket_pairs(keys):
        # Verify in slices: gathering both vectors of 4M pairs at once would take 4 GB.
        for start in range(0, len(pairs), VERIFY_SLICE):
            part = pairs[start : start + VERIFY_SLICE]
            similarity = np.einsum("ij,ij->i", vectors[part[:, 0]], vectors[part[:, 1]])
            yield part[similarity >= threshold]


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
    found = []
    for planes in lsh_planes(vectors.shape[1], tables, bits, seed):
        found.extend(similar_in_buckets(lsh_keys(vectors, planes), vectors, threshold))
    return unique_pairs(found)


def star_forest(pairs: np.ndarray) -> np.ndarray:
    """A spanning forest of the components over ``pairs``: (smallest member, member) for every
    other member of each, so a component of k items takes k - 1 edges however many pairs it had."""
    if not len(pairs):
        return np.empty((0, 2), np.int64)
    items, local = np.unique(pairs, return_inverse=True)
    labels = connected_components(local.reshape(-1, 2), len(items))
    others = np.flatnonzero(labels != np.arange(len(items)))
    return np.stack([items[labels[others]], items[others]], axis=1)


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
