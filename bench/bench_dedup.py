"""Dedup benchmark: the stage's grouping (``facecap.stages.dedup.stage.decide``) on synthetic fingerprints.

For n rows: random 64-bit pHashes and 128-d unit embeddings, with 5% planted near-duplicates of
other rows (pHash: 1-3 bits flipped; embedding: cosine about 0.95; the face pHash equal to the
image pHash). Prints time, the peak memory of a fresh process doing that one run (synthetic data
included), recall and precision of the planted pairs,
and the fitted growth exponent of time between sizes (1.0 = linear; n log n over 100k -> 1M is
about 1.2). Sizes: BENCH_DEDUP_SIZES (default "100000,1000000"); 10M is extrapolated on paper.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(Path(__file__).parent))
from common import machine  # noqa: E402

PLANTED = 0.05


def synthetic(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    phashes = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    vectors = rng.standard_normal((n, 128), dtype=np.float32)
    copies = rng.choice(n, size=int(n * PLANTED), replace=False)
    originals = rng.choice(np.setdiff1d(np.arange(n), copies), size=len(copies), replace=True)
    flips = rng.integers(1, 4, size=len(copies))
    for copy, original, count in zip(copies, originals, flips, strict=True):
        value = np.uint64(phashes[original].view(np.uint64))
        for bit in rng.choice(64, size=count, replace=False):
            value ^= np.uint64(1) << np.uint64(bit)
        phashes[copy] = np.array([value], np.uint64).view(np.int64)[0]
    vectors[copies] = vectors[originals] + 0.33 * rng.standard_normal((len(copies), 128)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    frame = pd.DataFrame(
        {
            "key": [f"{i:010d}_f0" for i in range(n)],
            "image_key": [f"{i:010d}" for i in range(n)],
            "face_index": np.zeros(n, np.int64),
            "bytes_hash": rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64),
            "pixel_hash": rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64),
            "url_hash": rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64),
            "phash": phashes,
            "face_phash": phashes,
            "score": rng.random(n),
        }
    )
    return frame, vectors, copies, originals


def measure(n: int, kinds: list[str]) -> dict:
    from facecap.stages.dedup.stage import DedupConfig, decide

    frame, vectors, copies, originals = synthetic(n)
    config = DedupConfig(kinds=kinds)
    started = time.perf_counter()
    decisions = decide(frame, vectors if "embedding" in kinds else None, config, np.empty(0, np.int64))
    seconds = time.perf_counter() - started
    marked = decisions["decision"].to_numpy() != ""
    planted = {(min(c, o), max(c, o)) for c, o in zip(copies, originals, strict=True)}
    found = sum(marked[c] or marked[o] for c, o in planted)  # one of the pair must go
    members = set(np.concatenate([copies, originals]))
    true_marks = sum(1 for i in np.flatnonzero(marked) if i in members)
    return {
        "n": n,
        "seconds": seconds,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "recall": found / len(planted),
        "precision": true_marks / max(1, marked.sum()),
    }


def main() -> None:
    sizes = [int(s) for s in os.environ.get("BENCH_DEDUP_SIZES", "100000,1000000").split(",")]
    print(f"machine: {machine()}; planted near-duplicates: {PLANTED:.0%} of rows")
    for kinds in (["exact", "near"], ["exact", "near", "embedding"]):
        print(f"\nkinds: {', '.join(kinds)}")
        print(f"{'rows':>10}{'seconds':>10}{'peak GB':>9}{'recall':>8}{'precision':>10}")
        results = []
        for n in sizes:
            # A fresh process per size and kind set: its peak memory is that run's alone.
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                result = pool.submit(measure, n, kinds).result()
            results.append(result)
            print(
                f"{n:>10,}{result['seconds']:>10.1f}{result['peak_gb']:>9.2f}"
                f"{result['recall']:>8.3f}{result['precision']:>10.3f}"
            )
        if len(results) >= 2:
            a, b = results[0], results[-1]
            exponent = math.log(b["seconds"] / a["seconds"]) / math.log(b["n"] / a["n"])
            ten_million = b["seconds"] * (1e7 / b["n"]) ** exponent
            print(f"fitted growth: time ~ n^{exponent:.2f}; 10M rows on paper: about {ten_million / 60:.0f} min")


if __name__ == "__main__":
    main()
