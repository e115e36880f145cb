"""Quality benchmark: faces/s per core for the whole stage, cascade off and on, and each measure alone.

Detects faces in the fixture photos (YuNet, default crops), then runs the quality stage in this
process on one core (OMP_NUM_THREADS=1, as a Ray worker gets) under the rules of the packaged
`default` and `hq` recipes (detect's score rule on YuNet's scale, 0.85, as the recipes advise),
with the cascade off (every measure on every row) and on, alternating, twice each; the faster
run of each counts. The two outputs must give every row the same status. Each measure is also
timed alone over the same faces, text and NSFW at full size and at the stage's default side.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # one core, before OpenCV and onnxruntime start their pools

import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(Path(__file__).parent))
from bench_detect import build_img2dataset_folder, photos  # noqa: E402
from common import machine  # noqa: E402

OUT = REPO / "bench-out" / "quality"


def faces_dataset() -> Path:
    from facecap.pipeline.executors import LocalExecutor
    from facecap.pipeline.runner import run_stage
    from facecap.pipeline.worker import StageJob
    from facecap.stages.detect.stage import DetectConfig, DetectStage
    from facecap.stages.ingest.readers import SourceConfig, open_source
    from facecap.stages.ingest.stage import IngestConfig, IngestStage

    shutil.rmtree(OUT, ignore_errors=True)
    build_img2dataset_folder(OUT / "i2d", photos())
    config = IngestConfig(input=[str(OUT / "i2d")])
    ingest = StageJob(stage_cls=IngestStage, config=config, output=str(OUT / "ingest"))
    run_stage(ingest, LocalExecutor(), source=open_source(SourceConfig(input=config.input)))
    detect = StageJob(
        stage_cls=DetectStage,
        config=DetectConfig(min_face_side=40),
        output=str(OUT / "detect"),
        parent=str(OUT / "ingest"),
    )
    run_stage(detect, LocalExecutor())
    return OUT / "detect"


def stage_rate(detect: Path, name: str, **config) -> tuple[float, int]:
    from facecap.pipeline.dataset import Dataset
    from facecap.pipeline.executors import LocalExecutor
    from facecap.pipeline.runner import run_stage
    from facecap.pipeline.storage import Storage
    from facecap.pipeline.worker import StageJob
    from facecap.stages.quality.stage import QualityConfig, QualityStage

    job = StageJob(stage_cls=QualityStage, config=QualityConfig(**config), output=str(OUT / name), parent=str(detect))
    started = time.perf_counter()
    run_stage(job, LocalExecutor())
    seconds = time.perf_counter() - started
    faces = Dataset(Storage(str(detect))).summary()["by_status"].get("ok", 0)
    return seconds, faces


def recipe_rules(name: str) -> list[dict]:
    """The packaged recipe's quality rules, with detect's score threshold on YuNet's scale."""
    import importlib.resources

    import yaml

    recipe = yaml.safe_load(importlib.resources.files("facecap.configs").joinpath(f"{name}.yaml").read_text())
    rules = recipe["quality"]["rules"]
    return [{**rule, "expr": "det_score >= 0.85"} if rule.get("name") == "min_score" else rule for rule in rules]


def compare(recipe: str, detect: Path) -> None:
    """Cascade off and on under one recipe's rules: faces/s, and that every status is the same."""
    import pyarrow as pa

    from facecap.pipeline.dataset import Dataset
    from facecap.pipeline.storage import Storage

    rules = recipe_rules(recipe)
    best: dict[bool, float] = {}
    for attempt in range(2):
        for cascade in (False, True):
            seconds, faces = stage_rate(detect, f"{recipe}-{cascade}-{attempt}", rules=rules, cascade=cascade)
            best[cascade] = min(best.get(cascade, float("inf")), seconds)
    outputs = {}
    for cascade in (False, True):
        dataset = Dataset(Storage(str(OUT / f"{recipe}-{cascade}-0")))
        table = pa.concat_tables([dataset.read_shard(i) for i in dataset.shard_indices()])
        outputs[cascade] = table.to_pandas().set_index("key").sort_index()
    off, on = outputs[False], outputs[True]
    same = off.index.equals(on.index) and (off.status == on.status).all()
    judged = on[on.status.eq("ok") | on.status.str.startswith("quality:")]
    skipped = {
        name: int(judged.quality_skipped.map(lambda names, n=name: n in names).sum()) for name in ("text", "nsfw")
    }
    print(f"\n{recipe} recipe's rules: {', '.join(r['name'] for r in rules)}")
    print(f"  {faces} faces, {int((on.status == 'ok').sum())} ok; same status on every row: {'yes' if same else 'NO'}")
    print(f"  with the cascade on, faces not given text / NSFW detection: {skipped['text']} / {skipped['nsfw']}")
    print(f"  cascade off (every measure on every row) {faces / best[False]:8.1f} faces/s")
    print(f"  cascade on                               {faces / best[True]:8.1f} faces/s")
    print(f"  speedup                                  {best[False] / best[True]:8.2f}x")


def per_measure(detect: Path) -> list[tuple[str, float, int]]:
    """Seconds and items for each measure alone over the stored crops and images."""
    from facecap.pipeline.dataset import Dataset, TarShardReader
    from facecap.pipeline.storage import Storage
    from facecap.stages.quality import measures
    from facecap.stages.quality.scorers import Brisque, NsfwDetector, TextDetector, cartoon_score
    from facecap.stages.quality.stage import NSFW_SIDE, TEXT_SIDE
    from facecap.stages.shared.geometry import head_pose

    dataset = Dataset(Storage(str(detect)))
    rows = dataset.read_shard(0).to_pandas()
    rows = rows[rows.status == "ok"]
    with TarShardReader(Storage(str(detect)), "part-00000.tar") as tar:
        crops = [cv2.imdecode(np.frombuffer(tar.get(k)["aligned112.jpg"], np.uint8), 1) for k in rows.key]
    with TarShardReader(Storage(str(OUT / "i2d")), "00000.tar") as tar:
        images = {k: cv2.imdecode(np.frombuffer(tar.get(k)["jpg"], np.uint8), 1) for k in set(rows.image_key)}
    timings = []

    def timed(name: str, items, function) -> None:
        started = time.perf_counter()
        for item in items:
            function(item)
        timings.append((name, time.perf_counter() - started, len(items)))

    boxes = [np.asarray(b, np.float32) for b in rows.box]
    timed("sharpness (per face)", crops, measures.sharpness)
    timed("exposure (per face)", crops, measures.exposure)
    timed("pose (per face)", [np.asarray(lm, np.float32).reshape(5, 2) for lm in rows.landmarks], head_pose)
    timed("colour (per image)", list(images.values()), measures.channel_spread)
    brisque, text, nsfw = Brisque(), TextDetector(TEXT_SIDE), NsfwDetector(NSFW_SIDE)
    timed("BRISQUE (per face)", crops, brisque.score)
    faces = []
    for box, key in zip(boxes, rows.image_key, strict=True):
        x1, y1, x2, y2 = (max(0, int(v)) for v in box)
        faces.append(images[key][y1:y2, x1:x2])
    timed("cartoon (per face)", [f for f in faces if f.size], cartoon_score)
    timed(f"text PP-OCRv4, {TEXT_SIDE or 'full'} px (per image)", list(images.values()), text.text_fraction)
    timed("text PP-OCRv4, full size (per image)", list(images.values()), TextDetector(None).text_fraction)
    timed(f"NSFW NudeNet, {NSFW_SIDE or 'full'} px (per image)", list(images.values()), nsfw.nsfw_score)
    timed("NSFW NudeNet, full size (per image)", list(images.values()), NsfwDetector(None).nsfw_score)
    return timings


def main() -> None:
    detect = faces_dataset()
    print(f"machine: {machine()}; one core (OMP_NUM_THREADS=1), in-process")
    for recipe in ("default", "hq"):
        compare(recipe, detect)
    print(f"\n{'measure alone':<40}{'items/s':>10}{'ms/item':>10}")
    for name, seconds, items in per_measure(detect):
        print(f"{name:<40}{items / seconds:>10.1f}{1000 * seconds / items:>10.2f}")


if __name__ == "__main__":
    main()
