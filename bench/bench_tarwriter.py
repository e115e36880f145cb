"""Tar writing: facecap's writer (pipeline/dataset.py: SpooledTar over tar_member_pieces) against
webdataset's TarWriter on the same samples, as the export writes them (a ~40 KB JPEG crop, its
caption and ~1.5 KB of JSON per sample), into a file. Prints samples/s and MB/s, best of 3.

BENCH_TAR_SAMPLES sets the number of samples (default 3000, about 125 MB of tar).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(Path(__file__).parent))
from common import machine  # noqa: E402

from facecap.pipeline.dataset import SpooledTar  # noqa: E402


def samples(count: int) -> list[tuple[str, dict[str, bytes]]]:
    rng = np.random.default_rng(0)
    meta = {"box": [10.5, 20.25, 200.0, 260.75], "landmarks": [[1.0, 2.0]] * 5, "caption": ["a face"] * 3}
    meta.update({f"attribute_{i}": float(i) / 7 for i in range(60)})
    text = json.dumps(meta).encode()
    out = []
    for i in range(count):
        jpeg = rng.integers(0, 256, int(rng.integers(30_000, 50_000)), dtype=np.uint8).tobytes()
        out.append((f"{i:010d}", {"jpg": jpeg, "txt": b"A middle-aged person with short hair.", "json": text}))
    return out


def facecap_writer(items, path: str) -> None:
    spool = SpooledTar()
    try:
        for key, members in items:
            spool.add(key, members)
        with open(path, "wb") as stream:
            spool.write_sorted(stream)
    finally:
        spool.close()


def webdataset_writer(items, path: str) -> None:
    with wds.TarWriter(path) as writer:
        for key, members in items:
            writer.write({"__key__": key, **members})


def best_of(function, items, path: str, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function(items, path)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    count = int(os.environ.get("BENCH_TAR_SAMPLES", "3000"))
    items = samples(count)
    print(machine())
    with tempfile.TemporaryDirectory(prefix="facecap-bench-tar-") as folder:
        for name, function in (("facecap SpooledTar", facecap_writer), ("webdataset TarWriter", webdataset_writer)):
            path = os.path.join(folder, f"{name.split()[0]}.tar")
            seconds = best_of(function, items, path)
            size = os.path.getsize(path) / 1e6
            print(f"{name:22s} {count / seconds:10,.0f} samples/s {size / seconds:8,.0f} MB/s ({size:,.0f} MB tar)")


if __name__ == "__main__":
    main()
