"""At what resolution text and NSFW detection agree with full resolution, on ../shared/data/faces.

`python bench/eval_quality_resolution.py` (one core: OMP_NUM_THREADS=1). Every readable fixture
photo is scored at its own size (the reference) and shrunk to several long sides. The fixtures
carry no text and nothing explicit (images.csv labels neither), so:

- text: each photo as is, and with a three-line caption band drawn in (bench/eval_quality.py's),
  so both sides of the rule exist; agreement of the decision at `q_text_fraction < 0.05` (the HQ
  recipe) and at 0.02, and how far the score moves; and with a block of small print (a screenshot
  or a flyer: lines 2% of the image's width high over its top third), which a shrink loses first;
- NSFW: the explicit score (`q_nsfw`) and its decision at 0.5 (the default rule), and, because no
  photo here comes near 0.5, the same for every NudeNet class (faces, covered body parts, ...):
  whether the detector finds the same things at the same confidence.

Prints one line per resolution with the agreement and the milliseconds an image; `text` or `nsfw`
as an argument runs one part, TEXT_SIDES=full,960,640 picks the text sides.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import csv
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(Path(__file__).parent))
from eval_quality import SHARED, with_caption_band  # noqa: E402

TEXT_SIDES = tuple(
    None if s == "full" else int(s) for s in os.environ.get("TEXT_SIDES", "full,1280,960,640,480,384,320").split(",")
)
NSFW_SIDES = (None, 1280, 960, 640, 480, 320)


def photos() -> list[tuple[str, np.ndarray]]:
    with open(SHARED / "images.csv", newline="") as f:
        names = [row["file"] for row in csv.DictReader(f)]
    loaded = [(name, cv2.imread(str(SHARED / name), cv2.IMREAD_COLOR)) for name in names]
    return [(name, image) for name, image in loaded if image is not None]


def timed(function, images: list[np.ndarray]) -> tuple[list, float]:
    started = time.perf_counter()
    results = [function(image) for image in images]
    return results, 1000 * (time.perf_counter() - started) / len(images)


def side_name(side: int | None) -> str:
    return "full" if side is None else f"{side} px"


def with_small_print(image: np.ndarray, height: float = 0.02) -> np.ndarray:
    """The photo with lines of small text (``height`` x the width high) over its top third."""
    out = image.copy()
    rows, width = out.shape[:2]
    scale = width * height / 22  # Hershey simplex capitals are about 22 px high at scale 1
    step = max(2, round(width * height * 1.8))
    for y in range(round(rows * 0.05) + step, round(rows * 0.35), step):
        line = "Terms and conditions apply see store for details"
        cv2.putText(out, line, (10, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), max(1, round(scale * 2)))
    return out


def text(images: list[np.ndarray]) -> None:
    from facecap.stages.quality.scorers import TextDetector

    plain = images
    banded = [with_caption_band(image) for image in images]
    small = [with_small_print(image) for image in images]
    print(f"\ntext (PP-OCRv4): {len(plain)} photos plain + the same with a caption band; reference: full size")
    print(
        f"{'long side':>10}{'ms/image':>10}{'agree <0.05':>13}{'plain':>8}{'banded':>8}{'agree <0.02':>13}"
        f"{'|diff| p95':>12}{'|diff| max':>12}{'plain rejected':>16}{'banded caught':>15}{'small caught':>14}"
    )
    reference = None
    for side in TEXT_SIDES:
        detector = TextDetector(max_side=side)
        scores_plain, ms_plain = timed(detector.text_fraction, plain)
        scores_banded, ms_banded = timed(detector.text_fraction, banded)
        scores_small, _ = timed(detector.text_fraction, small)
        scores = np.array(scores_plain + scores_banded)
        if reference is None:
            reference = scores
        diff = np.abs(scores - reference)
        agree = {t: (scores < t) == (reference < t) for t in (0.05, 0.02)}
        n = len(plain)
        print(
            f"{side_name(side):>10}{(ms_plain + ms_banded) / 2:>10.1f}{agree[0.05].mean():>13.1%}"
            f"{agree[0.05][:n].mean():>8.1%}{agree[0.05][n:].mean():>8.1%}{agree[0.02].mean():>13.1%}"
            f"{np.percentile(diff, 95):>12.4f}{diff.max():>12.4f}"
            f"{np.mean(np.array(scores_plain) >= 0.05):>16.1%}{np.mean(np.array(scores_banded) >= 0.05):>15.1%}"
            f"{np.mean(np.array(scores_small) >= 0.05):>14.1%}"
        )


def nsfw(images: list[np.ndarray]) -> None:
    from facecap.stages.quality.scorers import EXPLICIT, NsfwDetector

    print(f"\nNSFW (NudeNet 320n): {len(images)} photos; reference: the photo at its own size")
    print(
        f"{'long side':>10}{'ms/image':>10}{'q_nsfw agree@0.5':>18}{'|diff| max':>12}"
        f"{'classes agree@0.5':>19}{'class |diff| p99':>18}{'class |diff| max':>18}"
    )
    reference = None
    for side in NSFW_SIDES:
        detector = NsfwDetector(max_side=side)
        found, ms = timed(detector.detections, images)
        classes = sorted({d["class"] for image in found for d in image} | set(EXPLICIT))
        if reference is not None:
            classes = sorted(set(classes) | set(reference[1]))
        table = np.array(
            [[max((d["score"] for d in f if d["class"] == c), default=0.0) for c in classes] for f in found]
        )
        explicit = table[:, [classes.index(c) for c in EXPLICIT]].max(axis=1)
        if reference is None:
            reference = (table, classes, explicit)
        ref_table, ref_classes, ref_explicit = reference
        ref = np.array([[row[ref_classes.index(c)] if c in ref_classes else 0.0 for c in classes] for row in ref_table])
        class_diff = np.abs(table - ref)
        print(
            f"{side_name(side):>10}{ms:>10.1f}{np.mean((explicit >= 0.5) == (ref_explicit >= 0.5)):>18.1%}"
            f"{np.abs(explicit - ref_explicit).max():>12.4f}{np.mean((table >= 0.5) == (ref >= 0.5)):>19.2%}"
            f"{np.percentile(class_diff, 99):>18.4f}{class_diff.max():>18.4f}"
        )
    table, classes, explicit = reference
    print(
        f"  at full size: explicit score max {explicit.max():.3f}; classes found at >= 0.5: "
        f"{', '.join(c for i, c in enumerate(classes) if (table[:, i] >= 0.5).any())}"
    )


def main() -> None:
    images = [image for _, image in photos()]
    sides = np.array([max(image.shape[:2]) for image in images])
    print(
        f"{len(images)} photos, long side median {int(np.median(sides))} px, max {sides.max()} px; "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )
    which = sys.argv[1:] or ["text", "nsfw"]
    if "text" in which:
        text(images)
    if "nsfw" in which:
        nsfw(images)


if __name__ == "__main__":
    main()
