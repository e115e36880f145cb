"""Detection benchmark: faces/s per core inside the detect stage versus a bare loop.

The same images go through each available detector in a bare loop (decoded beforehand, then
detector.detect per image, one core) and inside `facecap detect` (one worker: tar reads, decode,
detect, policy, crops encoded, Parquet and tar writes, Ray). The stage runs with every face kept
(score >= 0.5, any size) and no crops, the default crops or all four, and once with the stage's
defaults (the FaceCaption-15M policy and default crops). Both sides detect at the same threshold,
so they find the same faces; the overhead is the stage's extra time over the bare loop's, and
faces/s counts detections. The target for YuNet is at most 15% over the bare loop.

BENCH_DETECTORS (comma-separated registry names) picks detectors; BENCH_RUNS (comma-separated:
nocrops, crops, allcrops, defaults) picks stage runs; BENCH_REPEATS (default 1) repeats bare loop
and stage runs interleaved and keeps each one's best, because this machine's speed drifts by 10%
and more over minutes; the overhead of each repeat (against the bare loop just before it) is
printed too.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from common import machine

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench-out" / "detect"
SHARED = Path(os.environ.get("FACECAP_SHARED", REPO.parent / "shared"))
COPIES = int(os.environ.get("BENCH_COPIES", "2"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "1"))
EVERY_FACE = ["--min-score", "0.5", "--min-face-side", "0"]
# label -> the stage's extra arguments: every face kept with no crops (boxes and landmarks only),
# the default two (square 512 and aligned 112) or all four; then the stage's own defaults.
RUNS = {
    "every face, no crops": [*EVERY_FACE, "--set", "detect.crops=[]"],
    "every face, default crops": [*EVERY_FACE, "--set", "detect.crops=[square,aligned112]"],
    "every face, all 4 crops": [*EVERY_FACE, "--set", "detect.crops=[box,square,aligned,aligned112]"],
    "stage defaults": [],
}
# BENCH_RUNS picks stage runs by these names (default: all).
RUN_NAMES = dict(zip(("nocrops", "crops", "allcrops", "defaults"), RUNS, strict=True))
DETECTORS = (
    ("yunet", "yunet-int8"),
    ("yunet", "yunet"),
    ("scrfd", "scrfd-500m"),
    ("scrfd", "scrfd-2.5g"),
    ("retinaface", "retinaface-mnet025"),
)


def chosen_runs() -> dict[str, list[str]]:
    names = [n.strip() for n in os.environ.get("BENCH_RUNS", "").split(",") if n.strip()]
    unknown = [n for n in names if n not in RUN_NAMES]
    if unknown:
        sys.exit(f"BENCH_RUNS: unknown {', '.join(unknown)} (choose from {', '.join(RUN_NAMES)})")
    return {RUN_NAMES[n]: RUNS[RUN_NAMES[n]] for n in names} if names else RUNS


def photos() -> list[Path]:
    folder = SHARED / "data" / "faces"
    found = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png") and "nonface" not in p.parts
    )
    if not found:
        sys.exit(f"no photos under {folder}: set FACECAP_SHARED")
    return found


def build_img2dataset_folder(folder: Path, files: list[Path]) -> list[bytes]:
    """One img2dataset-style shard of JPEGs, so the stage reads exactly these bytes."""
    folder.mkdir(parents=True)
    datas, keys = [], []
    for copy in range(COPIES):
        for i, path in enumerate(files):
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                continue
            datas.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes())
            keys.append(f"{copy:03d}{i:06d}")
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key, data in zip(keys, datas, strict=True):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(
        pa.table(
            {
                "key": keys,
                "url": [f"http://bench.invalid/{k}.jpg" for k in keys],
                "caption": keys,
                "status": ["success"] * len(keys),
            }
        ),
        folder / "00000.parquet",
    )
    return datas


def bare_loop(detector_kind: str, model: Path, datas: list[bytes]) -> tuple[float, int]:
    from facecap.stages.detect.detectors import make_detector

    # One core, like one stage worker (Ray sets OMP_NUM_THREADS=1; the stage passes it on).
    os.environ["OMP_NUM_THREADS"] = "1"
    cv2.setNumThreads(1)

    detector = make_detector(detector_kind, model, threshold=0.5, max_side=640, use_gpu=False)  # the stage default
    images = [cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR) for d in datas]
    started = time.perf_counter()
    faces = sum(len(detector.detect(image)) for image in images)
    return time.perf_counter() - started, faces


def in_stage(detector_kind: str, model: str, label: str, extra: list[str]) -> tuple[float, float, int]:
    """Shard seconds, wall seconds and faces kept of one `facecap detect` run."""
    out = OUT / f"stage-{label}"
    shutil.rmtree(out, ignore_errors=True)
    facecap = str(Path(sys.executable).with_name("facecap"))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "FACECAP_MODELS": str(SHARED / "models"),
    }
    started = time.perf_counter()
    subprocess.run(
        [
            facecap,
            "detect",
            str(OUT / "ingest"),
            str(out),
            "-q",
            "--detector",
            detector_kind,
            "--model",
            model,
            "--set",
            "ray.num_cpus=2",
            *extra,
        ],
        env=env,
        check=True,
    )
    wall = time.perf_counter() - started
    stats = [json.loads(p.read_text()) for p in (out / "_stats").glob("part-*.json")]
    faces = sum(s["by_status"].get("ok", 0) for s in stats)
    return sum(s["seconds"] for s in stats), wall, faces


def main() -> None:
    from facecap.pipeline import models

    runs = chosen_runs()  # a typo fails before the images are built

    shutil.rmtree(OUT, ignore_errors=True)
    files = photos()
    datas = build_img2dataset_folder(OUT / "images", files)
    facecap = str(Path(sys.executable).with_name("facecap"))
    subprocess.run(
        [facecap, "ingest", str(OUT / "images"), str(OUT / "ingest"), "-q", "--executor", "local"], check=True
    )
    os.environ["FACECAP_MODELS"] = str(SHARED / "models")
    wanted = [n for n in os.environ.get("BENCH_DETECTORS", "").split(",") if n]
    print(f"machine: {machine()}")
    print(f"images: {len(datas)} JPEGs ({len(files)} fixture photos x {COPIES}), one worker (one core)")
    print(f"best of {REPEATS} interleaved run(s) of the bare loop and of each stage run")
    print(f"{'detector':<20}{'run':<28}{'faces/s':>9}{'overhead':>10}{'kept':>6}  seconds (all runs) [overhead each]")
    for kind, name in DETECTORS:
        if wanted and name not in wanted:
            continue
        try:
            path = models.resolve(name)
        except models.ModelMissing as missing:
            print(f"{name:<20}skipped: {missing}")
            continue
        times: dict[str, list[float]] = {label: [] for label in ("bare loop", *runs)}
        kept: dict[str, int] = {}
        for _ in range(REPEATS):
            bare_seconds, faces = bare_loop(kind, path, datas)
            times["bare loop"].append(bare_seconds)
            kept["bare loop"] = faces
            for label, extra in runs.items():
                seconds, _, kept[label] = in_stage(kind, name, f"{name}-{list(RUNS).index(label)}", extra)
                times[label].append(seconds)
        bare = min(times["bare loop"])
        for label, seconds in times.items():
            best = min(seconds)
            overhead = "" if label == "bare loop" else f"{100 * (best / bare - 1):.0f}%"
            runs_text = ", ".join(f"{t:.1f}" for t in seconds)
            if label != "bare loop":
                each = (f"{100 * (t / b - 1):.0f}%" for t, b in zip(seconds, times["bare loop"], strict=True))
                runs_text += f" [{', '.join(each)}]"
            print(f"{name:<20}{label:<28}{faces / best:>9.1f}{overhead:>10}{kept[label]:>6}  {runs_text}")
    print(
        "faces/s: the bare loop's detections per second (both sides find the same faces); overhead: the stage's"
        " extra time (tar read, decode, policy, crops, writes) over the bare loop's; kept: face rows with status ok"
    )


if __name__ == "__main__":
    main()
