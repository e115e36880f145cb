"""Detection benchmark: faces/s per core inside the detect stage versus a bare loop.

The same decoded images go through each available detector twice: in a bare loop (decode once,
then detector.detect per image, one core) and inside `facecap detect` (one worker: tar reads,
decode, detect, policy, four crops encoded, Parquet and tar writes, Ray). The difference is the
stage's overhead; the target for YuNet is at most 15% over the bare loop.
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
# No crops (boxes and landmarks only), the default two (square 512 and aligned 112), and all four.
CROP_SETS = ("[]", "[square,aligned112]", "[box,square,aligned,aligned112]")


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
    from stages.lib.detectors import make_detector

    # One core, like one stage worker (Ray sets OMP_NUM_THREADS=1; the stage passes it on).
    os.environ["OMP_NUM_THREADS"] = "1"
    cv2.setNumThreads(1)

    detector = make_detector(detector_kind, model, threshold=0.5, max_side=640, use_gpu=False)  # the stage default
    images = [cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR) for d in datas]
    started = time.perf_counter()
    faces = sum(len(detector.detect(image)) for image in images)
    return time.perf_counter() - started, faces


def in_stage(detector_kind: str, model: str, label: str, crops: str) -> tuple[float, float, int]:
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
            "--min-score",
            "0.5",
            "--min-face-side",
            "0",
            "--set",
            "ray.num_cpus=2",
            "--set",
            f"detect.crops={crops}",
        ],
        env=env,
        check=True,
    )
    wall = time.perf_counter() - started
    stats = [json.loads(p.read_text()) for p in (out / "_stats").glob("part-*.json")]
    faces = sum(s["by_status"].get("ok", 0) for s in stats)
    return sum(s["seconds"] for s in stats), wall, faces


def main() -> None:
    from pipeline import models

    shutil.rmtree(OUT, ignore_errors=True)
    files = photos()
    datas = build_img2dataset_folder(OUT / "images", files)
    facecap = str(Path(sys.executable).with_name("facecap"))
    subprocess.run(
        [facecap, "ingest", str(OUT / "images"), str(OUT / "ingest"), "-q", "--executor", "local"], check=True
    )
    os.environ["FACECAP_MODELS"] = str(SHARED / "models")
    print(f"machine: {machine()}")
    print(f"images: {len(datas)} JPEGs ({len(files)} fixture photos x {COPIES}), one worker (one core)")
    print(f"{'detector':<22}{'bare faces/s':>13}{'stage faces/s':>14}{'overhead':>10}{'faces':>7}{'wall s':>8}")
    for kind, name in (
        ("yunet", "yunet-int8"),
        ("yunet", "yunet"),
        ("scrfd", "scrfd-500m"),
        ("scrfd", "scrfd-2.5g"),
        ("retinaface", "retinaface-mnet025"),
    ):
        try:
            path = models.resolve(name)
        except models.ModelMissing as missing:
            print(f"{name:<22} skipped: {missing}")
            continue
        bare_seconds, bare_faces = bare_loop(kind, path, datas)
        bare_rate = bare_faces / bare_seconds
        for crops in CROP_SETS:
            stage_seconds, wall, stage_faces = in_stage(kind, name, f"{name}-{len(crops)}", crops)
            stage_rate = stage_faces / stage_seconds
            print(
                f"{name:<22}{bare_rate:>13.1f}{stage_rate:>14.1f}{100 * (bare_rate / stage_rate - 1):>9.0f}%"
                f"{stage_faces:>7}{wall:>8.1f}  {crops}"
            )
    print("overhead = extra time per face in the stage (tar read, decode, policy, crops, writes) over the bare loop")


if __name__ == "__main__":
    main()
