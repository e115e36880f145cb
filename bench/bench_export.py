"""Export throughput (`make bench-export`): `facecap export --format webdataset` of FaceCaption-like
40 KB crops, samples/s per core, beside its floor, `tar` writing the same bytes.

Writes a finished dataset of EXPORT_ROWS rows (default 100,000, about 70% ok faces) with
bench/scale_data.py and crops of about 40 KB (SCALE_CROP_SIDE=320), then times, one after the other
and EXPORT_RUNS times (default 2) each:

- ``facecap export DATA OUT --format webdataset`` (the default executor: a process pool of every
  core), with the peak RSS of the driver and of its largest worker;
- the floor: ``tar -cf`` of the export's own tars into one file (the same bytes read and written
  once, by one process).

Prints samples/s per core for each and their ratio; results also go to bench-out/export/results.json.
EXPORT_DIR sets where the data goes (default bench-out/export).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("SCALE_CROP_SIDE", "320")  # before scale_data reads it
sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import FACECAP, folder_bytes, measured
from common import machine
from scale_data import write_dataset

REPO = Path(__file__).resolve().parent.parent
ROWS = int(os.environ.get("EXPORT_ROWS", "100000"))
RUNS = int(os.environ.get("EXPORT_RUNS", "2"))
ROOT = Path(os.environ.get("EXPORT_DIR", REPO / "bench-out" / "export"))


def main() -> None:
    cores = os.cpu_count() or 1
    print(f"machine: {machine()}; {ROWS:,} rows, crops of {os.environ['SCALE_CROP_SIDE']} px")
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    data = ROOT / "data"
    generated = write_dataset(str(data), ROWS, 10_000, workers=min(2, cores))
    samples = generated["ok"]
    print(f"dataset: {samples:,} ok samples, {folder_bytes(data) / 2**30:.2f} GiB")
    results: dict = {"rows": ROWS, "samples": samples, "cores": cores, "export": [], "floor": []}
    for run in range(RUNS):
        out = ROOT / "out"
        shutil.rmtree(out, ignore_errors=True)
        step = measured([FACECAP, "export", str(data), str(out), "--format", "webdataset", "-q"])
        step.pop("output")
        step["bytes"] = folder_bytes(out)
        results["export"].append(step)
        tars = sorted(p.name for p in out.glob("*.tar"))
        started = time.perf_counter()
        subprocess.run(["tar", "-cf", str(ROOT / "floor.tar"), "-C", str(out), *tars], check=True)
        floor = time.perf_counter() - started
        results["floor"].append({"seconds": floor, "bytes": (ROOT / "floor.tar").stat().st_size})
        (ROOT / "floor.tar").unlink()
        rate = samples / step["seconds"] / cores
        print(
            f"run {run + 1}: export {step['seconds']:.1f} s ({rate:,.0f} samples/s per core, "
            f"driver {step['driver_mb']:,.0f} MB, largest worker {step['child_mb']:,.0f} MB, "
            f"{step['bytes'] / 2**30:.2f} GiB); tar floor {floor:.1f} s ({samples / floor:,.0f} samples/s, one process)"
        )
    best = min(r["seconds"] for r in results["export"])
    floor = min(r["seconds"] for r in results["floor"])
    print(
        f"best: export {samples / best / cores:,.0f} samples/s per core on {cores} cores; "
        f"tar {samples / floor:,.0f} samples/s on one; export takes {best * cores / floor:.1f}x tar's core time"
    )
    (ROOT / "results.json").write_text(json.dumps(results, indent=1))
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(ROOT / "out", ignore_errors=True)


if __name__ == "__main__":
    main()
