"""Ingest benchmark: a LAION-like parquet of 1M URLs through `facecap ingest` on local Ray.

Prints rows/s, wall time and peak memory (driver alone and the whole process tree, Ray's
daemons and workers included), for a first run and for the no-op rerun.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, run_measured

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
OUT = Path("bench-out/ingest")


def build_input(path: Path, rows: int) -> None:
    """LAION-Face-like columns; 1% repeats, 0.5% invalid URLs."""
    urls = [f"https://i{i % 5003}.example-cdn.com/photos/{i:08d}/face-{i}.jpg?w=640" for i in range(rows)]
    for i in range(7, rows, 100):
        urls[i] = urls[i - 1]
    for i in range(11, rows, 200):
        urls[i] = "javascript:void(0)"
    table = pa.table(
        {
            "SAMPLE_ID": pa.array(range(rows), pa.int64()),
            "URL": urls,
            "TEXT": [f"portrait photo number {i} of a smiling person at an event" for i in range(rows)],
            "HEIGHT": [640] * rows,
            "WIDTH": [480] * rows,
            "LICENSE": ["?"] * rows,
            "NSFW": ["UNLIKELY"] * rows,
            "similarity": [0.32] * rows,
        }
    )
    pq.write_table(table, path, row_group_size=100_000)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    source = OUT / "laion.parquet"
    build_input(source, ROWS)
    facecap = str(Path(sys.executable).with_name("facecap"))
    cmd = [
        facecap,
        "ingest",
        str(source),
        str(OUT / "dataset"),
        "--url-column",
        "URL",
        "--caption-column",
        "TEXT",
        "-q",
    ]
    first = run_measured(cmd)
    if first.returncode != 0:
        sys.exit(f"ingest failed:\n{first.output}")
    again = run_measured(cmd)
    print(f"machine: {machine()}")
    print(f"ingest of {ROWS:,} LAION-like rows (shard size 10,000, local Ray)")
    print(f"{'run':<10}{'seconds':>10}{'rows/s':>12}{'driver MB':>12}{'tree MB':>10}")
    for label, m in (("first", first), ("rerun", again)):
        print(
            f"{label:<10}{m.seconds:>10.1f}{ROWS / m.seconds:>12,.0f}{m.peak_main_rss_mb:>12.0f}"
            f"{m.peak_tree_rss_mb:>10.0f}"
        )


if __name__ == "__main__":
    main()
